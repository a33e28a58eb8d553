"""POST /reconstruct: images -> what the model makes of them."""

from typing import Annotated

from fastapi import APIRouter, Request, Response

from service.deps import IMAGES_OPENAPI, ServedDep, read_images
from service.inference import Model
from service.rendering import IMAGE_RESPONSES, choose_format, render_images
from service.routes.decode import FORMAT_QUERY
from service.schemas import ImagesPublic, OutputFormat

router = APIRouter(tags=["images"])


@router.post(
    "/reconstruct",
    response_model=ImagesPublic,
    responses=IMAGE_RESPONSES,
    openapi_extra=IMAGES_OPENAPI,
)
async def reconstruct(
    request: Request,
    served: ServedDep,
    output: Annotated[OutputFormat | None, FORMAT_QUERY] = None,
) -> ImagesPublic | Response:
    """Reconstruct images through the model (decoder mean at z = mu), to inspect anomalies."""
    model, x = served.model, await read_images(request, served)
    fmt = choose_format(output, request.headers.get("accept"))

    likelihood = model.manifest.likelihood
    if model.gathers(len(x)):  # small: network calls gathered, rendered on the event loop
        return render_images(await model.reconstruct_gathered(x), fmt, likelihood)

    def run(m: Model) -> ImagesPublic | Response:
        return render_images(m.reconstruct(x), fmt, likelihood)

    return await model.run(len(x), run)
