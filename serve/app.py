"""``create_app``: the HTTP face of a ``Scheduler`` — FastAPI routes and the OpenAPI document of every answer they
give; the key, the body and the request metrics are ``serve.guard``'s.

The model is fixed when the app is made: no request names a file. Every request's settings are checked (pydantic,
then the model's plan in ``Scheduler.submit``) before any of its images joins the batch; errors are one line under
``detail``. The app's lifespan starts the scheduler and, at shutdown, stops it within what is left of the grace
period (``begin_shutdown`` marks the start of that period: new requests get 503 from then on).
"""

# no `from __future__ import annotations`: FastAPI and pydantic resolve the request model defined in create_app
import asyncio
import base64
import io
import json
import time
import typing
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from runtime.errors import GenerationError
from runtime.images import png_bytes
from runtime.pipeline import Pipeline
from runtime.sampling.settings import NAMES, SETTINGS, RunSettings, help_text, taking
from serve.errors import Cancelled, QueueFull
from serve.guard import CLIENT_CLOSED, IMAGES_PATH, MAX_BODY_BYTES, Guard, error
from serve.metrics import CONTENT_TYPE, Metrics
from serve.scheduler import ImageResult, Scheduler

RETRY_AFTER_FULL_S = 1  # 429: the queue drains continuously
RETRY_AFTER_STOPPING_S = 5  # 503: this process is going away; another replica (or its restart) will answer
DISCONNECT_POLL_S = 0.1
PLAYGROUND = Path(__file__).with_name("playground.html")
MAX_INDEX = 2**53 - 1  # seed and start_index: exact in every JSON client, far inside int64 image indices


def _one_line(errors) -> str:
    """pydantic's validation errors as one line: ``n: Input should be less than or equal to 64; ...``."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        msg = e.get("msg", "invalid")  # a body that is not a JSON object never gets here: serve.guard.body_problem
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def settings_fields() -> dict[str, tuple]:
    """The request's run-settings fields, derived from ``RunSettings``: its types, default None (the model's
    recommendation, else the runtime's default), help and, for a sampler-specific setting, ``x-samplers`` (the samplers
    it applies to). The interval is a JSON array of two integers."""
    hints = typing.get_type_hints(RunSettings)
    out = {}
    for f in SETTINGS:
        kind = hints[f.name]
        lo, hi = f.metadata["bounds"]  # documented in the schema; the setting's rule enforces them (one line, 422)
        schema = {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}
        if f.metadata["specific"]:  # the samplers it applies to (the playground greys it out for the others)
            schema["x-samplers"] = taking(f.name)
        extra = {"json_schema_extra": schema}
        inner = typing.get_args(kind)[0]
        if typing.get_origin(inner) is tuple:  # a JSON array: of a fixed length (the interval) or any (timesteps)
            items = typing.get_args(inner)
            length = {} if Ellipsis in items else {"max_length": len(items)}
            kind, extra = list[int] | None, {"min_length": 1 if Ellipsis in items else len(items), **length}
        out[f.name] = (kind, Field(None, description=help_text(f.name), **extra))
    return out


class Problem(BaseModel):
    """Every error answer: one line under ``detail``."""

    detail: str


class ImageRecord(BaseModel):
    index: int
    seed: int
    class_: int | None = Field(alias="class")
    class_name: str | None
    png_base64: str


class ImagesResponse(BaseModel):
    model_sha256: str
    provider: str
    precision: str = Field(description="What the network computed in: fp32, fp16 or bf16.")
    settings: dict = Field(description="The run settings, as run.json records them.")
    images: list[ImageRecord]


ERRORS = {  # status -> when the server answers it; every one is a Problem
    401: "API key missing or wrong, or sent in the URL (only when the server has a key)",
    413: "the body is larger than the server's limit",
    422: "bad settings, or a body that is not a JSON object (one line under detail)",
    429: "the queue is full; retry after Retry-After seconds",
    499: "the client closed the connection before its images were done (for the log and metrics; nobody reads it)",
    500: "the model produced NaN or Inf for this request's images",
    503: "the server is stopping; retry after Retry-After seconds (another replica, or this one restarted)",
    504: "the request's deadline passed; it was cancelled",
}


def problems(*statuses: int) -> dict:
    """``responses=`` for FastAPI: the given error statuses, each documented with the ``Problem`` body."""
    return {code: {"model": Problem, "description": ERRORS[code]} for code in statuses}


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


def create_app(scheduler: Scheduler, pipeline: Pipeline, *, api_key: str | None, max_images: int,
               max_body_bytes: int = MAX_BODY_BYTES, deadline_s: float, grace_s: float = 30.0) -> FastAPI:
    """The service's ASGI app over a (not yet started) ``scheduler`` that runs ``pipeline``.

    ``api_key``: required on every endpoint but ``/healthz`` when set. ``max_images``: images per request.
    ``max_body_bytes``: larger bodies get 413. ``deadline_s``: a request not done by then is cancelled (504).
    ``grace_s``: at shutdown, how long in-flight images may take to finish (counted from ``begin_shutdown``).
    The app's lifespan starts the scheduler and stops it.
    """
    metrics = Metrics(scheduler, getattr(scheduler, "max_batch", 256))
    state = _State()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            begin_shutdown(app)
            left = max(0.0, grace_s - (time.monotonic() - state.stop_started))
            await run_in_threadpool(scheduler.stop, left)

    app = FastAPI(title="ddpm-serve", version="1", lifespan=lifespan,
                  description="Generate images from one DDPM model; requests share the batch (continuous batching).")
    app.state.serve = state
    # The key is checked by Guard; these only document it (auto_error=False: they never answer themselves).
    guarded = [] if api_key is None else [Security(HTTPBearer(auto_error=False)),
                                          Security(APIKeyHeader(name="X-API-Key", auto_error=False))]
    locked = (401,) if api_key is not None else ()
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, _one_line(exc.errors()))

    _images_route(app, scheduler, pipeline, state, _request_model(max_images), guarded, locked, deadline_s)
    _other_routes(app, pipeline, state, metrics, guarded, locked, max_images)
    app.openapi = lambda: _openapi(app)
    return app


def _request_model(max_images: int) -> type[BaseModel]:
    """The ``/v1/images`` request body: n, class, seed, start_index and format, then every run setting."""

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

    return create_model("ImagesRequest", __base__=ImagesRequest, __doc__=ImagesRequest.__doc__,
                        **settings_fields())


def _encode(pipeline: Pipeline, results: list[ImageResult], plan, fmt: str) -> Response:
    """A request's answer: JSON with base64 PNGs, or npz bytes, with the model, provider and settings."""
    names = pipeline.contract.class_names
    meta = {"model_sha256": pipeline.sha256, "provider": pipeline.provider, "precision": pipeline.precision,
            "settings": plan.run_settings(),
            "images": [{"index": r.index, "seed": r.seed, "class": r.label,
                        "class_name": names[r.label] if r.label is not None and names else None} for r in results]}
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, arr_0=np.stack([r.image for r in results]), meta=np.array(json.dumps(meta)))
        return Response(buf.getvalue(), media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="samples.npz"'})
    for record, r in zip(meta["images"], results):
        record["png_base64"] = base64.b64encode(png_bytes(r.image)).decode("ascii")
    return JSONResponse(meta)


async def _client_gone(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _images_route(app: FastAPI, scheduler: Scheduler, pipeline: Pipeline, state: _State,
                  ImagesRequest: type[BaseModel], guarded: list, locked: tuple, deadline_s: float) -> None:
    """``POST /v1/images``: a request joins the running batch; its answer, or the one status that says why not."""

    @app.post(IMAGES_PATH, dependencies=guarded, response_class=JSONResponse, responses={
        200: {"model": ImagesResponse, "description": "JSON with base64 PNGs (format png), or npz bytes (format npz)",
              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        **problems(*locked, 413, 422, 429, 499, 500, 503, 504)})
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
            return error(503, "the server is stopping", RETRY_AFTER_STOPPING_S)
        try:
            settings = RunSettings(**{name: getattr(body, name) for name in NAMES})
            job = await run_in_threadpool(
                lambda: scheduler.submit(body.n, seed=body.seed, start_index=body.start_index, classes=body.classes,
                                         settings=settings))
        except GenerationError as e:  # SettingsError: settings the model or the sampler cannot take
            return error(422, str(e))
        except QueueFull as e:
            return error(429, str(e) or "the queue is full; retry later", RETRY_AFTER_FULL_S)
        except Cancelled:
            return error(503, "the server is stopping", RETRY_AFTER_STOPPING_S)
        done = asyncio.ensure_future(job.wait())
        done.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, also when abandoned
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({done, gone}, timeout=max(0.0, deadline_s - (time.monotonic() - start)),
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not state.stopping:
                raise
            # uvicorn cancels what is still running when the grace period ends: answer instead of a bare 500
            return error(503, "the server stopped before this request finished (grace period over)",
                         RETRY_AFTER_STOPPING_S)
        finally:  # the job leaves the batch unless it finished: deadline, client gone, or cancelled above
            gone.cancel()
            if not done.done():
                job.cancel()
                done.cancel()
        if not done.done() or done.cancelled():
            if gone.done() and not gone.cancelled():
                return error(CLIENT_CLOSED, "client closed the request")  # nobody reads it; for the log and metrics
            return error(504, f"not done within the deadline of {deadline_s:g} s; the request was cancelled")
        try:
            results = done.result()
        except GenerationError as e:
            return error(500, str(e))
        except Cancelled:
            return error(503, "the server stopped before this request finished", RETRY_AFTER_STOPPING_S)
        return await run_in_threadpool(_encode, pipeline, results, job.plan, body.format)


def _other_routes(app: FastAPI, pipeline: Pipeline, state: _State, metrics: Metrics, guarded: list, locked: tuple,
                  max_images: int) -> None:
    """The model card, the playground page, the health check and the metrics."""

    @app.get("/v1/model", dependencies=guarded, responses=problems(*locked))
    async def model() -> dict:
        """The model's sampling contract, its provider, the precision it computes in (fp32, fp16 or bf16) and its
        SHA-256, the run settings it recommends (what a request that gives none runs with) and this server's
        per-request image limit."""
        return {"contract": pipeline.contract.to_dict(), "provider": pipeline.provider, "precision": pipeline.precision,
                "model_sha256": pipeline.sha256, "recommended_settings": pipeline.plan().run_settings(),
                "max_images": max_images}

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        """The playground page: the model card, the settings, Generate, the images (plain HTML and JavaScript that
        calls this API; nothing is fetched from elsewhere)."""
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/healthz", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}},
                                    503: {"description": "shutdown has begun", "content": {"application/json": {
                                        "example": {"status": "stopping"}}}}})
    async def healthz() -> JSONResponse:
        """``{"status": "ok"}``, or 503 ``{"status": "stopping"}`` once shutdown has begun. Needs no API key."""
        if state.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_STOPPING_S)})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=guarded, response_class=Response,  # no media type: the one below only
             responses={200: {"description": "Prometheus text exposition",
                              "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}, **problems(*locked)})
    async def prometheus() -> Response:
        """Prometheus text: queue depth, images in flight, images done, batch fill per predictor call, latency."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, plus what its route declarations cannot say (cached on the app)."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        document["paths"][IMAGES_PATH]["post"]["requestBody"]["required"] = False  # empty: {}
        app.openapi_schema = document
    return app.openapi_schema
