"""``create_app``: the HTTP face of a ``Scheduler`` — FastAPI routes, limits, authentication and metrics.

The model is fixed when the app is made: no request names a file. Every request's settings are checked (pydantic,
then the model's plan in ``Scheduler.submit``) before any of its images joins the batch; errors are one line under
``detail``. The app's lifespan starts the scheduler and, at shutdown, stops it within what is left of the grace
period (``begin_shutdown`` marks the start of that period: new requests get 503 from then on).
"""

# no `from __future__ import annotations`: FastAPI and pydantic resolve the request model defined in create_app
import asyncio
import base64
import hmac
import io
import json
import time
import typing
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from runtime.errors import GenerationError
from runtime.generation.output import png_bytes
from runtime.pipeline import Pipeline
from runtime.sampling.settings import NAMES, SETTINGS, RunSettings
from serve.metrics import CONTENT_TYPE, Metrics
from serve.scheduler import Cancelled, ImageResult, QueueFull, Scheduler

MAX_BODY_BYTES = 16 * 1024  # a request is a few settings; this is generous
RETRY_AFTER_FULL_S = 1  # 429: the queue drains continuously
RETRY_AFTER_STOPPING_S = 5  # 503: this process is going away; another replica (or its restart) will answer
DISCONNECT_POLL_S = 0.1
METRICS_SYNC_S = 1.0
OPEN_PATHS = ("/healthz",)  # everything else needs the API key when one is set
IMAGES_PATH = "/v1/images"
MAX_INDEX = 2**53 - 1  # seed and start_index: exact in every JSON client, far inside int64 image indices


def _one_line(errors) -> str:
    """pydantic's validation errors as one line: ``n: Input should be less than or equal to 64; ...``."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            msg = f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
            loc = []
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def settings_fields() -> dict[str, tuple]:
    """The request's run-settings fields, derived from ``RunSettings``: its types, default None (the model's
    recommendation, else the runtime's default) and help. The interval is a JSON array of two integers."""
    hints = typing.get_type_hints(RunSettings)
    out = {}
    for f in SETTINGS:
        kind = hints[f.name]
        extra = {"ge": 1} if f.name == "steps" else {}
        if typing.get_origin(typing.get_args(kind)[0]) is tuple:
            kind, extra = list[int] | None, {"min_length": 2, "max_length": 2}
        out[f.name] = (kind, Field(None, description=f.metadata["help"], **extra))
    return out


def _error(status: int, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


@dataclass
class _State:
    stopping: bool = False
    stop_started: float | None = None  # time.monotonic() at begin_shutdown


def begin_shutdown(app: FastAPI) -> None:
    """Stop admitting requests (503 from now on) and start the grace period. Safe in a signal handler."""
    state: _State = app.state.serve
    if not state.stopping:
        state.stop_started = time.monotonic()
        state.stopping = True


class _Guard:
    """Pure ASGI middleware (keeps ``request.is_disconnected()`` working): the API key, the body limit, and the
    status and latency of ``POST /v1/images`` for the metrics."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.api_key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        # compare_digest on bytes: the same time for every wrong key of a length
        return given is not None and hmac.compare_digest(given, self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500
        timed = scope["path"] == IMAGES_PATH and scope["method"] == "POST"

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status)
        finally:
            if timed:
                self.metrics.observe_request(status, time.monotonic() - start)

    async def _handle(self, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            response = JSONResponse(
                {"detail": "a valid API key is needed (Authorization: Bearer KEY or X-API-Key: KEY)"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        too_large = _error(413, f"the request body is larger than {self.max_body_bytes} bytes")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await too_large(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        # Read the body here (at most max_body_bytes + one chunk), then replay it: also limits chunked bodies.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)


def create_app(scheduler: Scheduler, pipeline: Pipeline, *, api_key: str | None, max_images: int,
               max_body_bytes: int = MAX_BODY_BYTES, deadline_s: float, grace_s: float = 30.0) -> FastAPI:
    """The service's ASGI app over a (not yet started) ``scheduler`` that runs ``pipeline``.

    ``api_key``: required on every endpoint but ``/healthz`` when set. ``max_images``: images per request.
    ``max_body_bytes``: larger bodies get 413. ``deadline_s``: a request not done by then is cancelled (504).
    ``grace_s``: at shutdown, how long in-flight images may take to finish (counted from ``begin_shutdown``).
    The app's lifespan starts the scheduler and stops it.
    """
    contract = pipeline.contract
    sha256 = pipeline.sha256
    names = contract.class_names
    metrics = Metrics(scheduler, getattr(scheduler, "max_batch", 256))
    state = _State()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()

        async def sync_metrics() -> None:
            while True:
                await asyncio.sleep(METRICS_SYNC_S)
                metrics.sync()

        syncing = asyncio.ensure_future(sync_metrics())
        try:
            yield
        finally:
            syncing.cancel()
            begin_shutdown(app)
            left = max(0.0, grace_s - (time.monotonic() - state.stop_started))
            await run_in_threadpool(scheduler.stop, left)

    app = FastAPI(title="ddpm-serve", version="1", lifespan=lifespan,
                  description="Generate images from one DDPM model; requests share the batch (continuous batching).")
    app.state.serve = state
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    class ImagesRequest(BaseModel):
        """Run settings, as ``ddpm-generate`` takes them; settings left out take the model's recommendations."""

        model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
        n: int = Field(1, ge=1, le=max_images, description="Number of images: start_index … start_index+n−1.")
        classes: int | str | None = Field(None, alias="class", description="Class index or case-insensitive name "
                                          "for every image; default: classes cycle over the image indices.")
        seed: int = Field(0, ge=0, le=MAX_INDEX, description="Image k depends only on (seed, k) and the settings.")
        start_index: int = Field(0, ge=0, le=MAX_INDEX, description="Index of the first image.")
        format: Literal["png", "npz"] = Field("png", description="png: JSON with base64 PNGs; npz: binary npz.")

        @field_validator("classes", mode="before")
        @classmethod
        def _class(cls, v):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, str))):
                raise PydanticCustomError("class_type", "must be a class index or name, got {value}",
                                         {"value": json.dumps(v, default=str)})
            return v

    ImagesRequest = create_model("ImagesRequest", __base__=ImagesRequest, __doc__=ImagesRequest.__doc__,
                                 **settings_fields())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _one_line(exc.errors()))

    def encode(results: list[ImageResult], plan, fmt: str) -> Response:
        meta = {"model_sha256": sha256, "provider": pipeline.provider, "settings": plan.run_settings(), "images": [
            {"index": r.index, "seed": r.seed, "class": r.label,
             "class_name": names[r.label] if r.label is not None and names else None} for r in results]}
        if fmt == "npz":
            buf = io.BytesIO()
            np.savez(buf, arr_0=np.stack([r.image for r in results]), meta=np.array(json.dumps(meta)))
            return Response(buf.getvalue(), media_type="application/octet-stream",
                            headers={"Content-Disposition": 'attachment; filename="samples.npz"'})
        for record, r in zip(meta["images"], results):
            record["png_base64"] = base64.b64encode(png_bytes(r.image)).decode("ascii")
        return JSONResponse(meta)

    async def client_gone(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    @app.post(IMAGES_PATH, responses={
        200: {"content": {"application/octet-stream": {}}, "description": "JSON (format png) or npz bytes"},
        401: {"description": "API key missing or wrong"}, 413: {"description": "body too large"},
        422: {"description": "bad settings (one line under detail)"},
        429: {"description": "queue full; retry after Retry-After seconds"},
        500: {"description": "the model produced NaN/Inf for this request"},
        503: {"description": "the server is stopping"}, 504: {"description": "deadline passed; request cancelled"}})
    async def images(body: ImagesRequest, request: Request) -> Response:
        """Generate ``n`` images with the given settings; they join the running batch at once.

        Response (``format`` png): ``{"model_sha256", "provider", "settings": {the run settings as run.json records
        them}, "images": [{"index", "seed", "class", "class_name", "png_base64"}]}`` in index
        order. ``format`` npz: ``application/octet-stream``, an npz with ``arr_0`` (uint8 n×H×W×C, like
        ``samples.npz``) and ``meta`` (the same JSON without the PNGs, as a string). Image k equals
        ``ddpm-generate``'s image k for the same seed and settings.
        """
        start = time.monotonic()
        if state.stopping:
            return _error(503, "the server is stopping", RETRY_AFTER_STOPPING_S)
        try:
            settings = RunSettings(**{name: getattr(body, name) for name in NAMES})
            job = await run_in_threadpool(
                lambda: scheduler.submit(body.n, seed=body.seed, start_index=body.start_index, classes=body.classes,
                                         settings=settings))
        except GenerationError as e:  # SettingsError: settings the model or the sampler cannot take
            return _error(422, str(e))
        except QueueFull as e:
            return _error(429, str(e) or "the queue is full; retry later", RETRY_AFTER_FULL_S)
        except Cancelled:
            return _error(503, "the server is stopping", RETRY_AFTER_STOPPING_S)
        done = asyncio.ensure_future(job.wait())
        done.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, also when abandoned
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({done, gone}, timeout=max(0.0, deadline_s - (time.monotonic() - start)),
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not state.stopping:
                raise
            # uvicorn cancels what is still running when the grace period ends: answer instead of a bare 500
            return _error(503, "the server stopped before this request finished (grace period over)",
                          RETRY_AFTER_STOPPING_S)
        finally:  # the job leaves the batch unless it finished: deadline, client gone, or cancelled above
            gone.cancel()
            if not done.done():
                job.cancel()
                done.cancel()
        if not done.done() or done.cancelled():
            if gone.done() and not gone.cancelled():
                return _error(499, "client closed the request")  # nobody reads it; for the log and metrics
            return _error(504, f"not done within the deadline of {deadline_s:g} s; the request was cancelled")
        try:
            results = done.result()
        except GenerationError as e:
            return _error(500, str(e))
        except Cancelled:
            return _error(503, "the server stopped before this request finished", RETRY_AFTER_STOPPING_S)
        return await run_in_threadpool(encode, results, job.plan, body.format)

    @app.get("/v1/model")
    async def model() -> dict:
        """The model's sampling contract, its provider and SHA-256, the run settings it recommends (what a request
        that gives none runs with) and this server's per-request image limit."""
        return {"contract": contract.to_dict(), "provider": pipeline.provider, "model_sha256": sha256,
                "recommended_settings": pipeline.plan().run_settings(), "max_images": max_images}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """``{"status": "ok"}``, or 503 ``{"status": "stopping"}`` once shutdown has begun. Needs no API key."""
        if state.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_STOPPING_S)})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text: queue depth, images in flight, images done, batch fill per predictor call, latency."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
