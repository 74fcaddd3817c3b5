"""The HTTP API (FastAPI): OpenAI's image generation route, health, models and Prometheus metrics.

=====================================  ====================================================================
route                                  answer
=====================================  ====================================================================
``POST /v1/images/generations``        ``{"created", "data": [{"b64_json", "seed"}, ...]}``; with
                                       ``"stream": true`` server-sent events: ``progress`` per step, then
                                       the result, then ``[DONE]``
``GET /health``                        200 when every rank is alive; 503 and ``reason`` otherwise
``GET /v1/models``                     the one model served
``GET /metrics``                       Prometheus text (app/serve/metrics.py)
=====================================  ====================================================================

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from asyncdiff_partition.app.serve.generation import Cancelled
from asyncdiff_partition.app.serve.metrics import CONTENT_TYPE
from asyncdiff_partition.app.serve.schema import ImageRequest, RequestError, error_body
from asyncdiff_partition.app.serve.service import Service

__all__ = ["make_app"]

_CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (nobody reads it)


def make_app(service: Service) -> FastAPI:
    """The FastAPI application of ``service`` (module docstring)."""
    app = FastAPI(title="asyncdiff-partition", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        refusal = _validation_error(error)
        service.refused(refusal)
        return JSONResponse(refusal.body(), status_code=refusal.status)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        service.refused(error)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.post("/v1/images/generations", response_model=None)
    async def generations(body: ImageRequest, request: Request) -> Any:
        spec = service.spec(body)
        if body.stream:
            return _stream(service, spec)
        job = service.submit(spec)
        try:
            entries = await service.answer(job, request.is_disconnected)
        except Cancelled:
            return Response(status_code=_CLIENT_CLOSED)
        return {"created": int(time.time()), "data": entries}

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "asyncdiff-partition"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        service.metrics.queue_depth.set(service.batcher.depth())
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _stream(service: Service, spec: Any) -> StreamingResponse:
    """Server-sent events of one request: ``progress`` after each step, then the result (or an ``error``)."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    def progress(step: int, total: int) -> None:  # called from the worker thread
        with contextlib.suppress(RuntimeError):  # the event loop closed: nobody listens
            loop.call_soon_threadsafe(steps.put_nowait, (step, total))

    job = service.submit(spec, progress=progress)

    async def never() -> bool:  # a disconnect ends this generator (the response's next write fails)
        return False

    async def events() -> AsyncIterator[str]:
        answer = asyncio.ensure_future(service.answer(job, never))
        try:
            while not answer.done():
                step = asyncio.ensure_future(steps.get())
                await asyncio.wait({answer, step}, return_when=asyncio.FIRST_COMPLETED)
                if step.done():
                    done, total = step.result()
                    yield f"event: progress\ndata: {json.dumps({'step': done, 'steps': total})}\n\n"
                else:
                    step.cancel()
            try:
                entries = answer.result()
            except RequestError as error:
                service.refused(error)
                yield f"event: error\ndata: {json.dumps(error.body())}\n\n"
                return
            yield f"data: {json.dumps({'created': int(time.time()), 'data': entries})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not job.future.done():
                service.cancel(job)
            answer.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _validation_error(error: RequestValidationError) -> RequestError:
    """pydantic's first complaint as one OpenAI error (400)."""
    first = error.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return RequestError("the request body is not valid JSON", param=None, code="invalid_json")
    if kind == "extra_forbidden":
        return RequestError(f"unknown field {param!r}; the fields are: {', '.join(ImageRequest.model_fields)}",
                            param=param, code="unknown_field")
    if kind == "missing":
        return RequestError(f"{param} is required", param=param, code="missing_field")
    if kind == "model_attributes_type":
        return RequestError("the request body must be a JSON object", code="invalid_body")
    return RequestError(f"{param}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")
