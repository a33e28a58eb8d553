"""End to end: a real `vae serve` process on a loopback port, called over HTTP with httpx.

It serves the shipped default bundle (service/bundles/mnist) when the checkout has one, else the
tiny test bundle, and scores real MNIST test digits from the shared data folder beside the checkout.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import DEFAULT_BUNDLE
from tests import live
from tests.conftest import LiveServerFactory

REPO = Path(__file__).resolve().parents[2]
UPLOAD_LIMIT = 256 * 1024


def png(pixels: np.ndarray) -> bytes:
    """`(H, W)` uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(bundle: Path, live_server: LiveServerFactory) -> Iterator[httpx.Client]:
    env = {"VAE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}
    with live_server(bundle, env=env) as running, running.client(timeout=30.0) as client:
        yield client
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it
    assert running.process.returncode in (0, -signal.SIGTERM), running.output
    assert "Traceback" not in running.output, running.output


@pytest.fixture(scope="module")
def digits(mnist_dir: Path) -> np.ndarray:
    """The first 8 MNIST test digits, `(8, 28, 28)` uint8."""
    from model.data import read_idx

    return np.asarray(read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:8])


def test_operations(server: httpx.Client, bundle: Path) -> None:
    assert server.get("/healthz").json() == {"status": "ok"}
    assert server.get("/readyz").json() == {"status": "ready"}
    model = server.get("/model").json()
    assert model["image"] == {"channels": 1, "height": 28, "width": 28, "background": 0.0}
    assert model["calibration"]["scores"]["neg_elbo"]["values"]
    docs = server.get("/docs")
    assert docs.status_code == 200
    assert "/elbo" in server.get("/openapi.json").json()["paths"]


def test_a_real_digit_is_normal_and_noise_is_anomalous(
    server: httpx.Client, bundle: Path, digits: np.ndarray
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    uploads = [("images", (f"{i}.png", png(d), "image/png")) for i, d in enumerate(digits)]
    uploads.append(("images", ("noise.png", png(noise), "image/png")))
    response = server.post("/elbo", files=uploads, params={"k": 16})
    assert response.status_code == 200, response.text
    *digit_results, noise_result = response.json()["results"]
    assert noise_result["is_anomaly"] is True
    assert noise_result["percentile"] == 100.0
    assert all(noise_result["anomaly_score"] > d["anomaly_score"] for d in digit_results)
    # two bounds on the same log-likelihood: close, and IWAE-16 the tighter (higher) one on average
    for result in digit_results:
        assert result["iwae"] == pytest.approx(result["elbo"], rel=0.3)
    assert np.mean([d["iwae"] - d["elbo"] for d in digit_results]) > 0
    if bundle == DEFAULT_BUNDLE:  # the tiny bundle was calibrated on strokes, not on digits
        assert digit_results[0]["is_anomaly"] is False
        assert sum(not d["is_anomaly"] for d in digit_results) >= 7


def test_encode_decode_reconstruct(server: httpx.Client, digits: np.ndarray) -> None:
    digit = png(digits[0])
    encoded = server.post("/encode", files=[("images", ("7.png", digit, "image/png"))])
    assert encoded.status_code == 200
    mu = encoded.json()["results"][0]["mu"]
    raw = server.post("/encode", content=digit, headers={"Content-Type": "image/png"})
    assert raw.json()["results"][0]["mu"] == pytest.approx(mu, rel=1e-5, abs=1e-6)
    decoded = server.post("/decode", json={"z": [mu]}).json()["images"][0]
    reconstructed = server.post(
        "/reconstruct", content=digit, headers={"Content-Type": "image/png"}
    )
    assert reconstructed.json()["images"][0] == decoded
    image = Image.open(io.BytesIO(base64.b64decode(decoded)))
    assert (image.format, image.size) == ("PNG", (28, 28))


def test_sample_returns_decodable_pngs(server: httpx.Client) -> None:
    body = server.get("/sample", params={"n": 6, "seed": 1}).json()
    assert body["seed"] == 1 and len(body["images"]) == 6
    for data in body["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
    grid = server.get("/sample", params={"n": 16}, headers={"Accept": "image/png"})
    assert grid.headers["content-type"] == "image/png" and "x-seed" in grid.headers
    assert Image.open(io.BytesIO(grid.content)).size == (4 * 30 + 2, 4 * 30 + 2)


def test_bad_input_over_the_network(server: httpx.Client) -> None:
    too_big = server.post(
        "/encode", content=b"\0" * (UPLOAD_LIMIT + 1), headers={"Content-Type": "image/png"}
    )
    assert too_big.status_code == 413
    assert (
        f"over the limit of {UPLOAD_LIMIT} bytes (VAE_MAX_UPLOAD_BYTES)" in too_big.json()["detail"]
    )
    text = server.post("/elbo", content=b"hello", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415 and "unsupported media type" in text.json()["detail"]
    junk = server.post("/elbo", files=[("images", ("x.png", b"not an image", "image/png"))])
    assert junk.status_code == 422
    assert "is not an image in a supported format" in junk.json()["detail"][0]["msg"]
    nan = server.post(
        "/decode", content=b'{"z": [[NaN]]}', headers={"Content-Type": "application/json"}
    )
    assert (
        nan.status_code == 422
        and nan.json()["detail"][0]["msg"] == "Input should be a finite number"
    )
    assert server.get("/sample", params={"n": 0}).status_code == 422
    assert server.get("/healthz").status_code == 200  # still serving


def test_metrics_count_the_requests(server: httpx.Client) -> None:
    server.get("/sample", params={"n": 2})
    text = server.get("/metrics").text
    assert 'vae_http_requests_total{endpoint="/sample",method="GET",status="200"}' in text
    assert "vae_inference_duration_seconds_bucket" in text and "vae_ready 1.0" in text


def test_start_up_failures_are_clear(tiny_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "decoder.onnx").write_bytes(b"garbage")
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:create_app",
            "--factory",
            "--port",
            str(live.free_port()),
        ],
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("VAE_")},
            "VAE_BUNDLE": str(broken),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode != 0
    assert "decoder.onnx has 7 bytes, the manifest says" in process.stderr

    cuda = live.start(live.vae_serve(tiny_bundle, "--device", "cuda"), live.server_env())
    try:
        cuda.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        cuda.stop()
        pytest.skip("this machine has CUDA")
    cuda.stop()
    output = cuda.output
    assert cuda.process.returncode == 2
    assert "device cuda asked for, but onnxruntime has no CUDAExecutionProvider" in output
    assert "(set by --device)" in output


def test_the_shipped_default_calls_blank_and_inverted_images_anomalous(
    server: httpx.Client, bundle: Path, digits: np.ndarray
) -> None:
    """The likelihood trap: -ELBO calls a blank image more normal than a digit; the default not."""
    if bundle != DEFAULT_BUNDLE:
        pytest.skip("the shipped bundle's default score; the tiny bundle knows only strokes")
    blank = np.zeros((28, 28), dtype=np.uint8)
    dot = blank.copy()
    dot[14, 14] = 255
    images = [blank, np.full((28, 28), 255, np.uint8), dot, 255 - digits[0], digits[0]]
    uploads = [("images", (f"{i}.png", png(d), "image/png")) for i, d in enumerate(images)]
    response = server.post("/elbo", files=uploads, params={"map": "array"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["score"] == "blur_recon_energy"
    *odd, digit = body["results"]
    assert [r["is_anomaly"] for r in odd] == [True] * 4 and digit["is_anomaly"] is False
    assert min(r["anomaly_score"] for r in odd) > 2 * body["threshold"]
    assert -odd[0]["elbo"] < -digit["elbo"]  # what -ELBO would have said of the blank image
    heat = np.asarray(odd[2]["anomaly_map"])  # the dot: the map is hot around it
    assert heat.shape == (28, 28) and np.unravel_index(heat.argmax(), heat.shape) in [
        (r, c) for r in range(12, 17) for c in range(12, 17)
    ]
