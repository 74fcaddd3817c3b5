"""A pipeline's denoiser calls run on ranks that stay up, behind a plain single-process call.

Example::

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    parallelize(pipe, devices=2)          # an Engine: this process keeps the pipeline and its loop
    pipe(prompt="a red cube").images[0]   # each denoiser call runs on the 2 ranks, asynchronously
    pipe.close()                          # ranks ended (also at interpreter exit)

Note [engine]
~~~~~~~~~~~~~
The launching process keeps the user's pipeline and runs its own ``__call__``: text encoders,
scheduler, guidance and decoding run here, once. Only the denoisers' calls go to the ranks: each
call position of each denoiser (Note [streams] in pipelines/wrap.py) is a stream that the ranks
run with their step denoisers (:func:`~asyncdiff_partition.runtime.hybrid.rank_denoiser`: segments
side by side, stale values point to point); this process sends each call's inputs to every rank
and gets ε back from rank 0. This process does all the compiling too: a call with a new structure
is recorded here, captured, planned and split (:mod:`~asyncdiff_partition.pipelines.compiler`), and
each rank is handed its finished segment as a file (:mod:`~asyncdiff_partition.fx.shipping`) that
holds only its weights; the ranks never load the pipeline, record, capture, place or split, so a
rank holds its segments and nothing else of the model. At most ``max_structures`` structures stay
on the ranks; the least recently used is dropped. A rank that dies or a broken process group ends
the ranks; the next call starts new ones (``restarts`` times at most in a row).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.compiler import Compiled, PlanBook
from asyncdiff_partition.pipelines.prepared import Prepared, plan_from_dict
from asyncdiff_partition.pipelines.structure import CallKey
from asyncdiff_partition.pipelines.wrap import call_binding

__all__ = ["Engine", "EngineError", "RemoteDenoiser", "Shipped", "engine_rank"]


class EngineError(AsyncDiffError, RuntimeError):
    """The engine's ranks failed and could not be started again."""


@dataclass(frozen=True)
class Shipped:
    """One compiled call structure as the ranks receive it: where its segment files lie and how to run them."""

    name: str
    key: CallKey
    plan: dict[str, Any]
    directory: str
    n_segments: int
    timestep: str
    latent: str
    inputs: list[str]
    branches: bool = False  # batch group g takes the calls at positions g, g + B, ... (Note [pending predictions])


class Engine(Prepared):
    """A pipeline whose denoiser calls run on persistent ranks (Note [engine]); what :func:`parallelize` makes
    in a plain process. Used through the pipeline: ``pipe(...)``, :func:`warm`, :func:`describe`, ``pipe.close()``.

    Args:
        pipe: the pipeline (its loop, encoders and decoder run here).
        config: the run's configuration.
        plans: where plans come from (profiles cached by model fingerprint).
        max_structures: call structures kept on the ranks.
        restarts: how often the ranks are started again after a failure, in a row.
    """

    def __init__(self, pipe: Any, config: ParallelConfig, *, plans: PlanBook, max_structures: int = 8,
                 restarts: int = 2):
        super().__init__(pipe, config, mode="engine", plans=plans)
        self.max_structures, self.restarts = max_structures, restarts
        self.shipped: dict[tuple[str, CallKey], Shipped] = {}
        self.sources: dict[str, dict[int, tuple[str, str]]] = {}  # per denoiser: weights read by name
        self.new: list[Shipped] = []
        self.folder = tempfile.mkdtemp(prefix="asyncdiff-engine-")
        weakref.finalize(self, shutil.rmtree, self.folder, True)  # also without close()
        self.counts = {"starts": 0, "recordings": 0, "captures": 0, "calls": 0}
        self.pool: Any = None  # started at the first call: set-up mistakes are found before any rank starts
        self.failures = 0
        self.waiting: dict[int, Callable[[], dict[int, Any]]] = {}  # rank -> the reply it still owes

    # --- ranks -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ranks and hand them every structure prepared so far (no-op when they run)."""
        from asyncdiff_partition.runtime.ranks import RankPool

        if self.pool is not None:
            return
        begin = time.perf_counter()
        self.pool = RankPool(self.config.world, engine_rank, (self.config.to_dict(),), timeout_s=self.config.timeout_s)
        self.waiting = {}
        self.counts["starts"] += 1
        for denoiser in self.denoisers.values():
            denoiser.streams.clear()  # streams of earlier ranks are gone
        if self.shipped:
            self.pool.call(("add", list(self.shipped.values())))
        self.new = []
        self.timings["start_s"] = time.perf_counter() - begin

    def check_ranks(self) -> bool:
        """Whether every rank is alive; ranks that died between calls are ended and counted as a failure, so
        that the next call starts new ones (a call on them would fail)."""
        if self.pool is not None and not self.pool.alive():
            self.pool.close()
            self.pool = None
            self.failures += 1
        return self.pool is not None

    def close(self) -> None:
        self.waiting = {}
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        super().close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def command(self, message: tuple, ranks: list[int] | None = None) -> dict[int, Any]:
        """``message`` to every rank (or to ``ranks``), their replies; a broken pool is closed (the next call
        starts new ranks)."""
        return self.submit(message, ranks)()

    def submit(self, message: tuple, ranks: list[int] | None = None) -> Callable[[], dict[int, Any]]:
        """Send ``message`` now; the returned function waits for the replies (once). Every rank answers in
        order, so the replies a rank still owes are taken before it is sent another message."""
        targets = list(range(self.config.world)) if ranks is None else list(ranks)
        for rank in targets:
            owed = self.waiting.get(rank)
            if owed is not None:
                owed()
        self._guarded(lambda: self.pool.send(message, targets))
        replies: list[dict[int, Any]] = []

        def collect() -> dict[int, Any]:
            if not replies:
                for rank in targets:
                    self.waiting.pop(rank, None)
                replies.append(self._guarded(lambda: self.pool.collect(targets)))
            return replies[0]

        for rank in targets:
            self.waiting[rank] = collect
        return collect

    def group_ranks(self, group: int) -> list[int]:
        """The ranks of batch group ``group``."""
        size = self.config.world // self.config.groups
        return list(range(group * size, (group + 1) * size))

    def _guarded(self, work: Callable[[], Any]) -> Any:
        from asyncdiff_partition.runtime.ranks import RankError

        if self.pool is None:
            raise RankError("the ranks stopped; the next call starts new ones", 0, "closed", True)
        try:
            return work()
        except RankError as error:
            if error.broken:
                self.pool.close()
                self.pool = None
                self.waiting = {}
                self.failures += 1
            raise
        except BaseException:  # interrupted: the pool closed itself; the next call starts new ranks
            self.pool = None
            self.waiting = {}
            raise

    # --- calls -----------------------------------------------------------------------------

    def call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``pipe(*args, **kwargs)`` here, its denoiser calls on the ranks (Note [engine])."""
        if self.failures > self.restarts:
            raise EngineError(f"the ranks failed {self.failures} times in a row; see the errors above")
        if not self.denoisers:  # nothing is known of this pipeline's denoisers yet
            self.prepare(args, kwargs)
        self.start()
        begin = time.perf_counter()
        output = super().call(args, kwargs)
        self.timings["call_s"] = time.perf_counter() - begin
        self.counts["calls"] += 1
        self.failures = 0
        return output

    def prepare(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        begin = time.perf_counter()
        recording = super().prepare(args, kwargs)
        self.counts["recordings"] += 1
        self.timings["prepare_s"] = time.perf_counter() - begin
        return recording

    def keep(self, name: str, key: CallKey, compiled: Compiled) -> Compiled:
        """Ship the segments to files (each with its own weights only); keep the binding alone here."""
        from asyncdiff_partition.fx.shipping import ship_segments

        begin = time.perf_counter()
        self.timings.setdefault("ship_s", 0.0)
        self.counts["captures"] += 1
        directory = os.path.join(self.folder, f"structure-{time.time_ns()}")
        assert compiled.captured is not None
        saved = self._saved(name)
        ship_segments(compiled.segments, directory, replace(compiled.captured, model=None), saved=saved)  # no binding there
        shipped = Shipped(name, key, compiled.plan.to_dict(), directory, len(compiled.segments), compiled.timestep,
                          compiled.latent, compiled.inputs, compiled.branches)
        self.shipped[(name, key)] = shipped
        self.new.append(shipped)
        self.timings["ship_s"] += time.perf_counter() - begin
        return replace(compiled, binding=call_binding(compiled.binding), segments=[], captured=None)

    def _saved(self, name: str) -> dict[int, tuple[str, str]]:
        """The denoiser's weights its pipeline folder holds unchanged (read there by the ranks; found once)."""
        from asyncdiff_partition.fx.weights import saved_sources
        from asyncdiff_partition.pipelines.recording import components

        if name not in self.sources:
            root = getattr(getattr(self.pipe, "config", None), "_name_or_path", None)
            folder = os.path.join(root, name) if root else None
            module = components(self.pipe)[name]
            self.sources[name] = saved_sources(module, folder) if folder and os.path.isdir(folder) else {}
        return self.sources[name]

    def prepared(self) -> None:
        """Hand the ranks (if they run) what :meth:`prepare` compiled; drop the least recently used beyond the bound."""
        new, self.new = self.new, []
        if self.pool is not None and new:
            self.command(("add", new))
        while len(self.compiled) > self.max_structures:
            (name, key), _ = next(iter(self.compiled.items()))
            self.drop(name, key)
            dropped = self.shipped.pop((name, key))
            if self.pool is not None:
                self.command(("drop", [(name, key)]))
            shutil.rmtree(dropped.directory, ignore_errors=True)

    def step_denoiser(self, name: str, key: CallKey, compiled: Compiled, stream: int, position: int = 0) -> RemoteDenoiser:
        return RemoteDenoiser(self, stream, name, key, position % self.config.groups if compiled.branches else None)

    def summary(self) -> list[str]:
        from asyncdiff_partition.pipelines.prepared import summary

        plans = {k: plan_from_dict(s.plan) for k, s in self.shipped.items()}
        return summary(self.metas, plans, self.config)

    def reports(self) -> dict[int, dict[str, Any]]:
        """Every rank's memory counters and, per denoiser, the step rows and spans of its streams' last runs."""
        names = {s.denoiser.stream: (name, position) for name, d in self.denoisers.items()
                 for (position, _), s in d.streams.items() if isinstance(s.denoiser, RemoteDenoiser)}
        found = {}
        for rank, reply in self.command(("report",)).items():
            steps: dict[str, list[dict[str, Any]]] = {}
            spans: dict[str, list[dict[str, Any]]] = {}
            for stream, runs in reply.pop("streams").items():
                name, position = names.get(stream, (f"stream {stream}", 0))
                steps.setdefault(name, []).extend(dict(r, call=position) for r in runs["report"])
                spans.setdefault(name, []).extend(dict(r, call=position) for r in runs["spans"])
            found[rank] = {"steps": steps, "spans": spans, **reply}
        return found


class RemoteDenoiser:
    """A step denoiser whose segments run on an engine's ranks (Note [engine]): a stream's calls go there,
    to every rank, or to batch group ``group``'s ranks only (Note [pending predictions])."""

    def __init__(self, engine: Engine, stream: int, name: str, key: CallKey, group: int | None = None):
        self.engine, self.stream, self.name = engine, stream, name
        self.warmup = engine.config.warmup
        self.ranks = None if group is None else engine.group_ranks(group)
        self.known: tuple[torch.Size, torch.dtype] | None = None  # ε's shape and dtype, from the first reply
        engine.command(("open", stream, name, key, group))  # every rank: batch groups are made together

    def reset(self, timesteps: Sequence[float | int | None]) -> None:
        self.engine.command(("reset", self.stream, list(timesteps), self.warmup), self.ranks)

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        from asyncdiff_partition.pipelines.pending import Pending

        device = next(iter(inputs.values())).device
        first = 0 if self.ranks is None else self.ranks[0]
        collect = self.engine.submit(("step", self.stream, {k: v.detach().cpu() for k, v in inputs.items()}),
                                     self.ranks)

        def value() -> Tensor:
            eps = collect()[first]
            self.known = (eps.shape, eps.dtype)
            return eps.to(device)

        if self.ranks is None or self.known is None:
            return value()
        return Pending(value, shape=tuple(self.known[0]), dtype=self.known[1], device=device)

    def abandon(self) -> None:
        if self.engine.pool is not None:
            self.engine.command(("abandon", self.stream), self.ranks)


# --- one rank ----------------------------------------------------------------------------------


def engine_rank(config: dict[str, Any]) -> Callable[[Any], Any]:
    """Built in every rank of an engine (runtime.ranks): this rank's step denoisers, by stream."""
    from asyncdiff_partition.fx.pickling import LOAD_DEVICE
    from asyncdiff_partition.runtime import comm

    settings = ParallelConfig.from_dict(config)
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // settings.world))
    LOAD_DEVICE["device"] = str(comm.device())  # weights read by name go straight to this rank's device
    return _EngineRank(settings, comm.rank())


class _EngineRank:
    """One rank's side of Note [engine]: its segment of every structure, its step denoiser of every stream."""

    def __init__(self, config: ParallelConfig, rank: int):
        self.config, self.rank = config, rank
        self.segments: dict[tuple[str, CallKey], tuple[Any, Shipped]] = {}
        self.streams: dict[int, Any] = {}
        self.opened: dict[int, tuple[str, CallKey]] = {}  # stream -> the structure it runs
        self.replies: dict[int, int] = {}  # stream -> the rank that answers its steps
        self.groups: Any = None  # this rank's batch group, made at the first stream of a step's calls

    def __call__(self, message: tuple) -> Any:
        kind, *rest = message
        handler = getattr(self, f"_{kind}", None)
        if handler is None:
            raise ValueError(f"unknown engine command {kind!r}")
        return handler(*rest)

    def _add(self, shipped: list[Shipped]) -> None:
        from asyncdiff_partition.fx.shipping import ShippedSegments
        from asyncdiff_partition.runtime.hybrid import rank_segment_index

        for item in shipped:
            plan = plan_from_dict(item.plan)
            segment, _ = ShippedSegments(item.directory, item.n_segments).load(
                rank_segment_index(plan, self.rank, self.config.stride))
            self.segments[(item.name, item.key)] = (segment, item)

    def _drop(self, keys: list[tuple[str, CallKey]]) -> None:
        for key in keys:
            self.segments.pop(key, None)
            for stream in [s for s, k in self.opened.items() if k == key]:
                self.streams.pop(stream, None)
                self.opened.pop(stream)

    def _open(self, stream: int, name: str, key: CallKey, group: int | None = None) -> None:
        from asyncdiff_partition.runtime.hybrid import rank_denoiser

        segment, item = self.segments[(name, key)]
        config, plan = self.config, plan_from_dict(item.plan)
        options: dict[str, Any] = dict(input_names=item.inputs, latent=item.latent, warmup=config.warmup, stride=config.stride,
                       timestep_input=item.timestep, timeout_s=config.timeout_s, compile=config.compile, stream=stream)
        if group is None:
            self.opened[stream], self.replies[stream] = (name, key), 0
            self.streams[stream] = rank_denoiser(segment, plan, **options)
            return
        from asyncdiff_partition.runtime.denoiser import AsyncDenoiser
        from asyncdiff_partition.runtime.groups import make_groups

        size = config.world // config.groups
        if self.groups is None:  # collective: every rank opens every stream, in the same order
            self.groups = make_groups(config.groups, size)
        if self.groups.index == group:  # the whole call, on this group's segment schedule
            self.opened[stream], self.replies[stream] = (name, key), group * size
            self.streams[stream] = AsyncDenoiser(segment, replace(plan, batch_parallel=1),
                                                 group=self.groups.group, **options)

    def _reset(self, stream: int, timesteps: list[Any], warmup: int) -> None:
        denoiser = self.streams[stream]
        denoiser.warmup = warmup
        denoiser.reset(timesteps)

    def _step(self, stream: int, inputs: dict[str, Tensor]) -> Tensor | None:
        with torch.no_grad():
            eps = self.streams[stream](inputs)
        return eps.cpu() if self.rank == self.replies[stream] else None

    def _abandon(self, stream: int) -> None:
        denoiser = self.streams.get(stream)
        if denoiser is not None:
            denoiser.abandon()

    def _memory(self) -> dict[str, Any]:
        """What this rank holds: its segments' weights (name -> dtype, bytes), every live tensor's bytes."""
        import gc

        from asyncdiff_partition.fx.pickling import is_stand_in
        from asyncdiff_partition.runtime.memory import memory_counters

        gc.collect()
        storages: dict[int, int] = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        weights = {}
        modules = [s.module for s, _ in self.segments.values() if isinstance(s.module, torch.nn.Module)]
        for module in modules:
            for name, t in (*module.named_parameters(), *module.named_buffers()):
                if not is_stand_in(t):
                    weights[name] = (str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
        return {"weights": weights, "live_tensor_bytes": sum(storages.values()),
                **memory_counters(torch.nn.ModuleList(modules))}

    def _report(self) -> dict[str, Any]:
        from asyncdiff_partition.runtime.memory import memory_counters

        modules = torch.nn.ModuleList([s.module for s, _ in self.segments.values() if isinstance(s.module, torch.nn.Module)])
        return {"streams": {stream: {"report": d.report(), "spans": d.spans()} for stream, d in self.streams.items()},
                **memory_counters(modules)}
