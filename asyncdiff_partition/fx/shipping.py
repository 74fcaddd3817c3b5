"""Sending a captured model to other processes: whole, or as one finished segment per rank.

``pickle.dumps(captured)`` works (``CapturedModel.__reduce__`` comes here, Note [pickling a
captured model]). For the ranks of a run, :func:`ship_segments` writes one file per ready
segment: the segment's module with only its own weights, its value layouts, the verified
fingerprint and the placement, plus the capture's shell (input specs, call signature, the
original model with every weight a one-element stand-in), so that a rank loads (and ever holds)
only its own weights, and builds no op graph and splits nothing:

    ready = ready_segments(captured, plan, world_size=2)          # in the launching process
    shipped = ship_segments(ready, "/tmp/run", captured)
    segment, shell = shipped.load(segment_index)                   # in a rank
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from asyncdiff_partition.fx.capture import MODULE_KEY, CapturedModel, resolve_attr
from asyncdiff_partition.runtime.layout import ReadySegment

__all__ = ["ShippedSegments", "is_stand_in", "ship_segments"]

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
# Note [weight stand-ins]
# ~~~~~~~~~~~~~~~~~~~~~~~
# A rank needs its segment's module and the original model (to bind calls and to build its
# pipeline around), but only its segment's weights. Other weights ship as a one-element tensor
# expanded to the weight's shape and dtype: a real CPU tensor that ops accept (values are
# meaningless, shapes right) and that costs one element of memory. Everything that is not the
# segment's is released after set-up (job.release_weights); a stand-in must never reach compute
# that matters, and is_stand_in lets code check.


@dataclass(frozen=True)
class ShippedSegments:
    """Where :func:`ship_segments` put one file per ready segment."""

    directory: str
    n_segments: int

    def path(self, segment: int) -> Path:
        return Path(self.directory) / f"segment{segment}.pt"

    def load(self, segment: int) -> tuple[ReadySegment, Any]:
        """(the ready segment, the capture shell it was shipped with, or None).

        The shell of a torch capture is the ``CapturedModel`` whose graph is the segment's own
        module, with every weight other than the segment's a stand-in. ``torch.load`` reads each
        weight straight into its tensor (no serialized copy beside it), so loading never holds
        the weights twice.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.load on a file we wrote ourselves
            warnings.simplefilter("ignore", FutureWarning)  # torch's own TreeSpec unpickling
            shipped = torch.load(self.path(segment), weights_only=False)
        if "graph" not in shipped:
            return shipped["segment"], shipped["shell"]
        shell = _restore_captured(shipped["graph"], shipped["tensors"])
        ready = ReadySegment(module=shell.graph_module, **shipped["segment"])
        return ready, shell


def ship_segments(segments: Sequence[ReadySegment], directory: str | os.PathLike,
                  captured: CapturedModel | Any = None) -> ShippedSegments:
    """Write one file per ready segment into ``directory`` (``segment{i}.pt``).

    Args:
        segments: the ready segments of one plan, in order.
        directory: an existing folder.
        captured: the capture the segments were made from. A torch capture ships as a shell
            around each segment's module with only that segment's weights (Note [weight
            stand-ins]); anything else (an ONNX model's input specs) ships as it is, beside
            segments whose modules pickle on their own.
    """
    shipped = ShippedSegments(str(directory), len(segments))
    if not isinstance(captured, CapturedModel):
        for segment in segments:
            torch.save({"segment": segment, "shell": captured}, shipped.path(segment.index))
        return shipped
    weights = _weights(captured.graph_module) | _weights(captured._signature_model)
    for segment in segments:
        module = segment.module
        assert isinstance(module, torch.fx.GraphModule)
        shell = dataclasses.replace(captured, graph_module=module)
        graph, tensors = _pack(shell, stand_ins=weights - _weights(module))
        fields = {f.name: getattr(segment, f.name) for f in dataclasses.fields(segment) if f.name != "module"}
        torch.save({"graph": graph, "tensors": tensors, "segment": fields}, shipped.path(segment.index))
    return shipped


def is_stand_in(tensor: torch.Tensor) -> bool:
    """True for a weight stand-in (an expanded one-element tensor)."""
    return tensor.numel() > 1 and all(s == 0 for s in tensor.stride())


def _weights(module: torch.nn.Module | None) -> set[int]:
    """Ids of a module's parameters, buffers and tensor attributes its graph reads (``get_attr``)."""
    if module is None:
        return set()
    found = {id(t) for t in (*module.parameters(), *module.buffers())}
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.find_nodes(op="get_attr"):
            value = resolve_attr(module, str(node.target))
            if isinstance(value, torch.Tensor):
                found.add(id(value))
    return found


def _stand_in(shape: tuple[int, ...], dtype: torch.dtype, parameter: bool) -> torch.Tensor:
    t = torch.zeros((), dtype=dtype).expand(shape)
    return torch.nn.Parameter(t, requires_grad=False) if parameter else t


# --- the pickler -------------------------------------------------------------------------------


class _OpRef:
    """Stands for an fx node argument (by name) or an operator (by qualified name)."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name


def reduce_captured(captured: CapturedModel) -> tuple[Any, tuple[bytes, list[Any]]]:
    """``CapturedModel.__reduce__``: see Note [pickling a captured model]."""
    return _restore_captured, _pack(captured)


def _pack(captured: CapturedModel, stand_ins: frozenset[int] | set[int] = frozenset()) -> tuple[bytes, list[Any]]:
    """(graph blob, tensors): the blob refers to the tensors by index (``_OpPickler``).

    The graph goes into a blob of its own pickler (operators by name); the tensors stay outside
    it, in a list the outer pickler writes one by one, so loading never holds a blob of all
    the weights and the weights at once. Tensors whose ids are in ``stand_ins`` become
    stand-ins (Note [weight stand-ins]).
    """
    gm = captured.graph_module
    nodes = []
    for node in gm.graph.nodes:
        refer = lambda n: _OpRef("node", n.name)  # noqa: E731
        nodes.append((node.op, node.name, _op_ref(node.target), torch.fx.map_arg(node.args, refer),
                      torch.fx.map_arg(node.kwargs, refer), node.meta.get(MODULE_KEY, "")))
    attrs = {str(n.target): resolve_attr(gm, str(n.target)) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    state = {
        "class_name": type(gm).__name__, "nodes": nodes, "attrs": attrs, "inputs": captured.inputs,
        "method": captured.method, "example": captured.example, "attempts": captured.attempts,
        "treespec": captured._treespec, "constants": captured._constants, "model": captured._signature_model,
    }
    buffer = io.BytesIO()
    pickler = _OpPickler(buffer, stand_ins)
    pickler.dump(state)
    return buffer.getvalue(), pickler.tensors


def _restore_captured(blob: bytes, tensors: list[torch.Tensor]) -> CapturedModel:
    with warnings.catch_warnings():  # torch's own TreeSpec unpickling warns about LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        state = _OpUnpickler(io.BytesIO(blob), tensors).load()
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

    for op, name, target, args, kwargs, module in state["nodes"]:
        target = resolve(target)
        if op == "output":
            node = graph.output(resolve(args)[0])
        else:
            node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name)
        node.meta[MODULE_KEY] = module
        made[name] = node
    gm = torch.fx.GraphModule(state["attrs"], graph, class_name=state["class_name"])
    return CapturedModel(
        graph_module=gm, inputs=state["inputs"], method=state["method"], example=state["example"],
        attempts=state["attempts"], _treespec=state["treespec"], _constants=state["constants"],
        _signature_model=state["model"],
    )


class _OpPickler(pickle.Pickler):
    """Operators by name; every tensor (parameters too) by index into :attr:`tensors`, the
    ones in ``stand_ins`` (ids) as stand-ins."""

    def __init__(self, file: io.BytesIO, stand_ins: frozenset[int] | set[int]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[Any] = []
        self._index: dict[int, int] = {}
        self._stand_ins = stand_ins

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        if id(obj) not in self._index:
            self._index[id(obj)] = len(self.tensors)
            shipped = _StandIn(tuple(obj.shape), obj.dtype, isinstance(obj, torch.nn.Parameter)) if id(obj) in self._stand_ins else obj
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
        return _stand_in, self.args


def _op_ref(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        return _OpRef("op", f"{target.namespace}.{target._opname}.{target._overloadname}")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _OpRef("op", f"{target._qualified_op_name.replace('::', '.')}")
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _OpRef("op", f"higher_order.{target.name()}")
    return target


def _op_from_ref(ref: _OpRef) -> Any:
    return resolve_attr(torch.ops, ref.name)
