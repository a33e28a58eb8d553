"""service/objective.py equals model/objective.py function by function, given the same eps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service import objective
from service.bundle import load_bundle
from service.metrics import Metrics
from service.runtime import Runtime, draw_eps
from tests.service.helpers import noise, stroke

torch = pytest.importorskip("torch")
model_objective = pytest.importorskip("model.objective")

RTOL = 1e-4


def _images() -> np.ndarray:
    return np.stack([stroke(6), stroke(15), noise(1), np.zeros((28, 28), np.float32)])[:, None]


@pytest.mark.parametrize("bundle_name", ["tiny_bundle", "tiny_gaussian_bundle"])
@pytest.mark.parametrize("score", ["neg_elbo", "neg_iwae", "recon_error", "blur_recon_rel"])
def test_runtime_evaluate_is_the_pure_objective_on_the_bundle(
    bundle_name: str, score: str, request: pytest.FixtureRequest
) -> None:
    """Runtime.evaluate equals service/objective.py's functions on the bundle's own networks."""
    bundle = load_bundle(request.getfixturevalue(bundle_name))
    runtime = Runtime(bundle, Metrics(), max_rows=8192)
    manifest = bundle.manifest
    x = _images()  # (B, 1, 28, 28)
    S, K, draws = 3, 16, 8
    evaluation = asyncio.run(
        runtime.evaluate(x, samples=S, k=K, score=score, score_draws=draws, seed=7)  # type: ignore[arg-type]
    )
    mu, logvar = bundle.encode(x)
    eps = draw_eps(7, (K, len(x), manifest.latent_dim))
    args = (bundle.decode, x, mu, logvar)
    sigma = manifest.sigma or 1.0
    terms = objective.elbo(*args, eps[:S], manifest.likelihood, sigma)
    mean = objective.likelihood_mean(bundle.decode(mu), manifest.likelihood)
    expected_score = {
        "neg_elbo": -objective.elbo(*args, eps[:draws], manifest.likelihood, sigma).elbo,
        "neg_iwae": -objective.iwae(*args, eps[:draws], manifest.likelihood, sigma),
        "recon_error": objective.squared_error(x, mean),
        "blur_recon_rel": objective.blur_recon_rel(x, mean),
    }[score]
    for got, want in zip(evaluation.terms, terms, strict=True):
        np.testing.assert_array_equal(got, want)
    assert evaluation.iwae is not None
    want_iwae = objective.iwae(*args, eps, manifest.likelihood, sigma)
    np.testing.assert_array_equal(evaluation.iwae, want_iwae)
    np.testing.assert_array_equal(evaluation.score, expected_score)


def test_likelihood_mean() -> None:
    logits = np.array([-1000.0, 0.0, 1000.0], dtype=np.float32)
    np.testing.assert_allclose(objective.likelihood_mean(logits, "bernoulli"), [0.0, 0.5, 1.0])
    mean = np.array([-0.5, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(objective.likelihood_mean(mean, "gaussian"), mean)


def test_gaussian_needs_sigma() -> None:
    x = np.zeros((1, 1, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="positive sigma"):
        objective.log_likelihood(x, x, "gaussian", 0.0)


@pytest.mark.parametrize(
    "score, expected",
    [(5.0, 0.0), (10.0, 0.0), (15.0, 25.0), (20.0, 50.0), (40.0, 100.0), (41.0, 100.0)],
)
def test_percentile_interpolates_in_the_table(score: float, expected: float) -> None:
    percentiles, values = [0.0, 50.0, 100.0], [10.0, 20.0, 40.0]
    assert objective.percentile_of(np.array([score]), percentiles, values)[0] == pytest.approx(
        expected
    )


def test_value_at_percentile() -> None:
    assert objective.value_at(75.0, [0.0, 50.0, 100.0], [10.0, 20.0, 40.0]) == pytest.approx(30.0)


def test_draws_share_prefixes() -> None:
    long = draw_eps(3, (10, 4, 8))
    np.testing.assert_array_equal(long[:3], draw_eps(3, (3, 4, 8)))
    assert long.dtype == np.float32


def test_the_calibration_table_is_reproduced(tiny_bundle: Path) -> None:
    """The bundle's neg_elbo quantiles and the service's scores describe the same distribution."""
    bundle = load_bundle(tiny_bundle)
    table = bundle.manifest.calibration.scores["neg_elbo"]  # type: ignore[union-attr]
    x = np.stack([stroke(6 + i % 16) for i in range(64)])[:, None]  # the fixture's calibration set
    runtime = Runtime(bundle, Metrics(), max_rows=8192)
    evaluation = runtime.evaluate(x, samples=1, k=None, score="neg_elbo", score_draws=1, seed=0)
    scores = asyncio.run(evaluation).score
    median = objective.value_at(50.0, table.percentiles, table.values)
    assert abs(float(np.median(scores)) - median) / median < 0.05


def _blur_recon_rel_by_loops(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The score from its definition: an explicit 5x5 correlation over a zero-padded error."""
    taps = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16
    kernel = np.outer(taps, taps)
    b, c, h, w = x.shape
    err = np.pad((x - mean).astype(np.float64), [(0, 0), (0, 0), (2, 2), (2, 2)])
    blurred = np.zeros((b, c, h, w))
    for i in range(h):
        for j in range(w):
            blurred[:, :, i, j] = (err[:, :, i : i + 5, j : j + 5] * kernel).sum(axis=(2, 3))
    return (blurred**2).sum(axis=(1, 2, 3)) / (x.sum(axis=(1, 2, 3)) + 1)


def test_blur_recon_rel_by_hand_and_against_torch() -> None:
    # a single unit pixel in the middle: blur spreads it into the kernel, sum of squares
    # (70/256)^2; ink 1, so the score is that over 2. In a corner part of the kernel falls off.
    x = np.zeros((2, 1, 9, 9), dtype=np.float32)
    x[0, 0, 4, 4] = x[1, 0, 0, 0] = 1.0
    scores = objective.blur_recon_rel(x, np.zeros_like(x))
    np.testing.assert_allclose(scores, [(70 / 256) ** 2 / 2, (53 / 256) ** 2 / 2], rtol=1e-6)

    rng = np.random.default_rng(3)
    x = rng.random((3, 3, 12, 10), dtype=np.float32)
    mean = rng.random((3, 3, 12, 10), dtype=np.float32)
    expected = _blur_recon_rel_by_loops(x, mean)
    np.testing.assert_allclose(objective.blur_recon_rel(x, mean), expected, rtol=1e-5)
    t = torch.from_numpy
    np.testing.assert_allclose(
        model_objective.blur_recon_rel(t(x), t(mean)).numpy(), expected, rtol=1e-5
    )


@pytest.mark.parametrize("name", ["blur_recon_contrast", "blur_recon_energy"])
def test_contrast_scores_by_hand(name: str) -> None:
    # one unit pixel on a black 9x9 image: the median is 0, the contrast (and its square) 1, the
    # blurred error (70/256)^2 as for blur_recon_rel; on a white image with one black pixel, too
    x = np.zeros((2, 1, 9, 9), dtype=np.float32)
    x[0, 0, 4, 4] = 1.0
    x[1] = 1.0 - x[0]
    mean = x.copy()
    mean[:, 0, 4, 4] = 1.0 - mean[:, 0, 4, 4]  # reconstructions that miss that pixel
    floor = objective.ENERGY_FLOOR if name == "blur_recon_energy" else 1.0
    expected = (70 / 256) ** 2 / (1 + floor)
    np.testing.assert_allclose(getattr(objective, name)(x, mean), [expected] * 2, rtol=1e-6)


def test_anomaly_map_holds_the_terms_of_blur_recon_energy() -> None:
    rng = np.random.default_rng(6)
    x = rng.random((2, 3, 9, 7), dtype=np.float32)
    mean = x.copy()
    mean[:, :, 4, 3] += 0.5  # an error at one pixel
    heat = objective.anomaly_map(x, mean)
    assert heat.shape == (2, 9, 7)
    np.testing.assert_allclose(heat.sum(axis=(1, 2)), objective.blur_recon_energy(x, mean))
    assert np.unravel_index(np.argmax(heat[0]), (9, 7)) == (4, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_recon_energy_ignores_polarity_and_colours(channels: int) -> None:
    rng = np.random.default_rng(5)
    ink = (rng.random((3, 1, 16, 16)) < 0.2).astype(np.float32)
    mean = np.clip(ink + 0.1 * rng.standard_normal(ink.shape), 0, 1).astype(np.float32)
    plain = objective.blur_recon_energy(ink, mean)
    np.testing.assert_allclose(objective.blur_recon_energy(1 - ink, 1 - mean), plain, rtol=1e-5)
    # in two colours (background bg, stroke bg + delta): error and squared contrast both scale
    # with |delta|^2, so only the floor of the denominator moves the score
    bg = np.array([0.1, 0.7, 0.3][:channels], np.float32)[None, :, None, None]
    delta = np.array([0.8, -0.6, 0.2][:channels], np.float32)[None, :, None, None]
    coloured = objective.blur_recon_energy(bg + delta * ink, bg + delta * mean)
    energy = objective.contrast_energy(ink)
    scale = float(np.square(delta).sum())
    floor = objective.ENERGY_FLOOR
    np.testing.assert_allclose(
        coloured, plain * (energy + floor) * scale / (scale * energy + floor), rtol=1e-6
    )
    # blur_recon_contrast's L1 normaliser scales with sum |delta| instead: not invariant
    l1 = objective.blur_recon_contrast(bg + delta * ink, bg + delta * mean)
    contrast = objective.contrast(ink)
    l1_scale = float(np.abs(delta).sum())
    expected = objective.blur_recon_contrast(ink, mean) * (contrast + 1) * scale
    np.testing.assert_allclose(l1, expected / (l1_scale * contrast + 1), rtol=1e-5)
