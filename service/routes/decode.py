"""POST /decode: latent vectors -> images."""

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response

from service.deps import (
    ServedDep,
    get_served,
    invalid,
    over_limit,
    require_json,
)
from service.inference import F32, Model
from service.rendering import IMAGE_RESPONSES, choose_format, render_images
from service.schemas import DecodeRequest, ImagesPublic, OutputFormat

router = APIRouter(tags=["images"])

FORMAT_QUERY = Query(
    alias="format",
    description="base64: PNG per image in JSON (default); arrays: raw mean/probabilities; "
    "grid: one PNG (also chosen by `Accept: image/png`)",
)


def decode_mean(model: Model, z: F32, loc: tuple[str, ...], hint: str) -> F32:
    """Decode `z (N, D)` to the mean image; 422 at `loc`, with `hint`, if the decoder overflows."""
    try:
        return model.decode_mean(z)
    except ValueError as exc:
        raise invalid(loc, f"{exc}; {hint}") from None


async def decode_mean_gathered(model: Model, z: F32, loc: tuple[str, ...], hint: str) -> F32:
    """`decode_mean` awaited on the event loop, for `z` where `model.gathers(len(z))`."""
    try:
        return await model.decode_mean_gathered(z)
    except ValueError as exc:
        raise invalid(loc, f"{exc}; {hint}") from None


# |z| bound: 10^4 standard deviations of the prior N(0, I), far past any meaningful latent, and
# well inside what the decoder computes without overflowing float32
Z_MAX = 1e4


def validated_z(body: DecodeRequest, model: Model, max_rows: int) -> F32:
    """The request's z as float32 `(B, D)`, with the row count and width checked."""
    d = model.manifest.latent_dim
    if len(body.z) > max_rows:
        raise over_limit(("body", "z"), len(body.z), max_rows, "VAE_MAX_IMAGES")
    for i, row in enumerate(body.z):
        if len(row) != d:
            raise invalid(
                ("body", "z", i), f"z[{i}] has {len(row)} values; the model's latent_dim is {d}"
            )
    with np.errstate(over="ignore"):
        z = np.asarray(body.z, dtype=np.float32)
    if not np.abs(z).max() <= Z_MAX:  # also NaN after a float32 overflow
        raise invalid(("body", "z"), f"z has values beyond +-{Z_MAX:g}; the prior is N(0, I)")
    return z


@router.post(
    "/decode",
    response_model=ImagesPublic,
    responses=IMAGE_RESPONSES,
    # the API key first (get_served, cached for the `served` parameter), then the media type
    dependencies=[Depends(get_served), Depends(require_json)],
)
async def decode(
    body: DecodeRequest,
    request: Request,
    served: ServedDep,
    output: Annotated[OutputFormat | None, FORMAT_QUERY] = None,
) -> ImagesPublic | Response:
    """Decode latent vectors z (B x latent_dim) to images: PNGs, a PNG grid or raw arrays."""
    model, settings = served.model, served.settings
    fmt = choose_format(output, request.headers.get("accept"))
    z = validated_z(body, model, settings.max_images)
    model.metrics.images.labels("/decode").observe(len(z))

    loc, hint = ("body", "z"), "use latent values of a sensible size"
    if model.gathers(len(z)):  # small: one gathered decoder call, rendered on the event loop
        mean = await decode_mean_gathered(model, z, loc, hint)
        return render_images(mean, fmt, model.manifest.likelihood)

    def run(m: Model) -> ImagesPublic | Response:
        return render_images(decode_mean(m, z, loc, hint), fmt, model.manifest.likelihood)

    return await model.run(len(z), run)
