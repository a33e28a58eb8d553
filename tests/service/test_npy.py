"""NumPy `.npy` request bodies (Content-Type: application/x-npy): results and refusals."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise, stroke

NPY = {"Content-Type": "application/x-npy"}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def grey(count: int) -> np.ndarray:
    """`count` distinct 28x28 uint8 images."""
    arrays = [stroke(column=4 + i) if i % 2 else noise(i) for i in range(count)]
    return np.rint(np.stack(arrays) * 255).astype(np.uint8)


def post_npy(client: TestClient, path: str, array: np.ndarray, **params: Any) -> Any:
    return client.post(path, content=npy(array), headers=NPY, params=params)


def mu(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["mu"] for row in response.json()["results"]])


def test_uint8_batch_encodes_like_the_same_pngs(client: TestClient) -> None:
    pixels = grey(5)
    as_png = client.post("/encode", files=files(*(encode(p / 255.0) for p in pixels)))
    np.testing.assert_array_equal(mu(post_npy(client, "/encode", pixels)), mu(as_png))


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda p: (p / 255.0).astype(np.float32), id="float32 (B,H,W)"),
        pytest.param(lambda p: (p / 255.0)[:, None], id="float64 (B,1,H,W)"),
        pytest.param(lambda p: (p / 255.0).astype(np.float16), id="float16"),
        pytest.param(lambda p: (p / 255.0).astype(">f4"), id="big-endian float32"),
        pytest.param(lambda p: np.asfortranarray(p), id="uint8 Fortran order"),
    ],
)
def test_float_and_layout_variants_agree_with_json_pixels(client: TestClient, convert: Any) -> None:
    pixels = grey(3)
    array = convert(pixels)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    reference = np.asarray(array, dtype=np.float64).reshape(3, 28, 28) / scale
    as_json = client.post("/encode", json={"pixels": reference.tolist()})
    np.testing.assert_allclose(mu(post_npy(client, "/encode", array)), mu(as_json), atol=1e-6)


def test_one_image_bool_rgb_and_resized_arrays(client: TestClient) -> None:
    image = stroke() > 0.5  # (H, W) bool: one image
    single = mu(post_npy(client, "/encode", image))
    assert single.shape == (1, 8)
    reference = mu(client.post("/encode", json={"pixels": [image.astype(float).tolist()]}))
    np.testing.assert_allclose(single, reference, atol=1e-6)

    rgb = np.repeat(grey(2)[:, None] / 255.0, 3, axis=1)  # (B, 3, H, W), a grey RGB image
    from_rgb = mu(post_npy(client, "/encode", rgb))
    from_grey = mu(post_npy(client, "/encode", grey(2)))
    np.testing.assert_allclose(from_rgb, from_grey, atol=1e-5)  # luma of grey is grey

    small = noise(3, size=14)[None]  # resized to 28x28 like any other input
    reference = mu(client.post("/encode", json={"pixels": [small[0].tolist()]}))
    np.testing.assert_allclose(mu(post_npy(client, "/encode", small)), reference, atol=1e-6)


def test_elbo_scores_an_array_batch_like_the_same_pngs(client: TestClient) -> None:
    pixels = grey(4)
    params = {"k": 4, "seed": 3}
    as_png = client.post("/elbo", files=files(*(encode(p / 255.0) for p in pixels)), params=params)
    as_npy = post_npy(client, "/elbo", pixels, **params)
    assert as_png.status_code == as_npy.status_code == 200
    assert as_npy.json() == as_png.json()


def check(response: Any, status: int, expected: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = detail if isinstance(detail, str) else detail[0]["msg"]
    assert expected in text, text


@pytest.mark.parametrize(
    "body, status, expected",
    [
        (b"not an array", 422, "the application/x-npy body is not a NumPy .npy array"),
        (npy(np.array([{"a": 1}], dtype=object)), 422, "has dtype object; send uint8"),
        (npy(np.zeros((2, 28, 28), dtype=np.int16)), 422, "has dtype int16"),
        (npy(np.zeros((2, 2, 28, 28), dtype=np.uint8)), 422, "has shape (2, 2, 28, 28); send"),
        (npy(np.zeros((28,), dtype=np.uint8)), 422, "has shape (28,)"),
        (npy(np.zeros((0, 28, 28), dtype=np.uint8)), 422, "no pixels"),
        (
            npy(np.zeros((28, 28), dtype=np.uint8))
            .replace(b"(28, 28)", b"(-28, -28)", 1)
            .replace(b"  \n", b"\n", 1),  # the header keeps its length
            422,
            "has shape (1, 1, -28, -28): no pixels (every dimension must be positive)",
        ),
        (npy(np.full((1, 28, 28), 1.5)), 422, "has values in [1.5, 1.5]; floats must be in [0, 1]"),
        (npy(np.full((1, 28, 28), np.nan)), 422, "not finite"),
        (npy(np.full((1, 28, 28), 1e300)), 422, "not finite"),
        (npy(np.zeros((2, 28, 28), dtype=np.uint8))[:-10], 422, "truncated?"),
    ],
    ids=[
        "garbage",
        "pickle",
        "int16",
        "two-channels",
        "one-dimension",
        "empty",
        "negative-dimensions",
        "out-of-range",
        "nan",
        "float32-overflow",
        "truncated",
    ],
)
def test_bad_arrays_are_422_naming_the_problem(
    client: TestClient, body: bytes, status: int, expected: str
) -> None:
    check(client.post("/encode", content=body, headers=NPY), status, expected)


def test_array_limits(make_client: MakeClient) -> None:
    with make_client(max_rows=2, max_pixels=40 * 40, strict_size=False) as client:
        expected = "3 images, over the limit of 2 (VAE_MAX_ROWS)"
        check(post_npy(client, "/encode", grey(3)), 422, expected)
        big = np.zeros((1, 41, 40), dtype=np.uint8)
        check(post_npy(client, "/encode", big), 413, "over the limit of 1600 (VAE_MAX_PIXELS)")
    with make_client(strict_size=True) as client:
        small = np.zeros((1, 14, 14), dtype=np.uint8)
        check(post_npy(client, "/encode", small), 422, "the model takes 28x28 (VAE_STRICT_SIZE")
        assert post_npy(client, "/encode", grey(1)).status_code == 200


def test_headers_are_read_afresh_for_each_shape(client: TestClient) -> None:
    """Parsed headers are cached by their bytes: bodies that alternate between shapes, dtypes and
    layouts still decode each by its own header, and a bad header after a good one is refused."""
    pixels = grey(4)
    variants = [pixels[:2], pixels, (pixels[:3] / 255.0).astype(np.float32), pixels[:2], pixels]
    for array in variants:
        reference = np.asarray(array, dtype=np.float64)
        if array.dtype == np.uint8:
            reference = reference / 255.0
        as_json = client.post("/encode", json={"pixels": reference.tolist()})
        np.testing.assert_allclose(mu(post_npy(client, "/encode", array)), mu(as_json), atol=1e-6)
    body = bytearray(npy(pixels))
    body[body.index(b"'descr'") + 10] = ord("Q")  # '|u1' -> '|Q1': no such dtype
    refused = client.post("/encode", content=bytes(body), headers=NPY)
    assert refused.status_code == 422
    assert "is not a NumPy .npy array" in refused.text
