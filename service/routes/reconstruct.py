"""POST /reconstruct: images -> what the model makes of them."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from service.deps import ServedDep
from service.parsing import IMAGES_OPENAPI, read_images
from service.rendering import (
    IMAGE_RESPONSES,
    ImageQuery,
    png_base64,
    render_images,
    response_format,
)
from service.routing import ModelRoute
from service.runtime import F32, off_loop
from service.schemas import OutputFormat, ReconstructPublic

router = APIRouter(tags=["images"], route_class=ModelRoute)


class ReconstructQuery(ImageQuery):
    inputs: bool = Field(
        default=False,
        description="also return the inputs as the model saw them (JSON answers only)",
    )


@router.post(
    "/reconstruct",
    response_model=ReconstructPublic,
    responses=IMAGE_RESPONSES,
    openapi_extra=IMAGES_OPENAPI,
)
async def reconstruct(
    served: ServedDep, request: Request, query: Annotated[ReconstructQuery, Query()]
) -> Response:
    """Reconstruct images through the model (decoder mean at z = mu), to inspect anomalies."""
    fmt = response_format(request, query)
    x = await read_images(request, served)
    mean = await served.runtime.reconstruct(x)
    likelihood = served.runtime.manifest.likelihood
    return await off_loop(len(mean), respond, x, mean, fmt, likelihood, query.inputs)


def respond(x: F32, mean: F32, fmt: OutputFormat, likelihood: str, inputs: bool) -> Response:
    """The reconstructions, and with `inputs` the images as the model saw them (base64 PNGs)."""
    extra: dict[str, Any] = {"inputs": png_base64(x)} if inputs and fmt != "grid" else {}
    return render_images(mean, fmt, likelihood, public=ReconstructPublic, **extra)
