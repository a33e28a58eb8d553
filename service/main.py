"""The FastAPI app: `create_app(settings)` builds it; service/lifespan.py loads the bundle.

Run with `vae serve`, or `uvicorn service.main:create_app --factory`. Importing this module loads
nothing and never imports torch.
"""

import asyncio
import logging
import os
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from service import __version__
from service.batching import QueueFull
from service.errors import (
    BodyLimitMiddleware,
    HeadMiddleware,
    JSONResponse,
    busy_handler,
    disconnect_handler,
    http_error_handler,
    not_finite_handler,
    over_budget_handler,
    validation_error_handler,
)
from service.lifespan import lifespan
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import document
from service.routes import admin, decode, elbo, encode, health, model, reconstruct, sample
from service.routes.demo import router as demo_router
from service.routes.interpolate import router as interpolate_router
from service.routes.v2 import router as v2_router
from service.routing import ModelEndpoints, ModelRoute
from service.runtime import NotFinite, OverBudget
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """
Serve a variational auto-encoder bundle (docs/BUNDLE.md) with onnxruntime: encode images to
q(z|x), decode or sample latents to images, and score images by their ELBO / IWAE bound against
the bundle's calibration to flag anomalies. Image endpoints take multipart files, JSON (base64
files or pixel arrays in [0, 1]) or a raw image body; options go in the query string.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    settings = settings or get_settings()
    metrics = Metrics()
    logging.getLogger("service").setLevel(settings.log_level_number)
    if unknown := settings.unknown_env(os.environ):
        log.warning("ignoring unknown settings (typo?): %s", ", ".join(unknown))

    # /docs and /redoc from fastapi-offline's copies of Swagger UI and ReDoc, not from a CDN: they
    # work on a machine without internet access
    app = FastAPIOffline(
        title="VAE server",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    app.state.draining = False
    app.state.reload_lock = asyncio.Lock()
    routers = [
        module.router for module in (encode, decode, sample, elbo, reconstruct, model, health)
    ]
    routers.append(interpolate_router)
    for router in routers:
        app.include_router(router)
    app.include_router(demo_router)
    app.include_router(admin.router)
    app.include_router(v2_router)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(QueueFull, busy_handler)
    app.add_exception_handler(OverBudget, over_budget_handler)
    app.add_exception_handler(NotFinite, not_finite_handler)
    app.add_exception_handler(ClientDisconnect, disconnect_handler)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the /decode example sized to the loaded model's latent_dim."""
        runtime = app.state.runtime
        latent_dim = runtime.manifest.latent_dim if runtime is not None else None
        schema = document(app, default_openapi(), settings, latent_dim)
        if runtime is not None:
            d = runtime.manifest.latent_dim
            example = {"z": [[0.0] * d, [(-1.0) ** i for i in range(d)]]}
            schema["components"]["schemas"]["DecodeRequest"]["examples"] = [example]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    model_routes = [
        route for router in routers for route in router.routes if isinstance(route, ModelRoute)
    ]
    # innermost: the body limit and everything outside it apply to the model endpoints too
    app.add_middleware(ModelEndpoints, routes=model_routes)
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
