"""The HTTP app: OpenAI's chat-completions route with the ``dyvte`` block, models, health, metrics and the chat page.

Built on FastAPI and uvicorn rather than LitServe (docs/design.md, "dyvte/serve: why not LitServe"): LitServe
0.2.19's OpenAI spec validates requests into a pydantic model that drops unknown fields (the per-request ``dyvte``
method and ``seed`` never reach the API), defaults ``temperature`` to 0.7, builds responses from fixed models with
no room for the top-level ``dyvte`` block (``finish_reason`` is always ``"stop"``), and its ``/health`` answers
plain text. The batching is :class:`dyvte.serve.runner.Batcher`; uvicorn's graceful shutdown drains in-flight
requests on SIGTERM (``timeout_graceful_shutdown``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dyvte.serve.errors import RequestError, error_body
from dyvte.serve.metrics import Metrics
from dyvte.serve.parse import MAX_IMAGE_PIXELS, parse_request
from dyvte.serve.runner import Batcher, Job, ServedModel

__all__ = ["ServeOptions", "State", "create_app", "STATIC"]

logger = logging.getLogger(__name__)

#: the chat page's folder (``GET /`` is its ``index.html``, ``GET /static/<file>`` its files)
STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class ServeOptions:
    """How the server runs (the launcher's options; see :func:`dyvte.cli.serve.run`)."""

    allow_local_files: bool = False
    max_batch_size: int = 8
    batch_timeout: float = 0.02
    max_image_pixels: int = MAX_IMAGE_PIXELS


class State:
    """What the app serves: set by the loader once the model is in memory (``/health`` is 503 before)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.metrics = Metrics()
        self.served: ServedModel | None = None
        self.batcher: Batcher | None = None
        self.failed: str | None = None  # the loader's error, if loading failed

    def ready(self, served: ServedModel) -> None:
        """Start the worker for ``served``."""
        self.batcher = Batcher(served, self.metrics, self.options.max_batch_size, self.options.batch_timeout)
        self.served = served

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()


def _error(err: RequestError, metrics: Metrics) -> JSONResponse:
    metrics.error(err.code)
    return JSONResponse(err.body(), status_code=err.status)


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    payload = {**base, "object": "chat.completion.chunk", "choices": [choice], **extra}
    return f"data: {json.dumps(payload)}\n\n"


def create_app(
    state: State, load: Callable[[], ServedModel] | None = None, on_ready: Callable[[], None] | None = None
) -> FastAPI:
    """The FastAPI app over ``state``; ``load`` (optional) runs in a background thread at startup and its model is
    served once it returns (``/health`` 503 until then); ``on_ready`` runs after that."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load is not None:

            def loader() -> None:
                try:
                    state.ready(load())
                except Exception as err:  # noqa: BLE001 - /health says it; the log has the traceback
                    logger.exception("loading the model failed")
                    state.failed = f"{type(err).__name__}: {err}"
                    return
                if on_ready is not None:
                    on_ready()

            threading.Thread(target=loader, name="dyvte-serve-loader", daemon=True).start()
        yield
        state.close()  # after uvicorn drained the in-flight requests
        logger.info("stopped: in-flight requests drained")

    app = FastAPI(title="dyvte", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        metrics.error(f"http_{err.status_code}")
        return JSONResponse(error_body(str(err.detail), None, f"http_{err.status_code}"), status_code=err.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.served is not None:
            return JSONResponse({"status": "ok"})
        if state.failed is not None:
            return JSONResponse({"status": "failed", "error": state.failed}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        served = state.served
        data = [] if served is None else [{"id": served.model_id, "object": "model", "created": 0, "owned_by": "dyvte"}]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        served = state.served
        text = await run_in_threadpool(metrics.render, None if served is None else served.shift_report)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return JSONResponse(error_body("the chat page is not installed (dyvte/serve/static/index.html)"), 404)
        return FileResponse(index)

    @app.get("/static/{name:path}")
    async def static(name: str) -> Response:
        path = (STATIC / name).resolve()
        if not path.is_relative_to(STATIC) or not path.is_file():  # nothing outside the page's folder
            return JSONResponse(error_body(f"no file {name!r} in the chat page's folder", None, "http_404"), 404)
        return FileResponse(path)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        served = state.served
        if served is None:
            return JSONResponse(error_body("the model is still loading: retry when GET /health says ok"), 503)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(
                RequestError(f"the request body is not valid JSON ({err}); send a JSON object", None, "invalid_json"),
                metrics,
            )
        limits = served.limits(state.options.allow_local_files, state.options.max_image_pixels)
        try:
            checked = await run_in_threadpool(parse_request, body, limits)
            tokens = await run_in_threadpool(served.prompt_tokens, checked)
        except RequestError as err:
            return _error(err, metrics)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        job = Job(checked, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), tokens)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": checked.model or served.model_id,
        }
        metrics.enter(1)
        state.batcher.submit(job)
        if checked.stream:
            return StreamingResponse(_stream(job, events, base, metrics), media_type="text/event-stream")
        try:
            return await _complete(job, events, base)
        finally:
            metrics.enter(-1)

    return app


async def _complete(job: Job, events: asyncio.Queue, base: dict[str, Any]) -> JSONResponse:
    """Wait for the job's events and answer one chat.completion (with the ``dyvte`` block)."""
    text: list[str] = []
    try:
        while True:
            event = await events.get()
            kind = event["kind"]
            if kind == "delta":
                text.append(event["text"])
            elif kind == "error":
                return JSONResponse(error_body(event["message"], None, "model_error", "server_error"), 500)
            elif kind == "end":
                message = {"role": "assistant", "content": "".join(text)}
                choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": event["finish_reason"]}
                payload = {**base, "object": "chat.completion", "choices": [choice], "usage": event["usage"]}
                return JSONResponse({**payload, "dyvte": event["dyvte"]})
    finally:
        job.cancelled.set()  # the client went away while waiting: the worker skips or ends the row


async def _stream(job: Job, events: asyncio.Queue, base: dict[str, Any], metrics: Metrics) -> AsyncIterator[str]:
    """Server-sent events: the first chunk (role, ``dyvte``), text deltas, the last chunk (finish reason, usage,
    ``dyvte``), ``[DONE]``. A client that goes away closes this generator: its row ends at the next step."""
    try:
        while True:
            event = await events.get()
            kind = event["kind"]
            if kind == "start":
                yield _chunk(base, {"role": "assistant", "content": ""}, dyvte=event["dyvte"])
            elif kind == "delta":
                yield _chunk(base, {"content": event["text"]})
            elif kind == "error":
                yield f"data: {json.dumps(error_body(event['message'], None, 'model_error', 'server_error'))}\n\n"
                return
            elif kind == "end":
                yield _chunk(base, {}, event["finish_reason"], usage=event["usage"], dyvte=event["dyvte"])
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled.set()
        metrics.enter(-1)
