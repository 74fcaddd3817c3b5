"""Framework-agnostic op graph of a captured model, and the analysis of cuts through it.

Example::

    graph = OpGraph.from_nodes(nodes, edges)        # built by an adapter (fx, onnx)
    table = graph.cut_table()                       # bytes crossing every boundary
    graph.crossing(812).stale                       # what a cut before node 812 must send

The graph is a :class:`networkx.DiGraph` whose node attributes are plain numbers and strings,
so the partitioner and the plan never need torch. A *boundary* ``b`` (``0 <= b <= n``) cuts the
topological order into ``order[:b] | order[b:]``.

Note [value kinds]
    input     a model input. Every rank has every input at every step (each rank runs the
              same denoising loop), so inputs never cross a cut.
    constant  a parameter, buffer or constant tensor (fx ``get_attr``). It lives with the
              segment that consumes it; it never crosses a cut. Its bytes are owned by its
              first consumer (``param_bytes``), so that segment memory adds up once.
    op        a computed value. A *fresh* op (all ancestors are non-latent inputs and
              constants: time embeddings, condition projections) is recomputed by every
              segment that needs it; a *stale* op (depends on the latent) must be sent, and
              in the asynchronous schedule arrives one step late.
    output    the model output (the noise prediction).

Note [in-place writes]
    A node may write into a tensor in place (``copy_``, ``add_``, ``x[i] = v``) instead of, or
    besides, returning a value, and later nodes may read the written tensor through another name
    than the writer's output (LTX-Video scales its rope grid with ``grid[:, 0:1] = ...`` and then
    reads ``grid``). Data edges alone do not see that dependency, so the graph carries two more
    facts, given by the adapter that knows the framework's aliasing:

    storage   value -> the *bases* (nodes that created a tensor storage) its tensors live in;
              only storages that some node writes are listed
    writes    writing node -> the bases it writes into

    From them :meth:`OpGraph.observes` derives, per node, the last write before it into each
    storage it reads: the node must run after that write and see its result. A node that
    observes a stale write is stale; a fresh write is recomputed with its observers. Effects
    do not cross cuts as values (they add no bytes to the cut tables); :mod:`~asyncdiff_partition.core.effects`
    decides whether a placement keeps every write with its observers. They are facts of a
    capture, not of a profile file: :meth:`OpGraph.to_dict` leaves them out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from asyncdiff_partition.core import counters
from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["NODE_KINDS", "OUTPUT", "Crossing", "CutTable", "GraphError", "OpGraph"]

OUTPUT = "output"  # name of the model output among a segment's outputs (fx's output node is so named)

NODE_KINDS = ("input", "constant", "op", "output")
# Attributes every node carries, with their types; see OpGraph.from_nodes.
NODE_FIELDS: dict[str, type] = {
    "kind": str,
    "op": str,
    "target": str,
    "module": str,
    "out_bytes": int,
    "param_bytes": int,
    "latent": bool,
}


class GraphError(AsyncDiffError, ValueError):
    """The node list does not describe a valid op graph."""


@dataclass(frozen=True)
class Crossing:
    """The values that cross one boundary: stale ones are sent, fresh ones recomputed."""

    boundary: int
    stale: tuple[str, ...]
    stale_bytes: int
    fresh: tuple[str, ...]
    fresh_bytes: int


@dataclass(frozen=True)
class CutTable:
    """Per boundary ``b`` in ``0..n``: bytes and count of stale and of fresh crossing values."""

    stale_bytes: tuple[int, ...]
    stale_count: tuple[int, ...]
    fresh_bytes: tuple[int, ...]
    fresh_count: tuple[int, ...]


class OpGraph:
    """A DAG of ops in one fixed topological order, with per-node sizes and fresh flags.

    Build with :meth:`from_nodes`; ``graph.nx`` is the underlying :class:`networkx.DiGraph`
    (node attributes: see :data:`NODE_FIELDS` plus ``fresh`` and ``index``).
    """

    def __init__(self, graph: nx.DiGraph, order: Sequence[str]):
        self.nx = graph
        self.order: list[str] = list(order)
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.order)}
        self.storage: dict[str, tuple[str, ...]] = {}  # Note [in-place writes]
        self.writes: dict[str, tuple[str, ...]] = {}
        self._observes: dict[str, tuple[str, ...]] = {}

    @classmethod
    def from_nodes(cls, nodes: Sequence[dict[str, Any]], edges: Iterable[tuple[str, str]], *,
                   storage: Mapping[str, Sequence[str]] | None = None,
                   writes: Mapping[str, Sequence[str]] | None = None) -> OpGraph:
        """Build from nodes in topological order and (producer, consumer) edges.

        Args:
            nodes: one dict per node with ``name`` and the fields of :data:`NODE_FIELDS`.
            edges: data dependencies; a producer must come before its consumer in ``nodes``.
            storage, writes: in-place writes and the storages values live in (Note [in-place writes]).

        Raises:
            GraphError: missing fields, unknown kinds, duplicate names, edges against the order,
                writes into a storage created after the writer.
        """
        graph = nx.DiGraph()
        order: list[str] = []
        for i, node in enumerate(nodes):
            missing = [f for f in ("name", *NODE_FIELDS) if f not in node]
            if missing:
                raise GraphError(f"node #{i} lacks fields {missing}")
            if node["kind"] not in NODE_KINDS:
                raise GraphError(f"node {node['name']!r} has kind {node['kind']!r}; expected one of {NODE_KINDS}")
            if node["name"] in graph:
                raise GraphError(f"duplicate node name {node['name']!r}")
            attrs = {f: NODE_FIELDS[f](node[f]) for f in NODE_FIELDS}
            graph.add_node(node["name"], index=i, **attrs)
            order.append(node["name"])
        for producer, consumer in edges:
            if producer not in graph or consumer not in graph:
                raise GraphError(f"edge {producer!r} -> {consumer!r} names an unknown node")
            if graph.nodes[producer]["index"] >= graph.nodes[consumer]["index"]:
                raise GraphError(f"edge {producer!r} -> {consumer!r} goes against the topological order")
            graph.add_edge(producer, consumer)
        result = cls(graph, order)
        result._set_writes(storage or {}, writes or {})
        result._mark_fresh()
        counters.count("op_graphs")
        return result

    # --- per-node facts ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.order)

    def node(self, name_or_index: str | int) -> dict[str, Any]:
        name = self.order[name_or_index] if isinstance(name_or_index, int) else name_or_index
        attributes: dict[str, Any] = self.nx.nodes[name]
        return attributes

    def preds(self, index: int) -> list[int]:
        return sorted(self.index[p] for p in self.nx.predecessors(self.order[index]))

    @property
    def fresh(self) -> list[bool]:
        return [self.nx.nodes[n]["fresh"] for n in self.order]

    @property
    def param_bytes(self) -> int:
        return sum(self.nx.nodes[n]["param_bytes"] for n in self.order)

    def observes(self, name: str) -> tuple[str, ...]:
        """The writes ``name`` must run after and see: per storage it reads, the last write before it."""
        return self._observes.get(name, ())

    def reads(self, name: str) -> set[str]:
        """The written storages (their bases) that ``name``'s inputs live in."""
        return {base for p in self.nx.predecessors(name) for base in self.storage.get(p, ())}

    def _set_writes(self, storage: Mapping[str, Sequence[str]], writes: Mapping[str, Sequence[str]]) -> None:
        # Note [in-place writes]. One pass in topological order: the last write into each base.
        for what, table in (("storage", storage), ("writes", writes)):
            for name, bases in table.items():
                unknown = [n for n in (name, *bases) if n not in self.index]
                if unknown:
                    raise GraphError(f"{what} of {name!r} names unknown nodes {unknown}")
        for writer, bases in writes.items():
            late = [b for b in bases if self.index[b] > self.index[writer]]
            if late:
                raise GraphError(f"node {writer!r} writes into storages {late} that are created after it")
        self.storage = {n: tuple(b) for n, b in storage.items() if b}
        self.writes = {n: tuple(b) for n, b in writes.items() if b}
        last: dict[str, str] = {}
        for name in self.order:
            seen = {last[b] for b in self.reads(name) if b in last}
            if seen:
                self._observes[name] = tuple(sorted(seen, key=self.index.__getitem__))
            for base in self.writes.get(name, ()):
                last[base] = name

    def _mark_fresh(self) -> None:
        # See Note [value kinds]. One pass in topological order; a node that observes a write
        # depends on the writer as on an input (Note [in-place writes]).
        for name in self.order:
            attrs = self.nx.nodes[name]
            kind = attrs["kind"]
            if kind == "input":
                attrs["fresh"] = not attrs["latent"]
            elif kind == "constant":
                attrs["fresh"] = True
            elif kind == "op":
                deps = [*self.nx.predecessors(name), *self.observes(name)]
                attrs["fresh"] = all(self.nx.nodes[p]["fresh"] for p in deps)
            else:
                attrs["fresh"] = False

    def _category(self, name: str) -> str | None:
        """'stale' / 'fresh' for values that can cross a cut, None for inputs and constants."""
        attrs = self.nx.nodes[name]
        if attrs["kind"] != "op":
            return None
        return "fresh" if attrs["fresh"] else "stale"

    # --- cut analysis -----------------------------------------------------------------------

    def last_use(self) -> list[int]:
        """Per node, the position of its last consumer (its own position if it has none)."""
        return [
            max((self.index[c] for c in self.nx.successors(name)), default=i)
            for i, name in enumerate(self.order)
        ]

    def cut_table(self) -> CutTable:
        """Bytes crossing every boundary, in O(nodes + edges).

        A value at position ``i`` whose last consumer is at ``j`` crosses boundaries
        ``i+1 .. j``: add it at ``i+1`` and remove it at ``j+1`` of a difference array.
        """
        n = len(self.order)
        diff = {key: [0] * (n + 2) for key in ("stale_b", "stale_c", "fresh_b", "fresh_c")}
        for i, (name, last) in enumerate(zip(self.order, self.last_use())):
            category = self._category(name)
            if category is None or last <= i:
                continue
            size = self.nx.nodes[name]["out_bytes"]
            for key, amount in ((category + "_b", size), (category + "_c", 1)):
                diff[key][i + 1] += amount
                diff[key][last + 1] -= amount
        running = {}
        for key, values in diff.items():
            total, out = 0, []
            for b in range(n + 1):
                total += values[b]
                out.append(total)
            running[key] = tuple(out)
        return CutTable(running["stale_b"], running["stale_c"], running["fresh_b"], running["fresh_c"])

    def crossing(self, boundary: int) -> Crossing:
        """The values that cross ``boundary`` (produced before it, consumed at or after it)."""
        if not 0 <= boundary <= len(self.order):
            raise GraphError(f"boundary {boundary} is outside 0..{len(self.order)}")
        found: dict[str, list[str]] = {"stale": [], "fresh": []}
        for name in self.order[:boundary]:
            category = self._category(name)
            if category and any(self.index[c] >= boundary for c in self.nx.successors(name)):
                found[category].append(name)

        def size(names: list[str]) -> int:
            return sum(int(self.nx.nodes[n]["out_bytes"]) for n in names)

        return Crossing(boundary, tuple(found["stale"]), size(found["stale"]), tuple(found["fresh"]), size(found["fresh"]))


    def cheapest_cuts(self, count: int = 5, *, margin: float = 0.1) -> list[Crossing]:
        """Boundaries with the fewest stale bytes, away from the ends of the order, one per module.

        ``margin`` drops boundaries in the first and last fraction of the op nodes, where a cut
        would leave a segment with almost nothing to do.
        """
        ops = [i for i, name in enumerate(self.order) if self.nx.nodes[name]["kind"] == "op"]
        if len(ops) < 2:
            return []
        lo = ops[int(margin * (len(ops) - 1))] + 1
        hi = ops[int((1 - margin) * (len(ops) - 1))]
        table = self.cut_table()
        candidates = sorted(range(lo, max(lo, hi) + 1), key=lambda b: (table.stale_bytes[b], b))
        chosen: list[int] = []
        seen_modules: set[str] = set()
        for b in candidates:  # one cut per module: neighbours inside a module are near-duplicates
            module = self.nx.nodes[self.order[b - 1]]["module"]
            if module not in seen_modules:
                seen_modules.add(module)
                chosen.append(b)
                if len(chosen) == count:
                    break
        return [self.crossing(b) for b in chosen]

    def modules(self) -> dict[str, int]:
        """Parameter bytes per top-level-and-one module path (e.g. ``down_blocks.1``)."""
        totals: dict[str, int] = {}
        for name in self.order:
            attrs = self.nx.nodes[name]
            if attrs["param_bytes"]:
                parts = attrs["module"].split(".")
                key = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
                totals[key or "(root)"] = totals.get(key or "(root)", 0) + attrs["param_bytes"]
        return totals

    # --- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        nodes = []
        for name in self.order:
            attrs = self.nx.nodes[name]
            node = {"name": name, **{f: attrs[f] for f in NODE_FIELDS}}
            node["preds"] = self.preds(self.index[name])
            nodes.append(node)
        return {"nodes": nodes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpGraph:
        nodes = data["nodes"]
        edges = [(nodes[p]["name"], node["name"]) for node in nodes for p in node["preds"]]
        return cls.from_nodes(nodes, edges)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
