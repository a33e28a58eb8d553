"""POST /decode and GET /sample: latents to images in every output format."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

Z = [[0.0] * 8, [1.0, -1.0] * 4, [0.5] * 8]


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_decode_to_base64_pngs(client: TestClient) -> None:
    response = client.post("/decode", json={"z": Z})
    assert response.status_code == 200
    body = response.json()
    assert (body["channels"], body["height"], body["width"]) == (1, 28, 28)
    assert body["kind"] == "probabilities" and body["arrays"] is None
    images = [_png(base64.b64decode(b)) for b in body["images"]]
    assert [(i.format, i.mode, i.size) for i in images] == [("PNG", "L", (28, 28))] * 3


def test_decode_arrays_match_the_pngs(client: TestClient) -> None:
    arrays = np.array(
        client.post("/decode", params={"format": "arrays"}, json={"z": Z}).json()["arrays"]
    )
    assert arrays.shape == (3, 1, 28, 28)
    assert arrays.min() >= 0.0 and arrays.max() <= 1.0
    pngs = client.post("/decode", json={"z": Z}).json()["images"]
    first = np.asarray(_png(base64.b64decode(pngs[0]))) / 255.0
    np.testing.assert_allclose(first, arrays[0, 0], atol=1 / 255)


@pytest.mark.parametrize(
    "accept, expected",
    [
        ("image/png", "image/png"),
        ("image/*", "image/png"),
        ("application/json", "application/json"),
        ("*/*", "application/json"),
        ("image/png;q=0.5, application/json", "application/json"),
        ("application/json;q=0.2, image/png", "image/png"),
        ("text/html, */*;q=0.1", "application/json"),
        ("image/png, application/json", "application/json"),
        (",;", "application/json"),  # nothing parseable: the default
        ("image/png;q=oops", "image/png"),
    ],
)
def test_accept_negotiation(client: TestClient, accept: str, expected: str) -> None:
    response = client.post("/decode", json={"z": Z}, headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(expected)


def test_png_grid(client: TestClient) -> None:
    response = client.post("/decode", json={"z": Z}, headers={"Accept": "image/png"})
    grid = _png(response.content)
    assert grid.size == (2 * 30 + 2, 2 * 30 + 2)  # 3 images in a 2x2 grid, 2 px padding
    explicit = client.post("/decode", params={"format": "grid"}, json={"z": Z})
    assert explicit.content == response.content


def test_unacceptable_accept(client: TestClient) -> None:
    response = client.post("/decode", json={"z": Z}, headers={"Accept": "text/html"})
    assert response.status_code == 406
    assert "cannot answer Accept: text/html" in response.json()["detail"]


def test_gaussian_decodes_means(gaussian_client: TestClient) -> None:
    body = gaussian_client.post("/decode", params={"format": "arrays"}, json={"z": Z}).json()
    assert body["kind"] == "mean"
    assert np.array(body["arrays"]).shape == (3, 1, 28, 28)


def test_sample_is_seeded(client: TestClient) -> None:
    first = client.get("/sample", params={"n": 5, "seed": 3, "temperature": 0.5})
    assert first.status_code == 200
    body = first.json()
    assert (body["seed"], body["temperature"], len(body["images"])) == (3, 0.5, 5)
    expected = 0.5 * np.random.default_rng(3).standard_normal((5, 8), dtype=np.float32)
    np.testing.assert_allclose(body["z"], expected, rtol=1e-6)
    assert client.get("/sample", params={"n": 5, "seed": 3, "temperature": 0.5}).json() == body
    decoded = client.post("/decode", json={"z": body["z"]}).json()["images"]
    assert decoded == body["images"]


def test_sample_defaults_and_fresh_seeds(client: TestClient) -> None:
    one, two = client.get("/sample").json(), client.get("/sample").json()
    assert len(one["images"]) == 16 and one["temperature"] == 1.0
    assert one["seed"] != two["seed"]


def test_sample_grid_carries_the_seed(client: TestClient) -> None:
    response = client.get("/sample", params={"n": 4}, headers={"Accept": "image/png"})
    assert response.headers["content-type"] == "image/png"
    assert _png(response.content).size == (62, 62)
    seed = int(response.headers["x-seed"])
    replay = client.get("/sample", params={"n": 4, "seed": seed, "format": "grid"})
    assert replay.content == response.content


def test_sample_arrays(client: TestClient) -> None:
    body = client.get("/sample", params={"n": 2, "format": "arrays"}).json()
    assert np.array(body["arrays"]).shape == (2, 1, 28, 28)


def test_a_wrong_key_gets_the_accepted_keys(client: TestClient) -> None:
    response = client.post("/decode", json={"latents": [[0.0] * 8]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body"]
    assert error["msg"] == "unknown key(s) 'latents'; this body accepts 'z'"


def test_many_or_long_unknown_keys_are_cut_short(client: TestClient) -> None:
    body = {"z": [[0.0] * 8], **{f"k{i}": 0 for i in range(7)}, "x" * 1000: 0}
    (error,) = client.post("/decode", json=body).json()["detail"]
    assert error["msg"] == (
        "unknown key(s) 'k0', 'k1', 'k2', 'k3', 'k4' and 3 more; this body accepts 'z'"
    )
    body = {"x" * 1000: 0}
    (error,) = client.post("/decode", json=body).json()["detail"]
    assert error["msg"] == f"unknown key(s) '{'x' * 40}'; this body accepts 'z'"
