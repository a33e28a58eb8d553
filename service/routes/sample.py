"""GET /sample: z from the prior, decoded."""

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.deps import ServedDep
from service.rendering import IMAGE_RESPONSES, FormatDep, render_images
from service.runtime import MAX_SEED, draw_eps, fresh_seed, off_loop
from service.schemas import ImagesPublic, SamplePublic

router = APIRouter(tags=["images"])


@router.get("/sample", response_model=SamplePublic, responses=IMAGE_RESPONSES)
async def sample(
    served: ServedDep,
    fmt: FormatDep,
    n: Annotated[int, Query(ge=1, description="images to draw (at most VAE_MAX_ROWS)")] = 16,
    seed: Annotated[
        int | None, Query(ge=0, le=MAX_SEED, description="seed of z; fresh when omitted")
    ] = None,
    temperature: Annotated[
        float,
        Query(gt=0, le=100, allow_inf_nan=False, description="z ~ N(0, temperature^2 I)"),
    ] = 1.0,
) -> ImagesPublic | Response:
    """Draw n images: z from the prior N(0, I) scaled by temperature, decoded."""
    runtime, used_seed = served.runtime, fresh_seed() if seed is None else seed
    runtime.check_rows(n, f"n = {n} images")
    runtime.metrics.images.labels("/sample").observe(n)
    z = await off_loop(n, draw_eps, used_seed, (n, runtime.manifest.latent_dim)) * temperature
    mean = await runtime.decode(z)
    return await off_loop(
        len(mean),
        render_images,
        mean,
        fmt,
        runtime.manifest.likelihood,
        public=SamplePublic,
        headers={"X-Seed": str(used_seed)},
        seed=used_seed,
        temperature=temperature,
        z=z,
    )
