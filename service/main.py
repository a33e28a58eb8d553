"""The FastAPI app: `create_app(settings)`; the lifespan loads the bundle and warms it up.

Run with `vae serve`, or `uvicorn service.main:create_app --factory`. Importing this module loads
nothing and never imports torch.
"""

import asyncio
import gc
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.batching import QueueFull
from service.bundle import BundleError
from service.memory import limit_arenas
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import document
from service.reload import install_sighup, load_model, publish, remove_sighup
from service.routes import admin, decode, elbo, encode, health, model, reconstruct, sample
from service.routes.demo import router as demo_router
from service.routes.interpolate import router as interpolate_router
from service.routes.v2 import router as v2_router
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """
Serve a variational auto-encoder bundle (docs/BUNDLE.md) with onnxruntime: encode images to
q(z|x), decode or sample latents to images, and score images by their ELBO / IWAE bound against
the bundle's calibration to flag anomalies. Image endpoints take multipart files, JSON (base64
files or pixel arrays in [0, 1]) or a raw image body; options go in the query string.
"""
MAX_ECHOED_INPUT = 200  # characters of a rejected value echoed back in a 422
# JSON is parsed holding the GIL, about 40 ms a megabyte of numbers on this project's 2 cores, so a
# larger body would stall every other request; 1 MiB holds 64 MNIST images as pixel arrays, and
# large inputs have faster ways in (files, a raw image, .npy)
MAX_JSON_BYTES = 1 << 20


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes` (JSON: MAX_JSON_BYTES), by Content-Length up front
    or while streaming.

    Starlette ships a limiter too, but its 413 does not name the limit or the setting.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self, size: str, limit: int) -> str:
        if limit < self.max_bytes:
            return (
                f"JSON request body {size} over the limit of {limit} bytes for JSON; send "
                "large inputs as files (multipart), a raw image or an application/x-npy body"
            )
        return f"request body {size} over the limit of {limit} bytes (VAE_MAX_UPLOAD_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
        is_json = kind == b"application/json" or kind.endswith(b"+json")
        limit = min(self.max_bytes, MAX_JSON_BYTES) if is_json else self.max_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            detail = self._detail(f"is {int(length)} bytes,", limit)
            response = JSONResponse({"detail": detail}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # raised inside the route's body read: the app's handler renders the 413
                    raise HTTPException(status_code=413, detail=self._detail("is", limit))
            return message

        await self.app(scope, limited_receive, send)


class HeadMiddleware:
    """HEAD on any GET route: answered as the GET without its body (RFC 9110 9.3.2), so the
    routes and the OpenAPI document name GET alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _json_safe(value: Any) -> bool:
    try:
        return len(json.dumps(value, allow_nan=False)) <= MAX_ECHOED_INPUT
    except (TypeError, ValueError):
        return False


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body, minus echoed inputs that are huge or not JSON (NaN, infinity)."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        error = dict(error)
        if "input" in error and not _json_safe(error["input"]):
            error.pop("input")
        if "ctx" in error:
            error["ctx"] = {
                key: value if _json_safe(value) else str(value)
                for key, value in error["ctx"].items()
            }
        errors.append(error)
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


async def disconnect_handler(request: Request, exc: Exception) -> Response:
    """A client that hung up before its request was read: one log line, not a traceback."""
    peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    log.info("%s disconnected before sending all of %s %s", peer, request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request", for the metrics only


async def busy_handler(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After when the micro-batch queue is full."""
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})


def drain_first(app: FastAPI, delay_s: float) -> Callable[[], None]:
    """Wrap the server's SIGTERM/SIGINT handlers (uvicorn's): readiness turns false first.

    On the signal /readyz answers 503 at once; after `delay_s` (SIGTERM only; a second signal
    skips the wait) the signal reaches uvicorn, which stops accepting connections, lets in-flight
    requests finish (`timeout_graceful_shutdown`) and then runs the lifespan shutdown. Returns a
    function that restores the wrapped handlers. A no-op off the main thread (TestClient).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {
        sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)
    }

    def handle(sig: int, frame: FrameType | None) -> None:
        first = not app.state.draining
        app.state.draining = True
        app.state.metrics.ready.set(0)
        handler = previous[sig]
        assert callable(handler)
        if first and sig == signal.SIGTERM and delay_s > 0:
            log.info("SIGTERM: not ready; draining in %.1f s", delay_s)
            loop.call_soon_threadsafe(loop.call_later, delay_s, handler, sig, None)
        else:
            log.info("%s: not ready; draining in-flight requests", signal.Signals(sig).name)
            handler(sig, frame)

    for sig, handler in previous.items():
        if callable(handler):  # only a server's handler is wrapped, never the default action
            signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            if callable(handler):
                signal.signal(sig, handler)

    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    settings = settings or get_settings()
    metrics = Metrics()
    logging.getLogger("service").setLevel(settings.log_level_number)
    if unknown := settings.unknown_env(os.environ):
        log.warning("ignoring unknown settings (typo?): %s", ", ".join(unknown))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limit_arenas()  # before the worker threads that load and serve allocate
        try:
            app.state.model = await load_model(settings.bundle, settings, metrics)
        except BundleError as exc:
            log.error("cannot start: %s", exc)
            raise
        publish(metrics, None, app.state.model)
        collector = gc.get_threshold()
        gc.set_threshold(*settings.gc_thresholds)
        app.state.draining = False
        metrics.ready.set(1)
        restore_signals = drain_first(app, settings.shutdown_delay_s)
        sighup = install_sighup(app)
        watch = asyncio.create_task(metrics.watch_event_loop())
        manifest = app.state.model.manifest
        log.info("ready: serving %s %s", manifest.name, manifest.version)
        try:
            yield
        finally:  # uvicorn has stopped accepting and drained in-flight requests by now
            watch.cancel()
            app.state.draining = True
            metrics.ready.set(0)
            if sighup:
                remove_sighup()
            restore_signals()
            gc.set_threshold(*collector)
            served, app.state.model = app.state.model, None
            await run_in_threadpool(served.close)

    # /docs and /redoc from fastapi-offline's copies of Swagger UI and ReDoc, not from a CDN: they
    # work on a machine without internet access
    app = FastAPIOffline(
        title="VAE server",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.model = None
    app.state.draining = False
    app.state.reload_lock = asyncio.Lock()
    for module in (encode, decode, sample, elbo, reconstruct, model, health):
        app.include_router(module.router)
    app.include_router(interpolate_router)
    app.include_router(demo_router)
    app.include_router(admin.router)
    app.include_router(v2_router)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(QueueFull, busy_handler)
    app.add_exception_handler(ClientDisconnect, disconnect_handler)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the /decode example sized to the loaded model's latent_dim."""
        model = app.state.model
        latent_dim = model.manifest.latent_dim if model is not None else None
        schema = document(app, default_openapi(), settings, latent_dim)
        if model is not None:
            d = app.state.model.manifest.latent_dim
            example = {"z": [[0.0] * d, [(-1.0) ** i for i in range(d)]]}
            schema["components"]["schemas"]["DecodeRequest"]["examples"] = [example]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(HeadMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
            expose_headers=["X-Seed", "Retry-After"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every status
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """`service.main:app` for plain `uvicorn service.main:app`, built on first access."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = create_app()
    return _app
