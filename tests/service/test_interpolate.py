"""POST /interpolate: two images -> decoded points between their posterior means."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.routes.interpolate import interpolate
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise, stroke

A, B = encode(stroke(6)), encode(stroke(18))


def _pair(a: bytes = A, b: bytes = B) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("a", ("a.png", a, "image/png")), ("b", ("b.png", b, "image/png"))]


def _mu(client: TestClient, *images: bytes) -> np.ndarray:
    response = client.post("/encode", files=files(*images))
    assert response.status_code == 200, response.text
    return np.array([r["mu"] for r in response.json()["results"]], dtype=np.float32)


def _arrays(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(response.json()["arrays"])


@pytest.mark.parametrize("steps", [2, 5, 8])
def test_linear_equals_encode_lerp_decode(client: TestClient, steps: int) -> None:
    response = client.post(
        "/interpolate", files=_pair(), params={"steps": steps, "format": "arrays"}
    )
    body = response.json()
    assert (body["mode"], body["steps"], body["kind"]) == ("linear", steps, "probabilities")
    mu = _mu(client, A, B)  # (2, D)
    t = np.linspace(0, 1, steps)[:, None]
    z = (1 - t) * mu[0] + t * mu[1]
    np.testing.assert_allclose(body["z"], z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(body["z"][0], mu[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(body["z"][-1], mu[1], rtol=1e-6, atol=1e-7)
    decoded = client.post("/decode", params={"format": "arrays"}, json={"z": body["z"]})
    np.testing.assert_allclose(_arrays(response), _arrays(decoded), rtol=1e-5, atol=1e-6)
    assert _arrays(response).shape == (steps, 1, 28, 28)


def test_ends_reconstruct_the_images(client: TestClient) -> None:
    path = _arrays(client.post("/interpolate", files=_pair(), params={"format": "arrays"}))
    ends = _arrays(client.post("/reconstruct", files=files(A, B), params={"format": "arrays"}))
    np.testing.assert_allclose(path[[0, -1]], ends, rtol=1e-5, atol=1e-6)


def test_slerp_ends_and_norms(client: TestClient) -> None:
    body = client.post("/interpolate", files=_pair(), params={"mode": "slerp", "steps": 7}).json()
    mu = _mu(client, A, B)
    z = np.array(body["z"])
    np.testing.assert_allclose(z[[0, -1]], mu, rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(z, axis=1)
    ends = np.linalg.norm(mu, axis=1)
    np.testing.assert_allclose(norms, np.linspace(ends[0], ends[1], 7), rtol=1e-5)
    # the path is not the straight line (which would cut inside the sphere between the ends)
    linear = client.post("/interpolate", files=_pair(), params={"steps": 7}).json()["z"]
    assert not np.allclose(z[1:-1], np.array(linear)[1:-1], atol=1e-4)
    decoded = client.post("/decode", json={"z": body["z"]}).json()["images"]
    assert body["images"] == decoded


def test_slerp_math() -> None:
    a = np.array([3.0, 0.0], dtype=np.float32)
    b = np.array([0.0, 1.0], dtype=np.float32)
    z = interpolate(a, b, 3, "slerp")
    np.testing.assert_allclose(z[1], [2.0 / np.sqrt(2), 2.0 / np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), [3.0, 2.0, 1.0], rtol=1e-6)
    # parallel, antiparallel and zero vectors have no great circle: the straight line
    for b in ([6.0, 0.0], [-1.0, 0.0], [0.0, 0.0]):
        end = np.array(b, dtype=np.float32)
        np.testing.assert_allclose(
            interpolate(a, end, 5, "slerp"), interpolate(a, end, 5, "linear"), atol=1e-6
        )


def test_json_inputs_agree_with_multipart(client: TestClient) -> None:
    expected = client.post("/interpolate", files=_pair()).json()
    b64 = {"images": [base64.b64encode(A).decode(), base64.b64encode(B).decode()]}
    assert client.post("/interpolate", json=b64).json() == expected
    pixels = {"pixels": [stroke(6).tolist(), stroke(18).tolist()]}
    body = client.post("/interpolate", json=pixels).json()
    np.testing.assert_allclose(body["z"], expected["z"], rtol=1e-5, atol=1e-6)


def test_png_grid(client: TestClient) -> None:
    response = client.post("/interpolate", files=_pair(), headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    grid = Image.open(io.BytesIO(response.content))
    assert grid.size == (8 * 30 + 2, 30 + 2)  # 8 steps in a strip, 2 px padding
    images = client.post("/interpolate", files=_pair()).json()["images"]
    assert len(images) == 8


@pytest.mark.parametrize(
    "steps, status_code, message",
    [
        (1, 422, "Input should be greater than or equal to 2"),
        (0, 422, "Input should be greater than or equal to 2"),
        (
            5,
            422,
            "this request needs steps = 5 images = 5 network rows, over the per-request budget "
            "of 4 rows (VAE_MAX_ROWS); send fewer images or draws",
        ),
        (4, 200, None),
    ],
)
def test_steps_bounds(
    make_client: MakeClient, steps: int, status_code: int, message: str | None
) -> None:
    with make_client(max_rows=4) as client:
        response = client.post("/interpolate", files=_pair(), params={"steps": steps})
    assert response.status_code == status_code, response.text
    if message is not None:
        (error,) = response.json()["detail"]
        assert error["loc"] in (["query", "steps"], ["request"])
        assert error["msg"] == message


@pytest.mark.parametrize("count", [1, 3])
def test_wrong_number_of_images(client: TestClient, count: int) -> None:
    images = [encode(stroke(6 + i)) for i in range(count)]
    response = client.post("/interpolate", files=files(*images))
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "images"]
    assert error["msg"] == f"got {count} image(s); send exactly two (a, then b)"


def test_one_raw_image_is_not_enough(client: TestClient) -> None:
    response = client.post("/interpolate", content=A, headers={"Content-Type": "image/png"})
    assert response.status_code == 422
    assert "send exactly two" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "b, status_code, message",
    [
        (b"not an image", 422, "image 1 ('b.png') is not an image in a supported format"),
        (b"", 422, "image 1 ('b.png') is empty (0 bytes)"),
    ],
)
def test_bad_images(client: TestClient, b: bytes, status_code: int, message: str) -> None:
    response = client.post("/interpolate", files=_pair(b=b))
    assert response.status_code == status_code
    assert response.json()["detail"][0]["msg"].startswith(message)


def test_bad_requests(client: TestClient) -> None:
    mode = client.post("/interpolate", files=_pair(), params={"mode": "cubic"})
    assert mode.status_code == 422 and mode.json()["detail"][0]["loc"] == ["query", "mode"]
    text = client.post("/interpolate", content=b"hi", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415
    accept = client.post("/interpolate", files=_pair(), headers={"Accept": "text/html"})
    assert accept.status_code == 406
    both = client.post("/interpolate", json={"images": [], "pixels": []})
    assert both.status_code == 422


def test_noise_interpolates_too(client: TestClient) -> None:
    response = client.post("/interpolate", files=_pair(b=encode(noise(3))))
    assert response.status_code == 200


def test_needs_the_api_key(make_client: MakeClient) -> None:
    with make_client(api_key="s3cret") as client:
        assert client.post("/interpolate", files=_pair()).status_code == 401
        ok = client.post("/interpolate", files=_pair(), headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200


def test_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/interpolate" in paths
    assert "multipart/form-data" in paths["/interpolate"]["post"]["requestBody"]["content"]
