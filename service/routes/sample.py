"""GET /sample: z from the prior, decoded."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.deps import ServedDep, over_limit
from service.inference import F32, MAX_SEED, draw_eps, fresh_seed
from service.rendering import IMAGE_RESPONSES, choose_format, render_images
from service.routes.decode import FORMAT_QUERY, decode_mean, decode_mean_gathered
from service.schemas import ImagesPublic, OutputFormat, SamplePublic

router = APIRouter(tags=["images"])


@router.get("/sample", response_model=SamplePublic, responses=IMAGE_RESPONSES)
async def sample(
    request: Request,
    served: ServedDep,
    n: Annotated[int, Query(ge=1, description="images to draw (at most VAE_MAX_SAMPLE_N)")] = 16,
    seed: Annotated[
        int | None, Query(ge=0, le=MAX_SEED, description="seed of z; fresh when omitted")
    ] = None,
    temperature: Annotated[
        float,
        Query(gt=0, le=100, allow_inf_nan=False, description="z ~ N(0, temperature^2 I)"),
    ] = 1.0,
    output: Annotated[OutputFormat | None, FORMAT_QUERY] = None,
) -> ImagesPublic | Response:
    """Draw n images: z from the prior N(0, I) scaled by temperature, decoded."""
    model, settings = served.model, served.settings
    if n > settings.max_sample_n:
        raise over_limit(("query", "n"), n, settings.max_sample_n, "VAE_MAX_SAMPLE_N")
    fmt = choose_format(output, request.headers.get("accept"))
    used_seed = fresh_seed() if seed is None else seed
    model.metrics.images.labels("/sample").observe(n)
    z = temperature * draw_eps(used_seed, (n, model.manifest.latent_dim))
    loc, hint = ("query", "temperature"), "lower the temperature"

    def respond(mean: F32) -> ImagesPublic | Response:
        return render_images(
            mean,
            fmt,
            model.manifest.likelihood,
            public=SamplePublic,
            headers={"X-Seed": str(used_seed)},
            seed=used_seed,
            temperature=temperature,
            z=z.tolist(),
        )

    if model.gathers(n):  # small: one gathered decoder call, rendered on the event loop
        return respond(await decode_mean_gathered(model, z, loc, hint))
    return await model.run(n, lambda m: respond(decode_mean(m, z, loc, hint)))
