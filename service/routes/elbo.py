"""POST /elbo: images -> ELBO, IWAE and an anomaly verdict against the bundle's calibration."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from service.deps import (
    IMAGES_OPENAPI,
    ServedDep,
    invalid,
    over_limit,
    read_images,
)
from service.inference import MAX_SEED, EvaluateOptions, Evaluation, Model
from service.objective import F64, RECONSTRUCTION_SCORES, percentile_of, value_at
from service.rendering import heat_png
from service.schemas import ElboPublic, Score, json_response
from service.settings import Settings

router = APIRouter(tags=["scores"])

ThresholdSource = Literal["request", "settings", "manifest"]


def score_draws(model: Model, score: Score, samples: int, k: int | None) -> int:
    """Draws behind the anomaly score: the calibration's, so scores compare with its table."""
    if score in RECONSTRUCTION_SCORES:
        return 0  # deterministic: the decoder's mean at z = mu
    table = model.manifest.score_table(score)
    if score == "neg_elbo":
        return table.samples if table and table.samples else samples
    if k is not None:
        return k
    if table and table.k:
        return table.k
    raise invalid(("query", "k"), "score=neg_iwae needs k: the bundle's calibration names none")


def threshold_for(
    model: Model, settings: Settings, score: Score, requested: float | None
) -> tuple[float | None, ThresholdSource | None]:
    """The anomaly threshold: the request's, else VAE_ANOMALY_THRESHOLD, else the manifest's."""
    if requested is not None:
        return requested, "request"
    manifest = model.manifest
    if settings.anomaly_threshold is not None and score == manifest.default_score:
        return settings.anomaly_threshold, "settings"
    table = manifest.score_table(score)
    if manifest.calibration and table and table.usable:
        percentile = manifest.calibration.threshold_percentile
        return value_at(percentile, table.percentiles, table.values), "manifest"
    return None, None


@router.post("/elbo", response_model=ElboPublic, openapi_extra=IMAGES_OPENAPI)
async def elbo(
    request: Request,
    served: ServedDep,
    samples: Annotated[
        int, Query(ge=1, description="draws for the reported ELBO (at most VAE_MAX_SAMPLES)")
    ] = 1,
    k: Annotated[
        int | None, Query(ge=1, description="importance samples for the IWAE bound (VAE_MAX_K)")
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
        Literal["array", "png"] | None,
        Query(alias="map", description="also return a per-pixel anomaly map, as arrays or PNGs"),
    ] = None,
) -> Response:
    """Score images: ELBO and its terms, optional IWAE, anomaly score, percentile and verdict."""
    model, settings = served.model, served.settings
    x = await read_images(request, served)
    if samples > settings.max_samples:
        raise over_limit(("query", "samples"), samples, settings.max_samples, "VAE_MAX_SAMPLES")
    if k is not None and k > settings.max_k:
        raise over_limit(("query", "k"), k, settings.max_k, "VAE_MAX_K")
    if heat and x.size // x.shape[1] > settings.max_map_pixels:
        pixels = x.size // x.shape[1]
        raise over_limit(("query", "map"), pixels, settings.max_map_pixels, "VAE_MAX_MAP_PIXELS")
    chosen = score or model.manifest.default_score
    draws = score_draws(model, chosen, samples, k)
    limit, source = threshold_for(model, settings, chosen, threshold)
    table = model.manifest.score_table(chosen)

    def maps(values: F64 | None) -> list[Any]:
        if values is None:
            return [None] * len(x)
        if heat == "png":
            return [heat_png(image, m) for image, m in zip(x, values, strict=True)]
        return values.tolist()  # type: ignore[no-any-return]

    def respond(result: Evaluation) -> Response:
        n, scores = len(x), result.score
        percentiles = (
            percentile_of(scores, table.percentiles, table.values).tolist()
            if table and table.usable
            else [None] * n
        )
        columns = {  # one list per ElboResult field, made by numpy rather than per row
            "elbo": result.terms.elbo.tolist(),
            "reconstruction": result.terms.reconstruction.tolist(),
            "kl": result.terms.kl.tolist(),
            "samples": [samples] * n,
            "iwae": result.iwae.tolist() if result.iwae is not None else [None] * n,
            "k": [k] * n,
            "anomaly_score": scores.tolist(),
            "percentile": percentiles,
            "is_anomaly": (scores > limit).tolist() if limit is not None else [None] * n,
            "anomaly_map": maps(result.anomaly_map),
        }
        names = list(columns)
        rows = [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        return json_response(
            ElboPublic,
            {
                "seed": seed,
                "score": chosen,
                "score_draws": draws,
                "threshold": limit,
                "threshold_source": source,
                "results": rows,
            },
        )

    options: EvaluateOptions = {
        "samples": samples,
        "k": k,
        "score": chosen,
        "score_draws": draws,
        "seed": seed,
        "anomaly_map": heat is not None,
    }
    rows = len(x) * max(samples, k or 0, draws, 1)
    if model.gathers(rows):  # small: network calls gathered, the math on the event loop
        return respond(await model.evaluate_gathered(x, **options))
    return await model.run(rows, lambda m: respond(m.evaluate(x, **options)))
