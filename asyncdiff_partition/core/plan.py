"""Plans: which nodes each device runs, what it receives, and the predicted speedup.

Example::

    profile = Profile.load("profiles/sd21-unet.cpu-1t.json")
    plan = make_plan(profile, n_devices=2)                        # latency-balanced
    hand = make_plan(profile, n_devices=2, boundaries=["up_blocks.1.attentions.2"])
    plan.save("plan.json"); Plan.load("plan.json", fingerprint=profile.fingerprint)

A plan is computed from a profile alone (no torch): the op graph and costs come from the
profile, the cut from :mod:`asyncdiff_partition.core.partition`.

Plan file fields for the cut's objective (optional; a file without them is a latency plan):

    objective   {"kind": "latency" | "staleness", "latency_slack": x}. "latency": the exact
                min-max split (or a hand split). "staleness": among splits whose bottleneck is
                within (1 + x) of the optimum, the one with least summed staleness
                (partition.py, Note [staleness objective]). A later field (e.g. the batch-parallel
                degree) sits beside it, not inside it.
    staleness   None, or one float per cut (N - 1): the profile's staleness at each inner
                boundary (:meth:`~asyncdiff_partition.core.profile.Profile.cut_staleness`); the
                summed value is ``predicted["staleness"]``.
    extrapolation  λ in [0, 1] (0 with stride 2): asynchronous steps read
                v(s-1) + λ (v(s-1) - v(s-2)) instead of the stale v(s-1) (Note [extrapolation]
                in runtime/extrapolation.py); 0, the default, is AsyncDiff's plain read. It
                changes no cut and no predicted latency; ``eval`` chooses it on a calibration batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.errors import PlanError
from asyncdiff_partition.core.files import read_json, write_json_atomic
from asyncdiff_partition.core.graph import OpGraph
from asyncdiff_partition.core.partition import (
    Partition,
    PartitionError,
    PartitionProblem,
    balance_segments,
    evaluate_boundaries,
)
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.schedule import ScheduleError, check_extrapolation, check_stride, n_slots
from asyncdiff_partition.core.schedule import world_size as schedule_world_size

__all__ = [
    "SCHEMA_VERSION",
    "ASYNCDIFF_SD21_BOUNDARIES",
    "Plan",
    "PlanError",
    "SegmentPlan",
    "format_plan",
    "ideal_speedup",
    "make_plan",
    "module_boundaries",
    "with_calls_per_step",
]

SCHEMA_VERSION = 1
_REMAKE = "re-run 'asyncdiff-partition plan'"

# AsyncDiff's hand splits of the SD 2.1 UNet (DESIGN.md "Baselines"): the module at which
# each segment after the first starts, in diffusers UNet2DConditionModel names.
ASYNCDIFF_SD21_BOUNDARIES: dict[int, tuple[str, ...]] = {
    2: ("up_blocks.1.attentions.2",),
    3: ("mid_block", "up_blocks.3"),
    4: ("down_blocks.2", "up_blocks.2", "up_blocks.3.attentions.0"),
}


@dataclass
class SegmentPlan:
    """One device's share: positions ``[start, end)`` of the profile's op graph."""

    index: int
    start: int
    end: int
    first_module: str
    last_module: str
    modules: list[str]
    nodes: int
    param_bytes: int
    compute_ms: float
    transfer_ms: float
    time_ms: float
    receives: list[dict[str, Any]]  # {"value", "from_segment", "bytes"}
    replicated: list[str]

    @property
    def bytes_in(self) -> int:
        return sum(r["bytes"] for r in self.receives)

    @property
    def span(self) -> str:
        return f"{self.first_module} … {self.last_module}"


@dataclass
class Plan:
    """A saved partition of one profiled model for N devices (versioned JSON, exact round trip)."""

    model: str
    fingerprint: str
    profile: dict[str, Any]
    n_devices: int
    stride: int
    warmup: int
    steps: int
    world_size: int
    method: str
    boundaries: list[int]
    speeds: list[float]
    bandwidth_gbps: float | None
    link_latency_ms: float
    segments: list[SegmentPlan]
    predicted: dict[str, float]
    batch_parallel: int = 1  # B batch groups of N + S - 1 ranks each (core.hybrid_plan)
    phases: dict[str, Any] | None = None  # the switching policy (core.phases, runtime.policy); None: the warm-up
    objective: dict[str, Any] = field(default_factory=lambda: {"kind": "latency", "latency_slack": 0.0})
    staleness: list[float] | None = None
    extrapolation: float = 0.0
    schema_version: int = SCHEMA_VERSION
    kind: str = field(default="plan", repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def bytes_per_step(self) -> int:
        """Stale bytes this plan sends per step: each value once to each segment reading it."""
        return sum(segment.bytes_in for segment in self.segments)

    @property
    def broadcast_bytes_per_step(self) -> int:
        """AsyncDiff-style traffic: every value a segment hands on goes to all N - 1 other ranks."""
        produced = {r["value"]: int(r["bytes"]) for segment in self.segments for r in segment.receives}
        return sum(produced.values()) * (self.n_devices - 1)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str | None = None) -> Plan:
        """Read a plan file; with ``fingerprint``, also check that it was made for that model.

        Raises:
            FileFormatError: missing, corrupt, truncated, not a plan, unknown version.
            PlanError: a field breaks a rule of :mod:`~asyncdiff_partition.core.validation` (the
                message names the file and the field), or the plan was made for another model.
        """
        from dataclasses import MISSING, fields

        from asyncdiff_partition.core.validation import FieldError, validate_plan

        data = read_json(path, kind="plan", schema_version=SCHEMA_VERSION, fix=_REMAKE)
        own = fields(cls)
        try:
            validate_plan(data, path, fields=[f.name for f in own], segment_fields=[f.name for f in fields(SegmentPlan)],
                          required=[f.name for f in own if f.default is MISSING and f.default_factory is MISSING],
                          fix=_REMAKE)
        except FieldError as error:
            raise PlanError(str(error)) from None
        data["segments"] = [SegmentPlan(**s) for s in data["segments"]]
        plan = cls(**data)
        if fingerprint is not None:
            plan.check_model(fingerprint)
        return plan

    def check_model(self, fingerprint: str) -> None:
        """Refuse another model (the short form of :meth:`check_fingerprint`)."""
        self.check_fingerprint(fingerprint)

    def check_fingerprint(self, found: str, *, specs: Sequence[dict[str, Any]] | None = None,
                          n_nodes: int | None = None, where: str = "this model") -> None:
        """The one fingerprint rule: the model run now must be the one the plan was made for.

        Args:
            found: the fingerprint of the model at hand (op graph and input specs, as
                :func:`~asyncdiff_partition.core.profile.fingerprint` computes it).
            specs: its input specs (name, shape, dtype, latent); with them the message says
                which shapes differ from the profiled ones.
            n_nodes: its op-graph size; with it the message tells another model apart.
            where: how the message names the model at hand.

        Raises:
            PlanError: the fingerprints differ.
        """
        if found == self.fingerprint:
            return
        hint = f": {_mismatch_hint(self, specs, n_nodes)}" if specs is not None or n_nodes is not None else ""
        raise PlanError(
            f"plan was made for model fingerprint {self.fingerprint} ({self.model}) but {where} is {found}{hint}; "
            f"re-run 'asyncdiff-partition profile' and 'plan' for this model and these shapes"
        )

    def check_world_size(self, world_size: int, stride: int | None = None, *,
                         batch_parallel: int | None = None) -> None:
        """The world-size rule of :func:`~asyncdiff_partition.core.schedule.world_size`: B x (N + stride - 1)
        ranks (stride and B default the plan's; ``batch_parallel=1`` checks one batch group).

        Raises:
            PlanError: another number of ranks, or a stride other than 1 or 2.
        """
        stride = self.stride if stride is None else stride
        groups = self.batch_parallel if batch_parallel is None else batch_parallel
        try:
            needed = schedule_world_size(self.n_devices, stride, groups)
        except ScheduleError as error:
            raise PlanError(str(error)) from None
        if world_size != needed:
            shape = "N + stride - 1" if groups == 1 else f"B x (N + stride - 1) with B={groups} batch groups"
            hint = f"make a plan for {world_size - stride + 1} devices" if groups == 1 else (
                f"make a plan for {world_size} devices")
            raise PlanError(
                f"the plan splits {self.model} into N={self.n_devices} segments; with stride {stride} that needs "
                f"{shape} = {needed} ranks, but this run has {world_size}; start {needed} processes "
                f"(--nproc {needed}) or {hint}"
            )


def _mismatch_hint(plan: Plan, specs: Sequence[dict[str, Any]] | None, n_nodes: int | None) -> str:
    """Which of model and shapes differ, as far as the plan (and its profile file) tell."""
    specs = list(specs or [])
    profiled = plan.profile.get("inputs") or None
    if profiled is None:
        try:
            with open(plan.profile.get("path") or "", encoding="utf-8") as file:
                profiled = json.load(file)["inputs"]
        except (OSError, ValueError, KeyError, TypeError):
            profiled = None
    if profiled is not None and specs:
        changed = [f"{p['name']} {tuple(p['shape'])} -> {tuple(s['shape'])}"
                   for p, s in zip(profiled, specs) if p["name"] == s["name"] and list(p["shape"]) != list(s["shape"])]
        if changed and len(profiled) == len(specs):
            return f"the input shapes differ from the profiled ones ({'; '.join(changed)})"
    if n_nodes is not None and plan.boundaries and plan.boundaries[-1] != n_nodes:
        return f"it is another model: its graph has {n_nodes} nodes, the plan's {plan.boundaries[-1]}"
    shapes = ", ".join(f"{s['name']} {tuple(s['shape'])} {s['dtype']}" for s in specs)
    return f"another model, or input shapes other than the profiled ones (these: {shapes})"


def ideal_speedup(steps: int, warmup: int, n_devices: int, stride: int = 1) -> float:
    """AsyncDiff's ideal end-to-end speedup of the denoiser: T / (W + (T - W) / (N S))."""
    w = min(warmup, steps)
    return steps / (w + (steps - w) / (n_devices * stride))


def make_plan(
    profile: Any,
    n_devices: int,
    *,
    stride: int = 1,
    warmup: int = 1,
    steps: int = 50,
    speeds: Sequence[float] | None = None,
    bandwidth_gbps: float | None = None,
    link_latency_ms: float = 0.0,
    memory_caps: Sequence[int | None] | None = None,
    boundaries: Sequence[str] | None = None,
    profile_path: str = "",
    latency_slack: float = 0.0,
    extrapolation: float = 0.0,
) -> Plan:
    """Partition a profiled model for ``n_devices`` devices.

    Args:
        profile: a :class:`~asyncdiff_partition.core.profile.Profile`.
        n_devices: N, the number of segments.
        stride: 1, or 2 for stride denoising (one extra rank: world = N + 1).
        warmup, steps: W and T, for the predicted end-to-end speedup.
        speeds: per-device speed factors (heterogeneous devices); default all 1.
        bandwidth_gbps: link bandwidth in GB/s for the transfer cost; None = free transfers.
        link_latency_ms: fixed cost of every transfer.
        memory_caps: per-device parameter-byte caps (None entries: no cap).
        boundaries: module paths at which segments 2..N start (a hand split); None = balanced.
        profile_path: recorded in the plan.
        latency_slack: x > 0 cuts where the profile's staleness is least among the splits
            within (1 + x) of the optimal bottleneck (plan field ``objective``); needs a
            profile calibrated for staleness. 0: the latency-optimal split.
        extrapolation: λ, the plan field of that name (module docstring).

    Raises:
        PlanError: bad arguments, N larger than the graph allows, unknown module boundaries,
            a latency slack with a profile that has no staleness, or a slack with a hand split.
    """
    try:
        check_stride(stride)
        check_extrapolation(extrapolation, stride)
    except ScheduleError as error:
        raise PlanError(str(error)) from None
    if n_devices < 1:
        raise PlanError(f"need at least 1 device, got {n_devices}")
    if steps < 1 or warmup < 0:
        raise PlanError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    cut_staleness = profile.cut_staleness()
    if latency_slack and cut_staleness is None:
        raise PlanError(f"latency_slack={latency_slack} needs a profile calibrated for staleness, and "
                        f"{profile_path or profile.model!r} has none; calibrate it with 'asyncdiff-partition tune' "
                        f"(or fx.staleness.calibrate_staleness) or use latency_slack=0")
    if latency_slack and boundaries is not None:
        raise PlanError(f"latency_slack={latency_slack} chooses the cuts, but boundaries {list(boundaries)} "
                        f"fix them; give one or the other")
    graph = profile.op_graph()
    table = graph.cut_table()
    # Inputs are on every rank (Note [value kinds] in graph.py): like fresh values they have no
    # position, so no segment can consist of the latent input alone.
    kinds = [graph.node(i)["kind"] for i in range(len(graph))]
    problem = PartitionProblem(
        costs=profile.costs,
        fresh=[f or kind == "input" for f, kind in zip(graph.fresh, kinds)],
        preds=[graph.preds(i) for i in range(len(graph))],
        stale_bytes=table.stale_bytes,
        param_bytes=[graph.node(i)["param_bytes"] for i in range(len(graph))],
        staleness=cut_staleness,
    )
    bandwidth = None if bandwidth_gbps is None else bandwidth_gbps * 1e6  # bytes per ms
    try:
        if boundaries is not None:
            positions = module_boundaries(graph, boundaries)
            if len(positions) != n_devices - 1:
                raise PlanError(f"{len(boundaries)} boundaries make {len(boundaries) + 1} segments, "
                                f"but --devices is {n_devices}")
            partition = evaluate_boundaries(problem, [0, *positions, len(graph)], speeds=speeds,
                                            bandwidth=bandwidth, link_latency_ms=link_latency_ms)
            method = "manual"
        else:
            partition = balance_segments(problem, n_devices, speeds=speeds, bandwidth=bandwidth,
                                         link_latency_ms=link_latency_ms, memory_caps=memory_caps,
                                         latency_slack=latency_slack)
            method = "balanced"
    except PartitionError as error:
        raise PlanError(str(error)) from None
    segments = _segment_plans(graph, partition)
    # The unsplit model under the same cost model (nodes whose value nobody uses count nowhere).
    sequential = evaluate_boundaries(problem, [0, len(graph)]).compute[0]
    step = max(partition.times) / stride
    w = min(warmup, steps)
    total_async = w * sequential + (steps - w) * step
    return Plan(
        model=profile.model,
        fingerprint=profile.fingerprint,
        profile={"path": profile_path, "device": profile.device, "device_name": profile.device_name,
                 "threads": profile.threads, "created": profile.created, "inputs": profile.inputs},
        n_devices=n_devices,
        stride=stride,
        warmup=warmup,
        steps=steps,
        world_size=n_slots(n_devices, stride),
        method=method,
        boundaries=list(partition.boundaries),
        speeds=list(speeds) if speeds is not None else [1.0] * n_devices,
        bandwidth_gbps=bandwidth_gbps,
        link_latency_ms=link_latency_ms,
        segments=segments,
        predicted={
            "sequential_step_ms": sequential,
            "async_step_ms": step,
            "imbalance": partition.imbalance,
            "speedup": steps * sequential / total_async if total_async else float("nan"),
            "ideal_speedup": ideal_speedup(steps, warmup, n_devices, stride),
            **({} if cut_staleness is None else {"staleness": partition.staleness}),
        },
        objective={"kind": "staleness" if latency_slack else "latency", "latency_slack": float(latency_slack)},
        staleness=None if cut_staleness is None else [cut_staleness[b] for b in partition.boundaries[1:-1]],
        extrapolation=float(extrapolation),
    )


def with_calls_per_step(plan: Plan, calls: int) -> Plan:
    """``plan`` for a pipeline that calls the model ``calls`` times per step (separate guidance passes):
    every call runs the schedule once, so the step times scale and the speedups do not.

    Example:
        >>> with_calls_per_step(plan, 2).predicted["calls_per_step"]  # doctest: +SKIP
        2
    """
    if calls < 1:
        raise PlanError(f"a pipeline calls its model at least once per step, got {calls}")
    base = plan.predicted.get("calls_per_step", 1)
    scale = calls / base
    predicted = dict(plan.predicted, calls_per_step=calls)
    for key in ("sequential_step_ms", "async_step_ms", "full_sequential_step_ms"):
        if key in predicted:
            predicted[key] = predicted[key] * scale
    return replace(plan, predicted=predicted)


def module_boundaries(graph: OpGraph, module_paths: Sequence[str]) -> list[int]:
    """Positions at which the given modules start (first non-fresh op inside each).

    Raises:
        PlanError: a module path matches no op, or the modules are not in execution order.
    """
    positions = []
    for path in module_paths:
        path = path.strip()
        found = next(
            (i for i, name in enumerate(graph.order)
             if graph.node(i)["kind"] == "op" and not graph.node(i)["fresh"]
             and (graph.node(i)["module"] == path or graph.node(i)["module"].startswith(path + "."))),
            None,
        )
        if found is None:
            tops = sorted({graph.node(i)["module"].split(".")[0] for i in range(len(graph))} - {""})
            raise PlanError(f"no node of module {path!r} in this model; top-level modules: {', '.join(tops)}")
        positions.append(found)
    if any(a >= b for a, b in zip(positions, positions[1:])):
        raise PlanError(f"boundaries {list(module_paths)} are not in execution order (positions {positions})")
    return positions


def _segment_plans(graph: OpGraph, partition: Partition) -> list[SegmentPlan]:
    placement = place(graph, partition.boundaries)
    plans = []
    for k, nodes in enumerate(partition.segment_nodes):
        modules = [graph.node(i)["module"] for i in nodes if graph.node(i)["kind"] == "op"] or [""]
        plans.append(
            SegmentPlan(
                index=k,
                start=partition.boundaries[k],
                end=partition.boundaries[k + 1],
                first_module=modules[0] or "(root)",
                last_module=modules[-1] or "(root)",
                modules=_module_summary(modules),
                nodes=len(nodes),
                param_bytes=partition.param_bytes[k],
                compute_ms=partition.compute[k],
                transfer_ms=partition.transfer[k],
                time_ms=partition.times[k],
                receives=[
                    {"value": name, "from_segment": placement.owner[name], "bytes": graph.node(name)["out_bytes"]}
                    for name in placement.segments[k].receives
                ],
                replicated=[graph.order[i] for i in partition.replicated[k]],
            )
        )
    return plans


def _module_summary(modules: Sequence[str]) -> list[str]:
    """Top-level units in order without repeats: ``conv_in, down_blocks.0, ..., mid_block``."""
    units: list[str] = []
    for module in modules:
        parts = module.split(".")
        unit = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
        unit = unit or "(root)"
        if not units or units[-1] != unit:
            units.append(unit)
    return units


def format_plan(plan: Plan, title: str | None = None, measured: Sequence[float] | None = None) -> str:
    """The plan as a table: segment | modules | predicted ms | share | params | bytes in.

    With ``measured`` (ms of each segment run alone), two more columns set them beside the
    predicted compute time.
    """
    from asyncdiff_partition.core.summary import format_bytes

    total = sum(s.time_ms for s in plan.segments) or 1.0
    header = ("segment", "modules", "predicted ms", "share", "params", "bytes in")
    rows = [header + (("measured ms", "error") if measured else ())]
    for s in plan.segments:
        row: tuple[str, ...] = (str(s.index), _compress(s.modules), f"{s.time_ms:.1f}",
                                f"{100 * s.time_ms / total:.1f}%", format_bytes(s.param_bytes), format_bytes(s.bytes_in))
        if measured:
            m = measured[s.index]
            row += (f"{m:.1f}", f"{100 * (s.compute_ms - m) / m:+.1f}%")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title] if title else []
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    p = plan.predicted
    lines.append(
        f"{plan.method} plan, N={plan.n_devices} S={plan.stride} (world {plan.world_size}); step "
        f"{p['sequential_step_ms']:.1f} ms sequential -> {p['async_step_ms']:.1f} ms async "
        f"(max/mean {p['imbalance']:.3f}); predicted speedup {p['speedup']:.2f}x for T={plan.steps} "
        f"W={plan.warmup}, ideal {p['ideal_speedup']:.2f}x"
    )
    if plan.extrapolation:
        lines.append(f"stale values extrapolated: v(s-1) + {plan.extrapolation:g} (v(s-1) - v(s-2))")
    return "\n".join(lines)


def _compress(units: Sequence[str]) -> str:
    """``down_blocks.0, down_blocks.1, down_blocks.2`` → ``down_blocks.0-2``."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            prefix = run[0].rsplit(".", 1)[0]
            out.append(run[0] if len(run) == 1 else f"{prefix}.{run[0].rsplit('.', 1)[1]}-{run[-1].rsplit('.', 1)[1]}")
            run.clear()

    for unit in units:
        head, _, tail = unit.rpartition(".")
        if run and tail.isdigit() and run[-1].rpartition(".")[0] == head and int(run[-1].rpartition(".")[2]) + 1 == int(tail):
            run.append(unit)
            continue
        flush()
        if tail.isdigit():
            run.append(unit)
        else:
            out.append(unit)
    flush()
    return ", ".join(out)
