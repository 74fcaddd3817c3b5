"""The families of tests/tiny_families.py through parallelize(): several calls per step, two denoisers, PAG, priors.

For every family the reference schedule with W >= T equals the unwrapped pipeline exactly (warm-up
counts inference steps: PNDM's and Heun's extra calls included), W = 1 stays finite (its max
difference is printed), and each denoiser call position is its own stream. On 2 real gloo
processes, Wan 2.1 (two calls per step), Wan 2.2 (two transformers), CogVideoX, PAG on SDXL and
LTX-Video equal the reference schedule; the ranks read the profiles the reference run cached, so
they make the same plans. Every process runs one thread (kernels round differently with more).
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import CALLS_PER_STEP, DENOISERS, NEW_FAMILIES, STEPS, build, sample

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.parallelize import parallelize
from asyncdiff_partition.pipelines.wrap import scheduled

RANKED = ["wan_t2v", "wan22", "cogvideox", "pag_sdxl", "ltx"]  # 2 real ranks in make test
OPTIONAL = {"hunyuanimage21"}  # HunyuanImage 2.1 or SkyReels V2: exact, or refused with one project error


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(tokenizer folder, profile cache) shared by the module and its ranks."""
    return tuple(str(tmp_path_factory.mktemp(name)) for name in ("tokenizers", "profile-cache"))


@pytest.fixture(scope="module")
def reference(folders):
    """``reference(family)`` -> its runs, computed once: original, W >= T, W = 1, streams per denoiser."""
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in done:
            folder, cache = folders
            steps = STEPS.get(family, 3)
            pipe, kwargs = build(family, folder)
            original = sample(pipe, kwargs, steps)
            parallelize(pipe, devices=2, warmup=steps, reference=True, cache_dir=cache)
            exact = sample(pipe, kwargs, steps)
            streams = {name: sorted({position for position, _ in scheduled(getattr(pipe, name)).streams})
                       for name in DENOISERS[family]}
            parallelize(pipe, devices=2, warmup=1, reference=True, cache_dir=cache)
            stale = sample(pipe, kwargs, steps)
            done[family] = dict(original=original, exact=exact, stale=stale, streams=streams)
        return done[family]

    return get


@pytest.mark.parametrize("family", [f for f in NEW_FAMILIES if f not in OPTIONAL])
def test_reference_schedule_reproduces_the_pipeline(family, reference):
    runs = reference(family)
    assert torch.equal(runs["exact"], runs["original"]), f"{family}: W >= T differs from the pipeline"
    assert torch.isfinite(runs["stale"]).all()
    for name, positions in runs["streams"].items():  # one stream per call position of a step
        assert positions == list(range(CALLS_PER_STEP[family])), (name, positions)
    print(f"{family}: W=1 max abs diff vs the pipeline {(runs['stale'] - runs['original']).abs().max().item():.3g}")


@pytest.mark.parametrize("family", sorted(OPTIONAL))
def test_an_optional_family_is_exact_or_refused_with_one_error(family, reference):
    try:
        runs = reference(family)
    except AsyncDiffError as error:
        assert "\n" not in str(error).strip() or "could not capture" in str(error)
        return
    assert torch.equal(runs["exact"], runs["original"])


def test_two_ranks_equal_the_reference_schedule(folders, reference):
    """Wan 2.1, Wan 2.2, CogVideoX, PAG-SDXL and LTX in one launch of 2 ranks."""
    from asyncdiff_partition.runtime.launch import launch

    expected = {family: reference(family)["stale"] for family in RANKED}  # profiles cached first
    results = launch(_ranked_samples, (RANKED, *folders), nproc=2, timeout_s=300)
    for family in RANKED:
        torch.testing.assert_close(results[1][family], results[0][family], rtol=0, atol=0)
        torch.testing.assert_close(results[0][family], expected[family], rtol=0, atol=0,
                                   msg=f"{family}: 2 ranks vs the reference")


def _ranked_samples(families: list[str], folder: str, cache: str) -> dict[str, torch.Tensor]:
    """One rank: every family built with the same seed, parallelized with W = 1, sampled."""
    torch.set_num_threads(1)
    out = {}
    for family in families:
        pipe, kwargs = build(family, folder)
        parallelize(pipe, devices=2, warmup=1, cache_dir=cache, timeout_s=120)
        out[family] = sample(pipe, kwargs, STEPS.get(family, 3))
    return out


def test_batch_groups_take_the_calls_of_a_step_side_by_side(folders, reference):
    """Wan 2.1 makes its conditional and unconditional passes as two calls per step. With
    batch_parallel = 2 on 2 engine ranks, call k of every step runs on group k while the pipeline goes
    on to the next call (Note [pending predictions]); one segment per group leaves nothing stale, so
    the video equals the unwrapped pipeline's exactly."""
    folder, cache = folders
    expected = reference("wan_t2v")["original"]
    pipe, kwargs = build("wan_t2v", folder)
    parallelize(pipe, devices=2, batch_parallel=2, warmup=1, cache_dir=cache, timeout_s=120)
    engine = vars(pipe)["_asyncdiff_parallel"]
    try:
        out = sample(pipe, kwargs, STEPS.get("wan_t2v", 3))
        reports = engine.reports()
    finally:
        pipe.close()
    assert torch.equal(out, expected), "batch groups over a step's calls differ from the pipeline"
    for rank, reply in reports.items():  # group k ran call k of every step, and nothing else
        calls = {row["call"] for row in reply["steps"]["transformer"]}
        assert calls == {rank}, (rank, calls)
