"""The ``asyncdiff-partition run`` command: one sampling run from a plan, on its ranks.

Example::

    result = run_plan(RunConfig(model=None, plan="plan.json", steps=20, out_dir="run"))
    result["images"], result["report"], result["summary"]["step_ms"]["median"]

:func:`run_plan` checks everything a user can get wrong in this process, then spawns the
plan's ranks (:func:`~asyncdiff_partition.runtime.launch.launch`), each sent only its segment's weights
(:mod:`~asyncdiff_partition.fx.shipping`), or runs as one rank under an outside ``torchrun``, or
runs the single-process reference schedule (``reference=True``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from asyncdiff_partition.fx.capture import CapturedModel
from asyncdiff_partition.fx.shipping import ShippedSegments
from asyncdiff_partition.pipelines import zoo
from asyncdiff_partition.pipelines.offline import BuiltPipeline, build_pipeline, capture_for_pipeline
from asyncdiff_partition.pipelines.wrap import _denoiser_attr, wrap_pipeline
from asyncdiff_partition.runtime.report import peak_resident_bytes, resident_bytes

__all__ = ["RunConfig", "default_guidance", "plan_input_shapes", "release_weights", "run_plan", "run_worker"]


# --- the `run` command: one sampling run from a plan ------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """What ``asyncdiff-partition run`` was asked for; handed (pickled) to every worker.

    ``steps``, ``warmup`` and ``stride`` default to the plan's; ``threads`` to one per rank's
    share of the CPU cores.
    """

    model: str | None  # None: the plan's
    plan: str
    steps: int | None = None
    warmup: int | None = None
    stride: int | None = None
    seed: int = 0
    guidance: float | None = None  # None: the model's own (see default_guidance)
    out_dir: str = "run"
    trace: str | None = None
    reference: bool = False
    nproc: int | None = None
    threads: int | None = None
    timeout_s: float = 300.0
    progress: bool = True
    compile: bool = False  # torch.compile each segment (fx.compile.compile_segment)


def plan_input_shapes(plan: Any, plan_path: str | Path | None = None) -> list[dict[str, Any]] | None:
    """The input specs (name, shape, dtype, latent) the plan's profile was made with, if known.

    Read from ``plan.profile["inputs"]`` when the plan records them, else from the profile file
    the plan names (as given, or next to the plan file).
    """
    if plan.profile.get("inputs"):
        return list(plan.profile["inputs"])
    recorded = plan.profile.get("path")
    if not recorded:
        return None
    from asyncdiff_partition.core.files import FileFormatError
    from asyncdiff_partition.core.profile import Profile, ProfileError

    candidates = [Path(recorded)]
    if plan_path is not None and not Path(recorded).is_absolute():
        candidates.append(Path(plan_path).parent / recorded)
    for candidate in candidates:
        if candidate.is_file():
            try:
                profile = Profile.load(candidate)
            except (FileFormatError, ProfileError):
                continue
            if profile.fingerprint == plan.fingerprint:
                return list(profile.inputs)
    return None


def _latent_shape(plan: Any, plan_path: str | Path | None) -> tuple[int, Any, str]:
    """(denoiser batch, latent size, how it is known) for the plan's profile."""
    inputs = plan_input_shapes(plan, plan_path)
    if inputs is None:
        return 2, None, "the plan's profile file was not found, so batch 2 and the model's sample_size were assumed"
    shape = next(i["shape"] for i in inputs if i["latent"])
    h, w = shape[-2:]
    return int(shape[0]), (h if h == w else (h, w)), "the shape of the plan's profile"


def _prepare(
    config: RunConfig, plan: Any, *, verify: bool = True, device: Any = "cpu", world: int | None = None,
    stride: int | None = None, captured: CapturedModel | None = None,
) -> tuple[BuiltPipeline, CapturedModel, int]:
    """Build the pipeline on ``device`` and capture its denoiser at the plan's shapes.

    Given ``captured`` (the model captured elsewhere, with those shapes), the pipeline is
    built around its model instead. With ``world``, the plan is checked against the capture
    and that many ranks (``runtime.check_plan``). Returns the pipeline, the capture and the
    number of images a run makes.
    """
    from asyncdiff_partition.core.plan import PlanError
    from asyncdiff_partition.runtime.denoiser import check_plan

    batch, size, source = _latent_shape(plan, config.plan)
    model = captured._signature_model if captured is not None else None
    built = build_pipeline(config.model, seed=config.seed, sample_size=size, model=model)
    if captured is not None:  # a shipped capture: its weight stand-ins must not grow to full size on the device
        from asyncdiff_partition.fx.device_move import move_captured

        move_captured(captured, device)
    built.pipe.to(device)  # before a capture: the graph's constants live where the model does
    images = built.images_for_batch(batch, config.guidance)
    if captured is None:
        captured = capture_for_pipeline(built, batch=batch, sample_size=size, verify=verify)
    if world is not None:
        try:
            check_plan(captured, plan, world, stride=stride)
        except PlanError as error:
            raise PlanError(f"{error} (model {config.model!r} captured at latent shape "
                            f"{captured.latent.shape}, {source})") from None
    return built, captured, images


def _settings(config: RunConfig, plan: Any) -> tuple[int, int, int, int]:
    """(steps, warmup, stride, world size) after defaulting to the plan's."""
    steps = config.steps if config.steps is not None else plan.steps
    warmup = config.warmup if config.warmup is not None else plan.warmup
    stride = config.stride if config.stride is not None else plan.stride
    if steps < 1 or warmup < 0 or stride not in (1, 2):
        raise ValueError(f"need steps >= 1, warmup >= 0 and stride 1 or 2; got {steps}, {warmup}, {stride}")
    return steps, warmup, stride, plan.n_devices + stride - 1


def run_worker(config: RunConfig, captured: CapturedModel | ShippedSegments | None = None) -> dict[str, Any]:
    """One rank of an asynchronous run (the entry point ``launch`` starts on every rank).

    Joins the process group, builds the same pipeline as every other rank, captures the
    denoiser (or takes ``captured``: the launching process's capture, or its per-segment files
    from :func:`~asyncdiff_partition.shipping.ship_segments`, of which this rank loads its own),
    keeps only this rank's segment (:func:`release_weights`) and runs the pipeline with this
    rank's :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` in place of the denoiser; rank 0
    saves the images. Returns this rank's report rows, spans, timings and memory (picklable).
    """
    from asyncdiff_partition.core.plan import Plan
    from asyncdiff_partition.core.schedule import slot_segment
    from asyncdiff_partition.runtime import comm
    from asyncdiff_partition.runtime import denoiser as runtime

    torch.set_num_threads(config.threads or 1)
    plan = Plan.load(config.plan)
    steps, warmup, stride, _ = _settings(config, plan)
    rank, _, device = comm.init(timeout_s=config.timeout_s)
    try:
        if isinstance(captured, ShippedSegments):
            captured = captured.load(slot_segment(rank, plan.n_devices))
        built, captured, images = _prepare(config, plan, device=device, captured=captured)
        denoiser = runtime.AsyncDenoiser(captured, plan, warmup=warmup, stride=stride, timestep_input="timestep",
                                         timeout_s=config.timeout_s, compile=config.compile)
        wrap_pipeline(built.pipe, denoiser, _inputs_only(captured))
        del captured
        kept = release_weights(built.model, denoiser._segment.module)  # the only weights this rank needs
        result = _sample(config, built, denoiser, rank=rank, steps=steps, images=images)
        return {**result, "param_bytes": kept, "rss_after_run": resident_bytes(), "peak_rss": peak_resident_bytes()}
    finally:
        comm.shutdown()


def release_weights(model: torch.nn.Module, keep: torch.nn.Module) -> int:
    """Swap every parameter and buffer of ``model`` that ``keep`` does not hold for a meta tensor.

    A rank's pipeline keeps the original denoiser for its attributes (``config``, ...), not its
    weights: after this, only the weights of this rank's segment (``keep``) stay in memory, once
    nothing else refers to the old tensors (drop the capture first). Returns the bytes kept.
    """
    own = {id(t) for t in (*keep.parameters(), *keep.buffers())}
    kept = 0
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type == "meta":
                    continue
                if id(t) in own:
                    kept += t.numel() * t.element_size()
                    continue
                meta = t.detach().to("meta")
                is_param = isinstance(t, torch.nn.Parameter)
                store[name] = torch.nn.Parameter(meta, requires_grad=False) if is_param else meta
    return kept


def _inputs_only(captured: CapturedModel) -> CapturedModel:
    """The capture without its graph and examples: what ScheduledDenoiser needs to bind calls."""
    from dataclasses import replace

    empty = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    return replace(captured, graph_module=empty, example=[])


def _sample(config: RunConfig, built: BuiltPipeline, denoiser: Any, *, rank: int, steps: int,
            images: int) -> dict[str, Any]:
    """Run the wrapped pipeline once; rank 0 saves the images. This rank's results."""
    built.pipe.set_progress_bar_config(disable=not (config.progress and rank == 0), desc=f"sampling {config.model}")
    begin = time.perf_counter()
    with torch.no_grad():
        pictures = built(steps=steps, guidance_scale=config.guidance, images=images)
    wall_s = time.perf_counter() - begin
    wrapped = getattr(built.pipe, _denoiser_attr(built.pipe))
    paths: list[str] = []
    if rank == 0:
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            paths.append(str(out / f"image-{i}.png"))
            picture.save(paths[-1])
    return {"rank": rank, "report": wrapped.report(), "spans": wrapped.spans(), "wall_s": wall_s, "images": paths,
            "method": wrapped.captured.method, "latent_shape": list(wrapped.captured.latent.shape), "note": built.note,
            "threads": torch.get_num_threads(), "device": str(built.pipe.device)}


def default_guidance(spec: str) -> float:
    """The guidance scale ``run`` uses when none is given: the bundled digits model's own, else 5."""
    from asyncdiff_partition.pipelines.digits import GUIDANCE

    return GUIDANCE if spec in zoo.TRAINED_MODELS else 5.0


def run_plan(config: RunConfig) -> dict[str, Any]:
    """``asyncdiff-partition run``: check the plan, sample on its ranks, write images and report.

    Everything the user can get wrong (missing plan, plan of another model, shapes, world size)
    is checked in this process before any worker starts. Without ``reference`` the plan's world
    size of workers is spawned (``launch.launch``), unless this process was itself started by
    an outside launcher (torchrun), in which case it runs as its rank. With ``reference`` the
    single-process :class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` runs the same
    segments here.

    Returns:
        ``{"images": [paths], "report": path, "trace": path or None, "summary": {...}}``;
        empty paths on ranks other than 0.

    Raises:
        FileFormatError, PlanError: the plan file is missing, corrupt or made for another model.
        ValueError: settings that do not fit the plan (``nproc``, guidance vs. batch, sizes).
    """
    from dataclasses import replace

    from asyncdiff_partition.core.plan import Plan, ideal_speedup

    plan = Plan.load(config.plan)
    config = replace(config, model=config.model or plan.model)
    if config.guidance is None:
        config = replace(config, guidance=default_guidance(config.model))
    steps, warmup, stride, world = _settings(config, plan)
    if not config.reference and config.nproc is not None and config.nproc != world:
        raise ValueError(
            f"the plan needs {world} processes ({plan.n_devices} segments, stride {stride}) but --nproc is "
            f"{config.nproc}; leave --nproc out or make a plan with --devices {config.nproc - stride + 1}"
        )
    built, captured, images = _prepare(config, plan, verify=True, world=world, stride=stride)
    meta = {"model": config.model, "plan": str(config.plan), "mode": "reference" if config.reference else "async",
            "n_devices": plan.n_devices, "stride": stride, "world_size": 1 if config.reference else world,
            "steps": steps, "warmup": warmup, "guidance": config.guidance, "seed": config.seed, "images": images,
            "boundaries": plan.boundaries, "predicted": plan.predicted,
            "ideal_speedup": ideal_speedup(steps, warmup, plan.n_devices, stride),
            "compile": config.compile}
    from asyncdiff_partition.fx.opgraph import build_op_graph
    from asyncdiff_partition.fx.split import split_graph

    if config.reference:
        from asyncdiff_partition.runtime.reference import ReferenceSchedule

        segments = split_graph(captured, build_op_graph(captured), plan.boundaries)
        schedule = ReferenceSchedule(segments, warmup=warmup, stride=stride, timestep_input="timestep",
                                     compile=config.compile)
        wrap_pipeline(built.pipe, schedule, captured)
        results = {0: {**_sample(config, built, schedule, rank=0, steps=steps, images=images),
                       "peak_rss": peak_resident_bytes()}}
    else:
        from asyncdiff_partition.fx.shipping import ship_segments
        from asyncdiff_partition.runtime.launch import is_launched_externally, launch

        threads = config.threads or max(1, torch.get_num_threads() // world)
        worker_config = replace(config, threads=threads)
        del built  # every worker builds its own pipeline around the capture
        if is_launched_externally():
            # Each rank returns only its own rows: rank 0's report holds rank 0 alone (ranks_reported).
            mine = run_worker(worker_config, captured)
            results = {mine["rank"]: mine}
        else:
            # The workers get this capture, each with only its segment's weights: no capture per
            # rank, the same graph everywhere, no full replica in any worker.
            with tempfile.TemporaryDirectory(prefix="asyncdiff-run-") as directory:
                segments = split_graph(captured, build_op_graph(captured), plan.boundaries)
                shipped = ship_segments(captured, segments, directory)
                del segments
                results = launch(run_worker, (worker_config, shipped), world, timeout_s=config.timeout_s)
    return _write_outputs(config, meta, results)


def _write_outputs(config: RunConfig, meta: dict[str, Any], results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Rank 0: the run report (and trace) from every reported rank's results."""
    from asyncdiff_partition.runtime.report import summarise, write_report, write_trace

    first = results[min(results)]
    if first["rank"] != 0:  # launched from outside, not rank 0: rank 0 writes
        return {"images": [], "report": None, "trace": None, "summary": {}}
    meta = {**meta, "wall_s": max(r["wall_s"] for r in results.values()), "capture_method": first["method"],
            "latent_shape": first["latent_shape"], "pipeline_note": first["note"],
            "ranks_reported": sorted(results), "threads_per_rank": first["threads"], "device": first["device"]}
    for key in ("param_bytes", "rss_after_run", "peak_rss"):
        if all(key in r for r in results.values()):
            meta[f"{key}_per_rank"] = [results[rank][key] for rank in sorted(results)]
    rows = {rank: r["report"] for rank, r in results.items()}
    report = write_report(Path(config.out_dir) / "report.json", rows, meta)
    trace = write_trace(config.trace, {rank: r["spans"] for rank, r in results.items()}) if config.trace else None
    return {"images": first["images"], "report": str(report), "trace": str(trace) if trace else None,
            "summary": summarise(rows, warmup=meta["warmup"]), "wall_s": meta["wall_s"]}
