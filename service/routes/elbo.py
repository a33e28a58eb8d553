"""POST /elbo: images -> ELBO, IWAE and an anomaly verdict against the bundle's calibration."""

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.parsing import IMAGES_OPENAPI, ImagesDep, invalid
from service.runtime import F32, MAX_SEED, Evaluation, off_loop
from service.schemas import ElboPublic, Score, json_response
from service.verdict import MapFormat, Verdict, score_draws, threshold_for

router = APIRouter(tags=["scores"])


@router.post("/elbo", response_model=ElboPublic, openapi_extra=IMAGES_OPENAPI)
async def elbo(
    images: ImagesDep,
    samples: Annotated[
        int, Query(ge=1, description="draws for the reported ELBO (images x draws: VAE_MAX_ROWS)")
    ] = 1,
    k: Annotated[
        int | None, Query(ge=1, description="importance samples for the IWAE bound (VAE_MAX_ROWS)")
    ] = None,
    seed: Annotated[int, Query(ge=0, le=MAX_SEED, description="seed of eps")] = 0,
    score: Annotated[
        Score | None, Query(description="anomaly score; default: the calibration's")
    ] = None,
    threshold: Annotated[
        float | None,
        Query(allow_inf_nan=False, description="anomaly threshold on the score for this request"),
    ] = None,
    heat: Annotated[
        MapFormat | None,
        Query(alias="map", description="also return a per-pixel anomaly map, as arrays or PNGs"),
    ] = None,
) -> Response:
    """Score images: ELBO and its terms, optional IWAE, anomaly score, percentile and verdict."""
    runtime, x, settings = images.runtime, images.x, images.settings
    chosen = score or runtime.manifest.default_score
    try:
        draws = score_draws(runtime, chosen, samples, k)
    except ValueError as exc:
        raise invalid(("query", "k"), str(exc)) from None
    result = await runtime.evaluate(
        x,
        samples=samples,
        k=k,
        score=chosen,
        score_draws=draws,
        seed=seed,
        anomaly_map=heat is not None,
    )
    limit, source = threshold_for(runtime, settings, chosen, threshold)
    table = runtime.manifest.score_table(chosen)
    verdict = Verdict(seed, chosen, draws, limit, source, table, heat)
    return await off_loop(len(x), respond, verdict, x, result, samples, k)


def respond(verdict: Verdict, x: F32, result: Evaluation, samples: int, k: int | None) -> Response:
    """The JSON response, made in one pass by numpy and pydantic's compiled core."""
    return json_response(
        ElboPublic,
        {
            "seed": verdict.seed,
            "score": verdict.score,
            "score_draws": verdict.draws,
            "threshold": verdict.threshold,
            "threshold_source": verdict.source,
            "results": verdict.rows(x, result, samples, k),
        },
    )
