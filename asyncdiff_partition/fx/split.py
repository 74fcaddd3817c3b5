"""Split a captured graph into one ``fx.GraphModule`` per segment.

Example::

    captured = capture_model(unet, (latent, t), {"encoder_hidden_states": text})
    graph = build_op_graph(captured)
    segments = split_graph(captured, graph, [0, 900, len(graph)])
    eps = run_segments(segments, {"sample": latent, "timestep": t, "encoder_hidden_states": text})

The partitioner chooses the boundaries; this module only turns them into modules, following
Note [value kinds] in :mod:`asyncdiff_partition.core.graph`:

    value kind       where it goes
    input            a placeholder of every segment that uses it
    constant         a get_attr of every segment that uses it (the same tensor, not a copy)
    stale op         the segment of its position; sent once to every later segment using it
    fresh op         recomputed by every segment that uses it, with its fresh ancestors
    output           the last segment returns the model output (received if made earlier)

A fresh op that no stale op or output uses, directly or through other fresh ops (torch.export's
``_assert_tensor_metadata`` checks of the timestep, say), is left out, as the partitioner's cost
model charges it nowhere.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.graph import OUTPUT, OpGraph
from asyncdiff_partition.fx.capture import CapturedModel, resolve_attr

__all__ = ["Segment", "SplitError", "run_segments", "split_graph"]


Node = torch.fx.Node


class SplitError(AsyncDiffError, ValueError):
    """The boundaries (or the op graph) do not describe a split of this captured graph."""


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


def split_graph(captured: CapturedModel, graph: OpGraph, boundaries: Sequence[int]) -> list[Segment]:
    """Cut ``captured``'s graph at ``boundaries`` into one module per segment.

    Example:
        >>> segments = split_graph(captured, graph, [0, 812, len(graph)])  # doctest: +SKIP
        >>> segments[1].receives  # doctest: +SKIP
        ['add_3', 'conv2d_5']

    Args:
        captured: the captured model.
        graph: its op graph (:func:`~asyncdiff_partition.fx.opgraph.build_op_graph`), whose
            order is the fx node order.
        boundaries: ``N + 1`` strictly increasing positions in ``graph.order`` from 0 to n;
            segment ``k`` holds the stale ops at positions ``boundaries[k]:boundaries[k+1]``.

    Returns:
        The ``N`` segments, in order. Running them in order (:func:`run_segments`) computes
        exactly what ``captured.graph_module`` computes.

    Raises:
        SplitError: the op graph is not this capture's, the boundaries are not strictly
            increasing from 0 to n, or a segment holds no stale op and not the output.
    """
    gm = captured.graph_module
    nodes = list(gm.graph.nodes)
    if graph.order != [node.name for node in nodes]:
        raise SplitError(
            "the op graph does not match the captured graph's nodes; build it with build_op_graph(captured)"
        )
    bounds = _check_boundaries(boundaries, len(nodes))
    position = {node: i for i, node in enumerate(nodes)}
    fresh = graph.fresh
    n_seg = len(bounds) - 1

    # Stale ops and the output node are placed by position; all else is pulled in by its users.
    owner: dict[Node, int] = {}
    used: list[set[Node]] = [set() for _ in range(n_seg)]  # inputs, constants, fresh ops per segment
    received: list[set[Node]] = [set() for _ in range(n_seg)]
    sent: list[set[Node]] = [set() for _ in range(n_seg)]
    k = 0
    for i, node in enumerate(nodes):
        while i >= bounds[k + 1]:
            k += 1
        if node.op == "placeholder" or fresh[i]:
            continue
        owner[node] = k
        stack = list(node.all_input_nodes)
        while stack:
            value = stack.pop()
            if value in owner:  # a stale op: earlier in this segment, or sent from an earlier one
                if owner[value] != k:
                    received[k].add(value)
                    sent[owner[value]].add(value)
            elif value not in used[k]:
                used[k].add(value)
                stack.extend(value.all_input_nodes)
    placed = set(owner.values())
    empty = [k for k in range(n_seg) if k not in placed]
    if empty:
        k = empty[0]
        raise SplitError(
            f"segment {k} = positions [{bounds[k]}, {bounds[k + 1]}) of boundaries {bounds} holds no "
            f"stale op (only inputs, constants and fresh ops, which are not placed); move a boundary "
            f"or use fewer segments"
        )

    names = {node: spec.name for node, spec in zip(gm.graph.find_nodes(op="placeholder"), captured.inputs)}
    segments = []
    for k in range(n_seg):
        body = [n for n in nodes if owner.get(n) == k or n in used[k]]
        receives = sorted(received[k], key=position.__getitem__)
        sends = sorted(sent[k], key=position.__getitem__)
        segments.append(
            Segment(
                index=k,
                module=_build_module(gm, body, receives, sends, f"Segment{k}"),
                inputs=[names[n] for n in body if n.op == "placeholder"],
                receives=[n.name for n in receives],
                outputs=[n.name for n in sends] + ([OUTPUT] if k == n_seg - 1 else []),
                replicated=[n.name for n in body if n in used[k] and n.op not in ("placeholder", "get_attr")],
            )
        )
    return segments


def run_segments(segments: list[Segment], inputs: Mapping[str, Tensor]) -> Tensor:
    """Run the segments one after the other, handing each its received values.

    This is the sequential reference the asynchronous runtimes are compared with.

    Example:
        >>> eps = run_segments(split_graph(captured, graph, b), {"sample": x, "timestep": t})  # doctest: +SKIP

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
            raise ValueError(f"segment {segment.index} needs model inputs {missing}; got {sorted(inputs)}")
        args = [inputs[name] for name in segment.inputs] + [values[name] for name in segment.receives]
        values.update(zip(segment.outputs, segment.module(*args)))
    return values[OUTPUT]


def _check_boundaries(boundaries: Sequence[int], n: int) -> list[int]:
    b = list(boundaries)
    if any(isinstance(x, bool) or not isinstance(x, int) for x in b):
        raise SplitError(f"boundaries must be integers; got {b}")
    if len(b) < 2 or b[0] != 0 or b[-1] != n:
        raise SplitError(
            f"boundaries must run from 0 to n={n} with at least two entries; got {b}; "
            f"write them as [0, b_1, ..., {n}]"
        )
    for k, (lo, hi) in enumerate(zip(b, b[1:])):
        if lo >= hi:
            raise SplitError(
                f"boundaries must be strictly increasing; got {b} (entries {k} and {k + 1}: {lo} then {hi})"
            )
    return b


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
