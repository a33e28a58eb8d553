"""POST /encode."""

from __future__ import annotations

import base64

import numpy as np
from fastapi.testclient import TestClient

from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise, stroke


def _mu(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([r["mu"] for r in response.json()["results"]])


def test_one_upload(client: TestClient) -> None:
    response = client.post("/encode", files=files(encode(stroke())))
    assert response.status_code == 200
    body = response.json()
    assert body["latent_dim"] == 8 and body["seed"] is None
    (result,) = body["results"]
    assert len(result["mu"]) == len(result["logvar"]) == 8
    assert result["z"] is None


def test_a_batch_equals_single_images(client: TestClient) -> None:
    images = [encode(stroke(6)), encode(noise(1)), encode(stroke(18))]
    batch = _mu(client.post("/encode", files=files(*images)))
    singles = np.concatenate([_mu(client.post("/encode", files=files(image))) for image in images])
    np.testing.assert_allclose(batch, singles, rtol=1e-5, atol=1e-6)


def test_all_input_forms_agree(client: TestClient) -> None:
    png = encode(stroke())
    expected = _mu(client.post("/encode", files=files(png)))
    b64 = base64.b64encode(png).decode()
    for response in (
        client.post("/encode", json={"images": [b64]}),
        client.post("/encode", json={"images": [f"data:image/png;base64,{b64}"]}),
        client.post("/encode", json={"pixels": [stroke().tolist()]}),
        client.post("/encode", json={"pixels": [[stroke().tolist()]]}),
        client.post("/encode", content=png, headers={"Content-Type": "image/png"}),
    ):
        np.testing.assert_allclose(_mu(response), expected, rtol=1e-5, atol=1e-6)


def test_other_sizes_and_colour_are_converted(client: TestClient) -> None:
    rgb_big = np.repeat(np.kron(stroke(), np.ones((3, 3)))[..., None], 3, axis=2)  # 84x84 RGB
    response = client.post("/encode", files=files(encode(rgb_big, "JPEG")))
    assert response.status_code == 200
    pixels = client.post("/encode", json={"pixels": [np.zeros((3, 10, 12)).tolist()]})
    assert pixels.status_code == 200


def test_sampling_is_seeded_and_reparameterised(client: TestClient) -> None:
    png = encode(stroke())
    first = client.post(
        "/encode", params={"sample": True, "seed": 42}, files=files(png, png)
    ).json()
    again = client.post(
        "/encode", params={"sample": True, "seed": 42}, files=files(png, png)
    ).json()
    assert first == again and first["seed"] == 42
    result = first["results"][1]
    eps = np.random.default_rng(42).standard_normal((2, 8), dtype=np.float32)[1]
    expected = np.array(result["mu"]) + np.exp(0.5 * np.array(result["logvar"])) * eps
    np.testing.assert_allclose(result["z"], expected, rtol=1e-5)


def test_sampling_without_a_seed_uses_a_fresh_one(client: TestClient) -> None:
    png = encode(stroke())
    one = client.post("/encode", params={"sample": "true"}, files=files(png)).json()
    two = client.post("/encode", params={"sample": "true"}, files=files(png)).json()
    assert isinstance(one["seed"], int) and one["seed"] != two["seed"]
    assert one["results"][0]["z"] != two["results"][0]["z"]
    replay = client.post(
        "/encode", params={"sample": "true", "seed": one["seed"]}, files=files(png)
    )
    assert replay.json() == one


def test_strict_size(make_client: MakeClient) -> None:
    with make_client(strict_size=True) as client:
        response = client.post("/encode", files=files(encode(np.zeros((32, 32)))))
        assert response.status_code == 422
        assert response.json()["detail"][0]["msg"] == (
            "image 0 ('0.png') is 32x32; the model takes 28x28 (VAE_STRICT_SIZE is on)"
        )
        pixels = client.post("/encode", json={"pixels": [np.zeros((32, 30)).tolist()]})
        assert pixels.status_code == 422
        assert "pixels[0] is 30x32; the model takes 28x28" in pixels.json()["detail"][0]["msg"]
        assert client.post("/encode", files=files(encode(stroke()))).status_code == 200
