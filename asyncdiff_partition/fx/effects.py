"""In-place writes of a captured graph: which node writes into which tensor storage, and where each value lives.

Example::

    tracker = StorageTracker()
    inputs = {n: env[n] for n in node.all_input_nodes}   # around each node of one run of the graph
    snapshot = tracker.before(inputs)
    result = run(node)
    facts = tracker.after(node, inputs, result, snapshot)   # {"storage": (...), "writes": (...)}

:class:`~asyncdiff_partition.fx.opgraph.TensorMetaProp` does this for every node and records the
facts under ``node.meta[META_KEY]``; :func:`~asyncdiff_partition.fx.opgraph.build_op_graph` hands them
to the op graph (Note [in-place writes] in :mod:`~asyncdiff_partition.core.graph`).

A node writes an argument when its operator's schema marks that argument as mutated
(``alias_info.is_write``: ``copy_``, ``add_``, ``index_put_``, ...), when it is ``x[i] = v``
(``operator.setitem``, which ``Node.is_impure`` flags), when it is a module with ``inplace=True``,
or when running it bumps the argument's version counter (what autograd uses to detect in-place
changes: it catches writes hidden in functions fx does not look into). A storage is named after
its *base*: the node whose value first held it (views and in-place results share it).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["StorageTracker", "private_copy", "schema_writes"]

Node = torch.fx.Node


def schema_writes(node: Node) -> list[Node]:
    """The argument nodes that ``node`` writes in place, as far as its target says."""
    target = node.target
    if node.op == "call_function":
        if isinstance(target, torch._ops.OpOverload):
            return _mutated_args(target._schema, node)
        if target is operator.setitem and node.is_impure():
            return _nodes(node.args[:1])
        name = getattr(target, "__name__", "")
        if str(getattr(target, "__module__", "") or "").startswith("torch") and _mutates_self(name):
            return _nodes(node.args[:1])  # torch.relu_(x), torch.Tensor.add_(x, y)
    elif node.op == "call_method" and _mutates_self(str(target)):
        return _nodes(node.args[:1])
    elif node.op == "call_module" and node.graph.owning_module is not None:
        module = node.graph.owning_module.get_submodule(str(target))
        if getattr(module, "inplace", False) is True:  # torch.nn's convention: ReLU(inplace=True), ...
            return _nodes(node.args[:1])
    return []


def _mutated_args(schema: torch.FunctionSchema, node: Node) -> list[Node]:
    found: list[Node] = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        found.extend(_nodes([value]))
    return found


@functools.cache
def _mutates_self(name: str) -> bool:
    """Whether every aten overload named ``name`` writes its first argument (``mul_``, ``copy_``)."""
    packet = getattr(torch.ops.aten, name, None) if name.endswith("_") and not name.startswith("_") else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    schemas = [getattr(packet, overload)._schema for overload in packet.overloads()]
    return bool(schemas) and all(
        s.arguments and s.arguments[0].alias_info is not None and s.arguments[0].alias_info.is_write for s in schemas
    )


def _nodes(values: Any) -> list[Node]:
    return [v for v in pytree.tree_leaves(list(values)) if isinstance(v, Node)]


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


class StorageTracker:
    """Names every tensor storage of one run after the node that created it, and sees who writes it.

    Storages are compared by identity while alive (a freed storage's address may be reused by a
    later one: an entry whose storage has died is replaced).
    """

    def __init__(self) -> None:
        self._bases: dict[StorageWeakRef, tuple[StorageWeakRef, str]] = {}

    def base(self, tensor: torch.Tensor) -> str | None:
        """The node that created ``tensor``'s storage, if it was seen and is still alive."""
        ref = _storage(tensor)
        if ref is None:
            return None
        entry = self._bases.get(ref)
        if entry is None or entry[0].expired():
            return None
        return entry[1]

    def before(self, inputs: dict[Node, Any]) -> list[tuple[torch.Tensor, int | None]]:
        """The node's input tensors (``{input node: its value}``) with their version counters."""
        return [(t, _version(t)) for t in _tensors(list(inputs.values()))]

    def after(self, node: Node, inputs: dict[Node, Any], result: Any,
              snapshot: list[tuple[torch.Tensor, int | None]]) -> dict[str, tuple[str, ...]]:
        """``{"storage": bases the result lives in, "writes": bases the node wrote}``."""
        written: list[torch.Tensor] = [t for t, version in snapshot
                                       if version is not None and _version(t) not in (None, version)]
        for arg in schema_writes(node):
            written.extend(_tensors(inputs.get(arg)))
        storage: list[str] = []
        for tensor in _tensors(result):
            ref = _storage(tensor)
            if ref is None:
                continue
            name = self.base(tensor)
            if name is None:
                name = node.name
                self._bases[ref] = (ref, name)
            if name not in storage:
                storage.append(name)
        writes: list[str] = []
        for tensor in written:
            name = self.base(tensor)
            if name is not None and name not in writes:
                writes.append(name)
        return {"storage": tuple(storage), "writes": tuple(writes)}


def private_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in a storage of its own, with the same sizes and strides.

    What a tensor is to a segment that must not share it with another (a rank): ``clone()``
    would make a non-dense view (a ``chunk``, an ``expand``) contiguous, and kernels may then sum
    in another order, which hides or fakes a difference that exact comparison looks for.
    """
    if tensor.layout != torch.strided or tensor.numel() == 0 or any(s < 0 for s in tensor.stride()):
        return tensor.clone()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    region = torch.as_strided(tensor, (extent,), (1,), tensor.storage_offset())
    return region.clone().as_strided(tensor.shape, tensor.stride())


def _storage(tensor: torch.Tensor) -> StorageWeakRef | None:
    try:
        return StorageWeakRef(tensor.untyped_storage())
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or other storage-less tensors
        return None


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors track no version
        return None
