"""POST /reconstruct: images -> what the model makes of them."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from service.parsing import IMAGES_OPENAPI, ImagesDep
from service.rendering import IMAGE_RESPONSES, FormatDep, png_base64, render_images
from service.runtime import F32, off_loop
from service.schemas import ImagesPublic, OutputFormat, ReconstructPublic

router = APIRouter(tags=["images"])


@router.post(
    "/reconstruct",
    response_model=ReconstructPublic,
    responses=IMAGE_RESPONSES,
    openapi_extra=IMAGES_OPENAPI,
)
async def reconstruct(
    images: ImagesDep,
    fmt: FormatDep,
    inputs: Annotated[
        bool,
        Query(description="also return the inputs as the model saw them (JSON answers only)"),
    ] = False,
) -> ImagesPublic | Response:
    """Reconstruct images through the model (decoder mean at z = mu), to inspect anomalies."""
    mean = await images.runtime.reconstruct(images.x)
    likelihood = images.runtime.manifest.likelihood
    return await off_loop(len(mean), respond, images.x, mean, fmt, likelihood, inputs)


def respond(
    x: F32, mean: F32, fmt: OutputFormat, likelihood: str, inputs: bool
) -> ImagesPublic | Response:
    """The reconstructions, and with `inputs` the images as the model saw them (base64 PNGs)."""
    extra: dict[str, Any] = {"inputs": png_base64(x)} if inputs and fmt != "grid" else {}
    return render_images(mean, fmt, likelihood, public=ReconstructPublic, **extra)
