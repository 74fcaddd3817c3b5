"""Static shapes for an imported ONNX model: pinned inputs, shape inference, folded shape arithmetic.

Example::

    proto, values = make_static(proto, latent="sample", batch=2, path="unet.onnx")
    values["/conv_in/Conv_output_0"]                 # ((2, 32, 16, 16), 'float32')

Note [static shapes]
~~~~~~~~~~~~~~~~~~~~
A plan is made for fixed input shapes, as a torch capture is. The import pins every input
dimension (symbolic batch and latent size from the options), infers every value's shape, and
turns each ``Shape``/``Size`` node of a statically shaped value into a ``Constant``, as well as
the small integer arithmetic on it (``Gather``, ``Div``, ... of constants) that shape inference
cannot see through; then it infers again, until nothing more folds. Without that, an
exporter's ``Shape(sample)`` (for ``timestep.expand(sample.shape[0])``) would make the whole
time embedding depend on the latent: it would be sent between segments, one step stale,
instead of being recomputed fresh as in the torch capture of the same model, whose sizes are
constants; and a ``Slice`` whose end comes from a ``Shape`` would have no static shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.shape_inference
from onnx.reference import ReferenceEvaluator

from asyncdiff_partition.onnx.errors import OnnxModelError

__all__ = ["make_static"]

_FOLD_ROUNDS = 8  # folding rounds; each can expose new static shapes (Note [static shapes])
_FOLD_ELEMENTS = 64  # largest constant computed at import (shape arithmetic, not weights)

Values = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype name)


def make_static(proto: onnx.ModelProto, *, latent: str, batch: int | None = None, size: int | None = None,
                input_shapes: Mapping[str, Sequence[int]] | None = None, path: str = "") -> tuple[onnx.ModelProto, Values]:
    """Pin the inputs, infer every shape and fold ``Shape`` arithmetic (Note [static shapes]).

    Args:
        proto: the model (its inputs are changed in place).
        latent: the latent input's name; ``size`` pins its last two dimensions.
        batch: value for a symbolic first dimension of any input.
        size: value for symbolic height and width of the latent.
        input_shapes: full shapes by input name, over the file's own.
        path: the file, for messages.

    Returns:
        The model with complete ``value_info`` and no foldable ``Shape``/``Size`` nodes, and the
        static shape and dtype of every used tensor.

    Raises:
        OnnxModelError: a symbolic dimension without a value, failed inference, or a tensor
            whose shape stays unknown.
    """
    inits = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    _pin_inputs(proto, inputs, latent, batch, size, dict(input_shapes or {}), path)
    proto = _infer(proto, path)
    for _ in range(_FOLD_ROUNDS):
        if not _fold_shapes(proto):
            break
        proto = _infer(proto, path)
    return proto, _value_types(proto, path)


def _pin_inputs(proto: onnx.ModelProto, inputs: list[onnx.ValueInfoProto], latent: str, batch: int | None,
                size: int | None, shapes: dict[str, Sequence[int]], path: str) -> None:
    """Give every input dimension a value (Note [static shapes])."""
    unknown = sorted(set(shapes) - {v.name for v in inputs})
    if unknown:
        raise OnnxModelError(f"input_shapes names {unknown}, which are not inputs of {path!r}")
    for value in inputs:
        if not value.type.HasField("tensor_type"):
            raise OnnxModelError(f"input {value.name!r} of {path!r} is not a tensor; only tensor inputs are supported")
        dims = value.type.tensor_type.shape.dim
        if value.name in shapes:
            wanted = [int(d) for d in shapes[value.name]]
            del dims[:]
            for d in wanted:
                dims.add().dim_value = d
            continue
        if not value.type.tensor_type.HasField("shape"):
            raise OnnxModelError(f"input {value.name!r} of {path!r} has no shape (not even a rank); pass input_shapes")
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            label = dim.dim_param or "?"
            if i == 0 and batch is not None:
                dim.dim_value = batch
            elif value.name == latent and i >= len(dims) - 2 and size is not None:
                dim.dim_value = size
            else:
                hint = "--batch" if i == 0 else "--size" if value.name == latent and i >= len(dims) - 2 else "input_shapes"
                raise OnnxModelError(
                    f"input {value.name!r} of {path!r} has symbolic dimension {label!r} at position {i}; plans need "
                    f"static shapes: give it a value with {hint}, or export with static shapes"
                )


def _infer(proto: onnx.ModelProto, path: str) -> onnx.ModelProto:
    del proto.graph.value_info[:]  # recomputed from the pinned inputs; old symbolic dims would linger
    for value in proto.graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise OnnxModelError(f"ONNX shape inference failed on {path!r} with the pinned input shapes: {first}") from None


def _fold_shapes(proto: onnx.ModelProto) -> bool:
    """Shape/Size of a statically shaped value, and small all-constant nodes -> Constant.

    The second kind is the integer arithmetic exporters put between a ``Shape`` and the
    ``Slice``/``Reshape`` that reads it, which shape inference cannot see through. Returns True
    when something was folded (then shapes are inferred again).
    """
    shapes = {name: shape for name, (shape, _) in _known_types(proto).items() if shape is not None}
    constants = {t.name: t for t in proto.graph.initializer if math.prod(t.dims) <= _FOLD_ELEMENTS}
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    folded = False
    for node in proto.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and math.prod(value.dims) <= _FOLD_ELEMENTS:
                constants[node.output[0]] = value
            continue
        if node.op_type in ("Shape", "Size") and node.input[0] in shapes:
            shape = list(shapes[node.input[0]])
            if node.op_type == "Size":
                value = onnx.helper.make_tensor("value", onnx.TensorProto.INT64, [], [math.prod(shape)])
            else:
                attrs = {a.name: a.i for a in node.attribute}
                part = shape[slice(attrs.get("start", 0), attrs.get("end", len(shape)))]
                value = onnx.helper.make_tensor("value", onnx.TensorProto.INT64, [len(part)], part)
        elif _foldable(node, constants):
            value = _evaluate(node, constants, opsets)
            if value is None:
                continue
        else:
            continue
        node.CopyFrom(onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name, value=value))
        constants[node.output[0]] = value
        folded = True
    return folded


def _foldable(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]) -> bool:
    inputs = [name for name in node.input if name]
    return (bool(inputs) and len(node.output) == 1 and node.domain in ("", "ai.onnx")
            and "Random" not in node.op_type and all(name in constants for name in inputs))


def _evaluate(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto],
              opsets: Mapping[str, int]) -> onnx.TensorProto | None:
    """The node's value as a tensor, computed by onnx's reference evaluator; None if too big or failing."""
    feeds = {name: onnx.numpy_helper.to_array(constants[name]) for name in node.input if name}
    try:
        (result,) = ReferenceEvaluator(node, opsets=dict(opsets)).run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the reference evaluator lacks stays a node
        return None
    if not isinstance(result, (np.ndarray, np.generic)) or result.size > _FOLD_ELEMENTS:
        return None
    return onnx.numpy_helper.from_array(np.asarray(result), "value")


def _known_types(proto: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...] | None, int]]:
    """tensor name -> (static shape or None, elem type) from inputs, outputs, value_info, initializers."""
    found: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    for value in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            continue
        shape = None
        if tensor.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in tensor.shape.dim):
            shape = tuple(d.dim_value for d in tensor.shape.dim)
        if shape is not None or value.name not in found:
            found[value.name] = (shape, tensor.elem_type)
    for tensor in proto.graph.initializer:
        found[tensor.name] = (tuple(tensor.dims), tensor.data_type)
    return found


def _value_types(proto: onnx.ModelProto, path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every used tensor's static shape and dtype name; an error names the first unknown one."""
    known = _known_types(proto)
    for node in proto.graph.node:
        if node.op_type == "Constant":  # shape inference does give these, but be sure
            for a in node.attribute:
                if a.name == "value":
                    known.setdefault(node.output[0], (tuple(a.t.dims), a.t.data_type))
    used = {name for node in proto.graph.node for name in node.input if name} | {o.name for o in proto.graph.output}
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for node in proto.graph.node:
        for name in node.output:
            if not name or name not in used:
                continue
            shape, elem = known.get(name, (None, 0))
            if shape is None or not elem:
                raise OnnxModelError(
                    f"ONNX model {path!r}: no static shape for {name!r} (output of node {node.name!r}, a "
                    f"{node.op_type}) after shape inference; export with static shapes, or pin the inputs "
                    f"(--batch, --size, input_shapes)"
                )
            out[name] = (shape, _dtype_name(elem))
    for name, (shape, elem) in known.items():
        if name not in out and shape is not None and elem:
            out[name] = (shape, _dtype_name(elem))
    return out


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
