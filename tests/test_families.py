"""Every pipeline family through its real diffusers class: parallelize() against the unwrapped pipeline.

Tiny random components (tests/tiny_pipelines.py). For every family the reference schedule with
W >= T equals the pipeline exactly, W = 1 stays finite (its max difference is printed), and on
2 real gloo processes the asynchronous run equals the reference schedule on the same plan (the
reference run's plan, saved and handed to the ranks: rank 0 loads it and sends it to rank 1).

Each family is built, recorded, captured and profiled once per module (``_reference``); the
second parallelize reuses the capture.
"""

from __future__ import annotations

import os

import pytest
import tiny_pipelines
import torch
from tiny_pipelines import FAMILIES, build, sample

from asyncdiff_partition.pipelines.parallelize import parallelize
from asyncdiff_partition.pipelines.wrap import ScheduledDenoiser, scheduled

STEPS = 3
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer", "controlnet": "unet",
            "upscaler": "unet", "pixart": "transformer", "svd": "unet", "animatediff": "unet", "dit": "transformer",
            "ddpm": "unet"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(tokenizer folder, profile cache, plan folder) shared by the module."""
    return tuple(str(tmp_path_factory.mktemp(name)) for name in ("tokenizers", "profile-cache", "plans"))


@pytest.fixture(scope="module")
def reference(folders):
    """``reference(family)`` -> the family's runs, computed once: original, W >= T, W = 1, its plan file."""
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in done:
            folder, cache, plans = folders
            pipe, kwargs = build(family, folder)
            original = sample(pipe, kwargs, STEPS)
            parallelize(pipe, devices=2, warmup=STEPS, reference=True, cache_dir=cache, **kwargs)
            wrapped = scheduled(getattr(pipe, DENOISER[family]))
            exact = sample(pipe, kwargs, STEPS)
            exact_steps = len(wrapped.step_ms)
            parallelize(pipe, devices=2, warmup=1, reference=True, cache_dir=cache, **kwargs)
            stale = sample(pipe, kwargs, STEPS)
            plan = getattr(pipe, DENOISER[family]).plan
            path = plan.save(os.path.join(plans, f"{family}.plan.json"))
            done[family] = dict(wrapped=wrapped, original=original, exact=exact, exact_steps=exact_steps,
                                stale=stale, plan=str(path), boundaries=plan.boundaries)
        return done[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_schedule_reproduces_the_pipeline(family, reference):
    runs = reference(family)
    wrapped = runs["wrapped"]
    assert isinstance(wrapped, ScheduledDenoiser) and wrapped.module.plan.n_devices == 2
    assert torch.equal(runs["exact"], runs["original"])
    assert runs["exact_steps"] == STEPS  # one schedule step per pipeline step
    assert torch.isfinite(runs["stale"]).all()
    print(f"{family}: W=1 max abs diff vs the pipeline {(runs['stale'] - runs['original']).abs().max().item():.3g}")


def test_two_ranks_equal_the_reference_schedule(folders, reference):
    """Every family, one launch: rank 0 loads each family's plan file and sends it to rank 1."""
    from asyncdiff_partition.runtime.launch import launch

    families = list(FAMILIES)
    plans = {family: reference(family)["plan"] for family in families}
    results = launch(tiny_pipelines.parallel_sample, (families, folders[0], folders[1], STEPS, plans), nproc=2,
                     timeout_s=180)
    for family in families:
        output, plan = results[0][family]
        torch.testing.assert_close(results[1][family][0], output, rtol=0, atol=0)  # every rank has the result
        assert plan == results[1][family][1] and plan["boundaries"] == reference(family)["boundaries"]
        torch.testing.assert_close(output, reference(family)["stale"], msg=f"{family}: 2 ranks vs the reference")

