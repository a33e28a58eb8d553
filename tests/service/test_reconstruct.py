"""POST /reconstruct."""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.imaging import decode_image
from tests.service.helpers import encode, files, stroke


def test_reconstruction_is_the_decoded_mean(client: TestClient) -> None:
    png = encode(stroke())
    response = client.post("/reconstruct", params={"format": "arrays"}, files=files(png))
    assert response.status_code == 200
    arrays = np.array(response.json()["arrays"])
    mu = client.post("/encode", files=files(png)).json()["results"][0]["mu"]
    decoded = client.post("/decode", params={"format": "arrays"}, json={"z": [mu]}).json()["arrays"]
    np.testing.assert_allclose(arrays, decoded, rtol=1e-5, atol=1e-6)


def test_reconstruction_formats(client: TestClient) -> None:
    body = client.post("/reconstruct", files=files(encode(stroke()))).json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert (image.format, image.size) == ("PNG", (28, 28))
    grid = client.post(
        "/reconstruct",
        files=files(encode(stroke()), encode(stroke(9))),
        headers={"Accept": "image/png"},
    )
    assert grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.content)).size == (62, 32)
    # one image: the PNG answer is the JSON answer's PNG, byte for byte (no border)
    png = client.post(
        "/reconstruct", files=files(encode(stroke())), headers={"Accept": "image/png"}
    ).content
    assert png == base64.b64decode(body["images"][0])


def test_inputs_as_the_model_saw_them(client: TestClient) -> None:
    """A 56x56 RGB upload comes back as the 28x28 grey image the encoder was given."""
    rgb = np.zeros((56, 56, 3), np.uint8)
    rgb[10:40, 20:30] = (255, 128, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    upload = files(buffer.getvalue())
    body = client.post("/reconstruct", params={"inputs": "true"}, files=upload).json()
    (seen,) = body["inputs"]
    image = Image.open(io.BytesIO(base64.b64decode(seen)))
    assert (image.mode, image.size) == ("L", (28, 28))
    expected = decode_image(buffer.getvalue(), (1, 28, 28), max_pixels=1 << 20, strict=False)
    np.testing.assert_allclose(np.asarray(image) / 255.0, expected[0], atol=1 / 255 + 1e-6)
    assert client.post("/reconstruct", files=upload).json()["inputs"] is None  # unasked
