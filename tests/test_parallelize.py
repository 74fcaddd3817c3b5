"""parallelize(): the launcher rule, saved plans, profile caching and the recorded call."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import build, sample

from asyncdiff_partition import parallelize
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.plan import PlanError
from asyncdiff_partition.pipelines.parallelize import ParallelizeError
from asyncdiff_partition.pipelines.recording import RecordingError, record_denoiser_calls


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizers"))


def test_without_a_launcher_one_error_says_how_to_launch(folder, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    pipe, kwargs = build("ddpm", folder)
    with pytest.raises(ParallelizeError) as error:
        parallelize(pipe, devices=3, **kwargs)
    message = str(error.value)
    assert "\n" not in message and "torchrun --nproc_per_node 3" in message and "reference=True" in message
    assert isinstance(error.value, AsyncDiffError) and "forward" not in vars(pipe.unet)  # nothing replaced
    assert type(pipe).__call__ is type(pipe).__mro__[0].__call__ and "_asyncdiff_parallel" not in vars(pipe)


def test_a_wrong_world_size_is_refused_before_any_compute(folder, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    pipe, kwargs = build("ddpm", folder)
    with pytest.raises(ParallelizeError, match="needs 2 ranks but WORLD_SIZE is 3"):
        parallelize(pipe, devices=2, **kwargs)


def test_the_recording_leaves_the_pipeline_and_random_state_alone(folder):
    pipe, kwargs = build("flux", folder)
    scheduler, forward = pipe.scheduler, pipe.transformer.forward
    state = torch.random.get_rng_state()
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    recording = record_denoiser_calls(pipe, kwargs={**kwargs, "generator": generator})
    assert pipe.scheduler is scheduler and "forward" not in vars(pipe.transformer) and "step" not in vars(scheduler)
    assert pipe.transformer.forward == forward and torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(generator.get_state(), before)  # the dry run used a copy
    (denoiser,) = recording.denoisers
    assert denoiser.name == "transformer" and denoiser.timestep == "timestep" and denoiser.form == "t/1000"
    assert denoiser.per_step == 1 and len(denoiser.calls) == 1
    call = denoiser.calls[0].call
    assert call["hidden_states"].shape == (1, 16, 16) and "guidance" not in call  # None: the default, dropped


def test_a_failing_dry_run_is_one_clear_error(folder):
    pipe, kwargs = build("sd", folder)
    with pytest.raises(RecordingError, match="dry run of StableDiffusionPipeline"):
        record_denoiser_calls(pipe, kwargs={**kwargs, "height": 31})


def test_a_saved_plan_is_reused_and_a_plan_of_other_shapes_refused(folder, tmp_path):
    pipe, kwargs = build("sd", folder)
    parallelize(pipe, devices=2, reference=True, warmup=3, cache_dir=tmp_path / "cache", **kwargs)
    assert len(list((tmp_path / "cache").glob("*.profile.json"))) == 1  # profiled once, cached
    plan = pipe.unet.plan.save(tmp_path / "plan.json")
    expected = sample(pipe, kwargs, 3)

    parallelize(pipe, devices=2, reference=True, warmup=3, plan=plan, **kwargs)  # re-parallelize: unwraps first
    assert torch.equal(sample(pipe, kwargs, 3), expected)
    with pytest.raises(PlanError, match="plan was made for model fingerprint"):
        parallelize(pipe, devices=2, reference=True, plan=plan, **{**kwargs, "height": 64, "width": 64})
