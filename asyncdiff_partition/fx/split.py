"""Split a captured graph into one ``fx.GraphModule`` per segment, as a placement says.

Example::

    captured = capture_model(unet, (latent, t), {"encoder_hidden_states": text})
    graph = build_op_graph(captured)
    segments = split_graph(captured, place(graph, [0, 900, len(graph)]))
    eps = run_segments(segments, {"sample": latent, "timestep": t, "encoder_hidden_states": text})

The partitioner chooses the boundaries and :func:`~asyncdiff_partition.core.placement.place`
decides which node goes where (Note [value kinds] in :mod:`asyncdiff_partition.core.graph`); this
module only builds the modules, as torch.fx's ``split_module`` takes its policy as an argument.
Each module holds the placed nodes, the inputs, constants and fresh ops the placement lists for
it, and takes its received values as placeholders.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor

from asyncdiff_partition.core import counters
from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.placement import Placement
from asyncdiff_partition.fx.capture import CapturedModel, resolve_attr

__all__ = ["Segment", "SplitError", "run_segments", "split_graph"]


Node = torch.fx.Node


class SplitError(AsyncDiffError, ValueError):
    """The placement was not made from this captured graph's op graph."""


@dataclass
class Segment:
    """One consecutive piece of the model, ready to run on its own device.

    Call it as ``segment.module(*input_tensors, *received_values)``, in the orders of
    :attr:`inputs` and :attr:`receives`; it returns a tuple in the order of :attr:`outputs`.

    Attributes:
        index: position of the segment, 0 for the one that starts the model.
        module: holds only the parameters and buffers its own nodes and its replicated fresh
            nodes use: the original tensor objects, shared, never copied.
        inputs: model-input placeholder names it needs (``captured.inputs[i].name``).
        receives: names of the stale values it consumes that earlier segments produce.
        outputs: the values later segments consume (its sends), then :data:`OUTPUT` if it
            yields the model output.
        replicated: names of the fresh nodes it recomputes instead of receiving.
    """

    index: int
    module: torch.fx.GraphModule
    inputs: list[str]
    receives: list[str]
    outputs: list[str]
    replicated: list[str]


def split_graph(captured: CapturedModel, placement: Placement) -> list[Segment]:
    """Build one module per segment of ``placement`` from ``captured``'s graph.

    Example:
        >>> segments = split_graph(captured, place(build_op_graph(captured), [0, 812, 1630]))  # doctest: +SKIP
        >>> segments[1].receives  # doctest: +SKIP
        ['add_3', 'conv2d_5']

    Args:
        captured: the captured model.
        placement: :func:`~asyncdiff_partition.core.placement.place` of its op graph
            (:func:`~asyncdiff_partition.fx.opgraph.build_op_graph`), whose names are fx node names.

    Returns:
        The ``N`` segments, in order. Running them in order (:func:`run_segments`) computes
        exactly what ``captured.graph_module`` computes.

    Raises:
        SplitError: the placement names nodes this graph does not have, or was made for a
            graph of another size.
    """
    gm = captured.graph_module
    nodes = list(gm.graph.nodes)
    by_name = {node.name: node for node in nodes}
    named = {n for s in placement.segments for n in (*s.body, *s.receives)}
    if placement.n_nodes != len(nodes) or not named <= by_name.keys():
        raise SplitError(
            f"the placement was made for an op graph of {placement.n_nodes} nodes, not this captured graph's "
            f"{len(nodes)} nodes; it does not match; place the op graph of this capture (build_op_graph(captured))"
        )
    counters.count("splits")
    names = {node: spec.name for node, spec in zip(gm.graph.find_nodes(op="placeholder"), captured.inputs)}
    segments = []
    for part in placement.segments:
        body_names = part.body
        body = [n for n in nodes if n.name in body_names]
        segments.append(
            Segment(
                index=part.index,
                module=_build_module(gm, body, [by_name[v] for v in part.receives], [by_name[v] for v in part.sends],
                                     f"Segment{part.index}"),
                inputs=[names[by_name[n]] for n in part.inputs],
                receives=list(part.receives),
                outputs=list(part.outputs),
                replicated=list(part.replicated),
            )
        )
    return segments


def run_segments(segments: list[Segment], inputs: Mapping[str, Tensor]) -> Tensor:
    """Run the segments one after the other, handing each its received values.

    This is the sequential reference the asynchronous runtimes are compared with.

    Example:
        >>> eps = run_segments(split_graph(captured, place(graph, b)), {"sample": x, "timestep": t})  # doctest: +SKIP

    Args:
        segments: from :func:`split_graph`, in order.
        inputs: every model input the segments need, by placeholder name.

    Returns:
        The model output (what the last segment returns as :data:`OUTPUT`).

    Raises:
        ValueError: a needed model input is missing from ``inputs``.
    """
    values: dict[str, Any] = {}
    for segment in segments:
        missing = [name for name in segment.inputs if name not in inputs]
        if missing:
            raise ConfigError(f"segment {segment.index} needs model inputs {missing}; got {sorted(inputs)}")
        args = [inputs[name] for name in segment.inputs] + [values[name] for name in segment.receives]
        values.update(zip(segment.outputs, segment.module(*args)))
    return values[OUTPUT]


def _build_module(
    gm: torch.fx.GraphModule, body: list[Node], receives: list[Node], sends: list[Node], name: str
) -> torch.fx.GraphModule:
    """A module computing ``body`` (original order) from model inputs and ``receives``."""
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for node in body:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    for node in receives:
        env[node] = graph.placeholder(node.name)
        env[node].meta = copy.copy(node.meta)  # the producer's shapes, for whoever allocates buffers
    results: list[Any] = []
    for node in body:
        if node.op == "output":
            results.append(torch.fx.map_arg(node.args[0], env.__getitem__))
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple([env[n] for n in sends] + results))
    graph.lint()
    attrs = {str(n.target): resolve_attr(gm, str(n.target)) for n in body if n.op in ("get_attr", "call_module")}
    return torch.fx.GraphModule(attrs, graph, class_name=type(gm).__name__ + name)
