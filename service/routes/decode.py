"""POST /decode: latent vectors -> images."""

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Response

from service.deps import ServedDep, get_served
from service.parsing import JSONRoute, invalid, require_json
from service.rendering import IMAGE_RESPONSES, FormatDep, render_images
from service.runtime import F32, Runtime, off_loop
from service.schemas import DecodeRequest, ImagesPublic

router = APIRouter(tags=["images"], route_class=JSONRoute)

# |z| bound: 10^4 standard deviations of the prior N(0, I), far past any meaningful latent, and
# well inside what the decoder computes without overflowing float32
Z_MAX = 1e4


async def read_z(body: DecodeRequest, served: ServedDep) -> F32:
    """The request's z as float32 `(B, D)`, each row checked against the model's latent_dim."""
    d = served.runtime.manifest.latent_dim
    for i, row in enumerate(body.z):
        if len(row) != d:
            raise invalid(
                ("body", "z", i), f"z[{i}] has {len(row)} values; the model's latent_dim is {d}"
            )
    with np.errstate(over="ignore"):
        z = np.asarray(body.z, dtype=np.float32)
    if not np.abs(z).max() <= Z_MAX:  # also NaN after a float32 overflow
        raise invalid(("body", "z"), f"z has values beyond +-{Z_MAX:g}; the prior is N(0, I)")
    served.runtime.metrics.images.labels("/decode").observe(len(z))
    return z


@router.post(
    "/decode",
    response_model=ImagesPublic,
    responses=IMAGE_RESPONSES,
    # the API key first (get_served, cached for read_z), then the media type
    dependencies=[Depends(get_served), Depends(require_json)],
)
async def decode(
    z: Annotated[F32, Depends(read_z)], served: ServedDep, fmt: FormatDep
) -> ImagesPublic | Response:
    """Decode latent vectors z (B x latent_dim) to images: PNGs, a PNG grid or raw arrays."""
    runtime: Runtime = served.runtime
    mean = await runtime.decode(z)
    return await off_loop(len(mean), render_images, mean, fmt, runtime.manifest.likelihood)
