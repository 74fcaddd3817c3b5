"""Op graph of a captured torch.fx graph: the torch side of :mod:`asyncdiff_partition.core.graph`.

Example::

    captured = capture_model(model, args, kwargs)
    graph = build_op_graph(captured)                 # runs the graph once on the example inputs
    graph = shaped_op_graph(captured)                # the same, on fake tensors for a large model
    value_layouts(captured, ["add_3", "output"])     # recorded by the same pass

The pass that sizes the values (:class:`TensorMetaProp`) also records each value's
:class:`~asyncdiff_partition.fx.layout.ValueLayout` under ``node.meta[META_KEY]``, so the
layouts a rank allocates its receive buffers from cost no second pass, and the in-place writes
the op graph keeps with their readers (:mod:`~asyncdiff_partition.fx.effects`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff_partition.core.graph import OpGraph
from asyncdiff_partition.fx.capture import MODULE_KEY, CapturedModel
from asyncdiff_partition.fx.effects import StorageTracker, private_copy
from asyncdiff_partition.fx.layout import ValueLayout

__all__ = ["META_KEY", "TensorMetaProp", "build_op_graph", "shaped_op_graph", "shaped_pass", "traced_op_graph",
           "value_bytes", "value_layouts"]

META_KEY = "asyncdiff"  # node.meta[META_KEY]: {"bytes", "shapes", "dtypes", "layout", "storage", "writes"}
REAL_PASS_BYTES = 64 * 2**20  # see shaped_op_graph

_KINDS = {"placeholder": "input", "get_attr": "constant", "output": "output"}


def value_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) value."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


class TensorMetaProp(torch.fx.Interpreter):
    """Runs the graph once and records each node's output size, and the storages it lives in
    and writes (:class:`~asyncdiff_partition.fx.effects.StorageTracker`), under ``node.meta[META_KEY]``.

    ``result`` is the graph's output once :meth:`run` has returned.
    """

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.storages = StorageTracker()
        self.result: Any = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.result = super().run(*args, **kwargs)
        return self.result

    def run_node(self, node: torch.fx.Node) -> Any:
        inputs = {n: self.env[n] for n in node.all_input_nodes}
        snapshot = self.storages.before(inputs)
        result = super().run_node(node)
        tensors = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        node.meta[META_KEY] = {
            "bytes": value_bytes(result),
            "shapes": [list(t.shape) for t in tensors],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
            "layout": ValueLayout.of(result),
            **self.storages.after(node, inputs, result, snapshot),
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
    return traced_op_graph(captured, inputs)[0]


def traced_op_graph(captured: CapturedModel, inputs: list[torch.Tensor] | None = None) -> tuple[OpGraph, Any]:
    """:func:`build_op_graph`, and the captured graph's output from the same pass.

    The inputs are copied first (:func:`~asyncdiff_partition.fx.effects.private_copy`): a model
    that writes into its inputs in place leaves the capture's example as it was.
    """
    gm = captured.graph_module
    prop = TensorMetaProp(gm)
    with torch.no_grad():
        prop.run(*[private_copy(t) for t in (inputs if inputs is not None else captured.example)])
    return _op_graph(captured), prop.result


def _op_graph(captured: CapturedModel) -> OpGraph:
    """The op graph from the facts the last :class:`TensorMetaProp` pass recorded."""
    gm = captured.graph_module
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
    metas = {node.name: node.meta[META_KEY] for node in gm.graph.nodes}
    writes = {name: meta["writes"] for name, meta in metas.items() if meta["writes"]}
    written = {base for bases in writes.values() for base in bases}
    storage = {name: tuple(b for b in meta["storage"] if b in written) for name, meta in metas.items()}
    return OpGraph.from_nodes(nodes, edges, storage=storage, writes=writes)


def shaped_op_graph(captured: CapturedModel) -> OpGraph:
    """:func:`build_op_graph` on the example inputs' shapes, as cheaply as the model allows.

    Fake tensors give shapes without compute or activation memory, at about a millisecond per
    node; a model with under :data:`REAL_PASS_BYTES` of weights computes faster than that, so
    it runs for real. A graph that fake tensors cannot run (data-dependent shapes) runs for real.
    """
    return shaped_pass(captured)[0]


def shaped_pass(captured: CapturedModel) -> tuple[OpGraph, Any]:
    """:func:`shaped_op_graph`, and the captured graph's output on the example inputs when the
    pass ran for real (None when it ran on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = captured.graph_module
    weights = {id(t): t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()]}
    if sum(weights.values()) >= REAL_PASS_BYTES:
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                return build_op_graph(captured, [mode.from_tensor(t) for t in captured.example]), None
        except Exception:  # noqa: BLE001 - any failure: fall back to the real thing
            pass
    return traced_op_graph(captured)


def value_layouts(captured: CapturedModel, names: Iterable[str]) -> dict[str, ValueLayout]:
    """The layouts of the named values, as the last :func:`build_op_graph` pass recorded them.

    Raises:
        KeyError: a name is not a node of the graph, or no op graph was built from this capture.
    """
    nodes = {node.name: node for node in captured.graph_module.graph.nodes}
    found = {}
    for name in names:
        meta = nodes[name].meta.get(META_KEY)
        if meta is None or "layout" not in meta:
            raise KeyError(f"no layout recorded for {name!r}; build the op graph of this capture first")
        found[name] = meta["layout"]
    return found


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
