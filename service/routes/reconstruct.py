"""POST /reconstruct: images -> what the model makes of them."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import IMAGES_OPENAPI, ImagesDep, ModelDep, require_api_key
from service.rendering import IMAGE_RESPONSES, choose_format, render_images
from service.routes.decode import FORMAT_QUERY
from service.schemas import ImagesPublic, OutputFormat

router = APIRouter(tags=["images"], dependencies=[Depends(require_api_key)])


@router.post(
    "/reconstruct",
    response_model=ImagesPublic,
    responses=IMAGE_RESPONSES,
    openapi_extra=IMAGES_OPENAPI,
)
async def reconstruct(
    x: ImagesDep,
    request: Request,
    model: ModelDep,
    output: Annotated[OutputFormat | None, FORMAT_QUERY] = None,
) -> ImagesPublic | Response:
    """Reconstruct images through the model (decoder mean at z = mu), to inspect anomalies."""
    fmt = choose_format(output, request.headers.get("accept"))

    def run() -> ImagesPublic | Response:
        return render_images(model.reconstruct(x), fmt, model.manifest.likelihood)

    return await run_in_threadpool(run)
