"""The engine: parallelize(pipe, devices=2) in a plain process, ranks that stay up, plans per call structure.

One tiny SD pipeline folder. In a plain Python process (no launcher) parallelize starts 2 ranks,
and the pipeline's own calls at two sizes and two prompts, each size twice, run on them: the
ranks start once, a repeated structure records and captures nothing, every output equals the
single-process reference schedule of its size (same profiles, so the same plans), and close()
leaves no process behind. The same with batch groups (B = 2, CFG-parallel) and with phases.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_pipelines import build, sample

from asyncdiff_partition.pipelines.loading import load_pipeline
from asyncdiff_partition.pipelines.parallelize import describe, parallelize, unparallelize

CONFIGS = {
    "segments": {},
    "cfg-parallel": {"batch_parallel": 2},
    "phases": {"phases": {"kind": "fixed", "async_steps": [1, 3]}},
}
STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    pipe, kwargs = build("sd", root / "tokenizers")
    pipe.save_pretrained(root / "sd")
    return str(root / "sd"), kwargs


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            return file.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_stay_up_and_each_call_structure_is_prepared_once(name, folder, tmp_path):
    path, kwargs = folder
    options = CONFIGS[name]
    reference = parallelize(load_pipeline(path), devices=2, warmup=1, reference=True, cache_dir=tmp_path, **options)
    pipe = parallelize(load_pipeline(path), devices=2, warmup=1, cache_dir=tmp_path, **options)
    engine = vars(pipe)["_asyncdiff_parallel"]
    assert engine.pool is None  # the ranks start with the first call
    seen, pids = [], []
    for size, prompt in [(16, "a red cube"), (24, "a red cube"), (16, "a blue ball"), (24, "a blue ball")]:
        call = {**kwargs, "prompt": prompt, "height": size, "width": size}
        before = dict(engine.counts)
        output = sample(pipe, call, STEPS)
        pids = pids or [p.pid for p in engine.pool.processes]
        repeated = size in seen
        seen.append(size)
        assert engine.counts["recordings"] - before["recordings"] == (0 if repeated else 1)
        assert engine.counts["captures"] - before["captures"] == (0 if repeated else 1)
        torch.testing.assert_close(output, sample(reference, call, STEPS), rtol=0, atol=0,
                                   msg=f"{name}: {size} px, {prompt!r}: ranks vs the reference schedule")
    assert engine.counts["starts"] == 1 and engine.counts["calls"] == 4
    lines = describe(pipe)
    assert lines[0].startswith("unet: 1 call(s) per step, 2 call structure(s)") and lines[-1].startswith("weights per rank")
    pipe.close()
    assert all(_gone(pid) for pid in pids) and "_asyncdiff_parallel" not in vars(pipe)
    assert not [p for p in os.listdir(os.path.dirname(engine.folder)) if p == os.path.basename(engine.folder)]
    unparallelize(reference)


def test_the_callers_generator_advances_as_if_the_call_ran_here(folder, tmp_path):
    path, kwargs = folder
    plain = load_pipeline(path)
    mine = torch.Generator().manual_seed(5)
    plain(**kwargs, num_inference_steps=2, generator=mine, output_type="latent")
    with parallelize(load_pipeline(path), devices=2, cache_dir=tmp_path) as pipe:
        theirs = torch.Generator().manual_seed(5)
        pipe(**kwargs, num_inference_steps=2, generator=theirs, output_type="latent")
    assert torch.equal(mine.get_state(), theirs.get_state())


def test_a_dead_rank_fails_the_call_and_the_next_call_starts_new_ranks(folder, tmp_path):
    import signal

    from asyncdiff_partition.runtime.ranks import RankError

    path, kwargs = folder
    with parallelize(load_pipeline(path), devices=2, warmup=1, cache_dir=tmp_path) as pipe:
        engine = vars(pipe)["_asyncdiff_parallel"]
        first = sample(pipe, kwargs, STEPS)
        victim = engine.pool.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        with pytest.raises(RankError, match="rank 1 died"):
            sample(pipe, kwargs, STEPS)
        assert engine.pool is None and engine.counts["starts"] == 1
        assert torch.equal(sample(pipe, kwargs, STEPS), first)  # new ranks, the same structure, no new capture
        assert engine.counts["starts"] == 2 and engine.counts["captures"] == 1


def test_at_most_max_structures_stay_prepared_the_least_recently_used_is_dropped(folder, tmp_path):
    path, kwargs = folder
    with parallelize(load_pipeline(path), devices=2, warmup=1, cache_dir=tmp_path, max_structures=1) as pipe:
        engine = vars(pipe)["_asyncdiff_parallel"]
        for size in (16, 24, 16):
            sample(pipe, {**kwargs, "height": size, "width": size}, 2)
            assert len(engine.compiled) == len(engine.shipped) == 1
        assert engine.counts["captures"] == 3  # 16 was dropped when 24 came, so it was prepared again
        held = engine.command(("memory",))  # a dropped structure's segment and streams are gone from the ranks
        assert all(r["live_tensor_bytes"] < 2 * r["param_bytes"] + 2**20 for r in held.values())
