"""POST /elbo: bounds, anomaly scores and verdicts."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import objective
from service.bundle import read_manifest
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise, rewrite_manifest, stroke
from tests.service.test_objective import _blur_recon_rel_by_loops

FIELDS = {
    "elbo",
    "reconstruction",
    "kl",
    "samples",
    "iwae",
    "k",
    "anomaly_score",
    "percentile",
    "is_anomaly",
    "anomaly_map",
}


def _results(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_default_scoring(client: TestClient, tiny_bundle: Path) -> None:
    response = client.post("/elbo", files=files(encode(stroke()), encode(noise())))
    body = response.json()
    calibration = read_manifest(tiny_bundle).calibration
    assert calibration is not None
    table = calibration.scores["neg_elbo"]
    assert body["seed"] == 0 and body["score"] == "neg_elbo" and body["score_draws"] == 1
    assert body["threshold_source"] == "manifest"
    assert body["threshold"] == pytest.approx(
        objective.value_at(99.0, table.percentiles, table.values)
    )
    for result in body["results"]:
        assert set(result) == FIELDS
        assert result["samples"] == 1 and result["iwae"] is None and result["k"] is None
        assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"])
        assert result["kl"] >= 0
        assert result["anomaly_score"] == pytest.approx(-result["elbo"])
        assert 0.0 <= result["percentile"] <= 100.0
    stroke_result, noise_result = body["results"]
    assert stroke_result["is_anomaly"] is False  # like the calibration images
    assert noise_result["is_anomaly"] is True and noise_result["percentile"] == 100.0


def test_scores_are_reproducible_and_seeded(client: TestClient) -> None:
    png = encode(stroke())
    first = _results(client.post("/elbo", files=files(png)))
    assert _results(client.post("/elbo", files=files(png))) == first
    assert _results(client.post("/elbo", params={"seed": 0}, files=files(png))) == first
    assert _results(client.post("/elbo", params={"seed": 5}, files=files(png))) != first


def test_samples_and_iwae(client: TestClient) -> None:
    response = client.post("/elbo", params={"samples": 8, "k": 8}, files=files(encode(stroke())))
    (result,) = _results(response)
    assert (result["samples"], result["k"]) == (8, 8)
    assert result["iwae"] == pytest.approx(result["elbo"], rel=0.05)  # bounds on one log p(x)
    # the default score still uses the calibration's single draw
    single = _results(client.post("/elbo", files=files(encode(stroke()))))[0]
    assert result["anomaly_score"] == pytest.approx(single["anomaly_score"])


def test_neg_iwae_score(client: TestClient) -> None:
    response = client.post("/elbo", params={"score": "neg_iwae"}, files=files(encode(stroke())))
    body = response.json()
    assert body["score"] == "neg_iwae" and body["score_draws"] == 8  # the calibration's k
    with_k = client.post(
        "/elbo", params={"score": "neg_iwae", "k": 8}, files=files(encode(stroke()))
    ).json()
    assert with_k["results"][0]["anomaly_score"] == pytest.approx(-with_k["results"][0]["iwae"])
    assert with_k["results"][0]["anomaly_score"] == pytest.approx(
        body["results"][0]["anomaly_score"]
    )


def test_threshold_overrides(make_client: MakeClient) -> None:
    png = encode(stroke())
    with make_client(anomaly_threshold=1.0) as client:
        body = client.post("/elbo", files=files(png)).json()
        assert (body["threshold"], body["threshold_source"]) == (1.0, "settings")
        assert body["results"][0]["is_anomaly"] is True
        request = client.post("/elbo", params={"threshold": 1e9}, files=files(png)).json()
        assert (request["threshold"], request["threshold_source"]) == (1e9, "request")
        assert request["results"][0]["is_anomaly"] is False
        # the setting is a threshold on the default score only
        other = client.post("/elbo", params={"score": "neg_iwae"}, files=files(png)).json()
        assert other["threshold_source"] == "manifest"


def test_without_calibration(make_client: MakeClient, tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = rewrite_manifest(tiny_bundle, tmp_path / "uncalibrated", calibration=None)
    with make_client(bundle=bundle) as client:
        body = client.post("/elbo", params={"samples": 2}, files=files(encode(stroke()))).json()
        assert (body["threshold"], body["threshold_source"], body["score_draws"]) == (None, None, 2)
        (result,) = body["results"]
        assert result["percentile"] is None and result["is_anomaly"] is None
        assert result["anomaly_score"] == pytest.approx(-result["elbo"])
        response = client.post("/elbo", params={"score": "neg_iwae"}, files=files(encode(stroke())))
        assert response.status_code == 422
        assert "score=neg_iwae needs k" in response.json()["detail"][0]["msg"]
        thresholded = client.post(
            "/elbo", params={"threshold": 0}, files=files(encode(stroke()))
        ).json()
        assert thresholded["results"][0]["is_anomaly"] is True


def test_gaussian_bundle(gaussian_client: TestClient) -> None:
    (result,) = _results(
        gaussian_client.post("/elbo", params={"k": 4}, files=files(encode(stroke())))
    )
    assert np.isfinite([result["elbo"], result["iwae"], result["percentile"]]).all()


@pytest.mark.parametrize(
    "score", ["recon_error", "blur_recon_rel", "blur_recon_contrast", "blur_recon_energy"]
)
@pytest.mark.parametrize("which", ["client", "gaussian_client"])
def test_reconstruction_scores(which: str, score: str, request: pytest.FixtureRequest) -> None:
    client: TestClient = request.getfixturevalue(which)
    pixels = [stroke().tolist(), noise().tolist()]
    response = client.post("/elbo", params={"score": score}, json={"pixels": pixels})
    body = response.json()
    assert body["score"] == score and body["score_draws"] == 0
    assert body["threshold_source"] == "manifest"
    # independently: the decoder's mean at z = mu, from /reconstruct, against the input
    recon = client.post("/reconstruct", params={"format": "arrays"}, json={"pixels": pixels})
    assert recon.status_code == 200, recon.text
    mean = np.asarray(recon.json()["arrays"])
    x = np.asarray(pixels)[:, None]
    if score == "recon_error":
        expected = ((x - mean) ** 2).sum(axis=(1, 2, 3))
    elif score == "blur_recon_rel":
        expected = _blur_recon_rel_by_loops(x, mean)
    else:  # the same blurred error over the contrast against the median instead of the ink
        ink, deviation = x.sum(axis=(1, 2, 3)), x - np.median(x, axis=(2, 3), keepdims=True)
        power, floor = (1, 1.0) if score == "blur_recon_contrast" else (2, 0.1)
        contrast = (np.abs(deviation) ** power).sum(axis=(1, 2, 3))
        expected = _blur_recon_rel_by_loops(x, mean) * (ink + 1) / (contrast + floor)
    scores = [r["anomaly_score"] for r in _results(response)]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_anomaly_maps(client: TestClient) -> None:
    pixels = [stroke().tolist(), noise().tolist()]
    params = {"score": "blur_recon_energy", "map": "array"}
    results = _results(client.post("/elbo", params=params, json={"pixels": pixels}))
    recon = client.post("/reconstruct", params={"format": "arrays"}, json={"pixels": pixels})
    mean = np.asarray(recon.json()["arrays"], dtype=np.float32)
    expected = objective.anomaly_map(np.asarray(pixels, dtype=np.float32)[:, None], mean)
    for result, heat in zip(results, expected, strict=True):
        got = np.asarray(result["anomaly_map"])
        assert got.shape == (28, 28)
        np.testing.assert_allclose(got, heat, rtol=1e-4, atol=1e-9)
        assert got.sum() == pytest.approx(result["anomaly_score"], rel=1e-4)  # its terms
    # as PNG heat maps over the input, with any score; without map, none
    results = _results(client.post("/elbo", params={"map": "png"}, json={"pixels": pixels}))
    for result in results:
        image = Image.open(io.BytesIO(base64.b64decode(result["anomaly_map"])))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (28, 28)
    assert _results(client.post("/elbo", json={"pixels": pixels}))[0]["anomaly_map"] is None
