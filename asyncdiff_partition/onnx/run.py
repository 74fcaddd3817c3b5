"""Sampling runs of an ONNX plan: what ``asyncdiff-partition run`` does for an ``.onnx`` model.

Example::

    config = RunConfig(model="unet.onnx", plan="plan.json", steps=20, out_dir="run")
    result = run_onnx_plan(config)          # spawns the plan's ranks; result["latent"] is x_0 (.npy)

An ONNX file holds the denoiser only (no text encoder, no VAE), so a run denoises a seeded
random latent under seeded random conditions with a DDIM scheduler, through
:func:`~asyncdiff_partition.pipelines.wrap.denoise`: every rank runs that loop with its
:class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` (given an
:class:`~asyncdiff_partition.onnx.segments.OnnxCapture`), or, with ``reference``, one process runs
:class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` over the same ONNX segments. Rank 0
writes ``latent.npy`` and ``report.json`` (and the Chrome trace).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asyncdiff_partition.core.plan import Plan, ideal_speedup
from asyncdiff_partition.onnx.model import OnnxModel, is_onnx_path, load_onnx
from asyncdiff_partition.onnx.segments import OnnxCapture, check_onnx_plan, split_onnx
from asyncdiff_partition.pipelines.wrap import denoise
from asyncdiff_partition.runtime.job import RunConfig, plan_input_shapes

__all__ = ["is_onnx_run", "load_for_plan", "run_onnx_plan", "sample"]


def is_onnx_run(model_spec: str | None, plan_path: str | Path) -> bool:
    """True when ``run`` is for an ONNX model: ``--model x.onnx``, or a plan made of one."""
    if model_spec is not None:
        return is_onnx_path(model_spec)
    try:
        return is_onnx_path(Plan.load(plan_path).model)
    except ValueError:
        return False  # the torch path reports the unreadable plan


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
        raise ValueError(f"the model has no timestep input (inputs {[s.name for s in specs]}); "
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


def run_onnx_plan(config: RunConfig) -> dict[str, Any]:
    """``asyncdiff-partition run`` for an ONNX plan: check, sample on the plan's ranks, write results.

    Returns:
        ``{"latent": path, "images": [], "report": path, "trace": path or None, "summary", "wall_s"}``
        (``report`` None on ranks other than 0 of an outside launch).

    Raises:
        FileFormatError, PlanError: the plan is unreadable or not this model's.
        OnnxModelError: the model cannot be read.
        ValueError: ``nproc`` other than the plan's world size, bad settings.
    """
    from asyncdiff_partition.runtime.launch import is_launched_externally, launch

    plan = Plan.load(config.plan)
    config = replace(config, model=config.model or plan.model)
    if config.guidance is None:
        config = replace(config, guidance=5.0)  # as run's default for models other than the bundled one
    steps = config.steps if config.steps is not None else plan.steps
    warmup = config.warmup if config.warmup is not None else plan.warmup
    stride = config.stride if config.stride is not None else plan.stride
    world = plan.n_devices + stride - 1
    if not config.reference and config.nproc is not None and config.nproc != world:
        raise ValueError(f"the plan needs {world} processes ({plan.n_devices} segments, stride {stride}) but "
                         f"--nproc is {config.nproc}; leave --nproc out")
    model = load_for_plan(plan, config.plan, config.model)
    check_onnx_plan(model, plan, world, stride)  # here: the fingerprint (the ranks are started to fit)
    settings = {"steps": steps, "warmup": warmup, "stride": stride}
    if config.reference:
        results = {0: _reference(config, model, plan, **settings)}
    elif is_launched_externally():
        mine = _worker(config, settings)
        results = {mine["rank"]: mine}
    else:
        del model
        results = launch(_worker, (config, settings), world, timeout_s=config.timeout_s)
    meta = {"model": config.model, "plan": str(config.plan), "mode": "reference" if config.reference else "async",
            "runtime": "onnxruntime", "n_devices": plan.n_devices, "stride": stride,
            "world_size": 1 if config.reference else world, "steps": steps, "warmup": warmup,
            "guidance": config.guidance, "seed": config.seed, "boundaries": plan.boundaries,
            "predicted": plan.predicted, "ideal_speedup": ideal_speedup(steps, warmup, plan.n_devices, stride)}
    return _write_outputs(config, meta, results)


def _worker(config: RunConfig, settings: Mapping[str, int]) -> dict[str, Any]:
    """One rank: its ONNX segment in an AsyncDenoiser, the seeded loop; rank 0 keeps x_0."""
    from asyncdiff_partition.runtime import comm
    from asyncdiff_partition.runtime.denoiser import AsyncDenoiser

    threads = config.threads or 1
    torch.set_num_threads(threads)
    plan = Plan.load(config.plan)
    rank, _, _ = comm.init(timeout_s=config.timeout_s)
    try:
        capture = OnnxCapture(load_for_plan(plan, config.plan, config.model), threads=threads)
        timestep = capture.model.timestep or "timestep"
        denoiser = AsyncDenoiser(capture, plan, warmup=settings["warmup"], stride=settings["stride"],
                                 timestep_input=timestep, timeout_s=config.timeout_s)
        capture.model = None  # type: ignore[assignment]  # the denoiser holds this rank's segment only
        begin = time.perf_counter()
        x = sample(denoiser, capture, steps=settings["steps"], seed=config.seed, guidance=config.guidance,
                   timestep_input=timestep)
        return {"rank": rank, "report": denoiser.report(), "spans": denoiser.spans(),
                "wall_s": time.perf_counter() - begin, "latent": x.numpy() if rank == 0 else None}
    finally:
        comm.shutdown()


class _Timed:
    """A step denoiser with one report row and one span per call (for the reference run)."""

    def __init__(self, denoiser: Any):
        self.denoiser, self.rows, self.span_list = denoiser, [], []

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


def _reference(config: RunConfig, model: OnnxModel, plan: Plan, *, steps: int, warmup: int,
               stride: int) -> dict[str, Any]:
    from asyncdiff_partition.runtime.reference import ReferenceSchedule

    threads = config.threads or 1
    capture = OnnxCapture(model, threads=threads)
    timestep = model.timestep or "timestep"
    segments = split_onnx(model, plan.boundaries, threads=threads)
    timed = _Timed(ReferenceSchedule(segments, warmup=warmup, stride=stride, timestep_input=timestep))
    begin = time.perf_counter()
    x = sample(timed, capture, steps=steps, seed=config.seed, guidance=config.guidance, timestep_input=timestep)
    return {"rank": 0, "report": timed.rows, "spans": timed.span_list, "wall_s": time.perf_counter() - begin,
            "latent": x.numpy()}


def _write_outputs(config: RunConfig, meta: dict[str, Any], results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    from asyncdiff_partition.runtime.report import summarize_steps, write_report, write_trace

    first = results[min(results)]
    if first["rank"] != 0:
        return {"latent": None, "images": [], "report": None, "trace": None, "summary": {}}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    latent = _save_npy(out / "latent.npy", first["latent"])
    meta = {**meta, "wall_s": max(r["wall_s"] for r in results.values()), "ranks_reported": sorted(results),
            "threads_per_rank": config.threads or 1, "latent_file": latent.name}
    rows = {rank: r["report"] for rank, r in results.items()}
    report = write_report(out / "report.json", rows, meta)
    trace = write_trace(config.trace, {rank: r["spans"] for rank, r in results.items()}) if config.trace else None
    return {"latent": str(latent), "images": [], "report": str(report), "trace": str(trace) if trace else None,
            "summary": summarize_steps(rows, warmup=meta["warmup"]), "wall_s": meta["wall_s"]}


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
