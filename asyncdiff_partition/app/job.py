"""The ``asyncdiff-partition run`` command: one sampling run from a plan, on its ranks, for torch and ONNX.

Example::

    result = run_plan(RunConfig(model=None, plan="plan.json", steps=20, out_dir="run"))
    result["images"], result["report"], result["summary"]["step_ms"]["median"]

:func:`run_plan` is the one run path; a :class:`Backend` says how a model is loaded, compiled
into ready segments and sampled (:class:`~asyncdiff_partition.app.pipeline_backend.TorchBackend`: the model's diffusers pipeline;
:class:`~asyncdiff_partition.app.onnx_run.OnnxBackend`: a seeded loop over an ONNX denoiser). It
checks everything a user can get wrong in this process and compiles the plan once (one op
graph, one placement, one split), then spawns the plan's ranks
(:func:`~asyncdiff_partition.runtime.launch.launch`), each sent only its finished segment
(:mod:`~asyncdiff_partition.fx.shipping`); or runs as one rank under an outside ``torchrun``
(each rank compiles for itself and the ranks check that they agree); or runs the single-process
reference schedule (``reference=True``). The report counts, per rank, the op graphs built,
placements made and splits run (``compiler_counts_per_rank``; zero on spawned ranks).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.fx

from asyncdiff_partition.app.preflight import check_run
from asyncdiff_partition.app.settings import Backend, RunConfig, RunSettings, run_settings

__all__ = ["backend_for", "run_plan", "run_worker"]


def run_plan(config: RunConfig, backend: Backend | None = None) -> dict[str, Any]:
    """``asyncdiff-partition run``: check the plan, sample on its ranks, write the outputs and report.

    Everything the user can get wrong (missing plan, plan of another model, shapes, world size)
    is checked in this process before any worker starts. Without ``reference`` the plan's world
    size of workers is spawned (``launch.launch``), each handed its finished segment, unless this
    process was itself started by an outside launcher (torchrun), in which case it runs as its
    rank. With ``reference`` the single-process
    :class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` runs the same segments here.

    Args:
        config: what was asked for.
        backend: default: the ONNX backend for an ``.onnx`` model (or a plan of one), else torch.

    Returns:
        ``{"images": [paths], "latent": path or None, "report": path, "trace": path or None,
        "summary": {...}, "wall_s"}``; ``report`` None on ranks other than 0.

    Raises:
        FileFormatError, PlanError: the plan file is missing, corrupt or made for another model.
        ConfigError: settings that do not fit the plan (``nproc``, guidance vs. batch, sizes).
    """
    from asyncdiff_partition.core import counters
    from asyncdiff_partition.core.plan import Plan, ideal_speedup
    from asyncdiff_partition.runtime.launch import is_launched_externally, launch

    before = counters.counts()
    plan = Plan.load(config.plan)
    backend = backend or backend_for(config.model, plan)
    config = backend.configure(replace(config, model=config.model or plan.model), plan)
    settings = run_settings(config, plan)
    config = replace(config, threads=config.threads or max(1, torch.get_num_threads() // settings.world))
    check_run(config, plan, settings.world)  # devices, temp space, --out: before any capture or rank
    if settings.note and not config.reference:
        print(f"note: {settings.note}", file=sys.stderr)  # before the run, which may take long
    meta: dict[str, Any] = {"model": config.model, "plan": str(config.plan), "mode": "reference" if config.reference else "async",
            "runtime": backend.runtime, "n_devices": plan.n_devices, "stride": settings.stride,
            "world_size": 1 if config.reference else settings.world, "steps": settings.steps,
            "warmup": settings.warmup, "guidance": config.guidance, "seed": config.seed,
            "boundaries": plan.boundaries, "predicted": plan.predicted,
            "ideal_speedup": ideal_speedup(settings.steps, settings.warmup, plan.n_devices, settings.stride),
            "compile": config.compile}
    job = backend.compile(config, plan, settings)
    if config.reference:
        results = {0: backend.reference(config, plan, job, settings)}
    elif is_launched_externally():
        # Each rank compiled for itself; AsyncDenoiser checks that all ranks agree. Each rank
        # returns only its own rows: rank 0's report holds rank 0 alone (ranks_reported).
        mine = run_worker(config, backend, _InProcess(job), settings)
        results = {mine["rank"]: mine}
    else:
        with tempfile.TemporaryDirectory(prefix="asyncdiff-run-") as directory:
            shipped = backend.ship(job, directory)
            del job
            results = launch(run_worker, (config, backend, shipped, settings), settings.world,
                             timeout_s=config.timeout_s)
    meta["launcher_compiler_counts"] = counters.since(before)
    return _write_outputs(config, backend, meta, results)


def backend_for(model_spec: str | None, plan: Any) -> Backend:
    """The ONNX backend for an ``.onnx`` model (given, or the plan's), else the torch one."""
    from asyncdiff_partition.onnx.model import is_onnx_path

    if is_onnx_path(model_spec if model_spec is not None else plan.model):
        from asyncdiff_partition.app.onnx_run import OnnxBackend

        return OnnxBackend()
    from asyncdiff_partition.app.pipeline_backend import TorchBackend

    return TorchBackend()


def run_worker(config: RunConfig, backend: Backend, shipped: Any, settings: RunSettings) -> dict[str, Any]:
    """One rank of an asynchronous run (the entry point ``launch`` starts on every rank).

    Joins the process group and lets the backend load this rank's finished segment from
    ``shipped`` and sample. Returns this rank's results (picklable), with the op graphs,
    placements and splits this process made while doing so (``compiler_counts``).
    """
    from asyncdiff_partition.core import counters
    from asyncdiff_partition.core.plan import Plan
    from asyncdiff_partition.runtime import comm

    torch.set_num_threads(config.threads or 1)
    before = counters.counts()
    plan = Plan.load(config.plan)
    comm.init(timeout_s=config.timeout_s)
    try:
        result = backend.run_rank(config, plan, shipped, settings)
        return {**result, "compiler_counts": counters.since(before)}
    finally:
        comm.shutdown()


class _InProcess:
    """A compiled job handed to this process's own rank (outside torchrun): ``load`` as shipped files do."""

    def __init__(self, job: Any):
        self.job = job

    def load(self, segment: int) -> tuple[Any, Any]:
        ready, shell = self.job.ready[segment], self.job.shell
        self.job = None  # this rank keeps its segment only
        return ready, shell


def _write_outputs(config: RunConfig, backend: Backend, meta: dict[str, Any],
                   results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Rank 0: the backend's outputs, the run report (and trace) from every reported rank's results."""
    from asyncdiff_partition.app.report import summarize_steps, write_report, write_trace

    first = results[min(results)]
    if first["rank"] != 0:  # launched from outside, not rank 0: rank 0 writes
        return {"images": [], "latent": None, "report": None, "trace": None, "summary": {}}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = backend.write(config, first, out)
    meta = {**meta, **written["meta"], "wall_s": max(r["wall_s"] for r in results.values()),
            "ranks_reported": sorted(results), "threads_per_rank": first["threads"]}
    for key in ("param_bytes", "rss_after_run", "peak_rss", "compiler_counts"):
        if all(key in r for r in results.values()):
            meta[f"{key}_per_rank"] = [results[rank][key] for rank in sorted(results)]
    rows = {rank: r["report"] for rank, r in results.items()}
    report = write_report(out / "report.json", rows, meta)
    trace = write_trace(config.trace, {rank: r["spans"] for rank, r in results.items()}) if config.trace else None
    return {"images": written["images"], "latent": written["latent"], "report": str(report),
            "trace": str(trace) if trace else None, "summary": summarize_steps(rows, warmup=meta["warmup"]),
            "wall_s": meta["wall_s"]}
