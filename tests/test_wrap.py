"""The schedule inside denoising loops: diffusers pipelines, custom loops, and the `run` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_captured, tiny_profile
from PIL import Image

from asyncdiff_partition.app.report import load_report
from asyncdiff_partition.app.settings import RunConfig, plan_input_shapes
from asyncdiff_partition.cli.main import main
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.plan import make_plan, module_boundaries
from asyncdiff_partition.fx.capture import capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.pipelines.offline import build_pipeline
from asyncdiff_partition.pipelines.wrap import (
    ScheduledDenoiser,
    denoise,
    fit_inputs,
    scheduled,
    unwrap_pipeline,
    wrap_pipeline,
)
from asyncdiff_partition.runtime.reference import ReferenceSchedule

STEPS = 3
CUT = {"tiny-unet2d-condition": "up_blocks.1", "tiny-dit": "transformer_blocks.3", "tiny-unet2d": "up_blocks.1"}


def segments_of(name: str):
    captured = tiny_captured(name)
    graph = build_op_graph(captured)
    return captured, split_graph(captured, place(graph, [0, *module_boundaries(graph, [CUT[name]]), len(graph)]))


class Counting:
    """A step denoiser that counts resets and steps, around another."""

    def __init__(self, inner):
        self.inner, self.resets, self.calls, self.timesteps = inner, 0, 0, None

    def reset(self, timesteps):
        self.resets += 1
        self.timesteps = list(timesteps)
        self.inner.reset(timesteps)

    def __call__(self, inputs):
        self.calls += 1
        return self.inner(inputs)


# --- pipelines --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-unet2d-condition", "tiny-dit", "tiny-unet2d"])
def test_reference_schedule_with_full_warmup_reproduces_the_pipeline(name):
    built = build_pipeline(name, seed=0)  # same seed-0 weights as the captured zoo model
    images = built.images_for_batch(2, 5.0)  # the captured batch: 1 image with guidance, else 2
    expected = built(steps=STEPS, guidance_scale=5.0, images=images, output_type="pt")
    captured, segments = segments_of(name)
    schedule = Counting(ReferenceSchedule(segments, warmup=STEPS))
    wrap_pipeline(built.pipe, schedule, captured)
    attr = "unet" if name.startswith("tiny-unet") else "transformer"
    assert getattr(built.pipe, attr) is built.model and isinstance(scheduled(built.model), ScheduledDenoiser)

    first = built(steps=STEPS, guidance_scale=5.0, images=images, output_type="pt")
    second = built(steps=STEPS, guidance_scale=5.0, images=images, output_type="pt")  # a new run: reset again
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert schedule.resets == 2 and schedule.calls == 2 * STEPS
    assert schedule.timesteps == built.pipe.scheduler.timesteps.tolist()

    unwrap_pipeline(built.pipe)
    assert scheduled(built.model) is None and "forward" not in vars(built.model)
    assert torch.equal(built(steps=STEPS, guidance_scale=5.0, images=images, output_type="pt"), expected)


def test_a_run_with_other_timesteps_resets_even_mid_run():
    built = build_pipeline("tiny-unet2d-condition", seed=0)
    captured, segments = segments_of("tiny-unet2d-condition")
    schedule = Counting(ReferenceSchedule(segments, warmup=10))
    wrap_pipeline(built.pipe, schedule, captured)
    built(steps=2, guidance_scale=5.0, output_type="latent")
    built(steps=3, guidance_scale=5.0, output_type="latent")
    assert schedule.resets == 2 and len(schedule.timesteps) == 3


def test_the_wrapped_denoiser_is_the_model_itself():
    built = build_pipeline("tiny-unet2d-condition", seed=0)
    captured, segments = segments_of("tiny-unet2d-condition")
    wrap_pipeline(built.pipe, ReferenceSchedule(segments, warmup=10), captured)
    unet = built.pipe.unet
    assert unet is built.model  # config, dtype, modules, processors: the model's own
    assert dict(unet.named_modules()).keys() == dict(built.model.named_modules()).keys() and len(list(unet.modules())) > 1
    assert "sample" in __import__("inspect").signature(unet.forward).parameters  # pipelines read the signature


def test_a_wrong_latent_size_is_a_clear_one_line_error():
    built = build_pipeline("tiny-unet2d-condition", seed=0)
    captured, segments = segments_of("tiny-unet2d-condition")
    wrap_pipeline(built.pipe, ReferenceSchedule(segments, warmup=10), captured)
    embeds = built.text["prompt_embeds"]
    with pytest.raises(ValueError) as error:
        built.pipe(embeds, embeds, height=64, width=64, num_inference_steps=2, output_type="latent")
    message = str(error.value)
    assert "\n" not in message
    assert "latent 'sample' has shape (2, 4, 32, 32)" in message and "(2, 4, 16, 16)" in message
    assert "latent 16x16" in message


def test_timesteps_are_fitted_to_the_captured_shape_and_dtype():
    captured = tiny_captured("tiny-dit")
    x, t, labels = captured.example
    fitted = fit_inputs(captured, [x, torch.tensor(7.0), labels])  # a float scalar timestep
    assert fitted["timestep"].shape == t.shape and fitted["timestep"].dtype == t.dtype
    assert fitted["timestep"].tolist() == [7, 7]
    with pytest.raises(ValueError, match="input 'class_labels' has shape"):
        fit_inputs(captured, [x, t, labels[:1].repeat(3)])


def test_guidance_needs_an_even_profiled_batch():
    built = build_pipeline("tiny-dit", seed=0)
    assert built.images_for_batch(4, 5.0) == 2 and built.images_for_batch(3, 1.0) == 3
    with pytest.raises(ValueError, match="denoiser batch 3"):
        built.images_for_batch(3, 5.0)


def test_unsupported_models_point_to_denoise():
    with pytest.raises(TypeError, match="pipelines.wrap.denoise"):
        build_pipeline("tiny-sd3")


# --- custom loops -----------------------------------------------------------------------------


class Net(torch.nn.Module):
    """A user's own noise predictor: latent x, timestep t, context ctx."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.time = torch.nn.Linear(1, 8)
        self.ctx = torch.nn.Linear(6, 8)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t, ctx):
        h = torch.relu(self.conv1(x) + self.time(t.float()[:, None] / 1000)[:, :, None, None])
        h = h + self.ctx(ctx).mean(1)[:, :, None, None]
        return self.conv2(torch.relu(h)) * 0.1


def test_denoise_runs_a_custom_model_like_a_plain_loop():
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    net = Net().eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.randn(2, 5, 6)
    captured = capture_model(net, (x, t, ctx), latent="x")
    graph = build_op_graph(captured)
    segments = split_graph(captured, place(graph, [0, len(graph) // 2, len(graph)]))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    latents = torch.randn(1, 4, 8, 8)

    expected = latents  # the loop written out by hand
    with torch.no_grad():
        for step in scheduler.timesteps:
            eps = net(torch.cat([expected] * 2), step.expand(2), ctx)
            uncond, text = eps.chunk(2)
            expected = scheduler.step(uncond + 3.0 * (text - uncond), step, expected).prev_sample

    schedule = Counting(ReferenceSchedule(segments, warmup=4, timestep_input="t"))
    with torch.no_grad():
        result = denoise(schedule, captured, scheduler=scheduler, latents=latents, timesteps=scheduler.timesteps,
                         cond={"ctx": ctx}, guidance_scale=3.0, timestep_input="t")
        plain = denoise(lambda inputs: captured.graph_module(*inputs.values()), captured, scheduler=scheduler,
                        latents=latents, timesteps=scheduler.timesteps, cond={"ctx": ctx}, guidance_scale=3.0,
                        timestep_input="t")
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(plain, expected)
    assert schedule.resets == 1 and schedule.calls == 4


def test_denoise_names_missing_inputs():
    captured = tiny_captured("tiny-dit")
    with pytest.raises(ValueError, match=r"cond must hold exactly the inputs \['class_labels'\]"):
        denoise(lambda inputs: None, captured, scheduler=None, latents=torch.zeros(1), timesteps=[1], cond={})


# --- the run command --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_plan(tmp_path_factory):
    """A 2-segment plan of tiny-dit whose profile file sits next to it."""
    directory = tmp_path_factory.mktemp("dit-plan")
    profile = tiny_profile("tiny-dit")
    profile.save(directory / "tiny-dit.profile.json")
    plan = make_plan(profile, 2, steps=STEPS, warmup=1, profile_path="tiny-dit.profile.json")
    return plan.save(directory / "plan.json")


def invoke(*args):
    return CliRunner().invoke(main, ["--threads", "1", *args])


def test_plan_input_shapes_come_from_the_profile_next_to_the_plan(dit_plan):
    from asyncdiff_partition.core.plan import Plan

    plan = Plan.load(dit_plan)
    shapes = plan_input_shapes(plan, dit_plan)
    assert shapes is not None and shapes[0]["name"] == "hidden_states" and shapes[0]["shape"] == [2, 4, 16, 16]
    assert plan_input_shapes(plan) == shapes  # the plan records the profiled shapes itself


def test_run_reference_writes_images_report_and_trace(dit_plan, tmp_path):
    pytest.importorskip("asyncdiff_partition.core.schedule")
    out, trace = tmp_path / "out", tmp_path / "trace.json"
    result = invoke("run", "--plan", str(dit_plan), "--reference", "--out", str(out), "--trace", str(trace))
    assert result.exit_code == 0, result.output
    image = Image.open(out / "image-0.png")
    assert image.size == (32, 32)
    report = load_report(out / "report.json")
    assert report["meta"]["model"] == "tiny-dit" and report["meta"]["mode"] == "reference"
    assert report["meta"]["steps"] == STEPS and report["meta"]["warmup"] == 1
    assert report["meta"]["latent_shape"] == [2, 4, 16, 16] and report["summary"]["steps"] == STEPS
    assert [row["step"] for row in report["ranks"][0]["steps"]] == list(range(STEPS))
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) >= STEPS
    assert f"wrote {out / 'image-0.png'}" in result.output and "3 steps on 1 rank(s)" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "no/such/plan.json"], "plan file 'no/such/plan.json' does not exist"),
        (["--plan", "{plan}", "--model", "tiny-unet2d"], "plan was made for model fingerprint"),
        (["--plan", "{plan}", "--nproc", "3"], "the plan needs 2 processes"),
        (["--plan", "{plan}", "--model", "tiny-sd3"], "build_pipeline supports"),
    ],
)
def test_run_mistakes_are_one_line_errors(dit_plan, args, message):
    result = invoke("run", *[a.replace("{plan}", str(dit_plan)) for a in args])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_run_on_two_processes_matches_the_reference(unet_captured, tmp_path):
    profile = tiny_profile("tiny-unet2d-condition")
    plan_path = make_plan(profile, 2, steps=STEPS, warmup=1).save(tmp_path / "plan.json")
    result = invoke("run", "--plan", str(plan_path), "--out", str(tmp_path / "async"), "--timeout", "120")
    assert result.exit_code == 0, result.output
    report = load_report(tmp_path / "async" / "report.json")
    assert report["meta"]["mode"] == "async" and report["summary"]["ranks"] == 2
    assert report["summary"]["bytes_sent_total"] > 0
    total = sum(p.numel() * p.element_size() for p in unet_captured.graph_module.parameters())
    kept = report["meta"]["param_bytes_per_rank"]
    assert len(kept) == 2 and all(0 < k < total for k in kept)  # each rank keeps its segment only
    assert len(report["meta"]["peak_rss_per_rank"]) == 2 and all(report["meta"]["rss_after_run_per_rank"])

    actual = np.asarray(Image.open(tmp_path / "async" / "image-0.png"), dtype=np.int16)
    assert np.abs(actual - _reference_image(unet_captured, plan_path)).max() <= 1


def _reference_image(captured, plan_path) -> np.ndarray:
    """The reference schedule, in this process, on the plan's segments (same seed-0 weights)."""
    from asyncdiff_partition.core.plan import Plan

    built = build_pipeline("tiny-unet2d-condition", seed=0)
    segments = split_graph(captured, place(build_op_graph(captured), Plan.load(plan_path).boundaries))
    wrap_pipeline(built.pipe, ReferenceSchedule(segments, warmup=1), captured)
    (expected,) = built(steps=STEPS, guidance_scale=5.0)
    return np.asarray(expected, dtype=np.int16)


def test_two_elastic_agents_run_the_plan_as_two_nodes(unet_captured, tmp_path):
    """The multi-node path: two torchrun agents (--nnodes 2, one rendezvous) on this host."""
    import os
    import subprocess
    import sys

    from asyncdiff_partition.runtime.launch import _free_port

    plan_path = make_plan(tiny_profile("tiny-unet2d-condition"), 2, steps=STEPS, warmup=1).save(tmp_path / "plan.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port('127.0.0.1')}",
               "--rdzv_id", "two-nodes", "-m", "asyncdiff_partition.cli.main", "run", "--plan", str(plan_path),
               "--out", str(tmp_path / "multi"), "--timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    report = load_report(tmp_path / "multi" / "report.json")
    assert report["meta"]["world_size"] == 2 and report["meta"]["ranks_reported"] == [0]
    actual = np.asarray(Image.open(tmp_path / "multi" / "image-0.png"), dtype=np.int16)
    assert np.abs(actual - _reference_image(unet_captured, plan_path)).max() <= 1


def test_run_config_is_picklable():
    import pickle

    config = RunConfig(model="tiny-dit", plan="plan.json")
    assert pickle.loads(pickle.dumps(config)) == config
