"""The Python client (service/client.py) against a real `vae serve` on a loopback port.

Every answer is checked against the same request made without the client (multipart PNG uploads
and JSON over plain httpx), so the client's encoding of arrays and parsing of answers is tested,
not only that it returns something.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import Encoding, Samples, Scores, VAEClient, VAEError
from tests.e2e import test_server as e2e

server = e2e.server


def strokes(count: int = 3) -> np.ndarray:
    """`(count, 28, 28)` uint8: vertical bars, like the digits the bundles know."""
    x = np.zeros((count, 28, 28), np.uint8)
    for i in range(count):
        x[i, 4:24, 8 + 4 * i : 11 + 4 * i] = 255
    return x


@pytest.fixture(scope="module")
def vae(server: httpx.Client) -> Iterator[VAEClient]:
    with VAEClient(str(server.base_url)) as client:
        yield client


def uploads(images: np.ndarray) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", e2e.png(x), "image/png")) for i, x in enumerate(images)]


def test_encode_matches_an_upload(vae: VAEClient, server: httpx.Client) -> None:
    x = strokes()
    got = vae.encode(x)
    assert isinstance(got, Encoding) and got.z is None
    expected = server.post("/encode", files=uploads(x)).json()["results"]
    np.testing.assert_allclose(got.mu, [r["mu"] for r in expected], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.logvar, [r["logvar"] for r in expected], rtol=1e-5, atol=1e-6)
    drawn = vae.encode(x / 255.0, sample=True, seed=4)  # floats in [0, 1] as well as uint8
    assert drawn.seed == 4 and drawn.z is not None and drawn.z.shape == got.mu.shape
    np.testing.assert_allclose(drawn.mu, got.mu, rtol=1e-5, atol=1e-6)


def test_decode_reconstruct_and_sample(vae: VAEClient, server: httpx.Client) -> None:
    x = strokes()
    mu = vae.encode(x).mu
    decoded = vae.decode(mu)
    c, h, w = (vae.model()["image"][key] for key in ("channels", "height", "width"))
    assert decoded.shape == (3, c, h, w) and decoded.dtype == np.float32
    # reconstruct is the decoder's mean at z = mu
    np.testing.assert_allclose(vae.reconstruct(x), decoded, rtol=1e-5, atol=1e-6)
    png = server.post("/reconstruct", files=uploads(x[:1])).json()["images"][0]
    with Image.open(io.BytesIO(base64.b64decode(png))) as image:
        np.testing.assert_allclose(np.asarray(image) / 255.0, decoded[0, 0], atol=1 / 255)
    samples = vae.sample(4, seed=3, temperature=0.5)
    assert isinstance(samples, Samples) and samples.seed == 3
    assert samples.images.shape == (4, c, h, w) and samples.z.shape == (4, mu.shape[1])
    np.testing.assert_allclose(vae.decode(samples.z), samples.images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs(samples.z).mean(), 0.5 * np.sqrt(2 / np.pi), rtol=0.5)


def test_elbo_matches_an_upload(vae: VAEClient, server: httpx.Client) -> None:
    x = strokes()
    got = vae.elbo(x, k=8, seed=2)
    assert isinstance(got, Scores) and got.iwae is not None
    expected = server.post("/elbo", files=uploads(x), params={"k": 8, "seed": 2}).json()
    for name in ("elbo", "reconstruction", "kl", "iwae", "anomaly_score", "percentile"):
        np.testing.assert_allclose(
            getattr(got, name), [r[name] for r in expected["results"]], rtol=1e-5, err_msg=name
        )
    assert got.is_anomaly is not None
    assert got.is_anomaly.tolist() == [r["is_anomaly"] for r in expected["results"]]
    assert (got.score, got.threshold) == (expected["score"], expected["threshold"])
    np.testing.assert_allclose(got.elbo, got.reconstruction - got.kl, rtol=1e-5)


def test_errors_carry_the_servers_detail(vae: VAEClient) -> None:
    with pytest.raises(
        VAEError,
        match=r"^422: request: .*\(5000 draws \+ 1 reconstruction\) = 10002 network rows.*VAE_MAX",
    ) as info:
        vae.elbo(np.zeros((2, 28, 28), np.uint8), k=5000)
    assert info.value.status == 422
    with pytest.raises(VAEError, match=r"422: .*latent"):
        vae.decode(np.zeros((1, 3), np.float32))
    with pytest.raises(VAEError, match=r"422: .*floats must be in \[0, 1\]"):
        vae.encode(np.full((28, 28), 2.0))


@pytest.mark.parametrize(
    "layout",
    [
        lambda x: x,  # (B, C, H, W)
        lambda x: np.moveaxis(x, 1, -1),  # (B, H, W, 3), as Pillow gives them
        lambda x: np.concatenate([np.moveaxis(x, 1, -1), np.full((2, 28, 28, 1), 255)], -1),
    ],
    ids=["channels-first", "channels-last", "rgba"],
)
def test_colour_layouts_are_understood(vae: VAEClient, server: httpx.Client, layout: Any) -> None:
    rgb = np.zeros((2, 3, 28, 28), np.uint8)
    rgb[:, 0, 4:24, 10:14] = 255  # a red bar: grey for the 1-channel model after luma
    rgb[1, 2, 4:24, 14:18] = 200
    got = vae.encode(layout(rgb).astype(np.uint8)).mu
    pixels = {"pixels": (rgb / 255.0).tolist()}  # (C, H, W) per image, converted alike
    expected = [r["mu"] for r in server.post("/encode", json=pixels).json()["results"]]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "layout",
    [
        lambda x: x[0],  # (H, W)
        lambda x: x[0][:, :, None],  # (H, W, 1)
        lambda x: np.stack([x[0], np.full_like(x[0], 255)], -1),  # (H, W, 2): grey and alpha
        lambda x: x[:1, :, :, None],  # (1, H, W, 1)
    ],
    ids=["hw", "hw1", "la", "1hw1"],
)
def test_one_grey_image_is_one_image(vae: VAEClient, server: httpx.Client, layout: Any) -> None:
    # (28, 28, 1) was taken for 28 images 28 x 1 wide, and scored as 28 results
    x = strokes()  # (B, H, W) uint8
    got = vae.encode(layout(x).astype(np.uint8)).mu
    expected = server.post("/encode", files=uploads(strokes()[:1])).json()["results"]
    assert got.shape == (1, len(expected[0]["mu"]))
    np.testing.assert_allclose(got, [expected[0]["mu"]], rtol=1e-5, atol=1e-6)
