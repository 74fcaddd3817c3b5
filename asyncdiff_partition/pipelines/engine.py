"""A pipeline's calls run on ranks that stay up, behind a plain single-process call.

Example::

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    parallelize(pipe, devices=2)          # an Engine: 2 ranks load the pipeline from `folder`
    pipe(prompt="a red cube").images[0]   # rank 0's output; new shapes are prepared here first
    pipe.close()                          # ranks ended (also at interpreter exit)

Note [engine]
~~~~~~~~~~~~~
The launching process keeps the user's pipeline and does all the compiling: a call with a new
structure is recorded here (a dry run of the user's call), captured, planned and split
(:mod:`~asyncdiff_partition.pipelines.compiler`), and each rank is handed its finished segment as a
file (:mod:`~asyncdiff_partition.fx.shipping`); the ranks never record, capture, place or split. The
ranks load the pipeline from its folder (or the user's loader), never from a pickled copy, run the
pipeline's own ``__call__`` with the schedule on their denoisers (rank 0's output comes back, and
the caller's generators advance as if the call had run here) and keep only their segments'
weights of each denoiser. A call whose structure a rank does not hold stops on every rank at the
same denoiser call; this process prepares it and calls again (Note [prepared calls] in
pipelines/parallelize.py). At most ``max_structures`` structures stay prepared; the least
recently used is dropped from every rank. A rank that dies or a broken process group ends the
ranks; the next call starts new ones (``restarts`` times at most).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.compiler import PlanBook, compile_call, used_names, whole_batch
from asyncdiff_partition.pipelines.prepared import (
    MAX_PREPARES,
    DenoiserMeta,
    ParallelizeError,
    Prepared,
    plan_from_dict,
    summary,
)
from asyncdiff_partition.pipelines.recording import record_denoiser_calls
from asyncdiff_partition.pipelines.structure import CallKey
from asyncdiff_partition.pipelines.wrap import NeedsCapture

__all__ = ["Engine", "EngineError", "Shipped", "engine_rank"]


class EngineError(AsyncDiffError, RuntimeError):
    """The engine's ranks failed and could not be started again."""


@dataclass(frozen=True)
class Shipped:
    """One compiled call structure as the ranks receive it: where its segments lie and how to run them."""

    meta: DenoiserMeta
    key: CallKey
    plan: dict[str, Any]
    directory: str
    n_segments: int
    timestep: str
    latent: str
    inputs: list[str]
    used: frozenset[str]  # the model's tensor names some segment reads (each rank frees its own copies)


class Engine:
    """A pipeline whose calls run on persistent ranks (Note [engine]); what :func:`parallelize` makes in a
    plain process. Use it through the pipeline: ``pipe(...)``, :func:`warm`, :func:`describe`, ``pipe.close()``.

    Args:
        pipe: the pipeline (stays in this process: recording, capture and planning run here).
        config: the run's configuration.
        plans: where plans come from (profiles cached by model fingerprint).
        source: the pipeline's folder (default: the one it was loaded from) or a module-level
            function that loads it, for the ranks.
        max_structures: call structures kept prepared on the ranks.
        restarts: how often the ranks are started again after a failure.

    Raises:
        ParallelizeError: no folder to load the pipeline from and no loader.
        RankError: the ranks could not start (loading the pipeline failed there).
    """

    def __init__(self, pipe: Any, config: ParallelConfig, *, plans: PlanBook, source: Any = None,
                 max_structures: int = 8, restarts: int = 2):
        self.pipe, self.cls, self.config, self.plans = pipe, type(pipe), config, plans
        self.source = _source(pipe, source)
        self.max_structures, self.restarts = max_structures, restarts
        self.known: OrderedDict[tuple[str, CallKey], Shipped] = OrderedDict()
        self.metas: dict[str, DenoiserMeta] = {}
        self.folder = tempfile.mkdtemp(prefix="asyncdiff-engine-")
        self.counts = {"starts": 0, "recordings": 0, "captures": 0, "calls": 0}
        self.timings: dict[str, float] = {}
        self.pool: Any = None  # started at the first call (set-up mistakes are found before any rank starts)

    # --- ranks -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ranks (they load the pipeline) and hand them every structure prepared so far."""
        from asyncdiff_partition.runtime.ranks import RankPool

        if self.pool is not None:
            return
        begin = time.perf_counter()
        self.pool = RankPool(self.config.world, engine_rank, (self.source, self.config.to_dict()),
                             timeout_s=self.config.timeout_s)
        self.counts["starts"] += 1
        self.timings["start_s"] = time.perf_counter() - begin
        if self.known:
            self.pool.call(("add", list(self.known.values())))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- calls -----------------------------------------------------------------------------

    def call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``pipe(*args, **kwargs)`` on the ranks; rank 0's output (Note [engine])."""
        from asyncdiff_partition.runtime.ranks import RankError

        generators = _generators(kwargs)
        if not self.known:  # nothing is known of this pipeline's denoisers yet
            self.prepare(args, kwargs)
        failures = 0
        for _ in range(MAX_PREPARES + 1):
            if self.pool is None:
                self.start()
            begin = time.perf_counter()
            try:
                replies = self.pool.call(("call", args, kwargs))
            except RankError as error:
                if not error.broken:
                    raise
                self.pool.close()
                self.pool = None
                failures += 1
                if failures > self.restarts:
                    raise EngineError(f"the ranks failed {failures} times in a row, last: {error}") from None
                raise
            first = replies[0]
            if first.get("needs"):
                self.prepare(args, kwargs)
                continue
            self.counts["calls"] += 1
            self.timings["call_s"] = time.perf_counter() - begin
            self.reports = {rank: reply.get("report") for rank, reply in replies.items()}
            for g, state in zip(generators, first.get("generators") or []):
                g.set_state(state)
            return first["output"]
        raise ParallelizeError(f"{self.cls.__name__}'s call met a new denoiser call structure {MAX_PREPARES} times "
                               "in a row; its denoiser calls change from one run to the next")

    def prepare(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Record the call here, compile every new structure, hand the ranks their segments."""
        from asyncdiff_partition.fx.shipping import ship_segments

        begin = time.perf_counter()
        recording = record_denoiser_calls(self.pipe, args, kwargs, run=lambda *a, **k: self.cls.__call__(self.pipe, *a, **k))
        self.counts["recordings"] += 1
        self.timings["record_s"] = time.perf_counter() - begin
        new: list[Shipped] = []
        compile_s = ship_s = 0.0
        for record in recording.denoisers:
            meta = DenoiserMeta.of(record, self.pipe)
            self.metas[record.name] = meta
            for call in record.calls:
                if (record.name, call.key) in self.known:
                    continue
                mark = time.perf_counter()
                compiled = compile_call(record, call, self.config, self.plans, world=self.config.world)
                self.counts["captures"] += 1
                compile_s += time.perf_counter() - mark
                if "plan" not in record.module.__dict__:
                    record.module.__dict__["plan"] = compiled.plan  # pipe.unet.plan
                directory = os.path.join(self.folder, f"structure{len(self.known) + len(new)}-{time.time_ns()}")
                mark = time.perf_counter()
                ship_segments(compiled.segments, directory, compiled.captured)
                ship_s += time.perf_counter() - mark
                new.append(Shipped(meta, call.key, compiled.plan.to_dict(), directory, len(compiled.segments),
                                   compiled.timestep, compiled.latent, compiled.inputs,
                                   frozenset(used_names(compiled.segments))))
        self.timings.update(compile_s=compile_s, ship_s=ship_s)
        if new:
            for shipped in new:
                self.known[(shipped.meta.name, shipped.key)] = shipped
            dropped = []
            while len(self.known) > self.max_structures:
                dropped.append(self.known.popitem(last=False)[1])
            if self.pool is not None:
                self.pool.call(("add", new))
                if dropped:
                    self.pool.call(("drop", [(s.meta.name, s.key) for s in dropped]))
            for shipped in dropped:
                shutil.rmtree(shipped.directory, ignore_errors=True)
        self.timings["prepare_s"] = time.perf_counter() - begin

    def summary(self) -> list[str]:
        plans = {k: plan_from_dict(s.plan) for k, s in self.known.items()}
        return summary(self.metas, plans, self.config)


def _source(pipe: Any, source: Any) -> Any:
    if source is not None and callable(source):
        return source
    name = str(source) if source is not None else getattr(getattr(pipe, "config", None), "_name_or_path", None)
    where = f"{name!r} has no model_index.json" if name else "it was built in memory"
    if name and (Path(name).expanduser() / "model_index.json").is_file():
        return str(Path(name).expanduser())
    raise ParallelizeError(
        f"parallelize starts its ranks from the pipeline's folder, but {type(pipe).__name__} has none ({where}); save it "
        "(pipe.save_pretrained(folder)) and load it from there, pass source=folder or a module-level loader function, "
        "or pass reference=True for the single-process reference schedule")


def _generators(kwargs: dict[str, Any]) -> list[torch.Generator]:
    value = kwargs.get("generator")
    items = value if isinstance(value, list) else [value]
    return [g for g in items if isinstance(g, torch.Generator)]


# --- one rank ----------------------------------------------------------------------------------


def engine_rank(source: Any, config: dict[str, Any]) -> Callable[[Any], Any]:
    """Built in every rank of an engine (runtime.ranks): load the pipeline, then answer commands."""
    from asyncdiff_partition.pipelines.loading import load_pipeline
    from asyncdiff_partition.runtime import comm

    settings = ParallelConfig.from_dict(config)
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // settings.world))
    pipe = load_pipeline(source, device=comm.device()) if isinstance(source, str) else source()
    pipe.set_progress_bar_config(disable=True)
    return _EngineRank(pipe, settings, comm.rank())


class _EngineRank:
    """One rank's side of Note [engine]."""

    def __init__(self, pipe: Any, config: ParallelConfig, rank: int):
        self.prepared = Prepared(pipe, config, mode="engine")
        self.rank = rank

    def __call__(self, message: tuple) -> Any:
        kind = message[0]
        if kind == "add":
            for shipped in message[1]:
                self._add(shipped)
            return None
        if kind == "drop":
            for name, key in message[1]:
                self.prepared.drop(name, key)
            return None
        if kind == "call":
            return self._call(message[1], message[2])
        raise ValueError(f"unknown engine command {kind!r}")

    def _add(self, shipped: Shipped) -> None:
        from asyncdiff_partition.fx.shipping import ShippedSegments
        from asyncdiff_partition.fx.weights import release_named
        from asyncdiff_partition.pipelines.compiler import Compiled
        from asyncdiff_partition.runtime.hybrid import rank_segment_index

        prepared = self.prepared
        denoiser = prepared.install(shipped.meta)
        plan = plan_from_dict(shipped.plan)
        segment, shell = ShippedSegments(shipped.directory, shipped.n_segments).load(
            rank_segment_index(plan, self.rank, prepared.config.stride))
        binding = whole_batch(shell, plan.batch_parallel)
        prepared.add(shipped.meta.name, shipped.key, Compiled(binding, plan, [segment], shipped.timestep,
                                                              shipped.latent, shipped.inputs))
        if "plan" not in denoiser.module.__dict__:
            denoiser.module.__dict__["plan"] = plan
        release_named(denoiser.module, shipped.used)  # the segment brought its own copies

    def _call(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's own call with the schedule; rank 0 sends its output and its generators' states."""
        from asyncdiff_partition.runtime.memory import memory_counters

        prepared = self.prepared
        begin = time.perf_counter()
        try:
            with torch.no_grad():
                output = prepared.own_call(*args, **kwargs)
        except NeedsCapture as need:
            prepared.abandon()
            return {"needs": (need.name, need.position, need.step)}
        wall_s = time.perf_counter() - begin
        report = {"wall_s": wall_s, "steps": {name: d.report() for name, d in prepared.denoisers.items()},
                  "spans": {name: d.spans() for name, d in prepared.denoisers.items()},
                  **memory_counters(torch.nn.ModuleList([d.module for d in prepared.denoisers.values()]))}
        if self.rank != 0:
            return {"report": report}
        return {"output": output, "generators": [g.get_state() for g in _generators(kwargs)], "report": report}
