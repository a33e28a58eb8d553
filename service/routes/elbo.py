"""POST /elbo: images -> ELBO, IWAE and an anomaly verdict against the bundle's calibration."""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response

from service.bundle import ScoreCalibration
from service.objective import F64, RECONSTRUCTION_SCORES, percentile_of, value_at
from service.parsing import IMAGES_OPENAPI, ImagesDep, invalid
from service.rendering import heat_png
from service.runtime import F32, MAX_SEED, Evaluation, Runtime, off_loop
from service.schemas import ElboPublic, Score, json_response
from service.settings import Settings

router = APIRouter(tags=["scores"])

ThresholdSource = Literal["request", "settings", "manifest"]


def score_draws(runtime: Runtime, score: Score, samples: int, k: int | None) -> int:
    """Draws behind the anomaly score: the calibration's, so scores compare with its table."""
    if score in RECONSTRUCTION_SCORES:
        return 0  # deterministic: the decoder's mean at z = mu
    table = runtime.manifest.score_table(score)
    if score == "neg_elbo":
        return table.samples if table and table.samples else samples
    if k is not None:
        return k
    if table and table.k:
        return table.k
    raise invalid(("query", "k"), "score=neg_iwae needs k: the bundle's calibration names none")


def threshold_for(
    runtime: Runtime, settings: Settings, score: Score, requested: float | None
) -> tuple[float | None, ThresholdSource | None]:
    """The anomaly threshold: the request's, else VAE_ANOMALY_THRESHOLD, else the manifest's."""
    if requested is not None:
        return requested, "request"
    manifest = runtime.manifest
    if settings.anomaly_threshold is not None and score == manifest.default_score:
        return settings.anomaly_threshold, "settings"
    table = manifest.score_table(score)
    if manifest.calibration and table and table.usable:
        percentile = manifest.calibration.threshold_percentile
        return value_at(percentile, table.percentiles, table.values), "manifest"
    return None, None


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
        Literal["array", "png"] | None,
        Query(alias="map", description="also return a per-pixel anomaly map, as arrays or PNGs"),
    ] = None,
) -> Response:
    """Score images: ELBO and its terms, optional IWAE, anomaly score, percentile and verdict."""
    runtime, x, settings = images.runtime, images.x, images.settings
    chosen = score or runtime.manifest.default_score
    draws = score_draws(runtime, chosen, samples, k)
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
    return await off_loop(len(x), verdict.respond, x, result, samples, k)


@dataclass(frozen=True)
class Verdict:
    """How a request's anomaly scores are judged: the score, its draws, threshold and table."""

    seed: int
    score: Score
    draws: int
    threshold: float | None
    source: ThresholdSource | None
    table: ScoreCalibration | None
    heat: Literal["array", "png"] | None

    def maps(self, x: F32, values: F64 | None) -> list[Any]:
        """The anomaly maps as the request asked: nested lists or PNGs over the images."""
        if values is None:
            return [None] * len(x)
        if self.heat == "png":
            return [heat_png(image, m) for image, m in zip(x, values, strict=True)]
        return values.tolist()  # type: ignore[no-any-return]

    def rows(self, x: F32, result: Evaluation, samples: int, k: int | None) -> list[dict[str, Any]]:
        """One ElboResult per image, as dicts, made column-wise by numpy rather than per row."""
        n, scores, table, limit = len(result.score), result.score, self.table, self.threshold
        percentiles = (
            percentile_of(scores, table.percentiles, table.values).tolist()
            if table and table.usable
            else [None] * n
        )
        columns = {
            "elbo": result.terms.elbo.tolist(),
            "reconstruction": result.terms.reconstruction.tolist(),
            "kl": result.terms.kl.tolist(),
            "samples": [samples] * n,
            "iwae": result.iwae.tolist() if result.iwae is not None else [None] * n,
            "k": [k] * n,
            "anomaly_score": scores.tolist(),
            "percentile": percentiles,
            "is_anomaly": (scores > limit).tolist() if limit is not None else [None] * n,
            "anomaly_map": self.maps(x, result.anomaly_map),
        }
        names = list(columns)
        return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]

    def respond(self, x: F32, result: Evaluation, samples: int, k: int | None) -> Response:
        """The JSON response, made in one pass by numpy and pydantic's compiled core."""
        return json_response(
            ElboPublic,
            {
                "seed": self.seed,
                "score": self.score,
                "score_draws": self.draws,
                "threshold": self.threshold,
                "threshold_source": self.source,
                "results": self.rows(x, result, samples, k),
            },
        )
