"""Run reports and Chrome traces.

Example::

    reports = {0: denoiser.report(), 1: ...}            # rank -> per-step rows
    write_report("out/report.json", reports, {"model": "tiny-dit", "steps": 20})
    write_trace("out/trace.json", {0: denoiser.spans(), 1: ...})   # open in ui.perfetto.dev
    summarize_steps(reports)["step_ms"]["median"]

A per-step row is ``{"step", "rank", "compute_ms", "wait_ms", "comm_ms", "bytes_sent"}`` (what
``AsyncDenoiser.report()`` returns); a span is ``{"name", "start_s", "end_s"}`` with times from
one clock shared by the ranks of a node (``time.perf_counter``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.files import read_json, write_json_atomic
from asyncdiff_partition.core.summary import format_bytes
from asyncdiff_partition.runtime.memory import peak_resident_bytes, resident_bytes

__all__ = [
    "SCHEMA_VERSION", "format_run", "load_report", "peak_resident_bytes", "resident_bytes", "summarize_steps",
    "write_report", "write_trace",
]

SCHEMA_VERSION = 1
StepRow = dict[str, Any]
PerRank = Mapping[int, Sequence[StepRow]] | Sequence[Sequence[StepRow]]

_PARTS = ("compute_ms", "wait_ms", "comm_ms")


def _by_rank(per_rank: PerRank) -> dict[int, list[StepRow]]:
    items = per_rank.items() if isinstance(per_rank, Mapping) else enumerate(per_rank)
    return {int(rank): [dict(row) for row in rows] for rank, rows in sorted(items)}


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "mean": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values)}


def summarize_steps(per_rank_reports: PerRank, *, warmup: int | None = None) -> dict[str, Any]:
    """Per-step figures over the ranks: step time, its parts, bytes sent.

    A step's time is the slowest rank's ``compute_ms + wait_ms + comm_ms`` (the ranks run the
    step side by side); its bytes are the sum over the ranks.

    Args:
        per_rank_reports: rank -> per-step rows (a mapping, or a list indexed by rank).
        warmup: W; with it, the steps before and after W are also summarised apart.

    Returns:
        ``{"ranks", "steps", "step_ms": {median, mean, min, max}, "total_ms",
        "bytes_sent_per_step": {...}, "bytes_sent_total", "per_rank": [...]}`` and, with
        ``warmup``, ``"warmup_step_ms"`` and ``"async_step_ms"``.
    """
    ranks = _by_rank(per_rank_reports)
    step_ms: dict[int, float] = {}
    step_bytes: dict[int, int] = {}
    for rows in ranks.values():
        for row in rows:
            s = int(row["step"])
            busy = sum(float(row.get(part, 0.0)) for part in _PARTS)
            step_ms[s] = max(step_ms.get(s, 0.0), busy)
            step_bytes[s] = step_bytes.get(s, 0) + int(row.get("bytes_sent", 0))
    steps = sorted(step_ms)
    summary: dict[str, Any] = {
        "ranks": len(ranks),
        "steps": len(steps),
        "step_ms": _stats([step_ms[s] for s in steps]),
        "total_ms": sum(step_ms.values()),
        "bytes_sent_per_step": _stats([float(step_bytes[s]) for s in steps]),
        "bytes_sent_total": sum(step_bytes.values()),
        "per_rank": [
            {"rank": rank, **{part: _stats([float(r.get(part, 0.0)) for r in rows])["median"] for part in _PARTS},
             "bytes_sent_per_step": _stats([float(r.get("bytes_sent", 0)) for r in rows])["median"]}
            for rank, rows in ranks.items()
        ],
    }
    if warmup is not None:
        summary["warmup_step_ms"] = _stats([step_ms[s] for s in steps if s < warmup])
        summary["async_step_ms"] = _stats([step_ms[s] for s in steps if s >= warmup])
    return summary


def format_run(summary: Mapping[str, Any], *, wall_s: float | None = None) -> str:
    """One line: steps, ranks, median step time (warm-up / asynchronous), bytes sent per step."""
    parts = [f"median step {summary['step_ms']['median']:.1f} ms"]
    for key, label in (("warmup_step_ms", "warm-up"), ("async_step_ms", "async")):
        value = summary.get(key, {}).get("median", float("nan"))
        if value == value:  # not NaN: there were such steps
            parts.append(f"{label} {value:.1f} ms")
    line = f"{summary['steps']} steps on {summary['ranks']} rank(s): {parts[0]}"
    if len(parts) > 1:
        line += f" ({', '.join(parts[1:])})"
    sent = summary["bytes_sent_per_step"]["median"]
    line += f", {format_bytes(int(sent) if sent == sent else 0)} sent per step"
    return line + (f"; wall {wall_s:.2f} s" if wall_s is not None else "")


def write_report(path: str | Path, per_rank_reports: PerRank, meta: Mapping[str, Any]) -> Path:
    """Write a run report (atomically): ``meta``, :func:`summarize_steps`'s summary and every row.

    ``meta`` (model, plan, steps, warm-up, ...) is stored as given; its ``warmup`` entry, when
    there is one, splits the summary into warm-up and asynchronous steps.
    """
    ranks = _by_rank(per_rank_reports)
    warmup = meta.get("warmup")
    data = {
        "kind": "run_report",
        "schema_version": SCHEMA_VERSION,
        "meta": dict(meta),
        "summary": summarize_steps(ranks, warmup=warmup if isinstance(warmup, int) else None),
        "ranks": [{"rank": rank, "steps": rows} for rank, rows in ranks.items()],
    }
    return write_json_atomic(path, data)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a run report written by :func:`write_report`.

    Raises:
        FileFormatError: missing, corrupt, not a run report, or of an unknown version.
    """
    return read_json(path, kind="run_report", schema_version=SCHEMA_VERSION,
                     fix="re-run 'asyncdiff-partition run' to write a new one")


def write_trace(path: str | Path, per_rank_spans: Mapping[int, Sequence[Mapping[str, Any]]] | Sequence[Any]) -> Path:
    """Write spans as a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing).

    One complete event (``"ph": "X"``) per span, ``ts`` and ``dur`` in microseconds from the
    earliest span, ``pid`` 0 and ``tid`` the rank, plus the metadata events that name each
    rank's track.
    """
    items = per_rank_spans.items() if isinstance(per_rank_spans, Mapping) else enumerate(per_rank_spans)
    ranks = {int(rank): list(spans) for rank, spans in sorted(items)}
    starts = [float(s["start_s"]) for spans in ranks.values() for s in spans]
    origin = min(starts) if starts else 0.0
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                                     "args": {"name": "asyncdiff-partition run"}}]
    for rank, spans in ranks.items():
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
        for span in spans:
            start, end = float(span["start_s"]), float(span["end_s"])
            event: dict[str, Any] = {"name": str(span["name"]), "ph": "X", "ts": round((start - origin) * 1e6, 3),
                                     "dur": round(max(end - start, 0.0) * 1e6, 3), "pid": 0, "tid": rank}
            extra = {k: v for k, v in span.items() if k not in ("name", "start_s", "end_s")}
            if extra:
                event["args"] = extra
            events.append(event)
    return write_json_atomic(path, {"traceEvents": events, "displayTimeUnit": "ms"})
