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
it, and takes its received values as placeholders; it clones the received values and inputs it
writes into in place (Note [writes in segments] in :mod:`~asyncdiff_partition.core.effects`).

:func:`verify_segments` runs the segments chained on the capture's example call, each on its own
copies of what it gets, as ranks would, and refuses them unless they compute exactly what the
captured graph computes: a split proves itself before any rank starts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core import counters
from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.placement import Placement
from asyncdiff_partition.fx.capture import MODULE_KEY, CapturedModel, resolve_attr
from asyncdiff_partition.fx.effects import private_copy

__all__ = ["Segment", "SplitError", "run_segments", "split_graph", "verify_segments"]


Node = torch.fx.Node


class SplitError(AsyncDiffError, ValueError):
    """Segments that do not fit the captured graph: a placement made from another graph, or
    segments whose chained output differs from the captured graph's."""


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
                                     f"Segment{part.index}", [by_name[v] for v in part.cloned]),
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


def verify_segments(captured: CapturedModel, segments: list[Segment], *, expected: Any = None) -> None:
    """Run ``segments`` chained on the capture's example call; refuse them unless they give the captured graph's output.

    Each segment gets its own copy of the model inputs and of every value it receives, as a
    rank does, so a segment that depends on another segment's tensors (an in-place write across
    a cut) shows here. Random ops run from the same seed in both runs (:func:`seeded`). A model
    that changes its buffers at every call is refused at capture already; one that writes the
    same value each time (a cache) verifies.

    Example:
        >>> verify_segments(captured, split_graph(captured, place(graph, boundaries)))  # doctest: +SKIP

    Args:
        captured: the capture the segments were split from, with its example call.
        segments: from :func:`split_graph`, in order.
        expected: the captured graph's output on ``captured.example``, run under :func:`seeded`,
            when the caller has it (:func:`~asyncdiff_partition.fx.opgraph.shaped_pass`); the
            check then costs one forward of the model, else two.

    Raises:
        SplitError: a segment fails, or an output differs from the captured graph's (exactly on
            CPU; within ``torch.testing``'s default tolerances on an accelerator). The message
            names the output, its largest difference and the first value sent between
            segments that differs.
        ConfigError: the capture holds no example call.
    """
    if not captured.example:
        raise ConfigError("the capture holds no example call to verify its segments on; capture the model with "
                          "its example inputs (capture_model), or skip the check (verify=False)")
    feed = dict(zip((spec.name for spec in captured.inputs), captured.example))
    if expected is None:
        with seeded(captured.example), torch.no_grad():
            expected = captured.graph_module(*_copies(captured.example))
    values: dict[str, Any] = {}
    with seeded(captured.example), torch.no_grad():
        for segment in segments:
            args = _copies([feed[n] for n in segment.inputs] + [values[n] for n in segment.receives])
            try:
                values.update(zip(segment.outputs, segment.module(*args)))
            except Exception as error:  # noqa: BLE001 - reported with the segment that failed
                raise SplitError(f"segment {segment.index} fails on the capture's example call: "
                                 f"{type(error).__name__}: {error}") from error
    found = _difference(values.get(OUTPUT), expected)
    if found is not None:
        where = _first_sent_difference(captured, segments, values)
        raise SplitError(
            f"the {len(segments)} segments chained on the capture's example call differ from the captured graph: "
            f"{found}{where}; the split dropped or reordered work; this is a bug in the split: report it with the "
            f"model and the boundaries, and run unsplit meanwhile"
        )


@contextlib.contextmanager
def seeded(tensors: Sequence[Tensor], seed: int = 0) -> Iterator[None]:
    """The random number generators of the CPU and of the tensors' accelerators seeded with ``seed``,
    and restored afterwards: two runs under it draw the same random numbers."""
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _copies(values: Sequence[Any]) -> list[Any]:
    """Each tensor in a storage of its own (same strides: the exact comparison stays meaningful)."""
    return [pytree.tree_map(lambda v: private_copy(v) if isinstance(v, Tensor) else v, value) for value in values]


def _difference(actual: Any, expected: Any) -> str | None:
    """What differs between two outputs, in words; None if they agree (exactly on CPU)."""
    got, want = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    if len(got) != len(want):
        return f"the segments return {len(got)} output tensor(s), the captured graph {len(want)}"
    for i, (a, e) in enumerate(zip(got, want)):
        name = "the output" if len(want) == 1 else f"output {i}"
        if not isinstance(a, Tensor) or not isinstance(e, Tensor):
            if a != e:
                return f"{name} is {a!r}, the captured graph's {e!r}"
            continue
        if a.shape != e.shape or a.dtype != e.dtype:
            return f"{name} has shape {list(a.shape)} and dtype {a.dtype}, the captured graph's {list(e.shape)}, {e.dtype}"
        exact = e.device.type == "cpu"
        try:
            if exact:
                torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
            else:
                torch.testing.assert_close(a, e, equal_nan=True)
        except AssertionError:
            return f"{name} (shape {list(e.shape)}) differs by up to {_max_abs(a, e):.3g}" + (
                " (compared exactly, on CPU)" if exact else "")
    return None


def _max_abs(a: Tensor, e: Tensor) -> float:
    if a.is_complex() or a.is_floating_point():
        diff = (a.to(torch.complex128 if a.is_complex() else torch.float64)
                - e.to(torch.complex128 if e.is_complex() else torch.float64)).abs()
        diff = torch.where(a.isnan() & e.isnan(), torch.zeros_like(diff), diff).nan_to_num(nan=float("inf"))
    else:
        diff = (a.to(torch.float64) - e.to(torch.float64)).abs()
    return float(diff.max()) if diff.numel() else 0.0


def _first_sent_difference(captured: CapturedModel, segments: list[Segment], values: dict[str, Any]) -> str:
    """``; the first value sent between segments that differs is ...``, or why none does (run only on failure).

    A sent value is its segment's tensor when the segment has finished, so writes made in place
    after the value was computed may be in it: it is compared with the captured graph's value
    both as computed and as left at the end of the run, and differs only if it matches neither.
    """
    sent = {v for s in segments for v in s.outputs if v != OUTPUT}
    reference: dict[str, tuple[Any, Any]] = {}

    class _Keep(torch.fx.Interpreter):
        def run_node(self, node: Node) -> Any:
            result = super().run_node(node)
            if node.name in sent:
                reference[node.name] = (_copies([result])[0], result)
            return result

    with seeded(captured.example), torch.no_grad():
        _Keep(captured.graph_module).run(*_copies(captured.example))
    for node in captured.graph_module.graph.nodes:
        if node.name in sent:
            found = [_difference(values[node.name], want) for want in reference[node.name]]
            if all(f is not None for f in found):
                producer = next(s.index for s in segments if node.name in s.outputs)
                module = node.meta.get(MODULE_KEY, "")
                return (f"; the first value sent between segments that differs is {node.name!r} (module {module!r}, "
                        f"from segment {producer}): {str(found[0]).replace('the output', 'it')}")
    return "; every value sent between segments agrees, so the difference arises in the last segments' own work"


def _build_module(
    gm: torch.fx.GraphModule, body: list[Node], receives: list[Node], sends: list[Node], name: str,
    cloned: Sequence[Node] = (),
) -> torch.fx.GraphModule:
    """A module computing ``body`` (original order) from model inputs and ``receives``; the
    ``cloned`` inputs and receives are copied before anything reads them."""
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for node in body:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    for node in receives:
        env[node] = graph.placeholder(node.name)
        env[node].meta = copy.copy(node.meta)  # the producer's shapes, for whoever allocates buffers
    for node in cloned:  # Note [writes in segments]: never write a tensor this segment did not create
        env[node] = graph.call_function(torch.ops.aten.clone.default, (env[node],))
        env[node].meta[MODULE_KEY] = node.meta.get(MODULE_KEY, "")
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
