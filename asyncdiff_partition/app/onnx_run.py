"""The ONNX backend of ``asyncdiff-partition run``: how an ``.onnx`` model is loaded, compiled, sampled and written.

Example::

    config = RunConfig(model="unet.onnx", plan="plan.json", steps=20, out_dir="run")
    result = run_plan(config)               # picks OnnxBackend; result["latent"] is x_0 (.npy)

An ONNX file holds the denoiser only (no text encoder, no VAE), so a run denoises a seeded
random latent under seeded random conditions with a DDIM scheduler, through
:func:`~asyncdiff_partition.pipelines.wrap.denoise`: every rank runs that loop with its
:class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` over its shipped ready segment, or,
with ``reference``, one process runs
:class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` over the same segments. Rank 0
writes ``latent.npy`` and ``report.json`` (and the Chrome trace); the rest of the run (settings,
checks, launch, report) is :func:`~asyncdiff_partition.app.job.run_plan`'s.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asyncdiff_partition.app.settings import RunConfig, RunSettings, plan_input_shapes
from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.plan import Plan
from asyncdiff_partition.onnx.model import OnnxModel, load_onnx
from asyncdiff_partition.onnx.segments import OnnxCapture, ready_onnx_segments
from asyncdiff_partition.pipelines.wrap import denoise

__all__ = ["OnnxBackend", "load_for_plan", "sample"]


def load_for_plan(plan: Plan, plan_path: str | Path | None, spec: str | None = None) -> OnnxModel:
    """The plan's ONNX model, read with the input shapes its profile recorded."""
    shapes = plan_input_shapes(plan, plan_path) or []
    return load_onnx(spec or plan.model, input_shapes={s["name"]: s["shape"] for s in shapes},
                     latent=next((s["name"] for s in shapes if s["latent"]), None))


def sample(denoiser: Any, captured: Any, *, steps: int, seed: int = 0, guidance: float | None = None,
           timestep_input: str = "timestep") -> Tensor:
    """The seeded loop of an ONNX run: DDIM, random latent and conditions; returns x_0.

    ``captured`` is anything with ``inputs`` / ``latent`` specs (an ``OnnxCapture``, or the
    torch capture of the same model, whose loop is then the same to the bit). Guidance applies
    when ``guidance > 1`` and the model's batch is even (the latent is half of it).
    """
    import diffusers

    specs = captured.inputs
    if timestep_input not in [s.name for s in specs]:
        raise ConfigError(f"the model has no timestep input (inputs {[s.name for s in specs]}); "
                         f"name it one of timestep/timesteps/t/time")
    latent = captured.latent
    cfg = guidance is not None and guidance > 1 and latent.shape[0] % 2 == 0
    generator = torch.Generator().manual_seed(seed)
    shape = (latent.shape[0] // 2 if cfg else latent.shape[0], *latent.shape[1:])
    latents = torch.randn(shape, generator=generator, dtype=getattr(torch, latent.dtype))
    cond = {}
    for spec in specs:
        if spec.is_latent or spec.name == timestep_input:
            continue
        dtype = getattr(torch, spec.dtype)
        cond[spec.name] = (torch.randn(spec.shape, generator=generator).to(dtype) if dtype.is_floating_point
                           else torch.zeros(spec.shape, dtype=dtype))
    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        return denoise(denoiser, captured, scheduler=scheduler, latents=latents, timesteps=scheduler.timesteps,
                       cond=cond, guidance_scale=guidance if cfg else None, timestep_input=timestep_input)


@dataclass
class _OnnxJob:
    ready: list[Any]
    shell: OnnxCapture  # the input specs the loop needs


class OnnxBackend:
    """:func:`~asyncdiff_partition.app.job.run_plan` for an ONNX plan: a seeded loop; rank 0 keeps x_0."""

    runtime = "onnxruntime"

    def configure(self, config: RunConfig, plan: Plan) -> RunConfig:
        # as run's default for models other than the bundled one
        return config if config.guidance is not None else replace(config, guidance=5.0)

    def compile(self, config: RunConfig, plan: Plan, settings: RunSettings) -> _OnnxJob:
        if plan.batch_parallel > 1 or plan.phases is not None:
            raise ConfigError(f"the ONNX runtime runs segment plans only; this plan has batch_parallel="
                              f"{plan.batch_parallel} and phases {plan.phases}: run the torch model, or plan "
                              f"without --batch-parallel/--phases")
        model = load_for_plan(plan, config.plan, config.model)
        ready = ready_onnx_segments(model, plan, world_size=settings.world, stride=settings.stride, plan_path=config.plan,
                                    threads=config.threads or 1)
        return _OnnxJob(ready, OnnxCapture.of(model))

    def ship(self, job: _OnnxJob, directory: str) -> Any:
        from asyncdiff_partition.fx.shipping import ship_segments

        return ship_segments(job.ready, directory, job.shell)

    def reference(self, config: RunConfig, plan: Plan, job: _OnnxJob, settings: RunSettings) -> dict[str, Any]:
        from asyncdiff_partition.runtime.reference import ReferenceSchedule

        timestep = job.shell.timestep
        timed = _Timed(ReferenceSchedule(job.ready, warmup=settings.warmup, stride=settings.stride,
                                         timestep_input=timestep, extrapolation=plan.extrapolation))
        begin = time.perf_counter()
        x = sample(timed, job.shell, steps=settings.steps, seed=config.seed, guidance=config.guidance,
                   timestep_input=timestep)
        return {"rank": 0, "report": timed.rows, "spans": timed.span_list, "wall_s": time.perf_counter() - begin,
                "latent": x.numpy(), "threads": torch.get_num_threads()}

    def run_rank(self, config: RunConfig, plan: Plan, shipped: Any, settings: RunSettings) -> dict[str, Any]:
        from asyncdiff_partition.core.schedule import slot_segment
        from asyncdiff_partition.runtime import comm
        from asyncdiff_partition.runtime.denoiser import AsyncDenoiser

        rank = comm.rank()
        segment, shell = shipped.load(slot_segment(rank, plan.n_devices))
        timestep = shell.timestep
        denoiser = AsyncDenoiser(segment, plan, input_names=[s.name for s in shell.inputs], latent=shell.latent.name,
                                 warmup=settings.warmup, stride=settings.stride, timestep_input=timestep,
                                 timeout_s=config.timeout_s)
        del segment
        begin = time.perf_counter()
        x = sample(denoiser, shell, steps=settings.steps, seed=config.seed, guidance=config.guidance,
                   timestep_input=timestep)
        return {"rank": rank, "report": denoiser.report(), "spans": denoiser.spans(), "threads": config.threads or 1,
                "wall_s": time.perf_counter() - begin, "latent": x.numpy() if rank == 0 else None}

    def write(self, config: RunConfig, result: Mapping[str, Any], out: Path) -> dict[str, Any]:
        latent = _save_npy(out / "latent.npy", result["latent"])
        return {"images": [], "latent": str(latent), "meta": {"latent_file": latent.name}}


class _Timed:
    """A step denoiser with one report row and one span per call (for the reference run)."""

    def __init__(self, denoiser: Any):
        self.denoiser = denoiser
        self.rows: list[dict[str, Any]] = []
        self.span_list: list[Any] = []

    def reset(self, timesteps: Sequence[Any]) -> None:
        self.denoiser.reset(timesteps)
        self.rows, self.span_list = [], []

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        begin = time.perf_counter()
        eps = self.denoiser(inputs)
        end = time.perf_counter()
        step = len(self.rows)
        self.rows.append({"step": step, "rank": 0, "compute_ms": (end - begin) * 1e3, "wait_ms": 0.0,
                          "comm_ms": 0.0, "bytes_sent": 0})
        self.span_list.append({"name": "compute", "step": step, "rank": 0, "start_s": begin, "end_s": end})
        return eps


def _save_npy(path: Path, array: np.ndarray) -> Path:
    """np.save through a temp file and a rename (files are written atomically)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
