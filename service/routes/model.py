"""GET /model: the served bundle's manifest."""

from fastapi import APIRouter

from service.deps import ServedDep
from service.schemas import ModelPublic

router = APIRouter(tags=["model"])


@router.get("/model")
async def model_info(served: ServedDep) -> ModelPublic:
    """The manifest: image shape, latent dim, likelihood, version, metrics and calibration."""
    model = served.model
    return ModelPublic(**model.manifest.model_dump(), providers=model.bundle.providers)
