"""POST /admin/reload: swap in a new model version without a restart."""

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from service.bundle import BundleError
from service.deps import SettingsDep, require_api_key
from service.parsing import JSONRoute, invalid, require_json
from service.reload import (
    BundleNotFound,
    ReloadInProgress,
    Version,
    public_message,
    public_path,
    reload_model,
    resolve_bundle,
)
from service.runtime import Runtime
from service.schemas import RequestBody
from service.workers import announce_reload

ADMIN_DISABLED = (
    "admin endpoints are disabled: no VAE_API_KEY is configured; set VAE_API_KEY to enable them "
    "with that key (SIGHUP reloads the bundle without one)"
)


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """The API key; without one configured, 403: admin is never open to anyone."""
    if settings.api_key is None:
        raise HTTPException(status_code=403, detail=ADMIN_DISABLED)
    await require_api_key(request, settings)


# relative: '/'-separated names of 1-255 characters, none starting with '.' (no '..')
BUNDLE_NAME = r"^[^/.\x00][^/\x00]{0,254}(/[^/.\x00][^/\x00]{0,254})*$"

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], route_class=JSONRoute
)


class ReloadRequest(RequestBody):
    """Which bundle to load; the one serving now when omitted."""

    bundle: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        # documented, not enforced here: the route's own checks name the problem more clearly
        json_schema_extra={"pattern": BUNDLE_NAME},
        description="bundle directory, relative to the server's models root (the directory "
        "holding VAE_BUNDLE); default: the bundle serving now",
        examples=["mnist"],
    )


class ModelVersion(BaseModel):
    """One loaded bundle."""

    name: str
    version: str
    path: str = Field(description="the bundle directory, relative to the models root")

    @classmethod
    def of(cls, version: Version, root: Path) -> "ModelVersion":
        return cls(name=version.name, version=version.version, path=public_path(version.path, root))


class ReloadPublic(BaseModel):
    """The outcome of a reload."""

    previous: ModelVersion | None
    current: ModelVersion
    seconds: float


async def json_if_any(request: Request) -> None:
    """415 for a body that is not JSON; an empty body is fine (it reloads the bundle serving)."""
    if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
        await require_json(request)


@router.post(
    "/reload",
    dependencies=[Depends(json_if_any)],
    responses={
        403: {"description": "admin disabled (no VAE_API_KEY)"},
        404: {"description": "no bundle of that name under the models root"},
        415: {"description": "a body that is not JSON"},
        409: {"description": "the bundle failed a check, or another reload is running"},
    },
)
async def reload(
    request: Request,
    settings: SettingsDep,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadPublic:
    """Load, verify and warm up a bundle, then swap it in; a bad bundle leaves the old serving."""
    root = settings.models_directory
    path = None
    if body and body.bundle:
        try:
            path = resolve_bundle(root, body.bundle)
        except BundleNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except ValueError as exc:
            raise invalid(("body", "bundle"), str(exc)) from None
    try:
        swap = await reload_model(request.app, path)
    except ReloadInProgress as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except BundleError as exc:
        serving: Runtime | None = request.app.state.runtime
        still = (
            f"; still serving {serving.manifest.name} {serving.manifest.version}" if serving else ""
        )
        detail = public_message(f"bundle refused: {exc}{still}", root)
        raise HTTPException(status_code=409, detail=detail) from None
    # with several workers, the others load the same bundle (service/workers.py)
    announce_reload(request.app.state.runtime.bundle.path)
    return ReloadPublic(
        previous=ModelVersion.of(swap.previous, root) if swap.previous else None,
        current=ModelVersion.of(swap.current, root),
        seconds=round(swap.seconds, 3),
    )
