"""In-place writes under a placement: which copy of a tensor each write reaches, and which placements are refused.

Example::

    cloned, refusals = check_writes(graph, boundaries, owner, computed, received)
    refusals[0].message(graph, boundaries)   # "node 'copy_' (module 'rope') ... move boundary 212 ..."

Note [writes in segments]
    Each segment computes on its own copies of tensors: those it creates, the model inputs and
    weights it holds, and the values it receives (a value is sent when its segment has
    finished, so a receiver gets the sender's tensor with every write the sender made into it).
    A write ``W`` into a storage ``S`` (Note [in-place writes] in :mod:`~asyncdiff_partition.core.graph`)
    is kept exact for a node ``R`` of segment ``k`` that observes it when ``R`` reads the copy of
    ``S`` that ``W`` wrote:

        W runs in          R reads S through                                  placement
        segment k          the copy W wrote                                   kept: W runs before R
        segment k          another copy (S entered k twice)                   refused
        segment j < k      values received from j that live in W's copy       kept: the snapshot holds W
        segment j < k      anything else (its own copy, an older snapshot)    refused: R would miss W

    A fresh write is recomputed by every segment that has an observer of it (with the tensor it
    writes), so only stale writes can be refused this way. A segment never writes a tensor it
    did not create: a received value or a model input that it writes into is cloned first
    (``cloned``), so senders, the runtime's buffers and the caller's tensors stay as they were.
    A weight or buffer that is written keeps the write across calls and every rank holds its own
    copy: all nodes that read or write it must be in one segment, or the placement is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from asyncdiff_partition.core.graph import OpGraph

__all__ = ["Refusal", "check_writes"]

_Entries = Callable[[int, str], Mapping[str, frozenset[str]]]  # (segment, base) -> {value: its copies of base}


@dataclass(frozen=True)
class Refusal:
    """One write that a placement cannot keep exact; :meth:`message` says why and how to fix it.

    Attributes:
        writer: the writing node.
        base: the node that created the written storage.
        segment: the segment where the write is lost (or, for a weight, the first that uses it).
        reader: the node that would miss the write (None when the write itself is the problem).
        why: what goes wrong, in words.
        span: the positions ``(first, last)`` that must not be cut.
    """

    writer: str
    base: str
    segment: int
    reader: str | None
    why: str
    span: tuple[int, int]

    def message(self, graph: OpGraph, boundaries: Sequence[int]) -> str:
        def named(name: str) -> str:
            module = graph.node(name)["module"]
            return f"{name!r} (module {module!r})" if module else f"{name!r} (module: the model itself)"

        first, last = self.span
        cuts = [b for b in boundaries[1:-1] if first < b <= last]
        fix = (f"move boundar{'y' if len(cuts) == 1 else 'ies'} {cuts} out of positions {first + 1}..{last}"
               if cuts else f"keep positions {first}..{last} in one segment")
        reader = f"; node {named(self.reader)} reads it afterwards" if self.reader else ""
        return (f"node {named(self.writer)} writes in place into the tensor of node {named(self.base)}{reader}, "
                f"but in segment {self.segment} {self.why}; a write must stay in one segment with the nodes that "
                f"read its tensor afterwards (boundaries {list(boundaries)}): {fix}")


def check_writes(
    graph: OpGraph,
    boundaries: Sequence[int],
    owner: Mapping[str, int],
    computed: Sequence[set[str]],
    received: Sequence[set[str]],
) -> tuple[list[set[str]], list[Refusal]]:
    """Which values each segment must clone before writing them, and the writes it cannot keep.

    Args:
        graph: the op graph, with its writes (Note [in-place writes]).
        boundaries: the placement's boundaries (for the messages only).
        owner: stale node -> the segment that computes it and sends it.
        computed: per segment, every node its module computes (owned and replicated).
        received: per segment, the values it receives.

    Returns:
        Per segment the received values and inputs to clone, and the refusals (Note [writes in segments]).
    """
    n_seg = len(computed)
    cloned: list[set[str]] = [set() for _ in range(n_seg)]
    refusals: list[Refusal] = []
    if not graph.writes:
        return cloned, refusals
    nodes, index = graph.nx.nodes, graph.index
    living: dict[str, list[str]] = {}  # base -> values that live in its storage, in order
    for name in graph.order:
        for base in graph.storage.get(name, ()):
            living.setdefault(base, []).append(name)
    entries_memo: dict[tuple[int, str], dict[str, frozenset[str]]] = {}

    def entries(k: int, base: str) -> dict[str, frozenset[str]]:
        """value -> the copies of ``base`` it lives in, in segment ``k`` (a copy is named by the
        value through which the storage entered the segment)."""
        key = (k, base)
        if key not in entries_memo:
            found: dict[str, frozenset[str]] = {}
            for value in living.get(base, ()):
                if nodes[value]["kind"] == "constant":  # every name of a weight is the one tensor a rank holds
                    found[value] = frozenset({base})
                elif value in received[k] or value == base or nodes[value]["kind"] == "input":
                    found[value] = frozenset({value})
                elif value in computed[k]:
                    found[value] = _copies(graph, value, base, found)
            entries_memo[key] = found
        return entries_memo[key]

    for k in range(n_seg):
        for writer in sorted(computed[k] & graph.writes.keys(), key=index.__getitem__):
            for base in graph.writes[writer]:
                copies = _copies(graph, writer, base, entries(k, base))
                if len(copies) > 1:
                    refusals.append(Refusal(writer, base, k, None, f"that tensor arrives as {len(copies)} separate "
                                            f"copies {sorted(copies)} and the write would reach only one",
                                            (_second(copies, index), index[writer])))
                for copy in copies:
                    if copy in received[k] or nodes[copy]["kind"] == "input":
                        cloned[k].add(copy)
        for reader in sorted(computed[k], key=index.__getitem__):
            for writer in graph.observes(reader):
                for base in sorted(set(graph.writes[writer]) & graph.reads(reader), key=index.__getitem__):
                    missed = _missed(graph, k, reader, writer, base, owner, computed, received, entries)
                    if missed:
                        refusals.append(Refusal(writer, base, k, reader, *missed))
    refusals.extend(_shared_weights(graph, computed))
    return cloned, refusals


def _copies(graph: OpGraph, value: str, base: str, found: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The copies of ``base`` that ``value``'s inputs live in."""
    return frozenset().union(*(found.get(p, frozenset()) for p in graph.nx.predecessors(value)
                               if base in graph.storage.get(p, ())))


def _missed(graph: OpGraph, k: int, reader: str, writer: str, base: str, owner: Mapping[str, int],
            computed: Sequence[set[str]], received: Sequence[set[str]],
            entries: _Entries) -> tuple[str, tuple[int, int]] | None:
    """Why ``reader`` in segment ``k`` would not see ``writer``'s write into ``base``, and the
    positions that must not be cut; None if it would see it."""
    index = graph.index
    reads = _copies(graph, reader, base, entries(k, base))
    last = max(index[writer], index[reader])
    if writer in computed[k]:
        wrote = _copies(graph, writer, base, entries(k, base))
        if reads == wrote:
            return None
        # all copies but the first must be made inside the segment: no cut after the second
        return (f"it reads the tensor as {sorted(reads)} while the write goes to {sorted(wrote)}, "
                f"separate copies", (_second(reads | wrote, index), last))
    j = owner.get(writer)
    if j is None:  # a fresh write is recomputed wherever it is observed; not reached
        return f"the write {writer!r} is not computed there", (index[writer], last)
    wrote = _copies(graph, writer, base, entries(j, base))
    stale = sorted(c for c in reads if not (c in received[k] and owner.get(c) == j and entries(j, base).get(c) == wrote))
    if not stale:
        return None
    how = "its own copy" if all(c not in received[k] for c in stale) else "a copy taken before the write"
    return (f"the write runs in segment {j} and the reader gets the tensor as {stale}, {how}",
            (index[writer], last))


def _second(copies: frozenset[str], index: Mapping[str, int]) -> int:
    """The position of the second copy: the first may enter a segment, the others must be made in it."""
    positions = sorted(index[c] for c in copies)
    return positions[1] if len(positions) > 1 else positions[0]


def _shared_weights(graph: OpGraph, computed: Sequence[set[str]]) -> list[Refusal]:
    """Written weights and buffers that more than one segment uses (Note [writes in segments])."""
    refusals = []
    nodes, index = graph.nx.nodes, graph.index
    written = {base for bases in graph.writes.values() for base in bases if nodes[base]["kind"] == "constant"}
    for base in sorted(written, key=index.__getitem__):
        users = {k: sorted((n for n in computed[k] if base in graph.reads(n) or base in graph.writes.get(n, ())),
                           key=index.__getitem__)
                 for k in range(len(computed))}
        users = {k: found for k, found in users.items() if found}
        if len(users) > 1:
            writer = next(n for k in users for n in users[k] if base in graph.writes.get(n, ()))
            touching = [n for found in users.values() for n in found]
            refusals.append(Refusal(
                writer, base, min(users), None,
                f"that weight or buffer is also used by segments {sorted(users)[1:]}: it keeps the write across "
                f"calls and every rank holds its own copy",
                (min(index[n] for n in touching), max(index[n] for n in touching))))
    return refusals
