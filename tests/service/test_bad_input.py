"""Bad input gets a clear 4xx naming the problem: never a 500, never a hang."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.bundle import Bundle
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise, png_header_only, stroke

LIMITS = {
    "max_rows": 20,
    "max_upload_bytes": 64 * 1024,
    "max_pixels": 100_000,
}
PNG = encode(stroke())
IMAGE_ROUTES = ["/encode", "/elbo", "/reconstruct"]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def limited(tiny_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundle=tiny_bundle, **LIMITS))) as client:
        yield client


def message(response: Any) -> str:
    detail = response.json()["detail"]
    if isinstance(detail, str):
        return detail
    return " | ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in detail)


def check(response: Any, status: int, expected: str) -> None:
    assert response.status_code == status, response.text
    assert expected in message(response), message(response)


IMAGE_CASES = [
    (
        "not-an-image",
        {"files": files(b"GIF89 but not really an image at all")},
        422,
        "body.images.0: image 0 ('0.png') is not an image in a supported format (PNG, JPEG",
    ),
    (
        "truncated",
        {"files": files(encode(noise())[:120])},
        422,
        "image 0 ('0.png') could not be decoded, truncated or corrupt?",
    ),
    ("zero-bytes", {"files": files(b"")}, 422, "image 0 ('0.png') is empty (0 bytes)"),
    (
        "second-of-two-bad",
        {"files": files(PNG, b"")},
        422,
        "body.images.1: image 1 ('1.png') is empty",
    ),
    (
        "pixel-bomb",
        {"files": files(png_header_only(20_000, 20_000))},
        413,
        "image 0 ('0.png') is 20000x20000 = 400000000 pixels, over the limit of 100000 "
        "(VAE_MAX_PIXELS)",
    ),
    (
        "over-pixel-limit-in-all",  # each within the limit, together over it: decoding is bounded
        {"files": files(*[png_header_only(200, 200)] * 3)},
        413,
        "the request's 3 images declare 120000 pixels, over the limit of 100000 (VAE_MAX_PIXELS)",
    ),
    (
        "over-pixel-limit",
        {"files": files(png_header_only(400, 400))},
        413,
        "image 0 ('0.png') is 400x400 = 160000 pixels, over the limit of 100000 (VAE_MAX_PIXELS)",
    ),
    (
        "too-many-images",
        {"files": files(*[PNG] * 21)},
        422,
        "body.images: Input should be less than or equal to 20 (VAE_MAX_ROWS); got 21",
    ),
    (
        "too-many-arrays",
        {"json": {"pixels": [[[0.0, 1.0], [1.0, 0.0]]] * 21}},
        422,
        "body.pixels: Input should be less than or equal to 20 (VAE_MAX_ROWS); got 21",
    ),
    (
        "body-over-limit",
        {"files": files(b"\0" * 70_000)},
        413,
        "request body is 70",
    ),
    (
        "unsupported-media-type",
        {"content": b"abc", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported media type: Content-Type text/plain; "
        "use multipart/form-data, application/json, image/* (one raw image) or application/x-npy",
    ),
    ("no-media-type", {"content": b"abc"}, 415, "unsupported media type: no Content-Type"),
    (
        "form-text-field",
        {"files": files(PNG), "data": {"sample": "true"}},
        422,
        "body.sample: form field 'sample' is not a file upload",
    ),
    (
        "no-files",
        {"content": b"--x--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
        422,
        "body.images: no images: send at least one image",
    ),
    ("urlencoded", {"data": {"x": "1"}}, 415, "Content-Type application/x-www-form-urlencoded"),
    ("json-invalid", {"content": b"{'images': ", "headers": JSON}, 422, "JSON decode error"),
    (
        "json-both",
        {"json": {"images": ["AAAA"], "pixels": [[[0.0]]]}},
        422,
        "give exactly one of 'images' (base64 files) or 'pixels' (arrays)",
    ),
    ("json-neither", {"json": {}}, 422, "give exactly one of 'images'"),
    (
        "json-unknown-field",
        {"json": {"pictures": []}},
        422,
        "body: unknown key(s) 'pictures'; this body accepts 'images', 'pixels'",
    ),
    (
        "json-empty-list",
        {"json": {"images": []}},
        422,
        "body.images: List should have at least 1 item",
    ),
    (
        "json-bad-base64",
        {"json": {"images": ["not base64!"]}},
        422,
        "body.images.0: Value error, is not valid base64",
    ),
    ("json-base64-not-image", {"json": {"images": ["aGVsbG8="]}}, 422, "image 0 is not an image"),
    ("json-not-object", {"json": [1, 2]}, 422, "body: Input should be a valid dictionary"),
    (
        "pixels-nan",
        {"content": b'{"pixels": [[[0.5, NaN]]]}', "headers": JSON},
        422,
        "body.pixels.0: Value error, contains NaN or infinity",
    ),
    (
        "pixels-infinity",
        {"content": b'{"pixels": [[[0.5, -Infinity]]]}', "headers": JSON},
        422,
        "contains NaN or infinity",
    ),
    ("pixels-range", {"json": {"pixels": [[[0, 255]]]}}, 422, "pixel values must be in [0, 1]"),
    ("pixels-ragged", {"json": {"pixels": [[[0, 1], [0]]]}}, 422, "is ragged or too deep"),
    ("json-too-deep", {"content": b"[" * 60_000, "headers": JSON}, 422, "JSON nested too deeply"),
    ("pixels-strings", {"json": {"pixels": [[["a", "b"]]]}}, 422, "must contain only numbers"),
    (
        "pixels-rank",
        {"json": {"pixels": [[[[[0.0]]]]]}},
        422,
        "expected (height, width) or (channels, height, width)",
    ),
    (
        "pixels-channels",
        {"json": {"pixels": [np.zeros((2, 4, 4)).tolist()]}},
        422,
        "has shape [2, 4, 4]",
    ),
    ("pixels-not-list", {"json": {"pixels": [0.5]}}, 422, "must be a nested list of numbers"),
]


@pytest.mark.parametrize("route", IMAGE_ROUTES)
@pytest.mark.parametrize(
    "kwargs, status, expected",
    [case[1:] for case in IMAGE_CASES],
    ids=[case[0] for case in IMAGE_CASES],
)
def test_bad_images(
    limited: TestClient, route: str, kwargs: dict, status: int, expected: str
) -> None:
    check(limited.post(route, **kwargs), status, expected)


@pytest.mark.parametrize(
    "route, content_type",
    [
        ("/encode", "image/png"),
        ("/elbo", "application/json"),
        ("/reconstruct", "multipart/form-data; boundary=x"),
        ("/decode", "application/json"),
    ],
)
def test_streamed_body_over_limit(limited: TestClient, route: str, content_type: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        for _ in range(20):
            yield b"\0" * 8192

    response = limited.post(route, content=chunks(), headers={"Content-Type": content_type})
    check(response, 413, "request body is over the limit of 65536 bytes (VAE_MAX_UPLOAD_BYTES)")


Z8 = [0.0] * 8

DECODE_CASES = [
    (
        "wrong-dim",
        {"json": {"z": [Z8, [0.0] * 3]}},
        422,
        "body.z.1: z[1] has 3 values; the model's latent_dim is 8",
    ),
    (
        "nan",
        {"content": b'{"z": [[0, 0, 0, 0, 0, 0, 0, NaN]]}', "headers": JSON},
        422,
        "body.z.0.7: Input should be a finite number",
    ),
    (
        "infinity",
        {"content": b'{"z": [[Infinity, 0, 0, 0, 0, 0, 0, 0]]}', "headers": JSON},
        422,
        "body.z.0.0: Input should be a finite number",
    ),
    (
        "float32-overflow",
        {"json": {"z": [[1e39] + [0.0] * 7]}},
        422,
        "z has values beyond +-10000, far outside the prior",
    ),
    (
        "z-beyond-its-bound",  # finite in float32, but the decoder's output may not be
        {"json": {"z": [[0.0] * 7 + [-3e4]]}},
        422,
        "z has values beyond +-10000, far outside the prior",
    ),
    (
        "too-many-rows",
        {"json": {"z": [Z8] * 21}},
        422,
        "request: this request needs 21 latent vectors = 21 network rows, over the per-request "
        "budget of 20 rows (VAE_MAX_ROWS)",
    ),
    ("empty", {"json": {"z": []}}, 422, "body.z: List should have at least 1 item"),
    ("flat", {"json": {"z": Z8}}, 422, "body.z.0: Input should be a valid list"),
    ("strings", {"json": {"z": [["a"] * 8]}}, 422, "body.z.0.0: Input should be a valid number"),
    ("missing", {"json": {}}, 422, "body.z: Field required"),
    ("no-body", {"headers": JSON}, 422, "body: Field required"),
    (
        "text-plain",
        {"content": b'{"z": [[0]]}', "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported media type: Content-Type text/plain; use application/json",
    ),
    ("no-media-type", {"content": b'{"z": [[0]]}'}, 415, "unsupported media type: no Content-Type"),
    ("multipart", {"files": files(PNG)}, 415, "use application/json"),
    (
        "bad-format",
        {"json": {"z": [Z8]}, "params": {"format": "gif"}},
        422,
        "query.format: Input should be 'base64', 'arrays' or 'grid'",
    ),
]


@pytest.mark.parametrize(
    "kwargs, status, expected",
    [case[1:] for case in DECODE_CASES],
    ids=[case[0] for case in DECODE_CASES],
)
def test_bad_decode(limited: TestClient, kwargs: dict, status: int, expected: str) -> None:
    check(limited.post("/decode", **kwargs), status, expected)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"n": 0}, "query.n: Input should be greater than or equal to 1"),
        ({"n": -3}, "query.n: Input should be greater than or equal to 1"),
        (
            {"n": 21},
            "request: this request needs n = 21 images = 21 network rows, over the per-request "
            "budget of 20 rows (VAE_MAX_ROWS); send fewer images or draws",
        ),
        ({"n": "many"}, "query.n: Input should be a valid integer"),
        ({"n": 2.5}, "query.n: Input should be a valid integer"),
        ({"temperature": 0}, "query.temperature: Input should be greater than 0"),
        ({"temperature": "inf"}, "query.temperature: Input should be a finite number"),
        ({"temperature": "nan"}, "query.temperature: Input should be a finite number"),
        ({"temperature": 1000}, "query.temperature: Input should be less than or equal to 100"),
        ({"seed": -1}, "query.seed: Input should be greater than or equal to 0"),
        ({"seed": "x"}, "query.seed: Input should be a valid integer"),
        ({"seed": 2**63}, "query.seed: Input should be less than or equal to 9223372036854775807"),
    ],
)
def test_bad_sample(limited: TestClient, params: dict, expected: str) -> None:
    check(limited.get("/sample", params=params), 422, expected)


@pytest.mark.parametrize(
    "params, expected",
    [
        (
            {"k": 21},
            "request: this request needs 1 images x 21 draws = 21 network rows, over the "
            "per-request budget of 20 rows (VAE_MAX_ROWS)",
        ),
        ({"k": 0}, "query.k: Input should be greater than or equal to 1"),
        (
            {"samples": 21, "k": 3},
            "request: this request needs 1 images x 21 draws = 21 network rows",
        ),
        ({"samples": 0}, "query.samples: Input should be greater than or equal to 1"),
        (
            {"score": "psnr"},
            "query.score: Input should be 'neg_elbo', 'neg_iwae', 'recon_error', "
            "'blur_recon_rel', 'blur_recon_contrast' or 'blur_recon_energy'",
        ),
        ({"map": "jpeg"}, "query.map: Input should be 'array' or 'png'"),
        ({"threshold": "nan"}, "query.threshold: Input should be a finite number"),
        ({"threshold": "-inf"}, "query.threshold: Input should be a finite number"),
        ({"seed": "x"}, "query.seed: Input should be a valid integer"),
    ],
)
def test_bad_elbo_parameters(limited: TestClient, params: dict, expected: str) -> None:
    check(limited.post("/elbo", params=params, files=files(PNG)), 422, expected)


def test_map_counts_in_the_row_budget(limited: TestClient) -> None:
    """A map is one more image-sized row per image: 2 images x (9 draws + 1 map) = 20 rows fit
    VAE_MAX_ROWS=20, 2 x (10 + 1) do not."""
    ok = limited.post("/elbo", params={"map": "png", "k": 9}, files=files(PNG, PNG))
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["results"]) == 2
    check(
        limited.post("/elbo", params={"map": "array", "k": 10}, files=files(PNG, PNG)),
        422,
        "request: this request needs 2 images x (10 draws + 1 map) = 22 network rows, over the "
        "per-request budget of 20 rows (VAE_MAX_ROWS)",
    )
    # without the map, the same draws fit
    assert limited.post("/elbo", params={"k": 10}, files=files(PNG, PNG)).status_code == 200


def test_a_score_of_the_reconstruction_counts_in_the_row_budget(limited: TestClient) -> None:
    """A score of the reconstruction decodes one more row per image, at z = mu: 2 images x (9
    draws + 1) = 20 rows fit VAE_MAX_ROWS=20, 2 x (10 + 1) do not; a map shares that row."""
    for score in ("recon_error", "blur_recon_energy"):
        params = {"score": score, "k": 9}
        assert limited.post("/elbo", params=params, files=files(PNG, PNG)).status_code == 200
        check(
            limited.post("/elbo", params={"score": score, "k": 10}, files=files(PNG, PNG)),
            422,
            "request: this request needs 2 images x (10 draws + 1 reconstruction) = 22 network "
            "rows, over the per-request budget of 20 rows (VAE_MAX_ROWS)",
        )
    params = {"score": "blur_recon_energy", "k": 9, "map": "array"}
    assert limited.post("/elbo", params=params, files=files(PNG, PNG)).status_code == 200


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"sample": "maybe"}, "query.sample: Input should be a valid boolean"),
        ({"sample": "true", "seed": -5}, "query.seed: Input should be greater than or equal to 0"),
    ],
)
def test_bad_encode_parameters(limited: TestClient, params: dict, expected: str) -> None:
    check(limited.post("/encode", params=params, files=files(PNG)), 422, expected)


def test_unknown_route_and_method(limited: TestClient) -> None:
    assert limited.get("/encode").status_code == 405
    assert limited.get("/nope").status_code == 404


def test_pixel_arrays_over_the_pixel_limit(make_client: MakeClient) -> None:
    with make_client(max_pixels=500) as client:
        response = client.post("/encode", json={"pixels": [np.zeros((1, 20, 30)).tolist()]})
        check(
            response, 413, "pixels[0] is 30x20 = 600 pixels, over the limit of 500 (VAE_MAX_PIXELS)"
        )


def test_non_finite_decoder_output_is_a_422(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan = np.full((2, 1, 28, 28), np.nan, np.float32)
    with make_client() as client:
        monkeypatch.setattr(Bundle, "decode", lambda self, z: nan[: len(z)])
        response = client.post("/decode", json={"z": [Z8, Z8]})
        check(
            response,
            422,
            "request: the decoder output is not finite for rows [0 1]; send latent values of a "
            "sensible size",
        )
        sample = client.get("/sample", params={"n": 1})
        check(sample, 422, "the decoder output is not finite for rows [0]; send latent values")
