"""Human-readable summary of a captured model: what ``asyncdiff-partition inspect`` prints.

Example::

    captured = capture_model(model, inputs.args, inputs.kwargs)
    print(format_summary(summarize_model(captured, build_op_graph(captured), model_name="tiny")))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from asyncdiff_partition.core.graph import OpGraph

__all__ = ["ModelSummary", "format_bytes", "format_summary", "summarize_model"]


@dataclass
class ModelSummary:
    """Plain facts about a captured model and its op graph (JSON-ready through ``to_dict``)."""

    model: str
    model_class: str
    capture_method: str
    capture_fallbacks: list[str]
    inputs: list[dict[str, Any]]
    nodes: int
    op_nodes: int
    fresh_ops: int
    parameters: int
    param_bytes: int
    largest_modules: list[dict[str, Any]] = field(default_factory=list)
    cheapest_cuts: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_model(captured: Any, graph: OpGraph, *, model_name: str, top: int = 5) -> ModelSummary:
    """Collect the summary of ``captured`` (a CapturedModel) and its op graph."""
    kinds = [graph.node(n)["kind"] for n in graph.order]
    cuts = []
    for crossing in graph.cheapest_cuts(top):
        b = crossing.boundary
        cuts.append(
            {
                "boundary": b,
                "after": _describe(graph, b - 1),
                "before": _describe(graph, b),
                "stale_values": len(crossing.stale),
                "stale_bytes": crossing.stale_bytes,
                "fresh_values": len(crossing.fresh),
                "fresh_bytes": crossing.fresh_bytes,
            }
        )
    modules = sorted(graph.modules().items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    gm = captured.graph_module
    return ModelSummary(
        model=model_name,
        model_class=type(gm).__name__.removesuffix("Graph"),
        capture_method=captured.method,
        capture_fallbacks=[f"{method}: {message}" for method, message in captured.attempts],
        inputs=[
            s.to_dict() for s in captured.inputs
        ],
        nodes=len(graph),
        op_nodes=kinds.count("op"),
        fresh_ops=sum(1 for k, f in zip(kinds, graph.fresh) if k == "op" and f),
        parameters=sum(p.numel() for p in gm.parameters()),
        param_bytes=graph.param_bytes,
        largest_modules=[{"module": m, "param_bytes": b} for m, b in modules],
        cheapest_cuts=cuts,
    )


def _describe(graph: OpGraph, index: int) -> str:
    node = graph.node(index)
    return f"{node['module'] or '(root)'} [{graph.order[index]}]"


def format_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_summary(s: ModelSummary) -> str:
    lines = [
        f"model            {s.model} ({s.model_class})",
        f"captured with    {s.capture_method}"
        + (f" (after {', '.join(f.split(':')[0] for f in s.capture_fallbacks)} failed)" if s.capture_fallbacks else ""),
        f"nodes            {s.nodes} ({s.op_nodes} ops, {s.fresh_ops} fresh ops recomputed per segment)",
        f"parameters       {s.parameters:,} ({format_bytes(s.param_bytes)})",
        "inputs",
    ]
    for spec in s.inputs:
        mark = "  <- latent" if spec["latent"] else ""
        lines.append(f"  {spec['path']:<36} {str(tuple(spec['shape'])):<22} {spec['dtype']}{mark}")
    lines.append("largest modules")
    for m in s.largest_modules:
        lines.append(f"  {m['module']:<36} {format_bytes(m['param_bytes'])}")
    lines.append("cheapest cut points (stale bytes sent per step; fresh values are recomputed)")
    for c in s.cheapest_cuts:
        lines.append(
            f"  @{c['boundary']:<6} after {c['after']:<48} {format_bytes(c['stale_bytes']):>10} "
            f"in {c['stale_values']} value(s)"
        )
    return "\n".join(lines)
