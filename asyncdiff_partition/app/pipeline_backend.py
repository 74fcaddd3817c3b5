"""The torch backend of ``asyncdiff-partition run``: a plan's segments inside the model's own diffusers pipeline.

Example::

    run_plan(RunConfig(model=None, plan="plan.json"), TorchBackend())   # what run_plan picks for torch

The launching process builds the pipeline, captures its denoiser at the plan's shapes and
compiles the plan once (:func:`~asyncdiff_partition.fx.ready.ready_segments`); each rank builds the
same pipeline around the shipped model (its other segments' weights stand-ins), runs it with its
:class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` in place of the denoiser, and keeps only
its own weights (:func:`release_weights`); rank 0 saves the images.

A hybrid plan (``batch_parallel`` B > 1, or a switching policy in ``phases``) is captured at
batch / B, the rows of one batch group (its profile's shape), and runs each rank's
:class:`~asyncdiff_partition.runtime.hybrid.HybridDenoiser` instead; the pipeline still samples
the whole batch.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx

from asyncdiff_partition.app.report import peak_resident_bytes, resident_bytes
from asyncdiff_partition.app.settings import RunConfig, RunSettings, latent_shape
from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.files import write_atomic
from asyncdiff_partition.fx.capture import CapturedModel
from asyncdiff_partition.fx.device_move import move_captured
from asyncdiff_partition.fx.weights import release_weights
from asyncdiff_partition.pipelines import zoo
from asyncdiff_partition.pipelines.compiler import whole_batch
from asyncdiff_partition.pipelines.offline import BuiltPipeline, build_pipeline, capture_for_pipeline
from asyncdiff_partition.pipelines.wrap import ScheduledDenoiser, call_binding, scheduled, wrap_pipeline

__all__ = ["TorchBackend", "default_guidance"]


@dataclass
class _TorchJob:
    ready: list[Any]
    shell: CapturedModel  # the capture (the pipeline is built around its model)
    built: BuiltPipeline | None
    images: int


class TorchBackend:
    """Runs a torch plan inside the model's diffusers pipeline; rank 0 saves the images."""

    runtime = "torch"

    def configure(self, config: RunConfig, plan: Any) -> RunConfig:
        return config if config.guidance is not None else replace(config, guidance=default_guidance(config.model or plan.model))

    def compile(self, config: RunConfig, plan: Any, settings: RunSettings) -> _TorchJob:
        from asyncdiff_partition.core.plan import PlanError
        from asyncdiff_partition.fx.ready import ready_segments

        built, captured, images = _prepare(config, plan, verify=True)
        check_scheduler_steps(built.pipe.scheduler, settings.steps)
        try:
            ready = ready_segments(captured, plan, world_size=settings.world, stride=settings.stride,
                                   plan_path=config.plan)
        except PlanError as error:
            _, _, source = latent_shape(plan, config.plan)
            raise PlanError(f"{error} (model {config.model!r} captured at latent shape "
                            f"{captured.latent.shape}, {source})") from None
        return _TorchJob(ready, captured, built if config.reference else None, images)

    def ship(self, job: _TorchJob, directory: str) -> Any:
        from asyncdiff_partition.fx.shipping import ship_segments

        return ship_segments(job.ready, directory, job.shell)

    def reference(self, config: RunConfig, plan: Any, job: _TorchJob, settings: RunSettings) -> dict[str, Any]:
        from asyncdiff_partition.runtime.reference import ReferenceSchedule

        assert job.built is not None
        schedule = ReferenceSchedule(job.ready, warmup=settings.warmup, stride=settings.stride,
                                     timestep_input="timestep", compile=config.compile, phases=plan.phases,
                                     batch_parallel=plan.batch_parallel, latent_input=job.shell.latent.name,
                                     extrapolation=plan.extrapolation)
        wrap_pipeline(job.built.pipe, schedule, whole_batch(job.shell, plan.batch_parallel))
        return {**_sample(config, job.built, schedule, rank=0, steps=settings.steps, images=job.images),
                "peak_rss": peak_resident_bytes()}

    def run_rank(self, config: RunConfig, plan: Any, shipped: Any, settings: RunSettings) -> dict[str, Any]:
        """Builds the same pipeline as every other rank around the shipped model (weights of
        other segments are stand-ins), runs it with this rank's AsyncDenoiser in place of the
        denoiser and keeps only this rank's weights (:func:`release_weights`)."""
        from asyncdiff_partition.runtime import comm
        from asyncdiff_partition.runtime.hybrid import rank_denoiser, rank_segment_index

        rank, device = comm.rank(), comm.device()
        segment, shell = shipped.load(rank_segment_index(plan, rank, settings.stride))
        built, shell, images = _prepare(config, plan, device=device, captured=shell)
        options: dict[str, Any] = dict(input_names=[s.name for s in shell.inputs], latent=shell.latent.name, warmup=settings.warmup,
                       stride=settings.stride, timestep_input="timestep", timeout_s=config.timeout_s,
                       compile=config.compile, example=dict(zip((s.name for s in shell.inputs), shell.example)))
        denoiser = rank_denoiser(segment, plan, **options)
        wrap_pipeline(built.pipe, denoiser, whole_batch(call_binding(shell), plan.batch_parallel))
        module = segment.module
        del shell, segment, shipped
        assert isinstance(module, torch.nn.Module)
        kept = release_weights(built.model, module)  # the only weights this rank needs
        result = _sample(config, built, denoiser, rank=rank, steps=settings.steps, images=images)
        return {**result, "param_bytes": kept, "rss_after_run": resident_bytes(), "peak_rss": peak_resident_bytes()}

    def write(self, config: RunConfig, result: Mapping[str, Any], out: Path) -> dict[str, Any]:
        meta = {"capture_method": result["method"], "latent_shape": result["latent_shape"],
                "pipeline_note": result["note"], "device": result["device"]}
        return {"images": result["images"], "latent": None, "meta": meta}


def _prepare(
    config: RunConfig, plan: Any, *, verify: bool = True, device: Any = "cpu",
    captured: CapturedModel | None = None,
) -> tuple[BuiltPipeline, CapturedModel, int]:
    """Build the pipeline on ``device`` and capture its denoiser at the plan's shapes.

    Given ``captured`` (the model captured elsewhere, with those shapes), the pipeline is
    built around its model instead. Returns the pipeline, the capture and the number of
    images a run makes.
    """
    assert config.model is not None and config.guidance is not None  # set by TorchBackend.configure
    batch, size, _ = latent_shape(plan, config.plan)  # a hybrid plan's profile: one batch group's rows
    model = captured.model if captured is not None else None
    built = build_pipeline(config.model, seed=config.seed, sample_size=size, model=model)
    if captured is not None:  # a shipped shell: its weight stand-ins must not grow to full size on the device
        move_captured(captured, device)
    built.pipe.to(device)  # before a capture: the graph's constants live where the model does
    images = built.images_for_batch(batch * plan.batch_parallel, config.guidance)
    if captured is None:
        captured = capture_for_pipeline(built, batch=batch, sample_size=size, verify=verify)
    return built, captured, images


def _sample(config: RunConfig, built: BuiltPipeline, denoiser: Any, *, rank: int, steps: int,
            images: int) -> dict[str, Any]:
    """Run the wrapped pipeline once; rank 0 saves the images. This rank's results."""
    built.pipe.set_progress_bar_config(disable=not (config.progress and rank == 0), desc=f"sampling {config.model}")
    assert config.guidance is not None  # set by TorchBackend.configure
    begin = time.perf_counter()
    with torch.no_grad():
        pictures = built(steps=steps, guidance_scale=config.guidance, images=images)
    wall_s = time.perf_counter() - begin
    wrapped = scheduled(built.model)  # wrap_pipeline's
    assert isinstance(wrapped, ScheduledDenoiser)
    paths: list[str] = []
    if rank == 0:
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            png = io.BytesIO()
            picture.save(png, format="PNG")
            paths.append(str(write_atomic(out / f"image-{i}.png", png.getvalue())))
    return {"rank": rank, "report": wrapped.report(), "spans": wrapped.spans(), "wall_s": wall_s, "images": paths,
            "method": wrapped.captured.method, "latent_shape": list(wrapped.captured.latent.shape), "note": built.note,
            "threads": torch.get_num_threads(), "device": str(built.pipe.device)}


def default_guidance(spec: str) -> float:
    """The guidance scale ``run`` uses when none is given: the bundled digits model's own, else 5."""
    from asyncdiff_partition.pipelines.digits import GUIDANCE

    return GUIDANCE if spec in zoo.TRAINED_MODELS else 5.0


def check_scheduler_steps(scheduler: Any, steps: int) -> None:
    """Refuse, before any rank starts, a step count the pipeline's scheduler cannot sample with.

    A scheduler with ``steps_offset=1`` and "leading" spacing (Stable Diffusion's) maps 1000 steps
    to timesteps 1..1000, one past its 1000 training timesteps: the ranks would fail at their first
    scheduler step.

    Raises:
        ConfigError: a timestep outside ``[0, num_train_timesteps)``.
    """
    trained = int(getattr(scheduler.config, "num_train_timesteps", 0) or 0)
    if not trained:
        return
    probe = copy.deepcopy(scheduler)  # set_timesteps changes the scheduler's state
    probe.set_timesteps(steps)
    highest = int(max(probe.timesteps))
    if highest >= trained or int(min(probe.timesteps)) < 0:
        raise ConfigError(
            f"--steps {steps} gives timestep {highest} but {type(scheduler).__name__} was trained on "
            f"{trained} timesteps (0..{trained - 1}); use at most {trained - 1} steps"
        )
