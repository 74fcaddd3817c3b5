"""The ``asyncdiff-partition run`` command: one sampling run from a plan, on its ranks, for torch and ONNX.

Example::

    result = run_plan(RunConfig(model=None, plan="plan.json", steps=20, out_dir="run"))
    result["images"], result["report"], result["summary"]["step_ms"]["median"]

:func:`run_plan` is the one run path; a :class:`Backend` says how a model is loaded, compiled
into ready segments and sampled (:class:`TorchBackend` here: a diffusers pipeline;
:class:`~asyncdiff_partition.onnx.run.OnnxBackend`: a seeded loop over an ONNX denoiser). It
checks everything a user can get wrong in this process and compiles the plan once (one op
graph, one placement, one split), then spawns the plan's ranks
(:func:`~asyncdiff_partition.runtime.launch.launch`), each sent only its finished segment
(:mod:`~asyncdiff_partition.fx.shipping`); or runs as one rank under an outside ``torchrun``
(each rank compiles for itself and the ranks check that they agree); or runs the single-process
reference schedule (``reference=True``). The report counts, per rank, the op graphs built,
placements made and splits run (``compiler_counts_per_rank``; zero on spawned ranks).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.fx

from asyncdiff_partition.fx.capture import CapturedModel
from asyncdiff_partition.pipelines import zoo
from asyncdiff_partition.pipelines.offline import BuiltPipeline, build_pipeline, capture_for_pipeline
from asyncdiff_partition.pipelines.wrap import ScheduledDenoiser, wrap_pipeline
from asyncdiff_partition.runtime.report import peak_resident_bytes, resident_bytes

__all__ = ["Backend", "RunConfig", "RunSettings", "TorchBackend", "backend_for", "default_guidance", "plan_input_shapes",
           "release_weights", "run_plan", "run_settings", "run_worker"]


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


@dataclass(frozen=True)
class RunSettings:
    """Steps, warm-up, stride and world size of a run, after defaulting to the plan's."""

    steps: int
    warmup: int
    stride: int
    world: int


def run_settings(config: RunConfig, plan: Any) -> RunSettings:
    """The run's settings: ``config``'s, else the plan's; and the ``--nproc`` check.

    Raises:
        ValueError: steps < 1, warmup < 0, a stride other than 1 or 2, or ``nproc`` other than
            the plan's world size (N + stride - 1).
    """
    from asyncdiff_partition.core.schedule import n_slots

    steps = config.steps if config.steps is not None else plan.steps
    warmup = config.warmup if config.warmup is not None else plan.warmup
    stride = config.stride if config.stride is not None else plan.stride
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0; got {steps}, {warmup}")
    world = n_slots(plan.n_devices, stride)
    if not config.reference and config.nproc is not None and config.nproc != world:
        raise ValueError(
            f"the plan needs {world} processes ({plan.n_devices} segments, stride {stride}) but --nproc is "
            f"{config.nproc}; leave --nproc out or make a plan with --devices {config.nproc - stride + 1}"
        )
    return RunSettings(steps, warmup, stride, world)


class Backend(Protocol):
    """How one kind of model goes through :func:`run_plan` (module-level and picklable)."""

    runtime: str  # recorded in the report

    def configure(self, config: RunConfig, plan: Any) -> RunConfig:
        """``config`` with the model and guidance defaults of this kind of model."""

    def compile(self, config: RunConfig, plan: Any, settings: RunSettings) -> Any:
        """Load and check the model, build its op graph once, and make its ready segments."""

    def ship(self, job: Any, directory: str) -> Any:
        """Write each segment's file for the ranks; returns what ``run_rank`` loads them from."""

    def reference(self, config: RunConfig, plan: Any, job: Any, settings: RunSettings) -> dict[str, Any]:
        """The single-process reference run (rank 0's results)."""

    def run_rank(self, config: RunConfig, plan: Any, shipped: Any, settings: RunSettings) -> dict[str, Any]:
        """One rank (process group joined): load its segment, sample; this rank's results."""

    def write(self, config: RunConfig, result: Mapping[str, Any], out: Path) -> dict[str, Any]:
        """Rank 0: this kind's outputs (images, latent) and their report meta."""


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
        ValueError: settings that do not fit the plan (``nproc``, guidance vs. batch, sizes).
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
    meta = {"model": config.model, "plan": str(config.plan), "mode": "reference" if config.reference else "async",
            "runtime": backend.runtime, "n_devices": plan.n_devices, "stride": settings.stride,
            "world_size": 1 if config.reference else settings.world, "steps": settings.steps,
            "warmup": settings.warmup, "guidance": config.guidance, "seed": config.seed,
            "boundaries": plan.boundaries, "predicted": plan.predicted,
            "ideal_speedup": ideal_speedup(settings.steps, settings.warmup, plan.n_devices, settings.stride)}
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
        from asyncdiff_partition.onnx.run import OnnxBackend

        return OnnxBackend()
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


# --- the torch backend: a diffusers pipeline around the captured denoiser ---------------------


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
        return config if config.guidance is not None else replace(config, guidance=default_guidance(config.model))

    def compile(self, config: RunConfig, plan: Any, settings: RunSettings) -> _TorchJob:
        from asyncdiff_partition.core.plan import PlanError
        from asyncdiff_partition.fx.ready import ready_segments

        built, captured, images = _prepare(config, plan, verify=True)
        try:
            ready = ready_segments(captured, plan, world_size=settings.world, stride=settings.stride)
        except PlanError as error:
            _, _, source = _latent_shape(plan, config.plan)
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
                                     timestep_input="timestep")
        wrap_pipeline(job.built.pipe, schedule, job.shell)
        return {**_sample(config, job.built, schedule, rank=0, steps=settings.steps, images=job.images),
                "peak_rss": peak_resident_bytes()}

    def run_rank(self, config: RunConfig, plan: Any, shipped: Any, settings: RunSettings) -> dict[str, Any]:
        """Builds the same pipeline as every other rank around the shipped model (weights of
        other segments are stand-ins), runs it with this rank's AsyncDenoiser in place of the
        denoiser and keeps only this rank's weights (:func:`release_weights`)."""
        from asyncdiff_partition.core.schedule import slot_segment
        from asyncdiff_partition.runtime import comm
        from asyncdiff_partition.runtime.denoiser import AsyncDenoiser

        rank, device = comm.rank(), comm.device()
        segment, shell = shipped.load(slot_segment(rank, plan.n_devices))
        built, shell, images = _prepare(config, plan, device=device, captured=shell)
        denoiser = AsyncDenoiser(segment, plan, input_names=[s.name for s in shell.inputs], latent=shell.latent.name,
                                 warmup=settings.warmup, stride=settings.stride, timestep_input="timestep",
                                 timeout_s=config.timeout_s, example=dict(zip((s.name for s in shell.inputs),
                                                                              shell.example)))
        wrap_pipeline(built.pipe, denoiser, _inputs_only(shell))
        del shell, segment, shipped
        kept = release_weights(built.model, denoiser._segment.module)  # the only weights this rank needs
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
    batch, size, _ = _latent_shape(plan, config.plan)
    model = captured._signature_model if captured is not None else None
    built = build_pipeline(config.model, seed=config.seed, sample_size=size, model=model)
    built.pipe.to(device)  # before a capture: the graph's constants live where the model does
    images = built.images_for_batch(batch, config.guidance)
    if captured is None:
        captured = capture_for_pipeline(built, batch=batch, sample_size=size, verify=verify)
    return built, captured, images


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
    wrapped = next(v for v in vars(built.pipe).values() if isinstance(v, ScheduledDenoiser))  # wrap_pipeline's
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


def _write_outputs(config: RunConfig, backend: Backend, meta: dict[str, Any],
                   results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Rank 0: the backend's outputs, the run report (and trace) from every reported rank's results."""
    from asyncdiff_partition.runtime.report import summarise, write_report, write_trace

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
            "trace": str(trace) if trace else None, "summary": summarise(rows, warmup=meta["warmup"]),
            "wall_s": meta["wall_s"]}
