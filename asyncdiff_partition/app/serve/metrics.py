"""The service's Prometheus metrics (``GET /metrics``), in a registry of its own.

==============================================  =========  ======================================
metric                                          type       labels
==============================================  =========  ======================================
asyncdiff_serve_queue_depth                     gauge      -
asyncdiff_serve_requests_total                  counter    outcome: ok, cancelled, timeout,
                                                           rejected (429), invalid (4xx), failed
asyncdiff_serve_request_seconds                 histogram  shape: WxH/steps
asyncdiff_serve_batch_images                    histogram  -
asyncdiff_serve_setup_seconds                   gauge      stage: load, start, record, compile, ship
asyncdiff_serve_rank_step_seconds               gauge      rank, kind: compute, wait (median step
                                                           of the last call, from the engine)
asyncdiff_serve_rank_restarts_total             counter    -
==============================================  =========  ======================================
"""

from __future__ import annotations

import statistics
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "OUTCOMES", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("ok", "cancelled", "timeout", "rejected", "invalid", "failed")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    """The metrics of one service (module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("asyncdiff_serve_queue_depth", "Requests waiting for a batch", registry=r)
        self.requests = Counter("asyncdiff_serve_requests", "Requests answered, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.latency = Histogram("asyncdiff_serve_request_seconds", "Time from arrival to answer of answered requests",
                                 ["shape"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("asyncdiff_serve_batch_images", "Images per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 16),
                               registry=r)
        self.setup = Gauge("asyncdiff_serve_setup_seconds", "Set-up time by stage (latest)", ["stage"], registry=r)
        self.step = Gauge("asyncdiff_serve_rank_step_seconds", "Median step time of each rank in the last call",
                          ["rank", "kind"], registry=r)
        self.restarts = Counter("asyncdiff_serve_rank_restarts", "Times the ranks were started again", registry=r)

    def outcome(self, outcome: str, shape: str | None = None, seconds: float | None = None) -> None:
        self.requests.labels(outcome).inc()
        if shape is not None and seconds is not None:
            self.latency.labels(shape).observe(seconds)

    def timings(self, timings: dict[str, float]) -> None:
        """Set-up times (``load_s``, ``start_s``, the engine's ``record_s``, ``compile_s``, ``ship_s``)."""
        for name, seconds in timings.items():
            if name.endswith("_s") and name not in ("call_s", "sampling_s", "prepare_s"):
                self.setup.labels(name.removesuffix("_s")).set(seconds)

    def ranks(self, reports: dict[int, dict[str, Any]]) -> None:
        """Each rank's median compute and wait per step, from the engine's reports."""
        for rank, report in reports.items():
            rows = [row for rows in report.get("steps", {}).values() for row in rows]
            for kind in ("compute", "wait"):
                values = [row[f"{kind}_ms"] for row in rows if f"{kind}_ms" in row]
                if values:
                    self.step.labels(str(rank), kind).set(statistics.median(values) / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)
