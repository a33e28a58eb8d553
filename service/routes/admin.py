"""POST /admin/reload: swap in a new model version without a restart."""

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from service.bundle import BundleError
from service.deps import SettingsDep, invalid, require_api_key, require_json
from service.inference import Model
from service.reload import ReloadInProgress, reload_model
from service.schemas import RequestBody

ADMIN_DISABLED = (
    "admin endpoints are disabled: no VAE_API_KEY is configured; set VAE_API_KEY to enable them "
    "with that key, or VAE_ADMIN_OPEN=true to open them on a trusted network"
)


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """The API key when one is configured; without one, 403 unless VAE_ADMIN_OPEN=true."""
    if settings.api_key is None:
        if not settings.admin_open:
            raise HTTPException(status_code=403, detail=ADMIN_DISABLED)
        return
    await require_api_key(request, settings)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class ReloadRequest(RequestBody):
    """Which bundle to load; the one serving now when omitted."""

    bundle: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="bundle directory on the server (default: the bundle serving now)",
    )


class ModelVersion(BaseModel):
    """One loaded bundle."""

    name: str
    version: str
    path: str

    @classmethod
    def of(cls, model: Model) -> "ModelVersion":
        return cls(
            name=model.manifest.name, version=model.manifest.version, path=str(model.bundle.path)
        )


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
        403: {"description": "admin disabled (no VAE_API_KEY and VAE_ADMIN_OPEN is off)"},
        415: {"description": "a body that is not JSON"},
        409: {"description": "the bundle failed a check, or another reload is running"},
    },
)
async def reload(
    request: Request, body: Annotated[ReloadRequest | None, Body()] = None
) -> ReloadPublic:
    """Load, verify and warm up a bundle, then swap it in; a bad bundle leaves the old serving."""
    path = Path(body.bundle) if body and body.bundle else None
    if path is not None and not path.is_dir():
        raise invalid(("body", "bundle"), f"{path} is not a directory on the server")
    try:
        swap = await reload_model(request.app, path)
    except ReloadInProgress as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except BundleError as exc:
        serving: Model | None = request.app.state.model
        still = (
            f"; still serving {serving.manifest.name} {serving.manifest.version}" if serving else ""
        )
        raise HTTPException(status_code=409, detail=f"bundle refused: {exc}{still}") from None
    return ReloadPublic(
        previous=ModelVersion.of(swap.previous) if swap.previous else None,
        current=ModelVersion.of(swap.current),
        seconds=round(swap.seconds, 3),
    )
