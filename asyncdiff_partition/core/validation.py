"""The schema of plan and profile files: types, ranges, lengths and consistency, one rule per message.

Example::

    data = read_json(path, kind="plan", schema_version=1, fix=...)
    validate_plan(data, path, fields=PLAN_FIELDS, segment_fields=SEGMENT_FIELDS)   # FieldError if not

Written as plain checks rather than a JSON Schema (``jsonschema``) or typed models (pydantic):
most rules that matter here relate fields to each other (``len(boundaries) == n_devices + 1``,
segment ``k`` spans ``boundaries[k]..boundaries[k+1]``, ``world_size = batch_parallel (N + S - 1)``, one cost
per graph node, a segment receives only from earlier segments), which a JSON Schema cannot say,
so code would be needed beside it anyway; as code, every rule gives one message naming the file
and the field path (``segments[1].receives[0].from_segment``), with no new dependency, and the
core stays free of torch. The loaders (``Plan.load``, ``Profile.load``) turn :class:`FieldError`
into their own ``PlanError`` / ``ProfileError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn

from asyncdiff_partition.core.errors import AsyncDiffError, PlanError
from asyncdiff_partition.core.phases import PhaseError, check_phases
from asyncdiff_partition.core.placement import segment_inputs, segment_of
from asyncdiff_partition.core.schedule import ScheduleError, check_extrapolation, world_size

__all__ = ["FieldError", "check_plan_graph", "validate_plan", "validate_profile"]


class FieldError(AsyncDiffError, ValueError):
    """A field of a saved file breaks a rule; the message names the file and the field."""


class _Fields:
    """Checks of one file's fields; each failure raises :class:`FieldError` naming file and field."""

    def __init__(self, kind: str, path: Any, fix: str):
        self.kind, self.path, self.fix = kind, str(path), fix

    def fail(self, field: str, rule: str, value: Any = ..., *, got: str | None = None) -> NoReturn:
        shown = f", got {got}" if got is not None else "" if value is ... else f", got {_show(value)}"
        raise FieldError(f"{self.kind} file {self.path!r}: {field} must be {rule}{shown}; {self.fix}")

    def keys(self, data: Any, field: str, known: Collection[str], required: Collection[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.fail(field or "the top level", "an object", data)
        where = f"{field}." if field else ""
        missing = [k for k in required if k not in data]
        if missing:
            self.fail(f"{where}{missing[0]}", "present (the field is missing)")
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            self.fail(f"{where}{unknown[0]}", f"absent (not a {self.kind} field; known: {', '.join(sorted(known))})")
        return data

    def integer(self, value: Any, field: str, low: int | None = None, high: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, "an integer", value)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"from {low} to {high}"
            self.fail(field, f"an integer {bounds}", value)
        return value

    def number(self, value: Any, field: str, *, low: float | None = None, positive: bool = False,
               finite: bool = True) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(field, "a number", value)
        if finite and not math.isfinite(value):
            self.fail(field, "a finite number", value)
        if positive and not value > 0:
            self.fail(field, "a number > 0", value)
        if low is not None and not value >= low:
            self.fail(field, f"a number >= {low:g}", value)
        return float(value)

    def string(self, value: Any, field: str, *, empty: bool = True) -> str:
        if not isinstance(value, str) or (not empty and not value):
            self.fail(field, "a string" if empty else "a non-empty string", value)
        return value

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, "true or false", value)
        return value

    def array(self, value: Any, field: str, length: int | None = None, why: str = "") -> list[Any]:
        if not isinstance(value, list):
            self.fail(field, "a list", value)
        if length is not None and len(value) != length:
            self.fail(field, f"a list of {length} entries{why}", got=f"{len(value)} entries")
        return value

    def mapping(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def inputs(self, value: Any, field: str) -> None:
        """Input specs: name, shape, dtype, latent (exactly one latent input when any are listed)."""
        for i, spec in enumerate(self.array(value, field)):
            where = f"{field}[{i}]"
            self.keys(spec, where, known=("name", "path", "shape", "dtype", "latent"), required=("name", "shape", "dtype", "latent"))
            self.string(spec["name"], f"{where}.name", empty=False)
            if "path" in spec:
                self.string(spec["path"], f"{where}.path")
            for j, size in enumerate(self.array(spec["shape"], f"{where}.shape")):
                self.integer(size, f"{where}.shape[{j}]", low=0)
            self.string(spec["dtype"], f"{where}.dtype", empty=False)
            self.boolean(spec["latent"], f"{where}.latent")
        if value and sum(spec["latent"] for spec in value) != 1:
            self.fail(f"{field}[].latent", "true for exactly one input (the latent)", [s["latent"] for s in value])


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- plans -------------------------------------------------------------------------------------

_PREDICTED = ("sequential_step_ms", "async_step_ms", "imbalance", "speedup", "ideal_speedup")
# only some plans have these: fidelity-aware splits (staleness), hybrid plans (core.hybrid_plan)
_PREDICTED_OPTIONAL = ("staleness", "gather_ms", "full_sequential_step_ms", "calls_per_step")
_RECEIVE = ("value", "from_segment", "bytes")


def validate_plan(data: Mapping[str, Any], path: Any, *, fields: Collection[str], required: Collection[str],
                  segment_fields: Collection[str], fix: str) -> None:
    """Check a plan file's content (after its kind and schema version).

    Args:
        data: the parsed JSON object.
        path: the file, named in messages.
        fields, required: the plan's field names, and those without a default.
        segment_fields: the fields of one segment (all required).
        fix: what to do about it, appended to every message.

    Raises:
        FieldError: the first broken rule.
    """
    f = _Fields("plan", path, fix)
    f.keys(data, "", known=fields, required=required)
    f.string(data["model"], "model", empty=False)
    f.string(data["fingerprint"], "fingerprint", empty=False)
    profile = f.mapping(data["profile"], "profile")
    if profile.get("inputs"):
        f.inputs(profile["inputs"], "profile.inputs")
    if profile.get("path") is not None:
        f.string(profile["path"], "profile.path")
    n = f.integer(data["n_devices"], "n_devices", low=1)
    stride = f.integer(data["stride"], "stride", low=1, high=2)
    f.integer(data["warmup"], "warmup", low=0)
    f.integer(data["steps"], "steps", low=1)
    groups = f.integer(data["batch_parallel"], "batch_parallel", low=1) if "batch_parallel" in data else 1
    world = world_size(n, stride, groups)
    if f.integer(data["world_size"], "world_size", low=1) != world:
        rule = "n_devices + stride - 1" if groups == 1 else "batch_parallel * (n_devices + stride - 1)"
        f.fail("world_size", f"{rule} = {world}", data["world_size"])
    if data.get("phases") is not None:
        try:
            check_phases(data["phases"])
        except PhaseError as error:
            f.fail("phases", "a switching policy (core.phases)", data["phases"], got=f"{_show(data['phases'])}: {error}")
    f.string(data["method"], "method", empty=False)
    boundaries = f.array(data["boundaries"], "boundaries", n + 1, " (n_devices + 1)")
    for k, b in enumerate(boundaries):
        f.integer(b, f"boundaries[{k}]", low=0)
    if boundaries[0] != 0:
        f.fail("boundaries[0]", "0 (the first segment starts at the first node)", boundaries[0])
    for k in range(1, n + 1):
        if boundaries[k] <= boundaries[k - 1]:
            f.fail(f"boundaries[{k}]", f"greater than boundaries[{k - 1}] = {boundaries[k - 1]} (strictly increasing)",
                   boundaries[k])
    for k, speed in enumerate(f.array(data["speeds"], "speeds", n, " (one per device)")):
        f.number(speed, f"speeds[{k}]", positive=True)
    if data["bandwidth_gbps"] is not None:
        f.number(data["bandwidth_gbps"], "bandwidth_gbps", positive=True)
    f.number(data["link_latency_ms"], "link_latency_ms", low=0)
    segments = f.array(data["segments"], "segments", n, " (one per device)")
    for k, segment in enumerate(segments):
        _validate_segment(f, segment, k, boundaries, segment_fields)
    predicted = f.keys(data["predicted"], "predicted", known=_PREDICTED + _PREDICTED_OPTIONAL, required=_PREDICTED)
    for key in predicted:
        f.number(predicted[key], f"predicted.{key}", finite=False)
    if "staleness" in predicted:
        f.number(predicted["staleness"], "predicted.staleness", low=0)
    if "calls_per_step" in predicted:
        f.number(predicted["calls_per_step"], "predicted.calls_per_step", low=1)
    _validate_objective(f, data, n)


def _validate_objective(f: _Fields, data: Mapping[str, Any], n: int) -> None:
    """The fidelity-aware fields (core/plan.py's "Plan file fields"); all optional."""
    if "objective" in data:
        objective = f.keys(data["objective"], "objective", known=("kind", "latency_slack"), required=("kind",))
        if objective["kind"] not in ("latency", "staleness"):
            f.fail("objective.kind", "latency or staleness", objective["kind"])
        if "latency_slack" in objective:
            f.number(objective["latency_slack"], "objective.latency_slack", low=0)
    if data.get("staleness") is not None:
        for k, value in enumerate(f.array(data["staleness"], "staleness", n - 1, " (one per inner cut)")):
            f.number(value, f"staleness[{k}]", low=0)
    if "extrapolation" in data:
        factor = f.number(data["extrapolation"], "extrapolation", low=0)
        try:
            check_extrapolation(factor, data["stride"])
        except ScheduleError as error:
            f.fail("extrapolation", "a number in [0, 1], and 0 with stride 2", got=f"{_show(data['extrapolation'])} ({error})")


def _validate_segment(f: _Fields, segment: Any, k: int, boundaries: list[int], fields: Collection[str]) -> None:
    where = f"segments[{k}]"
    f.keys(segment, where, known=fields, required=fields)
    if f.integer(segment["index"], f"{where}.index") != k:
        f.fail(f"{where}.index", f"{k} (its position)", segment["index"])
    for key, expected in (("start", boundaries[k]), ("end", boundaries[k + 1])):
        if f.integer(segment[key], f"{where}.{key}") != expected:
            f.fail(f"{where}.{key}", f"boundaries[{k + (key == 'end')}] = {expected}", segment[key])
    f.string(segment["first_module"], f"{where}.first_module")
    f.string(segment["last_module"], f"{where}.last_module")
    for i, module in enumerate(f.array(segment["modules"], f"{where}.modules")):
        f.string(module, f"{where}.modules[{i}]")
    f.integer(segment["nodes"], f"{where}.nodes", low=0)
    f.integer(segment["param_bytes"], f"{where}.param_bytes", low=0)
    for key in ("compute_ms", "transfer_ms", "time_ms"):
        f.number(segment[key], f"{where}.{key}", low=0)
    seen: set[str] = set()
    for i, entry in enumerate(f.array(segment["receives"], f"{where}.receives")):
        at = f"{where}.receives[{i}]"
        f.keys(entry, at, known=_RECEIVE, required=_RECEIVE)
        value = f.string(entry["value"], f"{at}.value", empty=False)
        if value in seen:
            f.fail(f"{at}.value", f"received once by segment {k}", value)
        seen.add(value)
        if k == 0:
            f.fail(f"{at}", "absent: segment 0 has no earlier segment to receive from", entry)
        f.integer(entry["from_segment"], f"{at}.from_segment", low=0, high=k - 1)
        f.integer(entry["bytes"], f"{at}.bytes", low=0)
    for i, name in enumerate(f.array(segment["replicated"], f"{where}.replicated")):
        f.string(name, f"{where}.replicated[{i}]", empty=False)


def check_plan_graph(plan: Any, graph: Any, path: Any, fix: str = "re-run 'asyncdiff-partition plan'", *,
                     placement: Any = None) -> None:
    """Check a loaded plan against the op graph of the model it is run on (same fingerprint).

    The boundaries must end at the graph's last node, and every segment's ``receives`` must be
    what the graph says crosses into it (value, producing segment, bytes).

    ``placement``, when the caller has placed the plan's boundaries already
    (:func:`~asyncdiff_partition.core.placement.place`), is used instead of placing them again.

    Raises:
        PlanError: the first mismatch.
    """
    try:
        _check_plan_graph(_Fields("plan", path, fix), plan, graph, placement)
    except FieldError as error:
        raise PlanError(str(error)) from None


def _check_plan_graph(f: _Fields, plan: Any, graph: Any, placement: Any) -> None:
    if plan.boundaries[-1] != len(graph):
        f.fail(f"boundaries[{len(plan.boundaries) - 1}]", f"the model's node count {len(graph)}", plan.boundaries[-1])
    received = (segment_inputs(graph, plan.boundaries) if placement is None
                else [{v: graph.node(v)["out_bytes"] for v in s.receives} for s in placement.segments])
    owner = segment_of(graph, plan.boundaries)
    for k, segment in enumerate(plan.segments):
        expected = {name: (owner[graph.index[name]], size) for name, size in received[k].items()}
        actual = {r["value"]: (r["from_segment"], r["bytes"]) for r in segment.receives}
        if actual != expected:
            wrong = sorted(set(actual.items()) ^ set(expected.items()))[0][0]
            f.fail(f"segments[{k}].receives", f"the values crossing into segment {k} in this model "
                   f"({len(expected)}; first difference: {wrong!r})", got=f"{len(actual)} entries")


# --- profiles ----------------------------------------------------------------------------------

_NODE_TYPES: dict[str, type] = {"name": str, "kind": str, "op": str, "target": str, "module": str,
                                "out_bytes": int, "param_bytes": int, "latent": bool}


def validate_profile(data: Mapping[str, Any], path: Any, *, fields: Collection[str], required: Collection[str],
                     node_kinds: Collection[str], fix: str) -> None:
    """Check a profile file's content (after its kind and schema version).

    Args:
        data: the parsed JSON object.
        path: the file, named in messages.
        fields, required: the profile's field names, and those without a default.
        node_kinds: the op graph's node kinds.
        fix: what to do about it, appended to every message.

    Raises:
        FieldError: the first broken rule.
    """
    f = _Fields("profile", path, fix)
    f.keys(data, "", known=fields, required=required)
    for key in ("model", "fingerprint", "device"):
        f.string(data[key], key, empty=False)
    f.string(data["device_name"], "device_name")
    f.string(data["dtype"], "dtype", empty=False)
    f.integer(data["threads"], "threads", low=1)
    f.inputs(data["inputs"], "inputs")
    for name, version in f.mapping(data["versions"], "versions").items():
        f.string(version, f"versions.{name}")
    f.integer(data["warmup"], "warmup", low=0)
    f.integer(data["repeats"], "repeats", low=1)
    eager = f.keys(data["eager_ms"], "eager_ms", known=("median", "min", "max", "samples"), required=("median",))
    for key in ("median", "min", "max"):
        if key in eager:
            f.number(eager[key], f"eager_ms.{key}", low=0)
    for i, sample in enumerate(f.array(eager.get("samples", []), "eager_ms.samples")):
        f.number(sample, f"eager_ms.samples[{i}]", low=0)
    for name, size in f.mapping(data["peak_memory"], "peak_memory").items():
        f.integer(size, f"peak_memory.{name}", low=0)
    for key in ("command", "created"):
        if key in data:
            f.string(data[key], key)
    graph = f.keys(data["graph"], "graph", known=("nodes",), required=("nodes",))
    nodes = f.array(graph["nodes"], "graph.nodes")
    if not nodes:
        f.fail("graph.nodes", "a non-empty list", nodes)
    names: set[str] = set()
    for i, node in enumerate(nodes):
        where = f"graph.nodes[{i}]"
        f.keys(node, where, known=(*_NODE_TYPES, "preds"), required=(*_NODE_TYPES, "preds"))
        for key, kind in _NODE_TYPES.items():
            checks: dict[type, Callable[[Any, str], object]] = {str: f.string, int: f.integer, bool: f.boolean}
            checks[kind](node[key], f"{where}.{key}")
        if node["name"] in names:
            f.fail(f"{where}.name", "unique", node["name"])
        names.add(node["name"])
        if node["kind"] not in node_kinds:
            f.fail(f"{where}.kind", f"one of {', '.join(node_kinds)}", node["kind"])
        for key in ("out_bytes", "param_bytes"):
            f.integer(node[key], f"{where}.{key}", low=0)
        for j, pred in enumerate(f.array(node["preds"], f"{where}.preds")):
            f.integer(pred, f"{where}.preds[{j}]", low=0, high=i - 1)  # producers come first (topological order)
    for key in ("costs", "spread"):
        for i, cost in enumerate(f.array(data[key], key, len(nodes), " (one per graph node)")):
            f.number(cost, f"{key}[{i}]", low=0)
