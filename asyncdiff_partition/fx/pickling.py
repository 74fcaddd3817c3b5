"""Pickling of an fx graph node for node: operators by name, tensors outside the blob, weight stand-ins.

:func:`dump_graph` and :func:`load_graph` are the mechanism behind ``pickle.dumps(captured)``
(:meth:`~asyncdiff_partition.fx.capture.CapturedModel.__reduce__`) and behind the per-rank
segment files of :mod:`asyncdiff_partition.fx.shipping`:

    blob, tensors = dump_graph(gm, {"extra": 1}, meta_key="asyncdiff_module")
    gm2, state = load_graph(blob, tensors, meta_key="asyncdiff_module")
"""

from __future__ import annotations

import io
import operator
import pickle
import warnings
from collections.abc import Mapping, Set
from typing import Any

import torch
import torch.fx

__all__ = ["LOAD_DEVICE", "dump_graph", "is_stand_in", "load_graph", "load_saved", "stand_in"]

# Note [pickling a captured model]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# launch(spawn) pickles its arguments. An fx.GraphModule pickles as Python source that is
# traced again on load, which changes an exported graph (other nodes, other order: another
# fingerprint), and the aten operators in an exported graph do not pickle at all. So a
# CapturedModel pickles as its graph's node list (aten operators by name, node metadata cut to
# the module path) plus its tensors, and is rebuilt node for node, names included. The original
# model goes along: it binds call arguments and a rank's pipeline is built around it. Model and
# graph share their weight tensors, and pickle keeps them shared.
#
# Note [weights by name]
# ~~~~~~~~~~~~~~~~~~~~~~~
# A weight that a pipeline folder holds unchanged (same name, dtype, shape and values as the
# model in memory) need not travel: the shipped file names it (file, key) and the rank reads
# that one tensor from the memory-mapped safetensors file when it loads its segment. The rank
# never reads any other weight of the model, and nothing is copied through the temp folder.
#
# Note [weight stand-ins]
# ~~~~~~~~~~~~~~~~~~~~~~~
# A rank needs the whole graph (it splits it the way every rank does, and a shape pass runs it)
# but only its segment's weights. Other weights ship as a one-element tensor expanded to the
# weight's shape and dtype: a real CPU tensor that ops accept (values are meaningless, shapes
# right) and that costs one element of memory. Everything that is not the segment's is
# released after set-up; a stand-in must never reach compute that matters, and is_stand_in lets
# code check.


def dump_graph(gm: torch.fx.GraphModule, state: dict[str, Any], *, meta_key: str,
               stand_ins: Set[int] = frozenset(), saved: Mapping[int, tuple[str, str]] | None = None,
               ) -> tuple[bytes, list[Any]]:
    """(graph blob, tensors) for ``gm`` and ``state`` (any picklable values); Note [pickling a captured model].

    The graph goes into a blob of its own pickler (operators by name); the tensors stay outside
    it, in a list the outer pickler writes one by one, so loading never holds a blob of all the
    weights and the weights at once. Of the node metadata only ``node.meta[meta_key]`` is kept.
    Tensors whose ids are in ``stand_ins`` become stand-ins (Note [weight stand-ins]); those in
    ``saved`` (id -> safetensors file, key) are read from that file where they are loaded (Note
    [weights by name]).
    """
    nodes = []
    for node in gm.graph.nodes:
        nodes.append((node.op, node.name, _op_ref(node.target), torch.fx.map_arg(node.args, _refer),
                      torch.fx.map_arg(node.kwargs, _refer), node.meta.get(meta_key, "")))
    attrs = {str(n.target): operator.attrgetter(str(n.target))(gm)
             for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    buffer = io.BytesIO()
    pickler = _OpPickler(buffer, stand_ins, saved or {})
    pickler.dump({"class_name": type(gm).__name__, "nodes": nodes, "attrs": attrs, "state": state})
    return buffer.getvalue(), pickler.tensors


def load_graph(blob: bytes, tensors: list[torch.Tensor], *, meta_key: str) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """The graph module and the ``state`` that :func:`dump_graph` packed, rebuilt node for node."""
    with warnings.catch_warnings():  # torch's own TreeSpec unpickling warns about LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        packed = _OpUnpickler(io.BytesIO(blob), tensors).load()
    graph = torch.fx.Graph()
    made: dict[str, torch.fx.Node] = {}

    def resolve(value: Any) -> Any:
        if isinstance(value, _OpRef):
            return made[value.name] if value.kind == "node" else _op_from_ref(value)
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(v) for v in value) if not hasattr(value, "_fields") else type(value)(*map(resolve, value))
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(resolve(value.start), resolve(value.stop), resolve(value.step))
        return value

    for op, name, target, args, kwargs, module in packed["nodes"]:
        target = resolve(target)
        if op == "output":
            node = graph.output(resolve(args)[0])
        else:
            node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name)
        node.meta[meta_key] = module
        made[name] = node
    return torch.fx.GraphModule(packed["attrs"], graph, class_name=packed["class_name"]), packed["state"]


def stand_in(shape: tuple[int, ...], dtype: torch.dtype, parameter: bool) -> torch.Tensor:
    """A weight stand-in: one element expanded to ``shape`` (Note [weight stand-ins])."""
    t = torch.zeros((), dtype=dtype).expand(shape)
    return torch.nn.Parameter(t, requires_grad=False) if parameter else t


def is_stand_in(tensor: torch.Tensor) -> bool:
    """True for a weight stand-in (an expanded one-element tensor)."""
    return tensor.numel() > 1 and all(s == 0 for s in tensor.stride())


class _OpRef:
    """Stands for an fx node argument (by name) or an operator (by qualified name)."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name


class _OpPickler(pickle.Pickler):
    """Operators by name; every tensor (parameters too) by index into :attr:`tensors`, the
    ones in ``stand_ins`` (ids) as stand-ins."""

    def __init__(self, file: io.BytesIO, stand_ins: Set[int], saved: Mapping[int, tuple[str, str]]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[Any] = []
        self._index: dict[int, int] = {}
        self._stand_ins, self._saved = stand_ins, saved

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        if id(obj) not in self._index:
            self._index[id(obj)] = len(self.tensors)
            parameter = isinstance(obj, torch.nn.Parameter)
            shipped: Any = obj
            if id(obj) in self._stand_ins:
                shipped = _StandIn(tuple(obj.shape), obj.dtype, parameter)
            elif id(obj) in self._saved:
                shipped = _Saved(*self._saved[id(obj)], parameter)
            self.tensors.append(shipped)
        return ("tensor", self._index[id(obj)])

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch._ops.OperatorBase):
            ref = _op_ref(obj)
            return _OpRef, (ref.kind, ref.name)
        return NotImplemented


class _OpUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self.tensors[pid[1]]


class _StandIn:
    """Pickles as a weight stand-in (Note [weight stand-ins])."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, parameter: bool):
        self.args = (shape, dtype, parameter)

    def __reduce__(self) -> tuple[Any, ...]:
        return stand_in, self.args


class _Saved:
    """Pickles as a weight read from a safetensors file where it is loaded (Note [weights by name])."""

    def __init__(self, file: str, key: str, parameter: bool):
        self.args = (file, key, parameter)

    def __reduce__(self) -> tuple[Any, ...]:
        return load_saved, self.args


LOAD_DEVICE = {"device": "cpu"}  # where load_saved puts a weight: a rank sets its own device before it loads


def load_saved(file: str, key: str, parameter: bool) -> torch.Tensor:
    """The tensor ``key`` of a safetensors file (memory-mapped, only this tensor read), in its saved dtype,
    straight on ``LOAD_DEVICE["device"]``."""
    from safetensors import safe_open

    with safe_open(file, framework="pt", device=str(LOAD_DEVICE["device"])) as handle:
        t = handle.get_tensor(key)
    return torch.nn.Parameter(t, requires_grad=False) if parameter else t


def _refer(node: torch.fx.Node) -> Any:
    """An fx node argument as a reference by name (resolved on load)."""
    return _OpRef("node", node.name)


def _op_ref(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        return _OpRef("op", f"{target.namespace}.{target._opname}.{target._overloadname}")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _OpRef("op", f"{target._qualified_op_name.replace('::', '.')}")
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _OpRef("op", f"higher_order.{target.name()}")
    return target


def _op_from_ref(ref: _OpRef) -> Any:
    return operator.attrgetter(ref.name)(torch.ops)
