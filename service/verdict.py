"""POST /elbo's anomaly verdict without FastAPI: the draws behind the score, the threshold that
judges it and the per-image result rows. The route and `vae score` (in Ray actors, which need no
web stack) share this code, so the table and the HTTP answer cannot drift apart."""

import base64
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.bundle import ScoreCalibration, ScoreName
from service.imaging import to_png
from service.objective import F64, RECONSTRUCTION_SCORES, percentile_of, value_at
from service.runtime import F32, Evaluation, Runtime
from service.settings import Settings

ThresholdSource = Literal["request", "settings", "manifest"]
MapFormat = Literal["array", "png"]


def score_draws(runtime: Runtime, score: ScoreName, samples: int, k: int | None) -> int:
    """Draws behind the anomaly score: the calibration's, so scores compare with its table.
    ValueError when score=neg_iwae has no k (the route answers it as a 422 on `k`)."""
    if score in RECONSTRUCTION_SCORES:
        return 0  # deterministic: the decoder's mean at z = mu
    table = runtime.manifest.score_table(score)
    if score == "neg_elbo":
        return table.samples if table and table.samples else samples
    if k is not None:
        return k
    if table and table.k:
        return table.k
    raise ValueError("score=neg_iwae needs k: the bundle's calibration names none")


def threshold_for(
    runtime: Runtime, settings: Settings, score: ScoreName, requested: float | None
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


def heat_png(x: F32, heat: F32) -> str:
    """Base64 PNG of an image `(C, H, W)` in grey with its anomaly map `(H, W)` over it: black to
    red to yellow to white, relative to the map's own maximum, opaque where the map is high."""
    t = heat / max(float(heat.max()), 1e-12)
    hot = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)])
    grey = np.broadcast_to(x.mean(axis=0) * 0.6, hot.shape)
    alpha = np.sqrt(t)
    overlay = (grey * (1 - alpha) + hot * alpha).astype(np.float32)
    return base64.b64encode(to_png(overlay)).decode("ascii")


@dataclass(frozen=True)
class Verdict:
    """How a request's anomaly scores are judged: the score, its draws, threshold and table."""

    seed: int
    score: ScoreName
    draws: int
    threshold: float | None
    source: ThresholdSource | None
    table: ScoreCalibration | None
    heat: MapFormat | None

    def maps(self, x: F32, values: F64 | None) -> list[Any]:
        """The anomaly maps as the request asked: nested lists or PNGs over the images."""
        if values is None:
            return [None] * len(x)
        if self.heat == "png":
            return [heat_png(image, m) for image, m in zip(x, values, strict=True)]
        return [m.tolist() for m in values]  # an image at a time: a short hold of the GIL each

    def columns(self, x: F32, result: Evaluation, samples: int, k: int | None) -> dict[str, Any]:
        """ElboResult's fields, each a column over the images, made by numpy (not per row)."""
        n, scores, table, limit = len(result.score), result.score, self.table, self.threshold
        percentiles = (
            percentile_of(scores, table.percentiles, table.values).tolist()
            if table and table.usable
            else [None] * n
        )
        return {
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

    def rows(self, x: F32, result: Evaluation, samples: int, k: int | None) -> list[dict[str, Any]]:
        """One ElboResult per image, as dicts."""
        columns = self.columns(x, result, samples, k)
        names = list(columns)
        return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]
