"""Dependencies shared by the routes: settings, the runtime serving now, authentication."""

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.runtime import Runtime
from service.settings import Settings


async def get_settings_from_app(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]


async def get_runtime(request: Request) -> Runtime:
    """The runtime serving now; 503 until the lifespan has loaded and warmed up the bundle."""
    runtime: Runtime | None = request.app.state.runtime
    if runtime is None:
        raise HTTPException(status_code=503, detail="model not loaded yet; see GET /readyz")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With VAE_API_KEY set, require it as `X-API-Key` or `Authorization: Bearer`; 401 else."""
    if settings.api_key is None:
        return
    keys = request.headers.getlist("x-api-key")
    supplied = keys[0] if keys else None
    if supplied is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        supplied = token.strip() if scheme.lower() == "bearer" else None
    twice = len(keys) > 1 or len(request.headers.getlist("authorization")) > 1
    if twice:  # which one counts would depend on the reader: no key is taken from two
        problem = "more than one API key header"
    elif not supplied:
        problem = "missing API key"
    elif hmac.compare_digest(supplied.encode(), settings.api_key.get_secret_value().encode()):
        return
    else:
        problem = "invalid API key"
    raise HTTPException(
        status_code=401,
        detail=f"{problem}: send it as X-API-Key or Authorization: Bearer <key>",
        headers={"WWW-Authenticate": "Bearer"},
    )


@dataclass(frozen=True)
class Served:
    """What a model endpoint needs: the settings and the runtime serving now, the caller checked."""

    settings: Settings
    runtime: Runtime


async def get_served(request: Request) -> Served:
    """The API key check, the settings and the runtime in one dependency.

    FastAPI's per-dependency cost is a measurable part of a small request (bench/serving.py),
    so the model endpoints take this one instead of three.
    """
    settings = await get_settings_from_app(request)
    await require_api_key(request, settings)
    return Served(settings, await get_runtime(request))


ServedDep = Annotated[Served, Depends(get_served)]
