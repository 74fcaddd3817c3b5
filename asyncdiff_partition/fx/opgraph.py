"""Op graph of a captured torch.fx graph: the torch side of :mod:`asyncdiff_partition.core.graph`.

Example::

    captured = capture_model(model, args, kwargs)
    graph = build_op_graph(captured)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff_partition.core.graph import OpGraph
from asyncdiff_partition.fx.capture import MODULE_KEY, CapturedModel

__all__ = ["META_KEY", "TensorMetaProp", "build_op_graph", "value_bytes"]

META_KEY = "asyncdiff"  # node.meta[META_KEY]: {"bytes", "shapes", "dtypes"} of the node's value

_KINDS = {"placeholder": "input", "get_attr": "constant", "output": "output"}


def value_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) value."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


class TensorMetaProp(torch.fx.Interpreter):
    """Runs the graph once and records each node's output size under ``node.meta[META_KEY]``."""

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        tensors = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        node.meta[META_KEY] = {
            "bytes": value_bytes(result),
            "shapes": [list(t.shape) for t in tensors],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
        }
        return result


def build_op_graph(captured: CapturedModel, inputs: list[torch.Tensor] | None = None) -> OpGraph:
    """The framework-agnostic op graph of a captured model.

    Args:
        captured: from :func:`~asyncdiff_partition.fx.capture.capture_model`.
        inputs: tensors to size the values with; the capture's example inputs by default.

    Returns:
        An :class:`~asyncdiff_partition.core.graph.OpGraph` whose node names are the fx node names.
    """
    gm = captured.graph_module
    with torch.no_grad():
        TensorMetaProp(gm).run(*(inputs if inputs is not None else captured.example))
    latent = captured.latent.name
    owner = _first_consumers(gm)
    nodes: list[dict[str, Any]] = []
    edges: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        param_bytes = sum(c.meta[META_KEY]["bytes"] for c in owner.get(node, []))
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            param_bytes += value_bytes(list(module.parameters()) + list(module.buffers()))
        nodes.append(
            {
                "name": node.name,
                "kind": _KINDS.get(node.op, "op"),
                "op": node.op,
                "target": _target_name(node),
                "module": node.meta.get(MODULE_KEY, ""),
                "out_bytes": node.meta[META_KEY]["bytes"],
                "param_bytes": param_bytes,
                "latent": node.op == "placeholder" and node.name == latent,
            }
        )
        edges.extend((src.name, node.name) for src in node.all_input_nodes)
    return OpGraph.from_nodes(nodes, edges)


def _first_consumers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """consumer → the constants (get_attr) it is the first consumer of; it owns their bytes."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    owner: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            first = min(node.users, key=position.__getitem__)
            owner.setdefault(first, []).append(node)
    return owner


def _target_name(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        return torch.fx.node._get_qualified_name(node.target) if callable(node.target) else str(node.target)
    return str(node.target)
