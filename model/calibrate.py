"""Calibrate a bundle's anomaly scores from its ONNX files, and choose its default score.

Runs the bundle as the server does (onnxruntime and service/objective.py through
`service.runtime.Runtime`), so the tables hold exactly the numbers /elbo returns. `vae export`
calls it on the bundle it has just written; `vae calibrate` on an existing one.

The default score is chosen on held-out normal images only: each candidate's AUROC of those
images against outliers synthesised from them (OUTLIERS; no test anomaly plays a part). A
candidate that misses a family another candidate catches is passed over while one misses fewer;
among those the highest mean AUROC wins (`choose`, RULE). The candidates are the scores
that cost one decoder pass per image (DEFAULT_CANDIDATES): the default must be cheap to serve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from service.bundle import SCORE_NAMES, load_bundle
from service.metrics import Metrics
from service.objective import blur, value_at
from service.runtime import Runtime

log = logging.getLogger(__name__)

PERCENTILES = [round(0.1 * i, 1) for i in range(1001)]  # 0, 0.1, ..., 100
THRESHOLD_PERCENTILE = 99.0
# in order of preference where two tie (on MNIST, blur_recon_rel equals blur_recon_contrast)
DEFAULT_CANDIDATES = (
    "blur_recon_energy",
    "blur_recon_contrast",
    "blur_recon_rel",
    "recon_error",
    "neg_elbo",
)
# A score catches an outlier family when its AUROC there is at least this: 0.1 above chance.
CATCH = 0.6
# Mean AUROCs this close are a tie, which goes to the earlier candidate: differences this small
# are below the noise of 1,000 synthesised outliers against 1,000 held-out images.
TIE = 0.001
BATCH = 500
ROUGH = 200  # held-out images below which calibration warns that its figures are rough

Images = np.ndarray  # (N, C, H, W) float32 in [0, 1]
Outlier = Callable[[Images, np.random.Generator], Images]


def _background(x: Images) -> Images:
    """Each image's per-channel median, broadcast to its shape."""
    b, c = x.shape[:2]
    return np.broadcast_to(np.median(x.reshape(b, c, -1), axis=-1)[:, :, None, None], x.shape)


def _constant(x: Images, rng: np.random.Generator) -> Images:
    return np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape)


def _near_blank(x: Images, rng: np.random.Generator) -> Images:
    """The background, with one small square of the image left in it."""
    out = _background(x).copy()
    h, w = x.shape[2:]
    side = max(2, min(h, w) // 5)
    for i in range(len(x)):
        r, c = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        out[i, :, r : r + side, c : c + side] = x[i, :, r : r + side, c : c + side]
    return out


def _faint(x: Images, rng: np.random.Generator) -> Images:
    bg = _background(x)
    return np.asarray(bg + 0.15 * (x - bg))


def _noise(x: Images, rng: np.random.Generator) -> Images:
    return rng.random(x.shape, dtype=np.float32)


def _pixel_shuffle(x: Images, rng: np.random.Generator) -> Images:
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    order = np.argsort(rng.random((b, 1, flat.shape[-1])), axis=-1)  # one order per image
    return np.take_along_axis(flat, np.broadcast_to(order, flat.shape), axis=-1).reshape(x.shape)


def _cut_paste(x: Images, rng: np.random.Generator) -> Images:
    """A patch of another image pasted at a random place (CutPaste, Li et al. 2021)."""
    out = x.copy()
    h, w = x.shape[2:]
    donors = rng.permutation(len(x))
    for i in range(len(x)):
        ph, pw = rng.integers(h // 4, h // 2 + 1), rng.integers(w // 4, w // 2 + 1)
        sr, sc = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        dr, dc = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        out[i, :, dr : dr + ph, dc : dc + pw] = x[donors[i], :, sr : sr + ph, sc : sc + pw]
    return out


def _vflip(x: Images, rng: np.random.Generator) -> Images:
    return x[:, :, ::-1]


def _rotate(x: Images, rng: np.random.Generator) -> Images:
    return np.rot90(x, 1, axes=(2, 3)) if x.shape[2] == x.shape[3] else x[:, :, ::-1, ::-1]


def _mix(x: Images, rng: np.random.Generator) -> Images:
    return np.asarray(0.5 * (x + x[rng.permutation(len(x))]))


def _blurred(x: Images, rng: np.random.Generator) -> Images:
    for _ in range(4):
        x = blur(x) / blur(np.ones_like(x[:1]))  # renormalised at the border: no dark frame
    return x


def _inverted(x: Images, rng: np.random.Generator) -> Images:
    return 1.0 - x


# name -> (how it is made, what it stands for); every one is made from held-out normal images
OUTLIERS: dict[str, tuple[Outlier, str]] = {
    "constant": (_constant, "each image's mean colour everywhere (blank images)"),
    "near_blank": (_near_blank, "the image's median background with one square of 1/5 side kept"),
    "faint": (_faint, "the image at 15 % of its contrast against its background"),
    "noise": (_noise, "uniform noise in [0, 1]"),
    "pixel_shuffle": (_pixel_shuffle, "the image's pixels in a random order"),
    "cut_paste": (_cut_paste, "a patch of 1/4-1/2 side from another image pasted in"),
    "vflip": (_vflip, "the image upside down"),
    "rotate": (_rotate, "the image turned 90 degrees (180 if not square)"),
    "mix": (_mix, "the mean of two images"),
    "blur": (_blurred, "the image blurred 4 times by the 5x5 binomial filter"),
    "inverted": (_inverted, "1 - x"),
}


def synthesise(x: Images, seed: int) -> dict[str, Images]:
    """Every OUTLIERS family made from the images `x`, float32 `(N, C, H, W)` each."""
    return {
        name: np.ascontiguousarray(make(x, np.random.default_rng([seed, i])), dtype=np.float32)
        for i, (name, (make, _)) in enumerate(OUTLIERS.items())
    }


def score(model: Runtime, x: Images, name: str, draws: int, seed: int) -> np.ndarray:
    """`name` for every image of `x`, as /elbo computes it with `score_draws=draws`, `seed`."""
    out = []
    for i in range(0, len(x), BATCH):
        evaluation = model.evaluate(
            x[i : i + BATCH],
            samples=1,
            k=None,
            score=name,  # type: ignore[arg-type]  # one of SCORE_NAMES
            score_draws=draws,
            seed=seed,
        )
        result = asyncio.run(evaluation)
        out.append(result.score)
    return np.concatenate(out)


def _draws(name: str, k: int) -> int:
    return {"neg_elbo": 1, "neg_iwae": k}.get(name, 0)


RULE = (
    f"held-out normal images against outliers made from them (AUROC per family); a candidate "
    f"misses a family when its AUROC is below {CATCH} there and another candidate's is not; "
    f"families no candidate catches do not count; among the candidates that miss the fewest "
    f"families the highest mean AUROC over the counted families wins (within {TIE}: the "
    f"earlier candidate); candidates: the scores of one decoder pass"
)


def choose(
    auroc: dict[str, dict[str, float]],
) -> tuple[str, dict[str, float], dict[str, list[str]], list[str]]:
    """The default score from each candidate's AUROC per outlier family (RULE), with each
    candidate's mean AUROC and missed families over the families that count, and the families no
    candidate catches.

    A candidate at or below chance on a family another candidate catches would let that kind of
    anomaly through, whatever its mean. A family no candidate catches cannot tell them apart: it
    is no outlier for this data (1 - x when stroke and background colours are random), or one
    the model is too weak for.
    """
    families = list(next(iter(auroc.values())))
    uncaught = [f for f in families if all(a[f] < CATCH for a in auroc.values())]
    counted = [f for f in families if f not in uncaught] or families
    mean = {n: round(float(np.mean([a[f] for f in counted])), 4) for n, a in auroc.items()}
    missed = {n: [f for f in counted if a[f] < CATCH] for n, a in auroc.items()}
    fewest = min(len(m) for m in missed.values())
    candidates = [n for n in auroc if len(missed[n]) == fewest]
    best = max(mean[n] for n in candidates)
    chosen = next(n for n in candidates if mean[n] >= best - TIE)
    return chosen, mean, missed, uncaught


def calibrate(
    bundle: Path,
    normal: Images,
    description: str,
    *,
    k: int = 64,
    seed: int = 0,
    default_score: str | None = None,
) -> dict[str, Any]:
    """The manifest's `calibration` for the bundle at `bundle`, from held-out `normal` images.

    Half of them (a seeded split) make the percentile tables, whose value at the 99th
    percentile is each score's default threshold; the other half measure that threshold's
    false-positive rate. All of them, against OUTLIERS made from them, choose the default score
    unless `default_score` names one.
    """
    if default_score is not None and default_score not in SCORE_NAMES:
        raise ValueError(f"default score must be one of {SCORE_NAMES}, got {default_score!r}")
    if len(normal) < 2:
        raise ValueError(f"calibration needs at least 2 held-out images, got {len(normal)}")
    if len(normal) < ROUGH:
        log.warning(
            "calibrating on %d held-out images: the thresholds, their false-positive rate and "
            "the choice of the default score are rough below %d",
            len(normal),
            ROUGH,
        )
    normal = np.ascontiguousarray(normal, dtype=np.float32)
    model = Runtime(load_bundle(bundle, device="cpu", threads=0), Metrics(), max_rows=1 << 30)
    order = np.random.default_rng(seed).permutation(len(normal))
    table_rows, check_rows = order[: len(order) // 2], order[len(order) // 2 :]

    scores = {name: score(model, normal, name, _draws(name, k), seed) for name in SCORE_NAMES}
    outliers = synthesise(normal, seed)
    auroc: dict[str, dict[str, float]] = {}
    for name in DEFAULT_CANDIDATES:
        auroc[name] = {}
        for family, images in outliers.items():
            bad = score(model, images, name, _draws(name, k), seed)
            truth = np.r_[np.zeros(len(normal)), np.ones(len(bad))]
            auroc[name][family] = round(float(roc_auc_score(truth, np.r_[scores[name], bad])), 4)
    chosen, mean, missed, uncaught = choose(auroc)
    default = default_score or chosen

    def table(name: str) -> dict[str, Any]:
        values = np.percentile(scores[name][table_rows], PERCENTILES)
        extra = {"samples": 1, "seed": seed} if name == "neg_elbo" else {}
        extra = {"k": k, "seed": seed} if name == "neg_iwae" else extra
        return {**extra, "percentiles": PERCENTILES, "values": values.tolist()}

    tables = {name: table(name) for name in SCORE_NAMES}
    threshold = value_at(THRESHOLD_PERCENTILE, PERCENTILES, tables[default]["values"])
    fpr = float(np.mean(scores[default][check_rows] > threshold))
    log.info("default score %s (mean AUROC on synthetic outliers %s)", default, mean)
    if missed[chosen] or uncaught:
        log.warning(
            "the default score %s misses outlier families %s (AUROC < %s) and no candidate "
            "catches %s: the model may be too weak for its data",
            chosen,
            missed[chosen],
            CATCH,
            uncaught,
        )
    return {
        "data": description,
        "images": len(table_rows),
        "default_score": default,
        "threshold_percentile": THRESHOLD_PERCENTILE,
        "false_positive_rate": {
            "score": default,
            "threshold": threshold,
            "rate": fpr,
            "images": len(check_rows),
            "data": "the held-out images not used for the tables",
        },
        "selection": {
            "chosen": chosen,
            "default_from": "--default-score" if default_score else "selection",
            "rule": RULE,
            "normal_images": len(normal),
            "seed": seed,
            "outliers": {family: about for family, (_, about) in OUTLIERS.items()},
            "mean_auroc": mean,
            "missed": missed,
            "uncaught": uncaught,
            "auroc": auroc,
        },
        "scores": tables,
    }


def write_calibration(bundle: Path, calibration: dict[str, Any], version: str | None) -> None:
    """Replace the calibration (and the version, if given) in `bundle/manifest.json`, atomically."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["calibration"] = calibration
    if version:
        manifest["version"] = version
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=bundle)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
