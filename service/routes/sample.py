"""GET /sample: z from the prior, decoded."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from service.deps import ServedDep
from service.rendering import IMAGE_RESPONSES, ImageQuery, render_images, response_format
from service.routing import ModelRoute
from service.runtime import MAX_SEED, draw_prior, fresh_seed, off_loop
from service.schemas import SamplePublic

router = APIRouter(tags=["images"], route_class=ModelRoute)


class SampleQuery(ImageQuery):
    n: int = Field(default=16, ge=1, description="images to draw (at most VAE_MAX_ROWS)")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="seed of z; fresh when omitted"
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="scales the prior's spread: z ~ N(0, temperature^2 I), or for a mixture "
        "prior, a component's mean plus temperature times its spread",
    )


@router.get("/sample", response_model=SamplePublic, responses=IMAGE_RESPONSES)
async def sample(
    served: ServedDep, request: Request, query: Annotated[SampleQuery, Query()]
) -> Response:
    """Draw n images: z from the bundle's prior (N(0, I) or its mixture), its spread scaled by
    temperature, decoded."""
    fmt = response_format(request, query)
    runtime, n = served.runtime, query.n
    seed = fresh_seed() if query.seed is None else query.seed
    runtime.check_rows(n, f"n = {n} images")
    runtime.metrics.images.labels("/sample").observe(n)
    d, prior = runtime.manifest.latent_dim, runtime.bundle.prior
    z = await off_loop(n, draw_prior, seed, n, d, prior, query.temperature)
    mean = await runtime.decode(z)
    return await off_loop(
        len(mean),
        render_images,
        mean,
        fmt,
        runtime.manifest.likelihood,
        public=SamplePublic,
        headers={"X-Seed": str(seed)},
        seed=seed,
        temperature=query.temperature,
        z=z,
    )
