"""A bounded queue of requests, taken by the worker in batches of one call structure.

Example::

    batcher = Batcher(max_queue=64, max_rows=4, window_s=0.02)
    batcher.put(Job(key=(512, 512, 30, "cfg"), rows=1, spec=...))     # QueueFull when 64 wait
    batch = batcher.take()        # the first job, and for up to 20 ms every other job of its key (4 images at most)

A batch is one pipeline call, so its jobs must agree on everything that is one value per call
(size, steps, guidance, whether a negative prompt or an input image is given): that is the key.
Requests of other keys keep their place; the oldest request always leads the next batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batcher", "Closed", "Job", "QueueFull"]


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests already."""


class Closed(RuntimeError):
    """The queue takes no more requests (the service is draining or has stopped)."""


@dataclass(eq=False)
class Job:
    """One request on its way: its key (call structure), its images, its payload, how it is answered."""

    key: Hashable
    rows: int
    spec: Any
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: Callable[[int, int], None] | None = None  # (step done, steps): called from the worker
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """The bounded queue and its admission window (module docstring)."""

    def __init__(self, max_queue: int, max_rows: int, window_s: float):
        self.max_queue, self.max_rows, self.window_s = max_queue, max_rows, window_s
        self.waiting: list[Job] = []
        self.running: list[Job] = []  # the batch taken last, until finish()
        self.condition = threading.Condition()
        self.closed = False

    def put(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            QueueFull: ``max_queue`` requests wait already.
            Closed: after :meth:`close`.
        """
        with self.condition:
            if self.closed:
                raise Closed("the service is shutting down and takes no new requests")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this service queues "
                                f"(--max-queue {self.max_queue}); retry later")
            self.waiting.append(job)
            self.condition.notify_all()

    def take(self, poll_s: float = 0.5) -> list[Job] | None:
        """The next batch (the oldest job and others of its key), waiting for one; None once closed and empty."""
        with self.condition:
            while True:
                self.waiting = [j for j in self.waiting if not (j.cancelled.is_set() or j.future.done())]
                if self.waiting:
                    break
                if self.closed:
                    return None
                self.condition.wait(poll_s)
            deadline = time.monotonic() + self.window_s
            while True:
                batch = self._fits(self.waiting[0].key)
                left = deadline - time.monotonic()
                if sum(j.rows for j in batch) >= self.max_rows or left <= 0 or self.closed:
                    break
                self.condition.wait(left)
            self.waiting = [j for j in self.waiting if j not in batch]
            self.running = batch
            return batch

    def finish(self) -> None:
        """The batch taken last was answered."""
        with self.condition:
            self.running = []

    def idle(self) -> bool:
        """Nothing waits and nothing runs (taken and finished under one lock: no gap between them)."""
        with self.condition:
            return not self.waiting and not self.running

    def _fits(self, key: Hashable) -> list[Job]:
        batch, rows = [], 0
        for job in self.waiting:
            if job.key == key and rows + job.rows <= self.max_rows and not job.cancelled.is_set():
                batch.append(job)
                rows += job.rows
        return batch

    def depth(self) -> int:
        with self.condition:
            return len(self.waiting)

    def close(self) -> None:
        """Take no new requests; those waiting are still handed out."""
        with self.condition:
            self.closed = True
            self.condition.notify_all()
