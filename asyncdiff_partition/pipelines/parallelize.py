"""One call that runs any diffusers pipeline's denoisers asynchronously on N devices.

Example (``torchrun --nproc_per_node 2 script.py``; every rank runs the same script)::

    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    parallelize(pipe, devices=2, prompt="a red cube", height=512, width=512)   # prepares this call
    image = pipe(prompt="a red cube", height=512, width=512).images[0]         # unchanged call

:func:`parallelize` makes the pipeline's call prepare itself (Note [prepared calls]) and puts a
:class:`~asyncdiff_partition.pipelines.wrap.ScheduledDenoiser` on every denoiser the call uses.
Preparing a call runs it once as a dry run (:mod:`~asyncdiff_partition.pipelines.recording`),
captures every distinct call structure of every denoiser, makes a plan (rank 0 profiles, cached by
model fingerprint and device, and sends the plan to the others) or takes a saved one, and splits
it. Each rank keeps only its segments' weights. Other components (text encoders, VAE, a
ControlNet) stay whole on every rank.

Note [prepared calls]
~~~~~~~~~~~~~~~~~~~~~
A pipeline call whose denoiser calls all have a captured structure runs at once. A call with a
new structure (another size, batch, guidance pattern, attention set-up) stops at its first such
denoiser call (:class:`~asyncdiff_partition.pipelines.wrap.NeedsCapture`, on every rank at the same
call), the pipeline's random state and the caller's generators are put back as they were, the
call is prepared (recorded, captured, planned, split) and run again. Prompts, seeds and guidance
scales never prepare again. Under an outside launcher every rank keeps only its segments once the
first call has run, so later structures cannot be captured there: prepare them first
(``parallelize(pipe, ..., **call)``, :func:`warm`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.plan import Plan, PlanError, SegmentPlan, make_plan, with_calls_per_step
from asyncdiff_partition.fx.capture import CapturedModel, capture_model
from asyncdiff_partition.pipelines.recording import Call, DenoiserRecord, Recording, record_denoiser_calls
from asyncdiff_partition.pipelines.structure import CallKey, configured
from asyncdiff_partition.pipelines.wrap import (
    NeedsCapture,
    ScheduledDenoiser,
    Stream,
    call_binding,
    install,
    scheduled,
    uninstall,
)

__all__ = ["CACHE_ENV", "ParallelizeError", "choose_plan", "default_cache_dir", "describe", "parallelize",
           "unparallelize", "warm"]

CACHE_ENV = "ASYNCDIFF_CACHE"
MAX_PREPARES = 4  # new call structures one pipeline call may meet before it gives up
_STATE = "_asyncdiff_parallel"  # the pipeline's _Parallel, in its __dict__
_CAPTURES = "_asyncdiff_captures"  # on a denoiser (reference runs): {call key: capture}


class ParallelizeError(AsyncDiffError, RuntimeError):
    """parallelize cannot run here as asked (no launcher, wrong world size, unknown timestep form)."""


def default_cache_dir() -> Path:
    """Where profiles are cached: ``$ASYNCDIFF_CACHE``, else ``~/.cache/asyncdiff-partition``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "asyncdiff-partition")


def parallelize(
    pipe: Any,
    devices: int = 2,
    *,
    stride: int = 1,
    warmup: int = 1,
    switch_warmup: int | None = None,
    plan: str | Path | None = None,
    reference: bool = False,
    cache_dir: str | Path | None = None,
    steps: int = 50,
    timeout_s: float | None = None,
    **call_kwargs: Any,
) -> Any:
    """Run ``pipe``'s denoisers as the asynchronous schedule over ``devices`` segments; returns ``pipe``.

    Then call ``pipe(...)`` as before, with any arguments: each new call structure is prepared
    on its first call (Note [prepared calls]); ``call_kwargs``, if given, are prepared now. The
    plan in use is ``pipe.unet.plan`` (the denoiser's ``plan`` attribute) afterwards. Under a
    launcher (``torchrun``, :func:`~asyncdiff_partition.runtime.launch.launch`) there must be
    ``devices + stride - 1`` ranks; ``reference=True`` runs the single-process reference schedule.

    Args:
        pipe: a diffusers pipeline (any family: the denoisers are found, Note [finding the denoiser]).
        devices: N, the number of segments.
        stride: 1, or 2 (one extra rank).
        warmup: exact warm-up steps W, in inference steps (W >= the number of steps reproduces
            the pipeline exactly, whatever its scheduler).
        switch_warmup: exact steps where a denoiser takes over part way (Wan 2.2's
            ``transformer_2``); default ``warmup``.
        plan: a saved plan file for this model at these shapes; default: make one.
        reference: run every segment in this process (fidelity checks; no launcher needed).
        cache_dir: where profiles are cached (default :func:`default_cache_dir`).
        steps: the T the plan's predicted speedup is written for.
        timeout_s: bound on every wait for another rank.
        call_kwargs: a pipeline call to prepare now (``prompt``, ``height``, ``image``, ...).

    Raises:
        ParallelizeError: no launcher and not ``reference``, or another world size than the plan needs.
        RecordingError: the dry run did not find a denoiser.
        PlanError: ``plan`` was made for another model or other shapes.
    """
    from asyncdiff_partition.runtime.launch import is_launched_externally

    world = devices + stride - 1
    launched = is_launched_externally() and not reference
    if not reference and not launched:
        raise ParallelizeError(
            f"parallelize(devices={devices}, stride={stride}) runs one process per segment ({world} in all), but this "
            f"process was not started by a launcher; run 'torchrun --nproc_per_node {world} script.py' (every rank "
            f"calls parallelize) or 'asyncdiff-partition run --model DIR --prompt TEXT --devices {devices}', "
            "or pass reference=True for the single-process reference schedule"
        )
    if launched and int(os.environ["WORLD_SIZE"]) != world:
        raise ParallelizeError(
            f"parallelize(devices={devices}, stride={stride}) needs {world} ranks but WORLD_SIZE is "
            f"{os.environ['WORLD_SIZE']}; start {world} processes or pass devices={int(os.environ['WORLD_SIZE']) - stride + 1}"
        )
    from asyncdiff_partition.core.schedule import check_stride, make_schedule

    check_stride(stride)
    make_schedule(devices, 0, warmup=warmup, stride=stride)  # validates N and W
    unparallelize(pipe)
    if launched:
        from asyncdiff_partition.runtime import comm

        _, _, device = comm.init(timeout_s=timeout_s)
        if device.type == "cuda":
            pipe.to(device)
    state = _Parallel(pipe, devices=devices, stride=stride, warmup=warmup, switch_warmup=switch_warmup, plan=plan,
                      reference=reference, launched=launched, cache_dir=cache_dir, steps=steps, timeout_s=timeout_s)
    _intercept(pipe, state)
    if call_kwargs:
        try:
            state.prepare((), call_kwargs)
        except BaseException:
            unparallelize(pipe)
            raise
    return pipe


def warm(pipe: Any, *args: Any, **call_kwargs: Any) -> Any:
    """Prepare the call ``pipe(*args, **call_kwargs)`` ahead (Note [prepared calls]); returns ``pipe``.

    Raises:
        ParallelizeError: ``pipe`` was not parallelized, or its ranks already dropped other weights.
    """
    state = pipe.__dict__.get(_STATE)
    if state is None:
        raise ParallelizeError(f"warm() needs a parallelized pipeline; call parallelize({type(pipe).__name__}, ...) first")
    state.prepare(args, call_kwargs)
    return pipe


def describe(pipe: Any) -> list[str]:
    """What a parallelized pipeline runs, one line per denoiser and one for the weights each rank holds.

    Example:
        >>> print("\n".join(describe(pipe)))  # doctest: +SKIP
        transformer (WanTransformer3DModel): 2 calls per step, 1 call structure, boundaries [0, 412, 838], ...
        weights per rank: rank 0 1.2 MB (transformer 0.6 MB, transformer_2 0.6 MB), rank 1 ...
    """
    state = pipe.__dict__.get(_STATE)
    if state is None:
        raise ParallelizeError(f"describe() needs a parallelized pipeline; call parallelize({type(pipe).__name__}, ...)")
    return state.summary()


def unparallelize(pipe: Any) -> Any:
    """Undo :func:`parallelize`: the pipeline's own call and every denoiser's own ``forward`` back."""
    state = pipe.__dict__.pop(_STATE, None)
    if state is not None:
        object.__setattr__(pipe, "__class__", state.cls)
        for denoiser in state.denoisers.values():
            uninstall(denoiser.module)
    return pipe


# --- the prepared pipeline --------------------------------------------------------------------


def _intercept(pipe: Any, state: _Parallel) -> None:
    """Route ``pipe(...)`` through ``state`` (Note [prepared calls]): the instance gets a subclass of
    its own class (same name) whose ``__call__`` does that."""
    import functools

    cls = type(pipe)
    own = cls.__call__

    @functools.wraps(own)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__[_STATE].call(args, kwargs)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    pipe.__dict__[_STATE] = state
    object.__setattr__(pipe, "__class__", sub)


@dataclass
class _Compiled:
    """One call structure of one denoiser, finished: its binding, plan and segments."""

    binding: CapturedModel
    plan: Plan
    segments: list[Any]  # all (reference) or this rank's one
    timestep: str
    latent: str
    inputs: list[str]
    used: frozenset[int] = frozenset()  # ids of the model's tensors some segment reads


class _Parallel:
    """A parallelized pipeline's state: its denoisers, their compiled call structures, their streams."""

    def __init__(self, pipe: Any, *, devices: int, stride: int, warmup: int, switch_warmup: int | None,
                 plan: str | Path | None, reference: bool, launched: bool, cache_dir: str | Path | None,
                 steps: int, timeout_s: float | None):
        self.pipe, self.cls = pipe, type(pipe)
        self.devices, self.stride, self.warmup, self.switch_warmup = devices, stride, warmup, switch_warmup
        self.plan_path, self.reference, self.launched = plan, reference, launched
        self.cache_dir, self.steps, self.timeout_s = cache_dir, steps, timeout_s
        self.denoisers: dict[str, ScheduledDenoiser] = {}
        self.compiled: dict[tuple[str, CallKey], _Compiled] = {}
        self.first_plan: dict[str, tuple[Plan, list[str]]] = {}  # per denoiser: its plan and graph's node names
        self.released = False
        self.streams_made = 0
        self.recordings: list[Recording] = []
        self.records: dict[str, DenoiserRecord] = {}  # the latest recording of each denoiser

    # --- preparing ---------------------------------------------------------------------------

    def prepare(self, args: tuple, kwargs: dict[str, Any]) -> Recording:
        """Record the call, then capture, plan and split every structure not compiled yet."""
        if self.released:
            raise ParallelizeError(
                f"this rank already dropped the weights its segments do not use (after the first call), so it cannot "
                f"capture a new call structure of {self.cls.__name__}; prepare every call structure before the first "
                "call (parallelize(pipe, ..., **call) or warm(pipe, **call)), or use the single-process engine")
        recording = record_denoiser_calls(self.pipe, args, kwargs,
                                          run=lambda *a, **k: self.cls.__call__(self.pipe, *a, **k))
        self.recordings.append(recording)
        for record in recording.denoisers:
            self.records[record.name] = record
            self._wrap(record)
            for call in record.calls:
                if (record.name, call.key) not in self.compiled:
                    self.compiled[(record.name, call.key)] = self._compile(record, call)
        return recording

    def _wrap(self, record: DenoiserRecord) -> None:
        if record.name in self.denoisers and scheduled(record.module) is self.denoisers[record.name]:
            return
        from asyncdiff_partition.pipelines.recording import components

        sname = next(n for n, v in components(self.pipe).items() if v is record.scheduler)
        pipe = self.pipe
        denoiser = ScheduledDenoiser(record.module, record.name, self, scheduler=lambda: getattr(pipe, sname),
                                     form=record.form, output=record.output, warmup=self.warmup,
                                     switch_warmup=self.switch_warmup)
        self.denoisers[record.name] = install(record.module, denoiser)

    def _compile(self, record: DenoiserRecord, call: Call) -> _Compiled:
        from asyncdiff_partition.fx.ready import ready_segments

        # capture, profile and checks run the model itself, set up as the pipeline had it for this call
        with _own_forward(record.module), configured(record.module, call.configuration):
            captured = self._capture(record, call)
            timestep = _timestep_input(captured, record, self.stride)
            chosen = with_calls_per_step(_agree(lambda: self._choose(record, captured), self.launched), record.per_step)
            if record.name not in self.first_plan:
                record.module.__dict__["plan"] = chosen  # pipe.unet.plan, as before
                self.first_plan[record.name] = (chosen, [n.name for n in captured.graph_module.graph.nodes])
            inputs = [s.name for s in captured.inputs]
            if self.reference:
                return _Compiled(captured, chosen, ready_segments(captured, chosen), timestep, captured.latent.name,
                                 inputs)
            from asyncdiff_partition.runtime.denoiser import segment_for_rank

            world = self.devices + self.stride - 1
            segments = ready_segments(captured, chosen, world_size=world, stride=self.stride)
            segment = segment_for_rank(segments)
            modules = [s.module for s in segments if isinstance(s.module, torch.nn.Module)]
            used = frozenset(id(t) for m in modules for t in (*m.parameters(), *m.buffers()))
            return _Compiled(call_binding(captured), chosen, [segment], timestep, captured.latent.name, inputs, used)

    def _capture(self, record: DenoiserRecord, call: Call) -> CapturedModel:
        """Capture the recorded call; reference runs reuse a capture of the same structure from an
        earlier parallelize of this model."""
        cache = record.module.__dict__.setdefault(_CAPTURES, {}) if self.reference else {}
        if call.key not in cache:
            cache[call.key] = capture_model(record.module, (), call.call)
        return cache[call.key]

    def _choose(self, record: DenoiserRecord, captured: CapturedModel) -> Plan:
        """A structure of a denoiser already planned reuses that plan's cuts when its graph has the same
        nodes (one placement, one set of weights); else :func:`choose_plan`."""
        first = self.first_plan.get(record.name)
        names = [n.name for n in captured.graph_module.graph.nodes]
        if first is not None and first[1] == names:
            from asyncdiff_partition.core.profile import fingerprint
            from asyncdiff_partition.fx.opgraph import build_op_graph

            return replace(first[0], fingerprint=fingerprint(build_op_graph(captured),
                                                             [s.to_dict() for s in captured.inputs]))
        return choose_plan(captured, record.module, self.devices, stride=self.stride, warmup=self.warmup,
                           plan=self.plan_path, cache_dir=self.cache_dir, steps=self.steps)

    def summary(self) -> list[str]:
        lines, held = [], [0] * self.devices
        parts: list[list[str]] = [[] for _ in range(self.devices)]
        for name, (plan, _) in self.first_plan.items():
            record = self.records[name]
            structures = sum(n == name for n, _ in self.compiled)
            predicted = plan.predicted
            lines.append(f"{name} ({type(record.module).__name__}): {record.per_step} call(s) per step, {structures} call "
                         f"structure(s), boundaries {plan.boundaries}, predicted {predicted['speedup']:.2f}x "
                         f"(ideal {predicted['ideal_speedup']:.2f}x), step {predicted['async_step_ms']:.1f} ms vs "
                         f"{predicted['sequential_step_ms']:.1f} ms")
            for segment in plan.segments:
                held[segment.index] += segment.param_bytes
                parts[segment.index].append(f"{name} {segment.param_bytes / 1e6:.1f} MB")
        lines.append("weights per rank: " + ", ".join(f"rank {r} {b / 1e6:.1f} MB ({', '.join(parts[r])})"
                                                      for r, b in enumerate(held)))
        return lines

    # --- running -----------------------------------------------------------------------------

    def stream(self, name: str, position: int, key: CallKey, step: int, index: int) -> Stream:
        """The stream of a call position (Note [streams] in pipelines/wrap.py), or :class:`NeedsCapture`."""
        compiled = self.compiled.get((name, key))
        if compiled is None:
            raise NeedsCapture(name, position, step, key, "prepare this call first: warm(pipe, **call)")
        plan = compiled.plan
        if self.reference:
            from asyncdiff_partition.runtime.reference import ReferenceSchedule

            denoiser: Any = ReferenceSchedule(compiled.segments, warmup=self.warmup, stride=self.stride,
                                              timestep_input=compiled.timestep, extrapolation=plan.extrapolation)
        else:
            from asyncdiff_partition.runtime.denoiser import AsyncDenoiser

            denoiser = AsyncDenoiser(compiled.segments[0], plan, input_names=compiled.inputs, latent=compiled.latent,
                                     warmup=self.warmup, stride=self.stride, timestep_input=compiled.timestep,
                                     timeout_s=self.timeout_s, stream=self.streams_made)
        self.streams_made += 1
        return Stream(compiled.binding, denoiser, index)

    def call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The pipeline's own call, prepared as it goes (Note [prepared calls])."""
        if not self.denoisers:  # nothing is known of this pipeline's denoisers yet
            self.prepare(args, kwargs)
        snapshot = _Snapshot(kwargs)
        for _ in range(MAX_PREPARES):
            if self.launched and self.compiled and not self.released:
                self._release()
            try:
                return self.cls.__call__(self.pipe, *args, **kwargs)
            except NeedsCapture:
                for denoiser in self.denoisers.values():
                    denoiser.abandon()
                snapshot.restore()
                self.prepare(args, kwargs)
        raise ParallelizeError(f"{self.cls.__name__}'s call met a new denoiser call structure {MAX_PREPARES} times "
                               "in a row; its denoiser calls change from one run to the next")

    def _release(self) -> None:
        """Keep only this rank's segments' weights of every denoiser (Note [prepared calls])."""
        from asyncdiff_partition.fx.weights import release_weights

        for name, denoiser in self.denoisers.items():
            mine = [c for (n, _), c in self.compiled.items() if n == name]
            kept = torch.nn.ModuleList([c.segments[0].module for c in mine])
            release_weights(denoiser.module, kept, used=frozenset().union(*(c.used for c in mine)))
        self.released = True


@contextlib.contextmanager
def _own_forward(module: torch.nn.Module) -> Iterator[None]:
    """The model's own ``forward`` for a while, not the scheduled one installed on it."""
    current = module.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if current is not None:
            module.__dict__["forward"] = current


class _Snapshot:
    """The random state a pipeline call consumes: the global generators and the caller's own."""

    def __init__(self, kwargs: dict[str, Any]):
        generators = kwargs.get("generator")
        items = generators if isinstance(generators, list) else [generators]
        self.generators = [(g, g.get_state()) for g in items if isinstance(g, torch.Generator)]
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        for g, state in self.generators:
            g.set_state(state)
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _timestep_input(captured: CapturedModel, record: DenoiserRecord, stride: int) -> str:
    name = next((s.name for s in captured.inputs if s.path == record.timestep), None)
    if name is None and stride == 2:
        raise ParallelizeError(
            f"stride 2 sets the timestep of the next step, but no input of {type(record.module).__name__} follows "
            f"the scheduler's timesteps (inputs: {[s.path for s in captured.inputs]}); use stride=1"
        )
    return name or "timestep"


def _agree(decide: Callable[[], Plan], launched: bool) -> Plan:
    """Rank 0 decides the plan and sends it; every rank gets the same plan, or the same error."""
    if not launched:
        return decide()
    from asyncdiff_partition.runtime import comm

    message: dict[str, Any] = {}
    if comm.rank() == 0:
        try:
            message = {"plan": decide().to_dict()}
        except AsyncDiffError as error:
            message = {"error": str(error)}
    message = comm.broadcast_object(message, src=0, what="the plan")
    if "error" in message:
        raise PlanError(message["error"])
    data = dict(message["plan"])
    data["segments"] = [SegmentPlan(**s) for s in data["segments"]]
    return Plan(**data)


def choose_plan(captured: CapturedModel, module: torch.nn.Module, devices: int, *, stride: int, warmup: int,
                plan: str | Path | None, cache_dir: str | Path | None, steps: int) -> Plan:
    """``plan`` loaded and checked against ``captured``, or a plan made from its (cached) profile.

    Raises:
        PlanError: ``plan`` was made for another model or shapes, or for another number of segments.
    """
    from asyncdiff_partition.core.profile import Profile, fingerprint
    from asyncdiff_partition.fx.opgraph import build_op_graph

    found = fingerprint(build_op_graph(captured), [s.to_dict() for s in captured.inputs])
    if plan is not None:
        loaded = Plan.load(plan, fingerprint=found)
        if loaded.n_devices != devices:
            raise PlanError(f"plan {str(plan)!r} splits the model into {loaded.n_devices} segments but devices={devices}; "
                            f"pass devices={loaded.n_devices} or make a plan for {devices}")
        return loaded
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    tag = f"{device.type}{device.index if device.index is not None else ''}-{torch.get_num_threads()}t"
    path = Path(cache_dir or default_cache_dir()) / f"{found}.{tag}.profile.json"
    if path.is_file():
        profile = Profile.load(path)
    else:
        from asyncdiff_partition.fx.profiler import profile_model

        profile = profile_model(captured, model_name=type(module).__name__, device=str(device), repeats=3,
                                command="parallelize")
        profile.save(path)
    return make_plan(profile, devices, stride=stride, warmup=warmup, steps=steps, profile_path=str(path))
