"""The service: requests checked and queued, one worker thread running batches on the pipeline, answers and metrics.

Example::

    service = Service(options)
    service.start()                                   # pipeline loaded, ranks started, worker running
    job = service.submit(service.spec(request))       # RequestError: 400/404 (bad input), 429 (queue full), 503
    entries = await service.answer(job, disconnected) # the images; RequestError on timeout or failure
    service.close()                                   # worker stopped, ranks ended
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from asyncdiff_partition.app.serve.batcher import Batcher, Closed, Job, QueueFull
from asyncdiff_partition.app.serve.encoding import decode_image
from asyncdiff_partition.app.serve.generation import Cancelled, ImageSpec, Runner
from asyncdiff_partition.app.serve.metrics import Metrics
from asyncdiff_partition.app.serve.options import ServeOptions
from asyncdiff_partition.app.serve.schema import ImageRequest, RequestError
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.engine import EngineError
from asyncdiff_partition.runtime.ranks import RankError

__all__ = ["Service"]

_POLL_S = 0.1  # how often a waiting request looks at its client


class Service:
    """The generation service (module docstring); the HTTP layer is app/serve/routes.py."""

    def __init__(self, options: ServeOptions, *, cache_dir: str | None = None):
        self.options, self.cache_dir = options, cache_dir
        self.model_id = Path(options.model).name
        self.metrics = Metrics()
        self.batcher = Batcher(options.max_queue, options.max_batch, options.admission_window_ms / 1e3)
        self.runner: Runner | None = None
        self.worker: threading.Thread | None = None
        self.draining = False
        self.last_error: str | None = None

    # --- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the pipeline, start the ranks, start the worker thread."""
        self.runner = Runner(self.options, cache_dir=self.cache_dir)
        self.runner.start()
        self.metrics.timings(self.runner.setup)
        self.worker = threading.Thread(target=self._work, name="asyncdiff-serve-worker", daemon=True)
        self.worker.start()

    def begin_drain(self) -> None:
        """Take no new request (503); those queued or running still finish."""
        self.draining = True
        self.batcher.close()

    def idle(self) -> bool:
        return self.batcher.idle()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (after the call it runs) and end the ranks."""
        self.begin_drain()
        if self.worker is not None:
            self.worker.join(timeout_s)
        if self.runner is not None:
            self.runner.close()

    # --- requests -----------------------------------------------------------------------------

    def spec(self, request: ImageRequest) -> ImageSpec:
        """The images a request asks for, checked against the options and the pipeline.

        Raises:
            RequestError: 400 with the field at fault, or 404 for another model.
        """
        runner, options = self._runner(), self.options
        if request.model is not None and request.model != self.model_id:
            raise RequestError(f"model {request.model!r} is not served here; this service serves {self.model_id!r} "
                               "(GET /v1/models)", status=404, param="model", code="model_not_found")
        if request.n > options.max_n:
            raise RequestError(f"n must be at most {options.max_n} (--max-n), got {request.n}", param="n")
        width = height = None
        pixels = request.pixels()
        if pixels is not None:
            width, height = pixels
            scale = runner.scale()
            if width % scale or height % scale or not (scale <= width <= options.max_size and scale <= height <= options.max_size):
                raise RequestError(f"size must be WxH with each side a multiple of {scale} between {scale} and "
                                   f"{options.max_size} (--max-size), got {request.size!r}", param="size")
        steps = request.num_inference_steps or min(runner.default("num_inference_steps") or 50, options.max_steps)
        if steps > options.max_steps:
            raise RequestError(f"num_inference_steps must be at most {options.max_steps} (--max-steps), got {steps}",
                               param="num_inference_steps")
        for field, argument in (("negative_prompt", "negative_prompt"), ("guidance_scale", "guidance_scale"),
                                ("image", "image")):
            if getattr(request, field) is not None and not runner.takes(argument):
                raise RequestError(f"{type(runner.pipe).__name__} takes no {argument}; leave {field} out", param=field)
        image = None
        if request.image is not None:
            try:
                image = decode_image(request.image)
            except ValueError as error:
                raise RequestError(str(error), param="image") from None
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return ImageSpec(request.prompt, request.n, seed, width, height, steps, request.guidance_scale,
                         request.negative_prompt, image)

    def submit(self, spec: ImageSpec, progress: Callable[[int, int], None] | None = None) -> Job:
        """Queue a request's images.

        Raises:
            RequestError: 429 when the queue is full, 503 while draining or after the ranks failed for good.
        """
        if self.draining:
            raise RequestError("the service is shutting down; send the request to another replica", status=503,
                               kind="server_error", code="shutting_down")
        failed = self.failed()
        if failed:
            raise RequestError(failed, status=503, kind="server_error", code="ranks_failed")
        job = Job(key=spec.key(), rows=spec.n, spec=spec, progress=progress)
        try:
            self.batcher.put(job)
        except QueueFull as error:
            raise RequestError(str(error), status=429, kind="rate_limit_error", code="queue_full") from None
        except Closed as error:
            raise RequestError(str(error), status=503, kind="server_error", code="shutting_down") from None
        self.metrics.queue_depth.set(self.batcher.depth())
        return job

    async def answer(self, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> list[dict[str, Any]]:
        """Wait for ``job``'s images; a client that goes away or a request past its timeout cancels it.

        Raises:
            RequestError: 504 (timeout), 503 (the ranks failed), 400 (the pipeline refused the request).
            Cancelled: the client went away.
        """
        future = asyncio.wrap_future(job.future)
        deadline = job.submitted + self.options.request_timeout_s
        shape = job.spec.shape()
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                job.cancelled.set()
                raise RequestError(f"the request took longer than {self.options.request_timeout_s:g} s "
                                   "(--request-timeout) and was cancelled", status=504, kind="server_error",
                                   code="timeout")
            done, _ = await asyncio.wait({future}, timeout=min(_POLL_S, left))
            if done:
                entries = future.result()
                self.metrics.outcome("ok", shape, time.perf_counter() - job.submitted)
                return entries
            if await disconnected():
                self.cancel(job)
                raise Cancelled("the client went away")

    def refused(self, error: RequestError) -> None:
        """Count a request answered with an error (by its status)."""
        status = error.status
        self.metrics.outcome("timeout" if status == 504 else "rejected" if status == 429 else
                             "failed" if status >= 500 else "invalid")

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves its batch at the next step (counted once)."""
        if not job.cancelled.is_set():
            job.cancelled.set()
            self.metrics.outcome("cancelled")

    # --- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self.batcher.take()
            self.metrics.queue_depth.set(self.batcher.depth())
            if batch is None:
                return
            try:
                if batch:
                    self._run(batch)
            finally:
                self.batcher.finish()

    def _run(self, batch: list[Job]) -> None:
        runner = self._runner()
        starts = runner.engine.counts["starts"] if runner.engine is not None else 0
        self.metrics.batch.observe(sum(job.rows for job in batch))
        failure: Exception
        try:
            results = runner.run(batch)
        except Cancelled as error:
            results, failure = {}, error
        except (RankError, EngineError) as error:
            self.last_error = str(error) if isinstance(error, RankError) else self.last_error
            then = "they start again for the next request" if isinstance(error, RankError) else "restart the service"
            results, failure = {}, RequestError(f"the engine's ranks failed while running this request: {error}; {then}",
                                                status=503, kind="server_error", code="ranks_failed")
        except (AsyncDiffError, ValueError, TypeError) as error:  # the pipeline refused the call's arguments
            results, failure = {}, RequestError(f"the pipeline refused the request: {error}")
        except Exception as error:  # noqa: BLE001 - answered as a 500, the worker keeps serving
            results, failure = {}, RequestError(f"the pipeline failed: {type(error).__name__}: {error}", status=500,
                                                kind="server_error")
        else:
            failure = Cancelled("the client went away")
        for job in batch:
            if job.future.done():
                continue
            if job in results:
                job.future.set_result(results[job])
            else:
                job.future.set_exception(failure)
        if runner.engine is not None:
            if runner.engine.counts["starts"] > starts and starts:
                self.metrics.restarts.inc()
            self.metrics.timings(runner.engine.timings)
            if runner.engine.pool is not None:
                try:
                    self.metrics.ranks(runner.reports())
                except (RankError, EngineError):
                    pass  # found by the next call

    # --- state --------------------------------------------------------------------------------

    def failed(self) -> str | None:
        """Why the service cannot run requests any more (the ranks failed more often than --restarts), else None."""
        engine = self.runner.engine if self.runner is not None else None
        if engine is not None and engine.failures > engine.restarts:
            return (f"the ranks failed {engine.failures} times in a row, more than --restarts {engine.restarts}; "
                    f"last error: {self.last_error}; restart the service")
        return None

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of ``GET /health``: 200 when every rank is alive (or starts at the next request)."""
        body: dict[str, Any] = {"status": "ok", "model": self.model_id, "devices": self.options.parallel.devices,
                                "queue": self.batcher.depth(), "ranks": []}
        engine = self.runner.engine if self.runner is not None else None
        if self.runner is None:
            return 503, {**body, "status": "starting"}
        if self.draining:
            return 503, {**body, "status": "draining", "reason": "the service is shutting down"}
        failed = self.failed()
        if failed:
            return 503, {**body, "status": "failed", "reason": failed}
        if engine is None:
            return 200, body
        body["failures"] = engine.failures
        if engine.pool is None:
            return 200, {**body, "status": "ok", "reason": "the ranks start at the next request"}
        body["ranks"] = [{"rank": r, "pid": p.pid, "alive": p.exitcode is None} for r, p in enumerate(engine.pool.processes)]
        dead = [r for r in body["ranks"] if not r["alive"]]
        if dead:
            return 503, {**body, "status": "degraded", "reason": f"rank {dead[0]['rank']} (pid {dead[0]['pid']}) is "
                         "not alive; new ranks start at the next request"}
        return 200, body

    def _runner(self) -> Runner:
        if self.runner is None:
            raise RequestError("the service is starting", status=503, kind="server_error")
        return self.runner

