"""The torch backend's compile step: a capture checked against a plan, placed once, split into ready segments.

Example::

    ready = ready_segments(captured, plan, world_size=2)      # in the launching process
    ready[1].module, ready[1].layouts["add_3"], ready[1].fingerprint

The op graph is built once (on fake tensors for a large model,
:func:`~asyncdiff_partition.fx.opgraph.shaped_op_graph`); the same pass records the layout of every
value, so the checks, the placement, the split and the layouts cost one pass over the graph.
With ``verify`` (the default) the chained segments must reproduce the captured graph's output
(:func:`~asyncdiff_partition.fx.split.verify_segments`): where that pass runs for real its output
is the reference and the check costs one more forward; on fake tensors, two.
"""

from __future__ import annotations

from typing import Any

from asyncdiff_partition.core.graph import OUTPUT, OpGraph
from asyncdiff_partition.core.placement import Placement, place
from asyncdiff_partition.core.plan import Plan
from asyncdiff_partition.core.profile import fingerprint
from asyncdiff_partition.core.validation import check_plan_graph
from asyncdiff_partition.fx.capture import CapturedModel
from asyncdiff_partition.fx.layout import ReadySegment
from asyncdiff_partition.fx.opgraph import shaped_pass, value_layouts
from asyncdiff_partition.fx.split import Segment, seeded, split_graph, verify_segments

__all__ = ["check_plan", "checked_op_graph", "ready_segments", "ready_from_split"]


def checked_op_graph(captured: CapturedModel, plan: Plan, world_size: int | None = None, *,
                     stride: int | None = None) -> OpGraph:
    """The capture's op graph, after refusing a plan that does not fit it (or this many ranks).

    Args:
        captured: the model as this run captured it (its example inputs set the shapes).
        plan: the plan to run.
        world_size: number of ranks of this run; None skips that check.
        stride: the stride to run with (default the plan's); stride 2 needs one extra rank.

    Raises:
        PlanError: the world size is not N + stride - 1, or the plan's model fingerprint
            (graph structure, sizes and input shapes, as the profile computed it) differs.
    """
    return _checked(captured, plan, world_size, stride)[0]


def _checked(captured: CapturedModel, plan: Plan, world_size: int | None,
             stride: int | None) -> tuple[OpGraph, Any]:
    """:func:`checked_op_graph`, and the graph's output where the pass ran for real (seeded as
    :func:`~asyncdiff_partition.fx.split.verify_segments` seeds its runs)."""
    if world_size is not None:
        plan.check_world_size(world_size, stride)
    with seeded(captured.example):
        graph, output = shaped_pass(captured)
    specs = [s.to_dict() for s in captured.inputs]  # exactly as profile_model records them
    plan.check_fingerprint(fingerprint(graph, specs), specs=specs, n_nodes=len(graph))
    return graph, output


def check_plan(captured: CapturedModel, plan: Plan, world_size: int, *, stride: int | None = None) -> None:
    """Refuse a plan that does not fit this model, these input shapes or this many ranks (see
    :func:`checked_op_graph`)."""
    checked_op_graph(captured, plan, world_size, stride=stride)


def ready_from_split(captured: CapturedModel, placement: Placement, segments: list[Segment],
                     verified: str) -> list[ReadySegment]:
    """Ready segments from split ones, with layouts from the op-graph pass already run on ``captured``."""
    layouts = value_layouts(captured, {v for s in segments for v in s.receives} | {OUTPUT})
    return [ReadySegment(index=s.index, module=s.module, inputs=s.inputs, receives=s.receives, outputs=s.outputs,
                         layouts={v: layouts[v] for v in (*s.receives, OUTPUT)}, fingerprint=verified,
                         placement=placement, replicated=s.replicated)
            for s in segments]


def ready_segments(captured: CapturedModel, plan: Plan, *, world_size: int | None = None,
                   stride: int | None = None, plan_path: str | None = None,
                   verify: bool = True) -> list[ReadySegment]:
    """Check ``plan`` against ``captured``, place and split it: one ready segment per segment.

    With ``plan_path`` (the file the plan was loaded from), its segments' ``receives`` must also
    be what crosses the cuts in this graph (an in-memory plan's are the caller's business).

    Args:
        verify: run the segments chained on the capture's example call and compare with the
            captured graph (:func:`~asyncdiff_partition.fx.split.verify_segments`; one extra
            forward). Turn off only where these segments were verified already.

    Raises:
        PlanError: see :func:`checked_op_graph`; or receives that do not fit.
        SideEffectError: the plan's boundaries separate an in-place write from its readers.
        SplitError: the chained segments differ from the captured graph.
    """
    graph, output = _checked(captured, plan, world_size, stride)
    placement = place(graph, plan.boundaries)
    if plan_path is not None:  # a plan file is well-formed on load; here it must also fit this graph
        check_plan_graph(plan, graph, plan_path, placement=placement)
    segments = split_graph(captured, placement)
    if verify:
        verify_segments(captured, segments, expected=output)
    return ready_from_split(captured, placement, segments, plan.fingerprint)
