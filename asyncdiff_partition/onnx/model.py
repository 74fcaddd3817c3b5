"""ONNX models as op graphs: import, checks, and the facts the other stages need.

Example::

    model = load_onnx("unet.onnx")                  # latent guessed by name, or latent="x"
    model.graph.cheapest_cuts(3)                    # the same OpGraph as a torch capture gives
    model.latent, model.timestep, model.inputs      # 'sample', 'timestep', [{name, shape, ...}]

An ``.onnx`` file becomes the same :class:`~asyncdiff_partition.core.graph.OpGraph` that
:mod:`~asyncdiff_partition.fx.opgraph` builds from a torch capture (Note [value kinds]):

    ONNX                                   op-graph node
    graph input (not an initializer)       input (the latent one has ``latent=True``)
    initializer, Constant node             constant; its bytes go to its first consumer
    any other node                         op, named after the node; out_bytes = its live outputs
    the graph output                       output (a denoiser has exactly one)

The shapes are made static first (Note [static shapes] in :mod:`~asyncdiff_partition.onnx.shapes`).
No torch is needed here. Costs come from :mod:`~asyncdiff_partition.onnx.profiler`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from asyncdiff_partition.core.graph import OpGraph
from asyncdiff_partition.onnx.errors import OnnxModelError
from asyncdiff_partition.onnx.shapes import make_static

__all__ = [
    "CONTROL_FLOW",
    "LATENT_NAMES",
    "OUTPUT",
    "TIMESTEP_NAMES",
    "OnnxModel",
    "OnnxModelError",
    "is_onnx_path",
    "load_onnx",
]

OUTPUT = "output"  # the op-graph name of the model output (split.OUTPUT; asserted in the tests)
# Inputs that are the latent / the timestep, in order of preference, when no option names them.
LATENT_NAMES = ("sample", "latent", "latents", "hidden_states", "x", "x_t", "z", "noisy_latents")
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time")
CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclass
class OnnxModel:
    """An imported ONNX denoiser with static shapes, and its op graph.

    Attributes:
        path: the file it was read from.
        proto: the model as imported: nodes uniquely named (the op-graph names), inputs
            pinned, ``Shape`` nodes folded, every value's shape in ``value_info``.
        graph: the op graph; positions index ``graph.order``.
        inputs: one spec per graph input, ``{"name", "path", "shape", "dtype", "latent"}`` (the
            form profiles and plans record).
        latent: name of the latent input.
        timestep: name of the timestep input, None when none is recognised.
        output: name of the graph output tensor.
        node_outputs: op-graph node name -> the tensor names that make up its value (a node
            with several used outputs has a tuple value).
        values: tensor name -> (shape, dtype name) of every input, constant and node output.
    """

    path: str
    proto: onnx.ModelProto
    graph: OpGraph
    inputs: list[dict[str, Any]]
    latent: str
    timestep: str | None
    output: str
    node_outputs: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.inputs]

    def value_tensors(self, name: str) -> list[str]:
        """Tensor names of an op-graph value (an input's is its own name)."""
        return self.node_outputs.get(name, [name])


def is_onnx_path(spec: str | os.PathLike[str] | None) -> bool:
    """True for a model spec that names an ``.onnx`` file (existing or not)."""
    return spec is not None and str(spec).lower().endswith(".onnx")


def load_onnx(
    path: str | os.PathLike[str],
    *,
    latent: str | None = None,
    timestep: str | None = None,
    batch: int | None = None,
    size: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> OnnxModel:
    """Read an ``.onnx`` file into an :class:`OnnxModel` (Note [static shapes]).

    Example:
        >>> model = load_onnx("unet.onnx", batch=2)  # doctest: +SKIP
        >>> model.graph.crossing(1200).stale_bytes  # doctest: +SKIP

    Args:
        path: the file.
        latent: the latent input's name; default the first of :data:`LATENT_NAMES` present.
        timestep: the timestep input's name; default the first of :data:`TIMESTEP_NAMES`.
        batch: value for a symbolic first dimension of any input.
        size: value for symbolic last two dimensions of the latent (height and width).
        input_shapes: full shapes for inputs by name (over the file's own dimensions).

    Raises:
        OnnxModelError: not an ONNX file, fails the checker, control flow, no single output,
            no recognisable latent, or a value whose shape stays unknown.
    """
    path = str(path)
    proto = _read(path)
    _check_structure(proto, path)
    _check_model(proto, path)
    inits = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    if not inputs:
        raise OnnxModelError(f"ONNX model {path!r} has no inputs; a denoiser takes at least the latent")
    names = [v.name for v in inputs]
    latent_name = _pick(names, latent, LATENT_NAMES, "latent", path, required=True)
    assert latent_name is not None  # required=True raises instead
    timestep_name = _pick(names, timestep, TIMESTEP_NAMES, "timestep", path, required=False)
    _name_nodes(proto)
    proto, values = make_static(proto, latent=latent_name, batch=batch, size=size, input_shapes=input_shapes,
                                path=path)
    return _build(path, proto, values, latent_name, timestep_name)


# --- reading and checks -----------------------------------------------------------------------


def _read(path: str) -> onnx.ModelProto:
    if not os.path.isfile(path):
        raise OnnxModelError(f"ONNX file {path!r} does not exist")
    try:
        proto = onnx.load(path)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxModelError(f"{path!r} is not a readable ONNX model ({first})") from None
    if not proto.graph.node or not proto.opset_import:
        raise OnnxModelError(f"{path!r} is not an ONNX model (no graph nodes or opset); export the model to ONNX first")
    return proto


def _check_model(proto: onnx.ModelProto, path: str) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0]
        raise OnnxModelError(f"ONNX model {path!r} fails the ONNX checker: {first}") from None


def _check_structure(proto: onnx.ModelProto, path: str) -> None:
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in proto.graph.node:
        if node.op_type in CONTROL_FLOW or any(a.type in subgraph for a in node.attribute):
            raise OnnxModelError(
                f"ONNX model {path!r} has control flow: node {node.name or node.output[0]!r} is a {node.op_type} "
                f"with a subgraph, which cannot be cut inside; export with static shapes and no data-dependent "
                f"branches or loops (traced control flow unrolls)"
            )
    if len(proto.graph.output) != 1:
        outs = [o.name for o in proto.graph.output]
        raise OnnxModelError(
            f"ONNX model {path!r} has {len(outs)} outputs {outs}; a denoiser returns exactly one (the noise "
            f"prediction): export only that output"
        )


def _pick(names: list[str], given: str | None, preferred: Sequence[str], what: str, path: str,
          *, required: bool) -> str | None:
    if given is not None:
        if given not in names:
            raise OnnxModelError(f"--{what} {given!r} is not an input of {path!r}; its inputs are {names}")
        return given
    found = next((n for n in preferred if n in names), None)
    if found is None and required:
        raise OnnxModelError(
            f"cannot tell which input of {path!r} is the {what}: inputs are {names}, none is named "
            f"{'/'.join(preferred)}; pass --{what} NAME ({what}= in Python)"
        )
    return found


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Unique node names that differ from input, initializer and output names (op-graph names)."""
    taken = {v.name for v in proto.graph.input} | {t.name for t in proto.graph.initializer} | {OUTPUT}
    for i, node in enumerate(proto.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize if dtype != "bfloat16" else math.prod(shape) * 2


def _module_of(node_name: str) -> str:
    """``/down_blocks.0/resnets.1/conv1/Conv`` -> ``down_blocks.0.resnets.1.conv1`` (torch exporter scopes)."""
    if not node_name.startswith("/"):
        return ""
    return ".".join(part for part in node_name.split("/")[1:-1] if part)


# --- the op graph -----------------------------------------------------------------------------


def _build(path: str, proto: onnx.ModelProto, values: dict[str, tuple[tuple[int, ...], str]], latent: str,
           timestep: str | None) -> OnnxModel:
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    used = {name for node in g.node for name in node.input if name} | {o.name for o in g.output}
    size = lambda name: _nbytes(*values[name])  # noqa: E731
    producer: dict[str, str] = {}  # tensor name -> op-graph node name
    nodes: list[dict[str, Any]] = []
    edges: list[tuple[str, str]] = []
    node_outputs: dict[str, list[str]] = {}

    def add(name: str, kind: str, op: str, target: str, module: str, out_bytes: int, is_latent: bool = False) -> None:
        nodes.append({"name": name, "kind": kind, "op": op, "target": target, "module": module,
                      "out_bytes": out_bytes, "param_bytes": 0, "latent": is_latent})

    specs = []
    for value in g.input:
        if value.name in inits:
            continue
        shape, dtype = values[value.name]
        specs.append({"name": value.name, "path": value.name, "shape": list(shape), "dtype": dtype,
                      "latent": value.name == latent})
        add(value.name, "input", "input", value.name, "", size(value.name), value.name == latent)
        producer[value.name] = value.name
    for name in inits:
        if name in used and name not in producer:
            add(name, "constant", "initializer", name, "", size(name))
            producer[name] = name
    for node in g.node:
        live = [o for o in node.output if o and o in used]
        kind = "constant" if node.op_type == "Constant" else "op"
        add(node.name, kind, node.op_type, f"{node.domain or 'ai.onnx'}::{node.op_type}", _module_of(node.name),
            sum(size(o) for o in live))
        node_outputs[node.name] = live
        for name in node.input:
            if name:
                if name not in producer:
                    raise OnnxModelError(f"ONNX model {path!r}: node {node.name!r} reads {name!r}, which nothing produces")
                edges.append((producer[name], node.name))
        for name in node.output:
            if name:
                producer[name] = node.name
    output = g.output[0].name
    if output not in producer or producer[output] in {s["name"] for s in specs} or output in inits:
        raise OnnxModelError(f"ONNX model {path!r}: its output {output!r} is not computed by any node")
    add(OUTPUT, "output", "output", output, "", size(output))
    edges.append((producer[output], OUTPUT))

    position = {n["name"]: i for i, n in enumerate(nodes)}
    consumers: dict[str, list[str]] = {}
    for src, dst in edges:
        consumers.setdefault(src, []).append(dst)
    for n in nodes:  # a constant's bytes belong to its first consumer (Note [value kinds])
        if n["kind"] == "constant" and n["name"] in consumers:
            first = min(consumers[n["name"]], key=position.__getitem__)
            nodes[position[first]]["param_bytes"] += n["out_bytes"]
    graph = OpGraph.from_nodes(nodes, edges)
    return OnnxModel(path=path, proto=proto, graph=graph, inputs=specs, latent=latent, timestep=timestep,
                     output=output, node_outputs=node_outputs, values=values)
