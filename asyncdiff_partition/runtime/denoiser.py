"""The asynchronous schedule on N ranks: one segment per rank, stale values sent point to point.

Example (every rank runs the same loop; see :func:`launch` for starting the ranks)::

    rank, world, device = comm.init()
    denoiser = AsyncDenoiser(captured, Plan.load("plan.json"), warmup=1)
    del captured, model                      # the denoiser keeps only this rank's segment
    denoiser.reset(scheduler.timesteps)
    for t in scheduler.timesteps:
        eps = denoiser({"sample": x, "timestep": t.expand(2), "encoder_hidden_states": text})
        x = scheduler.step(eps, t, x).prev_sample
    comm.shutdown()

:class:`AsyncDenoiser` follows the table of Note [schedule] in :mod:`asyncdiff_partition.core.schedule`
(rank = slot) and gives the same ε as :class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule`
at every step.

Note [transfers]
~~~~~~~~~~~~~~~~
Every rank runs the whole sampling loop, so every rank has the latent and the conditions; only
stale values travel. When the main slots compute at step s, the value v that segment p makes
goes to every slot that reads it (:func:`~asyncdiff_partition.core.schedule.readers`: later slots of
the same step in a warm-up chain, else every slot of the next step that computes) whose segment
consumes v, once, by ``isend``. A reader posts the matching ``irecv`` when step s starts, into
fresh buffers shaped from a shape-only (fake tensor) pass over the captured graph, and waits
for it only when it needs the value: at once in a warm-up chain, else at the start of the next
step that computes, so transfers overlap compute. Both sides walk the same table and the same
value order (graph position), so sends and receives match without any handshake; a value that
is a list or tuple of tensors (an ``aten.chunk`` result, say) travels as its tensor leaves.
ε goes from the slot the table names to every rank by ``broadcast`` at every step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.graph import OUTPUT, OpGraph
from asyncdiff_partition.core.plan import Plan, PlanError
from asyncdiff_partition.core.profile import fingerprint
from asyncdiff_partition.core.schedule import (
    ScheduleError,
    Step,
    check_timestep_input,
    make_schedule,
    n_slots,
    readers,
    slot_segment,
)
from asyncdiff_partition.fx.capture import CapturedModel
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.reference import SamplingRun, check_inputs, step_inputs

__all__ = ["AsyncDenoiser", "check_plan"]

_REAL_PASS_BYTES = 64 * 2**20  # see _shape_pass


# --- checks before any compute ---------------------------------------------------------------


def check_plan(captured: CapturedModel, plan: Plan, world_size: int, *, stride: int | None = None) -> None:
    """Refuse a plan that does not fit this model, these input shapes or this many ranks.

    Example:
        >>> check_plan(captured, Plan.load("plan.json"), world_size=2)  # doctest: +SKIP

    Args:
        captured: the model as this run captured it (its example inputs set the shapes).
        plan: the plan to run.
        world_size: number of ranks of this run.
        stride: the stride to run with (default the plan's); stride 2 needs one extra rank.

    Raises:
        PlanError: the world size is not N + stride - 1, or the plan's model fingerprint
            (graph structure, sizes and input shapes, as the profile computed it) differs.
    """
    _checked_graph(captured, plan, world_size, plan.stride if stride is None else stride)


def _checked_graph(captured: CapturedModel, plan: Plan, world_size: int, stride: int) -> OpGraph:
    if stride not in (1, 2):
        raise PlanError(f"stride must be 1 or 2, got {stride}")
    needed = n_slots(plan.n_devices, stride)
    if world_size != needed:
        raise PlanError(
            f"the plan splits {plan.model} into N={plan.n_devices} segments; with stride {stride} that needs "
            f"N + stride - 1 = {needed} ranks, but this run has {world_size}; start {needed} processes "
            f"(--nproc {needed}) or make a plan for {world_size - stride + 1} devices"
        )
    graph = _shape_pass(captured, lambda example: build_op_graph(captured, example))
    specs = _input_specs(captured)
    mine = fingerprint(graph, specs)
    if mine != plan.fingerprint:
        raise PlanError(
            f"plan was made for model fingerprint {plan.fingerprint} ({plan.model}) but this model is {mine}: "
            f"{_mismatch_hint(plan, graph, specs)}; re-run 'asyncdiff-partition profile' and 'plan' for this "
            f"model and these shapes"
        )
    return graph


def _input_specs(captured: CapturedModel) -> list[dict[str, Any]]:
    # Exactly as profile_model records them: the fingerprint hashes this list.
    return [s.to_dict() for s in captured.inputs]


def _mismatch_hint(plan: Plan, graph: OpGraph, specs: list[dict[str, Any]]) -> str:
    """Which of model and shapes differ, as far as the plan (and its profile file) tell."""
    shapes = ", ".join(f"{s['name']} {tuple(s['shape'])} {s['dtype']}" for s in specs)
    try:
        with open(plan.profile.get("path") or "", encoding="utf-8") as file:
            profiled = json.load(file)["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        profiled = None
    if profiled is not None:
        changed = [f"{p['name']} {tuple(p['shape'])} -> {tuple(s['shape'])}"
                   for p, s in zip(profiled, specs) if p["name"] == s["name"] and list(p["shape"]) != list(s["shape"])]
        if changed and len(profiled) == len(specs):
            return f"the input shapes differ from the profiled ones ({'; '.join(changed)})"
    if graph.order and plan.boundaries and plan.boundaries[-1] != len(graph):
        return f"it is another model: its graph has {len(graph)} nodes, the plan's {plan.boundaries[-1]}"
    return f"another model, or input shapes other than the profiled ones (these: {shapes})"


def _shape_pass(captured: CapturedModel, fn: Callable[[list[Tensor]], Any]) -> Any:
    """``fn(example inputs)`` for the shapes of every value, as cheaply as the model allows.

    Fake tensors give shapes without compute or activation memory, at about a millisecond per
    node; a model with under :data:`_REAL_PASS_BYTES` of weights computes faster than that, so
    it runs for real. A graph that fake tensors cannot run (data-dependent shapes) runs for real.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = captured.graph_module
    weights = {id(t): t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()]}
    if sum(weights.values()) < _REAL_PASS_BYTES:
        return fn(list(captured.example))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            return fn([mode.from_tensor(t) for t in captured.example])
    except Exception:  # noqa: BLE001 - any failure: fall back to the real thing
        return fn(list(captured.example))


# --- shapes of received values ---------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """A tensor leaf of a transferred value."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Layout:
    """How a value is made of tensor leaves (and constant leaves, which never travel)."""

    spec: Any  # pytree.TreeSpec
    leaves: tuple[Any, ...]  # _Slot or a constant

    def empty(self, device: torch.device) -> list[Tensor]:
        return [torch.empty(leaf.shape, dtype=leaf.dtype, device=device) for leaf in self.leaves
                if isinstance(leaf, _Slot)]

    def build(self, tensors: list[Tensor]) -> Any:
        it = iter(tensors)
        return pytree.tree_unflatten([next(it) if isinstance(leaf, _Slot) else leaf for leaf in self.leaves], self.spec)


class _LayoutProp(torch.fx.Interpreter):
    """Records the :class:`_Layout` of the named nodes' values (the output node is ``output``)."""

    def __init__(self, gm: torch.fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.layouts = names, {}

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        if node.name in self.names:
            leaves, spec = pytree.tree_flatten(result)
            self.layouts[node.name] = _Layout(spec, tuple(
                _Slot(tuple(x.shape), x.dtype) if isinstance(x, Tensor) else x for x in leaves))
        return result


def _value_layouts(captured: CapturedModel, names: Sequence[str]) -> dict[str, _Layout]:
    def run(example: list[Tensor]) -> dict[str, _Layout]:
        prop = _LayoutProp(captured.graph_module, set(names))
        with torch.no_grad():
            prop.run(*example)
        return prop.layouts

    return _shape_pass(captured, run)


def _tensors(value: Any) -> list[Tensor]:
    return [x.contiguous() for x in pytree.tree_leaves(value) if isinstance(x, Tensor)]


# --- the runtime -----------------------------------------------------------------------------


class AsyncDenoiser:
    """This rank's part of the asynchronous schedule; implements ``StepDenoiser``.

    Construct it on every rank after :func:`asyncdiff_partition.runtime.self._comm.init`, with the same
    captured model and plan everywhere. Set-up checks the plan (:func:`check_plan`), splits the
    graph and keeps only this rank's segment (rank r runs segment r; with stride 2 the extra
    rank N runs the last segment), moved to this rank's device. Nothing else of ``captured`` is
    kept, so once the caller drops its own references (``del captured, model``, and the
    pipeline's, e.g. ``pipe.unet = None``) the other segments' weights are freed.

    ``warmup`` and ``time_shift`` may be changed between runs; they take effect at
    :meth:`reset`.

    Args:
        captured: the model captured on this rank (same model and shapes as the plan's); or a
            model of another framework with ``inputs``, ``latent`` and ``split_for_plan(plan,
            world_size, stride) -> (op graph, segments, value layouts)``, which checks the plan
            and brings its own segments (:class:`~asyncdiff_partition.onnx.segments.OnnxCapture`).
        plan: the plan; its boundaries, N, and by default its stride and warm-up.
        warmup: W exact warm-up steps (default ``plan.warmup``).
        stride: 1 or 2 (default ``plan.stride``); the world size must be N + stride - 1.
        time_shift: condition async steps on the previous step's timestep.
        timestep_input: name of the timestep placeholder.
        timeout_s: bound on every wait for another rank (default: the process group's).
        warm_up: run this rank's segment once at set-up on the capture's example inputs (zeros
            for received values), so that the first step does not pay for first-time
            allocations (0.3-0.4 s per rank for SD 1.5 on CPU).
        group: run among these ranks only (a :class:`~asyncdiff_partition.runtime.groups.GroupComm`
            of a batch group); default all ranks.
        phases: an object whose ``mask`` is the exactness mask decided so far (Note [phases],
            :class:`~asyncdiff_partition.runtime.policy.PhasePolicy`); default the warm-up.

    Raises:
        RuntimeError: the process group is not set up.
        PlanError: see :func:`check_plan`.
        ScheduleError: bad warm-up, or stride 2 / time_shift without a timestep input.
    """

    def __init__(
        self,
        captured: CapturedModel,
        plan: Plan,
        *,
        warmup: int | None = None,
        stride: int | None = None,
        time_shift: bool = False,
        timestep_input: str = "timestep",
        timeout_s: float | None = None,
        warm_up: bool = True,
        group: Any = None,
        phases: Any = None,
    ):
        self._comm = comm if group is None else group  # a batch group's ranks (runtime.groups)
        self.phases = phases  # a switching policy's mask (runtime.policy), re-read every step
        self.rank, self.world_size, self.device = self._comm.rank(), self._comm.world_size(), self._comm.device()
        self.n_segments = plan.n_devices
        self.stride = plan.stride if stride is None else stride
        self.warmup = plan.warmup if warmup is None else warmup
        self.time_shift, self.timestep_input, self.timeout_s = time_shift, timestep_input, timeout_s
        self._input_names = [spec.name for spec in captured.inputs]
        self._latent = captured.latent.name
        make_schedule(self.n_segments, 0, warmup=self.warmup, stride=self.stride)  # validates
        check_timestep_input(timestep_input, self._input_names, stride=self.stride, time_shift=time_shift)
        ready = getattr(captured, "split_for_plan", None)  # ready-made segments (onnx_segments.OnnxCapture)
        if ready is not None:
            graph, segments, layouts = ready(plan, self.world_size, self.stride)
        else:
            graph = _checked_graph(captured, plan, self.world_size, self.stride)
            segments, layouts = split_graph(captured, graph, plan.boundaries), None
        position = graph.index
        self._producer = {v: s.index for s in segments for v in s.outputs if v != OUTPUT}
        self._consumers = {v: {s.index for s in segments if v in s.receives} for v in self._producer}
        self._tag = {v: position[v] for v in self._producer}
        segment = segments[slot_segment(self.rank, self.n_segments)]
        del segments, graph  # this object keeps nothing else of captured (see the class docstring)
        segment.module.to(self.device)
        self._segment = segment
        self._layouts = layouts if layouts is not None else _value_layouts(captured, [*segment.receives, OUTPUT])
        example = getattr(captured, "example", None)
        if warm_up and example:
            self._warm_up({spec.name: t for spec, t in zip(captured.inputs, example)})
        self._run: SamplingRun | None = None
        self._clock = time.time() - time.perf_counter()  # perf_counter -> seconds since the epoch
        self._reset_state()

    def _warm_up(self, example: Mapping[str, Tensor]) -> None:
        segment = self._segment
        args = [example[name].to(self.device) for name in segment.inputs]
        for name in segment.receives:
            layout = self._layouts[name]
            args.append(layout.build([t.zero_() for t in layout.empty(self.device)]))
        with torch.no_grad():
            segment.module(*args)

    # --- StepDenoiser --------------------------------------------------------------------

    def reset(self, timesteps: Sequence[float | int]) -> None:
        """Start a sampling run over ``timesteps`` (the values the loop feeds the model, in order).

        Finishes the transfers of an unfinished previous run first (every rank must stop a
        run at the same step), then clears all state, the report and the spans, and waits
        for every rank: the run starts together, so a rank whose set-up took longer does not
        show up as the first step's cost on the others.
        """
        self._drain()
        self._comm.barrier("starting a sampling run")
        check_timestep_input(self.timestep_input, self._input_names, stride=self.stride, time_shift=self.time_shift)
        def remake() -> list[Step]:
            return make_schedule(self.n_segments, len(timesteps), warmup=self.warmup, stride=self.stride,
                                 time_shift=self.time_shift, exact=None if self.phases is None else self.phases.mask)

        self._run = SamplingRun(timesteps, remake(), remake=remake if self.phases is not None else None)
        self._reset_state()

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """ε of the next step; ``inputs`` by captured placeholder name, the same on every rank.

        Returns ε on the latent input's device (bit-identical on every rank).

        Raises:
            ScheduleError: no :meth:`reset`, too many steps, a timestep input other than the
                one given to :meth:`reset`, or a missing input.
            PeerError: another rank failed or did not answer in time.
        """
        run = self._run
        if run is None:
            raise ScheduleError("call reset(timesteps) before the first step of a run")
        step = run.advance(inputs, self.timestep_input)
        stats = {"step": step.index, "rank": self.rank, "compute_ms": 0.0, "wait_ms": 0.0, "comm_ms": 0.0,
                 "bytes_sent": 0}
        work = next((w for w in step.work if w.slot == self.rank), None)
        with torch.no_grad():
            if work is not None and not step.chained:
                self._collect(step.index - 1, stats)
            self._post_receives(run, step, stats)
            if work is not None:
                if step.chained:
                    self._collect(step.index, stats)
                feed = step_inputs(inputs, self.timestep_input, run.timestep_value(work, step))
                values = self._compute(feed, stats)
                self._send(run, step, values, stats)
                if (self.rank, step.index) in run.eps_sources:
                    self._kept[step.index] = values[OUTPUT]
            eps = self._broadcast_eps(step, stats)
            if step.index == len(run.table) - 1:
                self._drain(stats)
        self._report.append(stats)
        latent = inputs.get(self._latent)
        return eps.to(latent.device) if latent is not None else eps

    # --- measurements ---------------------------------------------------------------------

    def report(self) -> list[dict[str, Any]]:
        """Per step of the current run: ``step, rank, compute_ms, wait_ms, comm_ms, bytes_sent``.

        ``wait_ms`` is time blocked on values from other ranks, ``comm_ms`` time spent posting
        and completing sends and in the ε broadcast (which includes waiting for its producer).
        """
        return [dict(r) for r in self._report]

    def spans(self) -> list[dict[str, Any]]:
        """Timed phases of the current run, for a Chrome trace.

        Each is ``{"name", "step", "rank", "start_s", "end_s"}``; names are ``post`` (posting
        receives), ``wait`` (for received values), ``compute``, ``send`` and ``broadcast`` (of ε);
        times are seconds since the epoch, so that the ranks of one machine line up.
        """
        return [dict(s) for s in self._spans]

    # --- one step -------------------------------------------------------------------------

    def _post_receives(self, run: SamplingRun, step: Step, stats: dict[str, Any]) -> None:
        """Post the receives of the values made at this step that this rank will read."""
        if not any(w.slot == self.rank for w in readers(run.table, step.index)):
            return
        begin = time.perf_counter()
        for name in self._segment.receives:
            src = self._producer[name]
            buffers = self._layouts[name].empty(self.device)
            works = self._comm.irecv(buffers, src, tag=self._tag[name])
            self._inbox.append((step.index, name, src, buffers, works))
        stats["comm_ms"] += self._span("post", stats, begin)

    def _collect(self, through: int, stats: dict[str, Any]) -> None:
        """Wait for the values made up to step ``through``; they become this rank's inputs."""
        if not any(made <= through for made, *_ in self._inbox):
            return
        begin = time.perf_counter()
        pending = []
        for made, name, src, buffers, works in self._inbox:
            if made > through:
                pending.append((made, name, src, buffers, works))
                continue
            self._comm.wait(works, f"value {name} of step {made} from rank {src}", self.timeout_s)
            self._stale[name] = self._layouts[name].build(buffers)
        self._inbox = pending
        stats["wait_ms"] += self._span("wait", stats, begin)

    def _compute(self, feed: Mapping[str, Tensor], stats: dict[str, Any]) -> dict[str, Any]:
        segment = self._segment
        check_inputs(segment, feed, stats["step"])
        args = [feed[name].to(self.device) for name in segment.inputs]
        args += [self._stale[name] for name in segment.receives]
        begin = time.perf_counter()
        outputs = segment.module(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats["compute_ms"] += self._span("compute", stats, begin)
        return dict(zip(segment.outputs, outputs))

    def _send(self, run: SamplingRun, step: Step, values: dict[str, Any], stats: dict[str, Any]) -> None:
        """Send this rank's new values to the slots that read them (Note [transfers])."""
        reading = readers(run.table, step.index)
        begin = time.perf_counter()
        self._wait_sends()
        for name in self._segment.outputs:
            if name == OUTPUT:
                continue
            tensors = _tensors(values[name])
            for dst in sorted({w.slot for w in reading if w.segment in self._consumers[name]} - {self.rank}):
                self._sends.append((self._comm.isend(tensors, dst, tag=self._tag[name]), tensors, name, dst))
                stats["bytes_sent"] += sum(t.numel() * t.element_size() for t in tensors)
        stats["comm_ms"] += self._span("send", stats, begin)

    def _broadcast_eps(self, step: Step, stats: dict[str, Any]) -> Tensor:
        slot, made = step.eps
        begin = time.perf_counter()
        if slot == self.rank:
            eps = self._kept.pop(made).contiguous()
            stats["bytes_sent"] += eps.numel() * eps.element_size() * (self.world_size - 1)
        else:
            (eps,) = self._layouts[OUTPUT].empty(self.device)
        self._comm.broadcast(eps, slot, what=f"ε of step {step.index}")
        stats["comm_ms"] += self._span("broadcast", stats, begin)
        return eps

    # --- state ----------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._stale: dict[str, Any] = {}  # the newest received value of each name
        self._inbox: list[tuple[int, str, int, list[Tensor], list[Any]]] = []
        self._sends: list[tuple[list[Any], list[Tensor], str, int]] = []
        self._kept: dict[int, Tensor] = {}  # step -> this rank's model output, broadcast later
        self._report: list[dict[str, Any]] = []
        self._spans: list[dict[str, Any]] = []

    def _wait_sends(self) -> None:
        for works, _, name, dst in self._sends:
            self._comm.wait(works, f"value {name} to rank {dst}", self.timeout_s)
        self._sends = []

    def _drain(self, stats: dict[str, Any] | None = None) -> None:
        """Finish every transfer of the run (also of a run abandoned part way, on every rank)."""
        stats = stats if stats is not None else {"step": -1, "wait_ms": 0.0}
        self._wait_sends()
        if self._inbox:
            self._collect(self._inbox[-1][0], stats)

    def _span(self, name: str, stats: dict[str, Any], begin: float) -> float:
        end = time.perf_counter()
        self._spans.append({"name": name, "step": stats["step"], "rank": self.rank,
                            "start_s": self._clock + begin, "end_s": self._clock + end})
        return (end - begin) * 1e3
