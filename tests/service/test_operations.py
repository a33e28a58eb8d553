"""GET /model, /healthz, /readyz, /metrics, and the API key."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.bundle import SCORE_NAMES
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, stroke

MODEL_ROUTES = [
    ("POST", "/encode"),
    ("POST", "/decode"),
    ("GET", "/sample"),
    ("POST", "/elbo"),
    ("POST", "/reconstruct"),
    ("GET", "/model"),
]


def test_model_describes_the_bundle(client: TestClient) -> None:
    body = client.get("/model").json()
    assert body["name"] == "tiny-bernoulli" and body["version"] == "0.0.1"
    assert body["image"] == {"channels": 1, "height": 28, "width": 28, "background": 0.0}
    assert (body["latent_dim"], body["likelihood"], body["sigma"]) == (8, "bernoulli", None)
    assert body["providers"] == ["CPUExecutionProvider"]
    calibration = body["calibration"]
    assert set(calibration["scores"]) == set(SCORE_NAMES)
    assert calibration["images"] == 32  # fields beyond the schema are kept
    # the default threshold's false-positive rate on the 32 held-out images not in the tables
    fpr = calibration["false_positive_rate"]
    assert fpr["score"] == calibration["default_score"] and fpr["images"] == 32
    assert 0.0 <= fpr["rate"] <= 1.0 and calibration["selection"]["mean_auroc"]
    assert "onnx_max_abs_error" in body["metrics"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_before_the_lifespan(tiny_bundle: Path) -> None:
    client = TestClient(create_app(Settings(bundle=tiny_bundle)))  # no `with`: no lifespan
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["detail"] == "not ready: the model bundle is not loaded"
    sample = client.get("/sample")
    assert sample.status_code == 503 and "model not loaded yet" in sample.json()["detail"]


def test_metrics(make_client: MakeClient) -> None:
    with make_client() as client:
        client.post("/encode", files=files(encode(stroke()), encode(stroke(9))))
        client.get("/sample", params={"n": 3})
        client.get("/sample", params={"n": 0})
        client.get("/no/such/path")
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in [
        'vae_http_requests_total{endpoint="/encode",method="POST",status="200"} 1.0',
        'vae_http_requests_total{endpoint="/sample",method="GET",status="200"} 1.0',
        'vae_http_requests_total{endpoint="/sample",method="GET",status="422"} 1.0',
        'vae_http_requests_total{endpoint="<unmatched>",method="GET",status="404"} 1.0',
        'vae_http_request_duration_seconds_count{endpoint="/encode",method="POST",status="200"} 1',
        'vae_request_images_count{endpoint="/encode"} 1.0',
        'vae_request_images_sum{endpoint="/encode"} 2.0',
        'vae_request_images_sum{endpoint="/sample"} 3.0',
        'vae_batch_size_sum{network="encoder"} 2.0',  # warm-up is not counted
        "vae_ready 1.0",
    ]:
        assert line in text, line
    assert 'vae_inference_duration_seconds_bucket{le="0.001",network="decoder"}' in text
    assert 'vae_bundle_info{latent_dim="8",likelihood="bernoulli",name="tiny-bernoulli"' in text


def test_apps_do_not_share_metrics(make_client: MakeClient) -> None:
    with make_client() as one, make_client() as two:
        one.get("/healthz")
        assert 'endpoint="/healthz"' not in two.get("/metrics").text


@pytest.mark.parametrize("method, path", MODEL_ROUTES)
def test_api_key_is_required(make_client: MakeClient, method: str, path: str) -> None:
    with make_client(api_key="s3cret") as client:
        missing = client.request(method, path)
        assert missing.status_code == 401
        assert (
            missing.json()["detail"]
            == "missing API key: send it as X-API-Key or Authorization: Bearer <key>"
        )
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, path, headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and wrong.json()["detail"].startswith("invalid API key")
        bearer_wrong = client.request(method, path, headers={"Authorization": "Bearer guess"})
        assert bearer_wrong.status_code == 401
        # the right key and a wrong one: the first used to count, so the order decided
        for pair in (["s3cret", "guess"], ["guess", "s3cret"]):
            two = client.request(method, path, headers=[("X-API-Key", key) for key in pair])
            assert two.status_code == 401
            assert two.json()["detail"].startswith("more than one API key header")


def test_api_key_accepted(make_client: MakeClient) -> None:
    with make_client(api_key="s3cret") as client:
        assert client.get("/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/model", headers={"Authorization": "Basic s3cret"}).status_code == 401
        png = encode(stroke())
        ok = client.post("/encode", files=files(png), headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert client.get(open_path).status_code == 200, open_path
