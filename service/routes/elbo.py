"""POST /elbo: images -> ELBO, IWAE and an anomaly verdict against the bundle's calibration."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from service.deps import ServedDep
from service.parsing import IMAGES_OPENAPI, invalid, read_images
from service.routing import ModelRoute
from service.runtime import F32, MAX_SEED, Evaluation, off_loop
from service.schemas import (
    ElboPublic,
    ElboResult,
    Score,
    json_response,
    json_response_with_list,
    model_items,
)
from service.verdict import MapFormat, Verdict, score_draws, threshold_for

router = APIRouter(tags=["scores"], route_class=ModelRoute)


class ElboQuery(BaseModel):
    samples: int = Field(
        default=1, ge=1, description="draws for the reported ELBO (images x draws: VAE_MAX_ROWS)"
    )
    k: int | None = Field(
        default=None, ge=1, description="importance samples for the IWAE bound (VAE_MAX_ROWS)"
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="seed of eps")
    score: Score | None = Field(
        default=None, description="anomaly score; default: the calibration's"
    )
    threshold: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="anomaly threshold on the score for this request",
    )
    heat: MapFormat | None = Field(
        default=None,
        alias="map",
        description="also return a per-pixel anomaly map, as arrays or PNGs",
    )


@router.post("/elbo", response_model=ElboPublic, openapi_extra=IMAGES_OPENAPI)
async def elbo(
    served: ServedDep, request: Request, query: Annotated[ElboQuery, Query()]
) -> Response:
    """Score images: ELBO and its terms, optional IWAE, anomaly score, percentile and verdict."""
    x = await read_images(request, served)
    runtime, samples, k = served.runtime, query.samples, query.k
    chosen = query.score or runtime.manifest.default_score
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
        seed=query.seed,
        anomaly_map=query.heat is not None,
    )
    limit, source = threshold_for(runtime, served.settings, chosen, query.threshold)
    table = runtime.manifest.score_table(chosen)
    verdict = Verdict(query.seed, chosen, draws, limit, source, table, query.heat)
    return await off_loop(len(x), respond, verdict, x, result, samples, k)


def respond(verdict: Verdict, x: F32, result: Evaluation, samples: int, k: int | None) -> Response:
    """The JSON response, by numpy and pydantic's compiled core: in one pass, or a result at a
    time when the results carry anomaly maps (a large answer: the event loop runs between them)."""
    fields = {
        "seed": verdict.seed,
        "score": verdict.score,
        "score_draws": verdict.draws,
        "threshold": verdict.threshold,
        "threshold_source": verdict.source,
    }
    rows = verdict.rows(x, result, samples, k)
    if result.anomaly_map is None:
        return json_response(ElboPublic, {**fields, "results": rows})
    return json_response_with_list(ElboPublic, fields, "results", model_items(ElboResult, rows))
