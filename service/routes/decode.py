"""POST /decode: latent vectors -> images."""

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from service.deps import Served, ServedDep
from service.parsing import invalid, read_json, require_json
from service.rendering import IMAGE_RESPONSES, ImageQuery, render_images, response_format
from service.routing import ModelRoute
from service.runtime import F32, off_loop
from service.schemas import DecodeRequest, ImagesPublic

router = APIRouter(tags=["images"], route_class=ModelRoute)

# |z| bound: 10^4 standard deviations of N(0, I) (a mixture prior's components lie within a few),
# far past any meaningful latent, and well inside what the decoder computes without overflowing
# float32
Z_MAX = 1e4


async def read_z(request: Request, served: Served) -> F32:
    """The request's z as float32 `(B, D)`, each row checked against the model's latent_dim."""
    await require_json(request)
    body = await read_json(request, DecodeRequest)
    d = served.runtime.manifest.latent_dim
    for i, row in enumerate(body.z):
        if len(row) != d:
            raise invalid(
                ("body", "z", i), f"z[{i}] has {len(row)} values; the model's latent_dim is {d}"
            )
    with np.errstate(over="ignore"):
        z = np.asarray(body.z, dtype=np.float32)
    if not np.abs(z).max() <= Z_MAX:  # also NaN after a float32 overflow
        raise invalid(("body", "z"), f"z has values beyond +-{Z_MAX:g}, far outside the prior")
    served.runtime.metrics.images.labels("/decode").observe(len(z))
    return z


@router.post(
    "/decode",
    response_model=ImagesPublic,
    responses=IMAGE_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/DecodeRequest"}}
            },
        }
    },
)
async def decode(
    served: ServedDep, request: Request, query: Annotated[ImageQuery, Query()]
) -> Response:
    """Decode latent vectors z (B x latent_dim) to images: PNGs, a PNG grid or raw arrays."""
    fmt = response_format(request, query)
    z = await read_z(request, served)
    runtime = served.runtime
    mean = await runtime.decode(z)
    return await off_loop(len(mean), render_images, mean, fmt, runtime.manifest.likelihood)
