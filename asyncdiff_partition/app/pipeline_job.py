"""The ``run --model PIPELINE_DIR --prompt TEXT`` command: a saved diffusers pipeline, parallelized on persistent ranks.

Example::

    result = run_pipeline(PipelineRun(model="sd-tiny", prompt="a red cube", steps=8,
                                      parallel=ParallelConfig(devices=2)))
    result["images"], result["report"], result["setup"]      # files written, set-up timings

The folder's own pipeline class is loaded here (every component in the dtype it was saved in) and
parallelized (:func:`~asyncdiff_partition.pipelines.parallelize.parallelize`): the engine's ranks
load it from the folder, this process records, captures, plans and splits the call and hands each
rank its finished segment, and rank 0's output comes back and is written here (images; video
frames as PNGs and an animated GIF), with ``report.json`` (per rank and step: compute, waits,
bytes; set-up timings; memory) and, with ``trace``, a Chrome trace. Everything that can be checked
before a rank starts is (options the pipeline does not take, devices, the output folder, temp
space). Under an outside ``torchrun`` every rank runs this and rank 0 writes.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.loading import load_pipeline

__all__ = ["PipelineJobError", "PipelineRun", "call_arguments", "profile_pipeline", "run_pipeline", "write_output"]


class PipelineJobError(AsyncDiffError, ValueError):
    """A pipeline folder or a ``--prompt`` run option that cannot work (found before any rank starts)."""


@dataclass(frozen=True)
class PipelineRun:
    """What ``asyncdiff-partition run --model DIR --prompt TEXT`` was asked for.

    ``steps``, ``guidance`` and ``size`` default to the pipeline's own.
    """

    model: str
    prompt: str | None = None
    image: str | None = None
    plan: str | None = None
    size: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    out_dir: str = "run"
    reference: bool = False
    trace: str | None = None
    nproc: int | None = None
    oversubscribe: bool = False
    progress: bool = False
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def run_pipeline(run: PipelineRun) -> dict[str, Any]:
    """``run --model DIR --prompt TEXT``: check, load, parallelize, sample once, write; returns what was written.

    Raises:
        PipelineJobError, PreflightError, ConfigError: before any rank starts.
        RecordingError, CaptureError, PlanError, RankError: while preparing or sampling.
    """
    from asyncdiff_partition.app.preflight import check_devices, check_temp_space, check_writable
    from asyncdiff_partition.app.report import write_report, write_trace
    from asyncdiff_partition.pipelines.parallelize import describe, parallelize, warm
    from asyncdiff_partition.runtime.launch import is_launched_externally

    config = run.parallel.checked()
    launched = is_launched_externally() and not run.reference
    if run.nproc is not None and run.nproc != config.world:
        raise PipelineJobError(f"--nproc {run.nproc} but the run has {config.world} ranks (--devices); leave --nproc out "
                               f"or make them agree")
    if not Path(run.model).is_dir():
        raise PipelineJobError(f"--model {run.model!r} is not a folder; pass a pipeline folder written by save_pretrained")
    if run.image is not None:
        _open_image(run.image)
    ranks = 1 if run.reference or launched else config.world
    setup: dict[str, float] = {}
    begin = time.perf_counter()
    pipe = load_pipeline(run.model)
    setup["load_s"] = time.perf_counter() - begin
    call = call_arguments(pipe, run)
    if run.steps is not None:
        call["num_inference_steps"] = run.steps
    check_devices(ranks, oversubscribe=run.oversubscribe or ranks == 1)
    if ranks > 1:
        check_temp_space(2 * _denoiser_bytes(pipe))
    parallelize(pipe, config, reference=run.reference, plan=run.plan)
    state = pipe.__dict__["_asyncdiff_parallel"]
    try:
        begin = time.perf_counter()
        warm(pipe, **call)  # record, capture, plan, split (and ship): a mistake here starts no rank
        setup["prepare_s"] = time.perf_counter() - begin
        setup.update({k: v for k, v in state.timings.items() if k in ("record_s", "compile_s", "ship_s")})
        check_writable(run.out_dir)
        if run.trace is not None:
            check_writable(Path(run.trace).parent or ".", "--trace")
        rank = 0
        if launched:
            from asyncdiff_partition.runtime import comm

            rank = comm.rank()
        elif not run.reference:
            begin = time.perf_counter()
            state.start()
            setup["spawn_s"] = time.perf_counter() - begin
        pipe.set_progress_bar_config(disable=not (run.progress and rank == 0))
        begin = time.perf_counter()
        with torch.no_grad():
            output = pipe(**call, generator=torch.Generator().manual_seed(run.seed))
        wall_s = time.perf_counter() - begin
        lines = describe(pipe)
        reports = _rank_reports(state, rank)
        plans = _plans(pipe, state)
    finally:
        pipe.close()
    if rank != 0:
        return {"rank": rank}
    out = Path(run.out_dir)
    written = write_output(output, out)
    if run.plan is None:
        written["plans"] = [str(plan.save(out / (f"plan-{name}.json" if i else "plan.json")))
                            for i, (name, plan) in enumerate(plans.items())]
    rows = {r: [dict(row, denoiser=name) for name, steps in report["steps"].items() for row in steps]
            for r, report in reports.items()}
    memory = {r: {k: report.get(k) for k in ("param_bytes", "rss", "peak_rss", "cuda_peak_allocated")}
              for r, report in reports.items()}
    meta = {"model": run.model, "pipeline": type(pipe).__name__, "mode": "reference" if run.reference else
            "ranks" if launched else "engine", "config": config.to_dict(), "denoisers": lines, "setup_s": setup,
            "sampling_s": wall_s, "memory": memory, "warmup": config.warmup, "call": sorted(call)}
    report_path = write_report(out / "report.json", rows, meta)
    trace_path = write_trace(run.trace, {r: [s for spans in report["spans"].values() for s in spans]
                                         for r, report in reports.items()}) if run.trace else None
    return {**written, "report": str(report_path), "trace": str(trace_path) if trace_path else None,
            "setup": setup, "wall_s": wall_s, "denoisers": lines, "pipeline": type(pipe).__name__}


def _plans(pipe: Any, state: Any) -> dict[str, Any]:
    """The plan of each denoiser the run used (its first call structure's)."""
    from asyncdiff_partition.pipelines.recording import components

    found = {}
    for name, module in components(pipe).items():
        plan = getattr(module, "__dict__", {}).get("plan")
        if plan is not None and name in getattr(state, "metas", {}):
            found[name] = plan
    return found


def _denoiser_bytes(pipe: Any) -> int:
    """The bytes of every module of the pipeline: an upper bound of what shipping segments writes."""
    modules = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def _rank_reports(state: Any, rank: int) -> dict[int, dict[str, Any]]:
    """Every rank's report of the last call (an engine's ranks), or this process's own."""
    reports = getattr(state, "reports", None)
    if callable(reports):
        return dict(reports())
    from asyncdiff_partition.runtime.memory import memory_counters

    modules = torch.nn.ModuleList([d.module for d in state.denoisers.values()])
    return {rank: {"steps": {n: d.report() for n, d in state.denoisers.items()},
                   "spans": {n: d.spans() for n, d in state.denoisers.items()}, **memory_counters(modules)}}


def call_arguments(pipe: Any, config: PipelineRun) -> dict[str, Any]:
    """The pipeline call the options ask for (``prompt``, ``image``, ``height``/``width``, ``guidance_scale``).

    Raises:
        PipelineJobError: an option the pipeline's ``__call__`` does not take.
    """
    params = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    call: dict[str, Any] = {}

    def give(option: str, value: Any, *keys: str) -> None:
        if value is None:
            return
        missing = [k for k in keys if k not in params]
        if missing:
            raise PipelineJobError(f"{name} takes no {'/'.join(missing)}, so {option} cannot be used; drop {option} "
                                   f"(its call takes: {', '.join(p for p in params if p not in ('self', 'kwargs'))})")
        call.update(dict.fromkeys(keys, value))

    give("--prompt", config.prompt, "prompt")
    give("--image", config.image, "image")
    if config.image is not None:
        call["image"] = _open_image(config.image)
    give("--size", config.size, "height", "width")
    give("--guidance", config.guidance, "guidance_scale")
    return call


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise PipelineJobError(f"--image {path!r} does not exist; pass an image file (PNG, JPEG)")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise PipelineJobError(f"--image {path!r} is not an image PIL can read ({error}); pass a PNG or JPEG") from None


def write_output(output: Any, out_dir: str | Path) -> dict[str, list[str]]:
    """A pipeline's output as files: ``image-K.png``; video frames as ``video-K/frame-F.png`` and ``video-K.gif``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {"images": [], "frames": [], "videos": []}
    for k, image in enumerate(getattr(output, "images", None) or []):
        written["images"].append(_save(image, out / f"image-{k}.png"))
    frames = getattr(output, "frames", None)
    for k, video in enumerate(frames if frames is not None else []):
        folder = out / f"video-{k}"
        folder.mkdir(exist_ok=True)
        pictures = [_picture(frame) for frame in video]
        written["frames"] += [_save(p, folder / f"frame-{f:03d}.png") for f, p in enumerate(pictures)]
        gif = out / f"video-{k}.gif"
        tmp = gif.with_suffix(".tmp.gif")
        pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=125, loop=0)
        tmp.replace(gif)
        written["videos"].append(str(gif))
    return written


def _picture(frame: Any) -> Any:
    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame
    import numpy as np

    array = np.asarray(frame.detach().float().cpu().permute(1, 2, 0) if isinstance(frame, torch.Tensor) else frame)
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"))


def _save(picture: Any, path: Path) -> str:
    """Write atomically (temp file + rename)."""
    tmp = path.with_suffix(".tmp.png")
    _picture(picture).save(tmp, format="PNG")
    tmp.replace(path)
    return str(path)


def profile_pipeline(config: PipelineRun, *, device: str = "cpu", warmup: int = 1, repeats: int = 5,
                     command: str = "") -> Any:
    """``profile --model DIR --prompt TEXT``: the denoiser's recorded call, captured and profiled.

    The profile's fingerprint is the one ``run --model DIR --prompt TEXT --plan FILE`` checks
    (same size and guidance give the same shapes).
    """
    from asyncdiff_partition.fx.capture import capture_model
    from asyncdiff_partition.fx.profiler import profile_model
    from asyncdiff_partition.pipelines.recording import record_denoiser_calls

    pipe = load_pipeline(config.model, device=device)
    recording = record_denoiser_calls(pipe, kwargs=call_arguments(pipe, config)).denoisers[0]
    captured = capture_model(recording.module, (), recording.calls[0].call)
    return profile_model(captured, model_name=str(config.model), device=device, warmup=warmup, repeats=repeats,
                         command=command)
