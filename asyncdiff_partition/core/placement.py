"""Placement: which node runs in which segment, computed once from an op graph and a plan's boundaries.

Example::

    placement = place(graph, plan.boundaries)
    placement.segments[1].receives          # stale values segment 1 gets from earlier segments
    placement.segments[0].replicated        # fresh ops segment 0 recomputes instead of receiving
    split_graph(captured, placement)        # the torch splitter only builds modules from it

The placement is the policy half of a split (as ``split_callback`` is for torch.fx's
``split_module``); :func:`~asyncdiff_partition.fx.split.split_graph` and
:func:`~asyncdiff_partition.onnx.segments.split_onnx` are the mechanism. It follows Note [value
kinds] in :mod:`asyncdiff_partition.core.graph`:

    value kind       where it goes
    input            every segment that uses it (every rank has every input)
    constant         every segment that uses it
    stale op         the segment of its position; sent once to every later segment using it
    fresh op         recomputed by every segment that uses it, with its fresh ancestors
    output           the segment of its position (the last one) yields the model output

A fresh op that no stale op or output uses, directly or through other fresh ops, is placed
nowhere, as the partitioner's cost model charges it nowhere.

In-place writes (Note [in-place writes] in :mod:`~asyncdiff_partition.core.graph`) go with the
nodes that observe them: a fresh write is recomputed by every segment that computes one of its
observers, a stale one stays in the segment of its position, and a fresh write into a weight or
buffer that nothing reads afterwards runs in the segment of its position. A placement that would
separate a stale write from its observers is refused with :class:`SideEffectError`
(Note [writes in segments] in :mod:`~asyncdiff_partition.core.effects`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asyncdiff_partition.core import counters
from asyncdiff_partition.core.effects import check_writes
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.graph import OUTPUT, OpGraph

__all__ = ["Placement", "PlacementError", "SegmentPlacement", "SideEffectError", "check_boundaries", "place",
           "segment_inputs", "segment_of"]


class PlacementError(AsyncDiffError, ValueError):
    """Boundaries that do not cut this op graph into segments that each hold work of their own."""


class SideEffectError(PlacementError):
    """Boundaries that would separate an in-place write from the nodes that read its tensor afterwards."""


@dataclass(frozen=True)
class SegmentPlacement:
    """One segment's share of the op graph (names are op-graph node names, in graph order).

    Attributes:
        index: position of the segment, 0 for the one that starts the model.
        start, end: its positions ``[start, end)`` of the topological order.
        placed: the stale ops (and the output node) it owns.
        inputs: model inputs it reads.
        constants: constants (weights, buffers) it reads.
        replicated: fresh ops it recomputes instead of receiving.
        receives: stale values it consumes that earlier segments produce.
        sends: values of its own that later segments consume.
        yields_output: whether it produces the model output.
        cloned: received values and model inputs it writes into in place; its module works on
            a copy of them (Note [writes in segments] in :mod:`~asyncdiff_partition.core.effects`).
    """

    index: int
    start: int
    end: int
    placed: tuple[str, ...]
    inputs: tuple[str, ...]
    constants: tuple[str, ...]
    replicated: tuple[str, ...]
    receives: tuple[str, ...]
    sends: tuple[str, ...]
    yields_output: bool
    cloned: tuple[str, ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        """What a segment module returns: its sends, then :data:`OUTPUT` if it yields the output."""
        return self.sends + ((OUTPUT,) if self.yields_output else ())

    @property
    def body(self) -> frozenset[str]:
        """Every node the segment's module computes or reads (all but its receives)."""
        return frozenset(self.placed + self.inputs + self.constants + self.replicated)


@dataclass(frozen=True)
class Placement:
    """Node -> segment for one op graph and one set of boundaries; made by :func:`place`.

    Attributes:
        boundaries: the ``N + 1`` positions it was made from.
        segments: one :class:`SegmentPlacement` per segment.
        owner: every placed node -> its segment.
        positions: every value that crosses a cut -> its graph position (the message tag
            that names it on the wire).
        n_nodes: nodes in the op graph.
    """

    boundaries: tuple[int, ...]
    segments: tuple[SegmentPlacement, ...]
    owner: dict[str, int]
    positions: dict[str, int]
    n_nodes: int

    @property
    def n_segments(self) -> int:
        return len(self.segments)

    def consumers(self, value: str) -> tuple[int, ...]:
        """The segments that receive ``value``."""
        return tuple(s.index for s in self.segments if value in s.receives)

    def to_dict(self) -> dict[str, Any]:
        segments = []
        for s in self.segments:
            segment = {"placed": list(s.placed), "receives": list(s.receives), "sends": list(s.sends),
                       "inputs": list(s.inputs), "replicated": list(s.replicated)}
            if s.cloned:  # only where a segment writes in place: other digests stay as they were
                segment["cloned"] = list(s.cloned)
            segments.append(segment)
        return {"boundaries": list(self.boundaries), "n_nodes": self.n_nodes, "segments": segments}

    def digest(self) -> str:
        """A short hash of what each segment holds, sends and receives (ranks compare it)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_boundaries(boundaries: Sequence[Any], n: int) -> list[int]:
    """The one boundary rule: integers rising strictly from 0 to ``n``, at least two of them.

    Raises:
        PlacementError: the boundaries break that rule (the message shows them and the fix).
    """
    b = list(boundaries)
    if any(isinstance(x, bool) or not isinstance(x, int) for x in b):
        raise PlacementError(f"boundaries must be integers; got {b}")
    if len(b) < 2 or b[0] != 0 or b[-1] != n:
        raise PlacementError(
            f"boundaries must run from 0 to n={n} with at least two entries; got {b}; write them as [0, b_1, ..., {n}]"
        )
    for k, (lo, hi) in enumerate(zip(b, b[1:])):
        if lo >= hi:
            raise PlacementError(
                f"boundaries must be strictly increasing; got {b} (entries {k} and {k + 1}: {lo} then {hi})"
            )
    return b


def place(graph: OpGraph, boundaries: Sequence[int]) -> Placement:
    """Place every node of ``graph`` for the segments ``boundaries`` cut it into.

    Example:
        >>> placement = place(graph, [0, 812, len(graph)])  # doctest: +SKIP
        >>> placement.segments[1].receives  # doctest: +SKIP
        ('add_3', 'conv2d_5')

    Args:
        graph: the op graph.
        boundaries: ``N + 1`` strictly increasing positions from 0 to ``len(graph)``; segment
            ``k`` owns the stale ops at positions ``boundaries[k]:boundaries[k+1]``.

    Raises:
        PlacementError: bad boundaries, or a segment that owns no stale op and not the output.
        SideEffectError: the boundaries separate an in-place write from a node that reads its
            tensor afterwards (the message names both, their modules, and the boundary to move).
    """
    bounds = check_boundaries(boundaries, len(graph))
    counters.count("placements")
    order, nodes = graph.order, graph.nx.nodes
    n_seg = len(bounds) - 1
    owner: dict[str, int] = {}
    used: list[set[str]] = [set() for _ in range(n_seg)]  # inputs, constants, fresh ops per segment
    received: list[set[str]] = [set() for _ in range(n_seg)]
    sent: list[set[str]] = [set() for _ in range(n_seg)]
    unobserved = set(graph.writes) - {w for name in order for w in graph.observes(name)}
    k = 0
    for i, name in enumerate(order):
        while i >= bounds[k + 1]:
            k += 1
        attrs = nodes[name]
        if attrs["kind"] == "input":
            continue
        if attrs["fresh"]:
            if name in unobserved and any(nodes[b]["kind"] == "constant" for b in graph.writes[name]):
                used[k].add(name)  # a write into a weight is kept even when nothing in this call reads it
                _gather(graph, name, k, owner, used, received, sent)
            continue
        owner[name] = k
        _gather(graph, name, k, owner, used, received, sent)
    holding = set(owner.values())
    for k in range(n_seg):
        if k not in holding:
            raise PlacementError(
                f"segment {k} = positions [{bounds[k]}, {bounds[k + 1]}) of boundaries {bounds} holds no stale op "
                f"(only inputs, constants and fresh ops, which are not placed); move a boundary or use fewer segments"
            )
    index = graph.index

    def by_kind(names: set[str], kind: str) -> tuple[str, ...]:
        return tuple(n for n in order if n in names and nodes[n]["kind"] == kind)

    computed = [{n for n, s in owner.items() if s == k} | {n for n in used[k] if nodes[n]["kind"] == "op"}
                for k in range(n_seg)]
    cloned, refusals = check_writes(graph, bounds, owner, computed, received)
    if refusals:
        more = f" ({len(refusals) - 1} more such write(s))" if len(refusals) > 1 else ""
        raise SideEffectError(refusals[0].message(graph, bounds) + more)
    segments = []
    for k in range(n_seg):
        placed = tuple(n for n in order[bounds[k]:bounds[k + 1]] if owner.get(n) == k)
        segments.append(SegmentPlacement(
            index=k, start=bounds[k], end=bounds[k + 1], placed=placed,
            inputs=by_kind(used[k], "input"), constants=by_kind(used[k], "constant"),
            replicated=by_kind(used[k], "op"),
            receives=tuple(sorted(received[k], key=index.__getitem__)),
            sends=tuple(sorted(sent[k], key=index.__getitem__)),
            yields_output=any(nodes[n]["kind"] == "output" for n in placed),
            cloned=tuple(n for n in order if n in cloned[k]),
        ))
    positions = {v: index[v] for s in segments for v in s.sends}
    return Placement(tuple(bounds), tuple(segments), owner, positions, len(graph))


def _gather(graph: OpGraph, name: str, k: int, owner: dict[str, int], used: list[set[str]],
            received: list[set[str]], sent: list[set[str]]) -> None:
    """Everything segment ``k`` needs to compute ``name``: received stale values, and the inputs,
    constants and fresh ops (with the fresh writes they observe) it computes itself."""
    stack = [(p, True) for p in graph.nx.predecessors(name)] + [(w, False) for w in graph.observes(name)]
    while stack:  # predecessors come first in the order: owned ones are already placed
        value, is_data = stack.pop()
        if value in owner:
            if owner[value] != k and is_data:  # an observed stale write elsewhere: core.effects decides
                received[k].add(value)
                sent[owner[value]].add(value)
        elif value not in used[k]:
            used[k].add(value)
            stack.extend((p, True) for p in graph.nx.predecessors(value))
            stack.extend((w, False) for w in graph.observes(value))


def segment_inputs(graph: OpGraph, boundaries: Sequence[int]) -> list[dict[str, int]]:
    """Per segment, the stale values it consumes from earlier segments: {producer: bytes}.

    ``boundaries`` are ``N+1`` increasing positions from 0 to n. Unlike a single cut, this
    counts only what each segment really consumes (point-to-point transfers).
    """
    return [{v: graph.node(v)["out_bytes"] for v in s.receives} for s in place(graph, boundaries).segments]


def segment_of(graph: OpGraph, boundaries: Sequence[int]) -> list[int]:
    """Segment index of every position of ``graph.order`` for the given boundaries."""
    b = check_boundaries(boundaries, len(graph.order))
    out: list[int] = []
    for k in range(len(b) - 1):
        out.extend([k] * (b[k + 1] - b[k]))
    return out
