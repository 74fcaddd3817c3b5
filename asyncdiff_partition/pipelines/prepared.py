"""A parallelized pipeline in one process: its denoisers, their compiled call structures, the streams of their calls.

Example::

    prepared = Prepared(pipe, ParallelConfig(devices=2), mode="reference", plans=plans)
    prepared.prepare((), dict(prompt="a red cube"))    # record, capture, plan, split
    prepared.call((), dict(prompt="a blue ball"))      # the pipeline's own call on the schedule

:func:`~asyncdiff_partition.pipelines.parallelize.parallelize` makes one for ``reference=True`` and
under an outside launcher (Note [where the ranks run]); every rank of an
:class:`~asyncdiff_partition.pipelines.engine.Engine` holds one whose structures come from the engine.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.plan import Plan, SegmentPlan
from asyncdiff_partition.fx.layout import ReadySegment
from asyncdiff_partition.pipelines.compiler import Compiled, PlanBook, compile_call
from asyncdiff_partition.pipelines.recording import DenoiserRecord, Recording, components, record_denoiser_calls
from asyncdiff_partition.pipelines.structure import CallKey, OutputForm
from asyncdiff_partition.pipelines.wrap import NeedsCapture, ScheduledDenoiser, Stream, install, scheduled, uninstall

__all__ = ["CAPTURES", "MAX_PREPARES", "DenoiserMeta", "ParallelizeError", "Prepared", "plan_from_dict", "summary"]

MAX_PREPARES = 4  # new call structures one pipeline call may meet before it gives up
CAPTURES = "_asyncdiff_captures"  # on a denoiser (reference runs): {call key: capture}


class ParallelizeError(AsyncDiffError, RuntimeError):
    """parallelize cannot run here as asked (wrong world size, no pipeline folder for the ranks, ...)."""


@dataclass(frozen=True)
class DenoiserMeta:
    """What a process needs to run a denoiser it did not record: where it is and how it is called."""

    name: str
    scheduler: str  # the scheduler component whose steps its calls belong to
    form: str | None
    output: OutputForm
    per_step: int
    rows: int

    @classmethod
    def of(cls, record: DenoiserRecord, pipe: Any) -> DenoiserMeta:
        scheduler = next(n for n, v in components(pipe).items() if v is record.scheduler)
        return cls(record.name, scheduler, record.form, record.output, record.per_step, record.rows)


class Prepared:
    """A parallelized pipeline in one process (Note [where the ranks run]): its denoisers, their compiled
    call structures and the streams of their calls.

    ``mode`` is ``"reference"`` (every segment here) or ``"ranks"`` (this process is one rank of an
    outside launch; it compiles its calls itself); an :class:`~asyncdiff_partition.pipelines.engine.Engine`
    is a ``Prepared`` whose streams run on its own ranks.
    """

    def __init__(self, pipe: Any, config: ParallelConfig, *, mode: str, plans: PlanBook | None = None):
        self.pipe, self.cls, self.config, self.mode, self.plans = pipe, type(pipe), config, mode, plans
        self.denoisers: dict[str, ScheduledDenoiser] = {}
        self.metas: dict[str, DenoiserMeta] = {}
        self.compiled: OrderedDict[tuple[str, CallKey], Compiled] = OrderedDict()
        self.released = False
        self.streams_made = 0
        self.recordings: list[Recording] = []
        self.captures = 0
        self.timings: dict[str, float] = {}  # seconds of the latest prepare: record_s, compile_s (and the engine's)

    # --- preparing ---------------------------------------------------------------------------

    def prepare(self, args: tuple, kwargs: dict[str, Any]) -> Recording:
        """Record the call, then capture, plan and split every structure not compiled yet."""
        if self.released or self.plans is None:
            raise ParallelizeError(
                f"this rank already dropped the weights its segments do not use (after the first call), so it cannot "
                f"capture a new call structure of {self.cls.__name__}; prepare every call structure before the first "
                "call (parallelize(pipe, ..., **call) or warm(pipe, **call)), or run in a plain process, where "
                "parallelize starts its own ranks")
        begin = time.perf_counter()
        recording = record_denoiser_calls(self.pipe, args, kwargs, run=self.own_call)
        self.timings = {"record_s": time.perf_counter() - begin, "compile_s": 0.0}
        self.recordings.append(recording)
        captures = None
        for record in recording.denoisers:
            self.install(DenoiserMeta.of(record, self.pipe))
            for call in record.calls:
                if (record.name, call.key) in self.compiled:
                    continue
                if self.mode == "reference":
                    captures = record.module.__dict__.setdefault(CAPTURES, {})
                world = None if self.mode == "reference" else self.config.world
                begin = time.perf_counter()
                compiled = compile_call(record, call, self.config, self.plans, world=world, captures=captures)
                self.timings["compile_s"] += time.perf_counter() - begin
                self.captures += 1
                if record.name not in {n for n, _ in self.compiled}:
                    record.module.__dict__["plan"] = compiled.plan  # pipe.unet.plan
                self.compiled[(record.name, call.key)] = self.keep(record.name, call.key, compiled)
        self.prepared()
        return recording

    def keep(self, name: str, key: CallKey, compiled: Compiled) -> Compiled:
        """What this process keeps of a structure it compiled: all of it here, a rank's own segment."""
        return _keep_own(compiled, self.config) if self.mode == "ranks" else compiled

    def prepared(self) -> None:
        """Called after :meth:`prepare` compiled what was new (an engine hands it to its ranks)."""

    def own_call(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's own ``__call__`` (not the prepared one)."""
        return self.cls.__call__(self.pipe, *args, **kwargs)

    def install(self, meta: DenoiserMeta) -> ScheduledDenoiser:
        """The scheduled forward of denoiser ``meta.name`` (installed once)."""
        module = components(self.pipe)[meta.name]
        current = self.denoisers.get(meta.name)
        if current is not None and scheduled(module) is current:
            return current
        pipe = self.pipe
        denoiser = ScheduledDenoiser(module, meta.name, self, scheduler=lambda: components(pipe)[meta.scheduler],
                                     form=meta.form, output=meta.output, warmup=self.config.warmup,
                                     switch_warmup=self.config.switch_warmup)
        self.metas[meta.name] = meta
        self.denoisers[meta.name] = install(module, denoiser)
        return denoiser

    def drop(self, name: str, key: CallKey) -> None:
        """Forget a call structure and its streams (least recently used, beyond a bound)."""
        self.compiled.pop((name, key), None)
        denoiser = self.denoisers.get(name)
        if denoiser is not None:
            for slot in [s for s in denoiser.streams if s[1] == key]:
                denoiser.streams.pop(slot)

    def summary(self) -> list[str]:
        return summary(self.metas, {k: c.plan for k, c in self.compiled.items()}, self.config)

    # --- running -----------------------------------------------------------------------------

    def stream(self, name: str, position: int, key: CallKey, step: int, index: int) -> Stream:
        """The stream of a call position (Note [streams] in pipelines/wrap.py), or :class:`NeedsCapture`."""
        compiled = self.compiled.get((name, key))
        if compiled is None:
            raise NeedsCapture(name, position, step, key, "prepare this call first: warm(pipe, **call)")
        self.compiled.move_to_end((name, key))
        denoiser = self.step_denoiser(name, key, compiled, self.streams_made, position)
        self.streams_made += 1
        return Stream(compiled.binding, denoiser, index)

    def step_denoiser(self, name: str, key: CallKey, compiled: Compiled, stream: int, position: int = 0) -> Any:
        """The step denoiser of a new stream (call ``position`` of a step): the reference schedule here, this
        rank's denoiser on a rank."""
        plan, config = compiled.plan, self.config
        if self.mode == "reference":
            from asyncdiff_partition.runtime.reference import ReferenceSchedule

            return ReferenceSchedule(compiled.segments, warmup=config.warmup, stride=config.stride,
                                     timestep_input=compiled.timestep, extrapolation=plan.extrapolation,
                                     batch_parallel=1 if compiled.branches else plan.batch_parallel,
                                     latent_input=compiled.latent, phases=plan.phases, compile=config.compile)
        if compiled.branches:
            raise ConfigError("batch groups over a step's separate denoiser calls run on the engine (parallelize in a "
                              "plain process), not under an outside launcher; use batch_parallel=1 there")
        from asyncdiff_partition.runtime.hybrid import rank_denoiser

        return rank_denoiser(compiled.segments[0], plan, input_names=compiled.inputs, latent=compiled.latent,
                             warmup=config.warmup, stride=config.stride, timestep_input=compiled.timestep,
                             timeout_s=config.timeout_s, compile=config.compile, stream=stream)

    def call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The pipeline's own call, prepared as it goes (Note [prepared calls])."""
        if not self.denoisers:  # nothing is known of this pipeline's denoisers yet
            self.prepare(args, kwargs)
        snapshot = _Snapshot(kwargs)
        for _ in range(MAX_PREPARES):
            if self.mode == "ranks" and self.compiled and not self.released:
                self.release()
            try:
                begin = time.perf_counter()
                output = self.own_call(*args, **kwargs)
                self.timings["sampling_s"] = time.perf_counter() - begin  # the pipeline's own call, alone
                return output
            except NeedsCapture:
                self.abandon()
                snapshot.restore()
                self.prepare(args, kwargs)
            except BaseException:  # stopped part way (a step callback raised, an interrupt): so must the streams
                with contextlib.suppress(Exception):
                    self.abandon()
                raise
        raise ParallelizeError(f"{self.cls.__name__}'s call met a new denoiser call structure {MAX_PREPARES} times "
                               "in a row; its denoiser calls change from one run to the next")

    def abandon(self) -> None:
        """End every stream's run where it is (a call that stopped part way; every rank does the same)."""
        for denoiser in self.denoisers.values():
            denoiser.abandon()

    def release(self) -> None:
        """Keep only this rank's segments' weights of every denoiser (Note [prepared calls])."""
        from asyncdiff_partition.fx.weights import release_weights

        for name, denoiser in self.denoisers.items():
            mine = [c for (n, _), c in self.compiled.items() if n == name]
            kept = torch.nn.ModuleList([m for c in mine for s in c.segments if isinstance(m := s.module, torch.nn.Module)])
            used = frozenset().union(*(c.used for c in mine if hasattr(c, "used")))
            release_weights(denoiser.module, kept, used=used)
        self.released = True

    def close(self) -> None:
        for denoiser in self.denoisers.values():
            uninstall(denoiser.module)


@dataclass
class _RankCompiled(Compiled):
    """A compiled structure a rank keeps: its own segment, and which of the model's tensors any segment reads."""

    used: frozenset[int] = frozenset()


def _keep_own(compiled: Compiled, config: ParallelConfig) -> Compiled:
    """This rank's segment of a structure compiled on every rank; the capture is dropped."""
    from asyncdiff_partition.pipelines.wrap import call_binding
    from asyncdiff_partition.runtime import comm
    from asyncdiff_partition.runtime.hybrid import rank_segment_index

    modules = [s.module for s in compiled.segments if isinstance(s.module, torch.nn.Module)]
    used = frozenset(id(t) for m in modules for t in (*m.parameters(), *m.buffers()))
    own: ReadySegment = compiled.segments[rank_segment_index(compiled.plan, comm.rank(), config.stride)]
    values = {f.name: getattr(compiled, f.name) for f in fields(Compiled)}
    values.update(binding=call_binding(compiled.binding), segments=[own], captured=None)
    return _RankCompiled(**values, used=used)


def summary(metas: dict[str, DenoiserMeta], plans: dict[tuple[str, Any], Plan], config: ParallelConfig) -> list[str]:
    """The lines of :func:`describe`: per denoiser its calls, structures, cuts and prediction; the weights per rank."""
    lines = []
    held = [0] * config.world
    parts: list[list[str]] = [[] for _ in range(config.world)]
    for name, meta in metas.items():
        mine = [plan for (n, _), plan in plans.items() if n == name]
        if not mine:
            continue
        plan = mine[0]
        predicted = plan.predicted
        lines.append(f"{name}: {meta.per_step} call(s) per step, {len(mine)} call structure(s), boundaries "
                     f"{plan.boundaries}, batch groups {plan.batch_parallel}, predicted {predicted['speedup']:.2f}x "
                     f"(ideal {predicted['ideal_speedup']:.2f}x), step {predicted['async_step_ms']:.1f} ms vs "
                     f"{predicted['sequential_step_ms']:.1f} ms")
        from asyncdiff_partition.core.schedule import n_slots, slot_segment

        slots = n_slots(plan.n_devices, plan.stride)
        for rank in range(config.world):
            segment = plan.segments[slot_segment(rank % slots, plan.n_devices)]
            held[rank] += segment.param_bytes
            parts[rank].append(f"{name} {segment.param_bytes / 1e6:.1f} MB")
    lines.append("weights per rank: " + ", ".join(f"rank {r} {b / 1e6:.1f} MB ({', '.join(parts[r])})"
                                                  for r, b in enumerate(held)))
    return lines


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


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """A plan sent as :meth:`Plan.to_dict` (between processes)."""
    data = dict(data)
    data["segments"] = [SegmentPlan(**s) for s in data["segments"]]
    return Plan(**data)
