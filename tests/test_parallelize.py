"""parallelize(): the launcher rule, saved plans, profile caching and the recorded call."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import build, sample

from asyncdiff_partition import parallelize
from asyncdiff_partition.core.plan import PlanError
from asyncdiff_partition.pipelines.parallelize import ParallelizeError, unparallelize
from asyncdiff_partition.pipelines.recording import RecordingError, record_denoiser_calls
from asyncdiff_partition.pipelines.wrap import scheduled


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizers"))


def test_a_pipeline_built_in_memory_runs_on_started_ranks(folder, monkeypatch, tmp_path):
    """No launcher: parallelize starts its own ranks; they need no folder (they get finished segments)."""
    monkeypatch.delenv("RANK", raising=False)
    pipe, kwargs = build("ddpm", folder)
    expected = sample(pipe, kwargs, 3)
    with parallelize(pipe, devices=2, warmup=3, cache_dir=tmp_path):
        assert torch.equal(sample(pipe, kwargs, 3), expected)  # W >= T: the pipeline exactly
    assert "forward" not in vars(pipe.unet) and "_asyncdiff_parallel" not in vars(pipe)
    assert type(pipe).__name__ == "DDPMPipeline" and type(pipe).__call__ is type(pipe).__mro__[0].__call__


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


def test_a_pipeline_without_a_scheduler_is_one_clear_error():
    from diffusers import DiffusionPipeline

    class Upsampler(DiffusionPipeline):  # like LTX's latent upsampler: a model, no scheduler
        def __init__(self, net):
            super().__init__()
            self.register_modules(net=net)

        def __call__(self, x):
            return self.net(x)

    pipe = Upsampler(torch.nn.Linear(4, 4))
    with pytest.raises(RecordingError, match="Upsampler has no scheduler") as error:
        parallelize(pipe, devices=2, reference=True, x=torch.zeros(1, 4))
    assert "\n" not in str(error.value) and type(pipe).__name__ == "Upsampler" and "forward" not in vars(pipe.net)


def test_calls_prepare_themselves_once_per_structure(folder, tmp_path):
    """No call arguments at parallelize time: the first call of each size records and captures, a repeat
    (another prompt, seed, guidance scale) does not, and every output equals the pipeline's own."""
    pipe, kwargs = build("sd", folder)
    expected = {size: sample(pipe, {**kwargs, "height": size, "width": size}, 3, seed=1) for size in (16, 24)}
    other = sample(pipe, {**kwargs, "prompt": "a blue ball", "guidance_scale": 3.0}, 3, seed=2)
    parallelize(pipe, devices=2, warmup=3, reference=True, cache_dir=tmp_path)
    state = vars(pipe)["_asyncdiff_parallel"]
    for size in (16, 24, 16, 24):
        assert torch.equal(sample(pipe, {**kwargs, "height": size, "width": size}, 3, seed=1), expected[size])
    assert len(state.recordings) == 2 and len(state.compiled) == 2  # one per size
    assert torch.equal(sample(pipe, {**kwargs, "prompt": "a blue ball", "guidance_scale": 3.0}, 3, seed=2), other)
    assert len(state.recordings) == 2


def test_a_new_attention_set_up_is_captured_again_never_run_stale(folder, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor

    pipe, kwargs = build("sd", folder)
    parallelize(pipe, devices=2, warmup=3, reference=True, cache_dir=tmp_path)
    sample(pipe, kwargs, 3)
    state = vars(pipe)["_asyncdiff_parallel"]
    pipe.unet.set_attn_processor(AttnProcessor())  # through the model itself: it is the pipeline's own
    with_new = sample(pipe, kwargs, 3)
    assert len(state.compiled) == 2  # the new processors made a new capture
    unparallelize(pipe)
    assert torch.equal(with_new, sample(pipe, kwargs, 3))


def test_a_prior_returns_its_own_output_type(folder, tmp_path):
    from tiny_families import build as build_new

    pipe, kwargs = build_new("kandinsky22_prior", folder)
    parallelize(pipe, devices=2, warmup=3, reference=True, cache_dir=tmp_path)
    out = pipe(**{**kwargs, "num_inference_steps": 2})  # the pipeline reads .predicted_image_embedding
    assert out.image_embeds.shape == (1, 32)
    form = scheduled(pipe.prior).output
    assert form.kind == "class" and form.cls.__name__ == "PriorTransformerOutput"
    assert form.field == "predicted_image_embedding"
