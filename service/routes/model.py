"""GET /model: the served bundle's manifest."""

from fastapi import APIRouter, Depends

from service.deps import ModelDep, require_api_key
from service.schemas import ModelPublic

router = APIRouter(tags=["model"], dependencies=[Depends(require_api_key)])


@router.get("/model")
async def model_info(model: ModelDep) -> ModelPublic:
    """The manifest: image shape, latent dim, likelihood, version, metrics and calibration."""
    return ModelPublic(**model.manifest.model_dump(), providers=model.bundle.providers)
