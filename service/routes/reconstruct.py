"""POST /reconstruct: images -> what the model makes of them."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from service.deps import IMAGES_OPENAPI, ServedDep, read_images
from service.inference import F32, Model
from service.rendering import IMAGE_RESPONSES, choose_format, png_base64, render_images
from service.routes.decode import FORMAT_QUERY
from service.schemas import ImagesPublic, OutputFormat, ReconstructPublic

router = APIRouter(tags=["images"])


@router.post(
    "/reconstruct",
    response_model=ReconstructPublic,
    responses=IMAGE_RESPONSES,
    openapi_extra=IMAGES_OPENAPI,
)
async def reconstruct(
    request: Request,
    served: ServedDep,
    output: Annotated[OutputFormat | None, FORMAT_QUERY] = None,
    inputs: Annotated[
        bool,
        Query(description="also return the inputs as the model saw them (JSON answers only)"),
    ] = False,
) -> ImagesPublic | Response:
    """Reconstruct images through the model (decoder mean at z = mu), to inspect anomalies."""
    model, x = served.model, await read_images(request, served)
    fmt = choose_format(output, request.headers.get("accept"))

    likelihood = model.manifest.likelihood

    def respond(mean: F32) -> ImagesPublic | Response:
        extra: dict[str, Any] = {"inputs": png_base64(x)} if inputs and fmt != "grid" else {}
        return render_images(mean, fmt, likelihood, public=ReconstructPublic, **extra)

    if model.gathers(len(x)):  # small: network calls gathered, rendered on the event loop
        return respond(await model.reconstruct_gathered(x))

    def run(m: Model) -> ImagesPublic | Response:
        return respond(m.reconstruct(x))

    return await model.run(len(x), run)
