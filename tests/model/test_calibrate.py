"""model/calibrate.py: the synthesised outliers, the choice of the default score, the FPR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from model.calibrate import (
    DEFAULT_CANDIDATES,
    OUTLIERS,
    calibrate,
    choose,
    score,
    synthesise,
)
from service.bundle import load_bundle
from service.metrics import Metrics
from service.objective import value_at
from service.runtime import Runtime


@pytest.mark.parametrize("shape", [(6, 1, 28, 28), (5, 3, 16, 12)])
def test_outliers_keep_shape_and_range(shape: tuple[int, int, int, int]) -> None:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    made = synthesise(x, seed=1)
    assert list(made) == list(OUTLIERS)
    for name, images in made.items():
        assert images.shape == x.shape and images.dtype == np.float32, name
        assert images.min() >= 0.0 and images.max() <= 1.0, name
    np.testing.assert_allclose(made["inverted"], 1 - x)
    assert np.ptp(made["constant"], axis=(2, 3)).max() == 0.0
    # a pixel shuffle keeps each image's pixels, only their places change
    np.testing.assert_array_equal(
        np.sort(made["pixel_shuffle"].reshape(*shape[:2], -1)), np.sort(x.reshape(*shape[:2], -1))
    )
    # seeded: the same seed, the same outliers
    np.testing.assert_array_equal(synthesise(x, seed=1)["cut_paste"], made["cut_paste"])


def test_selection_and_false_positive_rate(tiny_bundle: Path) -> None:
    rng = np.random.default_rng(2)
    x = np.zeros((40, 1, 28, 28), dtype=np.float32)  # strokes like the tiny bundle's data
    for i, r in enumerate(rng.integers(4, 22, 40)):
        x[i, 0, 4:24, r : r + 3] = 1.0
    cal = calibrate(tiny_bundle, x, "strokes", k=4, seed=3)
    sel = cal["selection"]
    assert list(sel["auroc"]) == list(DEFAULT_CANDIDATES)
    assert cal["default_score"] == sel["chosen"] == choose(sel["auroc"])[0]
    assert sel["default_from"] == "selection" and set(sel["outliers"]) == set(OUTLIERS)
    counted = [f for f in OUTLIERS if f not in sel["uncaught"]]
    for name, table in sel["auroc"].items():
        assert sel["missed"][name] == [f for f in counted if table[f] < 0.6]
    # one figure recomputed independently: blur_recon_contrast, blank (constant) images
    model = Runtime(load_bundle(tiny_bundle), Metrics(), max_rows=1 << 30)
    normal = score(model, x, "blur_recon_contrast", 0, 3)
    blank = score(model, synthesise(x, 3)["constant"], "blur_recon_contrast", 0, 3)
    auc = roc_auc_score(np.r_[np.zeros(40), np.ones(40)], np.r_[normal, blank])
    assert sel["auroc"]["blur_recon_contrast"]["constant"] == pytest.approx(auc, abs=1e-4)
    # the FPR: the other half of the images above the tables' 99th percentile
    fpr = cal["false_positive_rate"]
    check = np.random.default_rng(3).permutation(40)[20:]
    table = cal["scores"][cal["default_score"]]
    threshold = value_at(99.0, table["percentiles"], table["values"])
    assert fpr["threshold"] == pytest.approx(threshold)
    scores = score(model, x[check], cal["default_score"], 1, 3)
    assert fpr["rate"] == pytest.approx(float(np.mean(scores > threshold)))


def test_calibration_refuses_unknown_scores_and_tiny_sets(tiny_bundle: Path) -> None:
    x = np.zeros((40, 1, 28, 28), dtype=np.float32)
    with pytest.raises(ValueError, match="default score must be one of"):
        calibrate(tiny_bundle, x, "d", default_score="mse")
    with pytest.raises(ValueError, match="at least 2 held-out images, got 1"):
        calibrate(tiny_bundle, x[:1], "d")


def test_a_tiny_held_out_set_still_calibrates_with_a_warning(
    tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = np.random.default_rng(4).random((2, 1, 28, 28), dtype=np.float32)
    cal = calibrate(tiny_bundle, x, "two images", k=2)
    assert cal["images"] == cal["false_positive_rate"]["images"] == 1
    assert cal["default_score"] in DEFAULT_CANDIDATES
    assert "calibrating on 2 held-out images" in caplog.text


@pytest.mark.parametrize(
    "auroc, chosen, uncaught",
    [
        # the best mean is at chance on one family: the next candidate, above chance on all
        (
            {"a": {"f": 1.0, "g": 1.0, "h": 0.55}, "b": {"f": 0.9, "g": 0.8, "h": 0.7}},
            "b",
            [],
        ),
        # a family no candidate catches (in-distribution for this data) does not count
        (
            {"a": {"f": 1.0, "g": 0.9, "h": 0.5}, "b": {"f": 0.9, "g": 0.8, "h": 0.52}},
            "a",
            ["h"],
        ),
        # every candidate misses one family another catches: the fewest misses, then the mean
        (
            {
                "a": {"f": 1.0, "g": 0.1, "h": 0.2},
                "b": {"f": 0.7, "g": 0.65, "h": 0.3},
                "c": {"f": 0.2, "g": 0.9, "h": 0.95},
            },
            "c",
            [],
        ),
        # equal, or within TIE: the first (the order of DEFAULT_CANDIDATES)
        ({"a": {"f": 0.9}, "b": {"f": 0.9}}, "a", []),
        ({"a": {"f": 0.9}, "b": {"f": 0.9009}}, "a", []),
        ({"a": {"f": 0.9}, "b": {"f": 0.902}}, "b", []),
    ],
)
def test_choose_passes_over_a_score_that_misses_a_family(
    auroc: dict[str, dict[str, float]], chosen: str, uncaught: list[str]
) -> None:
    name, mean, missed, left_out = choose(auroc)
    assert (name, left_out) == (chosen, uncaught)
    counted = [f for f in auroc[chosen] if f not in uncaught]
    assert missed == {n: [f for f in counted if a[f] < 0.6] for n, a in auroc.items()}
    assert mean[name] == pytest.approx(np.mean([auroc[name][f] for f in counted]), abs=1e-4)
