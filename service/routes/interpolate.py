"""POST /interpolate: two images -> decoded points on a path between their posterior means."""

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from service.deps import ServedDep
from service.parsing import images_openapi, invalid, read_images
from service.rendering import IMAGE_RESPONSES, ImageQuery, render_images, response_format
from service.routing import ModelRoute
from service.runtime import F32, off_loop
from service.schemas import ImagesPublic

router = APIRouter(tags=["latents"], route_class=ModelRoute)

Mode = Literal["linear", "slerp"]
# Below this sin(angle) the directions are (anti)parallel and slerp's weights are 0/0.
MIN_SIN_ANGLE = 1e-6


class InterpolatePublic(ImagesPublic):
    """Images decoded along the path from mu(a) to mu(b), in order, with the path itself."""

    mode: Mode
    steps: int
    z: list[list[float]] = Field(description="steps x latent_dim points; the first is mu(a)")


def interpolate(a: F32, b: F32, steps: int, mode: Mode) -> F32:
    """`steps` points from `a (D,)` to `b (D,)`, both included -> `(steps, D)`.

    linear: (1 - t) a + t b. slerp: the direction moves along the great circle (Shoemake 1985;
    White 2016, "Sampling Generative Networks") while the norm goes linearly from |a| to |b|, so no
    point falls into the low-density middle of the prior the way a straight line's midpoint does.
    """
    t = np.linspace(0.0, 1.0, steps)[:, None]  # (steps, 1), float64 for the trigonometry
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if mode == "linear":
        return ((1 - t) * a64 + t * b64).astype(np.float32)
    norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if norm_a == 0.0 or norm_b == 0.0:
        return interpolate(a, b, steps, "linear")  # a zero vector has no direction
    u, v = a64 / norm_a, b64 / norm_b
    angle = float(np.arccos(np.clip(u @ v, -1.0, 1.0)))
    if np.sin(angle) < MIN_SIN_ANGLE:
        return interpolate(a, b, steps, "linear")
    direction = (np.sin((1 - t) * angle) * u + np.sin(t * angle) * v) / np.sin(angle)
    norm = (1 - t) * norm_a + t * norm_b
    z: F32 = (norm * direction).astype(np.float32)
    return z


class InterpolateQuery(ImageQuery):
    steps: int = Field(
        default=8, ge=2, description="points on the path, ends included (VAE_MAX_ROWS)"
    )
    mode: Mode = Field(
        default="linear", description="linear, or slerp: great-circle direction, linear norm"
    )


@router.post(
    "/interpolate",
    response_model=InterpolatePublic,
    responses=IMAGE_RESPONSES,
    openapi_extra=images_openapi(2),
)
async def interpolate_images(
    served: ServedDep, request: Request, query: Annotated[InterpolateQuery, Query()]
) -> Response:
    """Interpolate between two images: encode both to mu, walk between them, decode each point.

    Send exactly two images, a then b (multipart files in that order, e.g. fields `a` and `b`;
    or JSON `images` / `pixels` with two entries).
    """
    fmt = response_format(request, query)
    x = await read_images(request, served)
    runtime, steps, mode = served.runtime, query.steps, query.mode
    if len(x) != 2:
        raise invalid(("body", "images"), f"got {len(x)} image(s); send exactly two (a, then b)")
    runtime.check_rows(steps, f"steps = {steps} images")
    mu, _ = await runtime.encode(x)  # (2, D)
    z = await off_loop(steps, interpolate, mu[0], mu[1], steps, mode)  # (steps, D)
    mean = await runtime.decode(z)
    return await off_loop(
        len(mean),
        render_images,
        mean,
        fmt,
        runtime.manifest.likelihood,
        public=InterpolatePublic,
        columns=steps,  # a strip, a to b
        mode=mode,
        steps=steps,
        z=z,
    )
