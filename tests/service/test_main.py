"""The app factory: no torch, lazy loading, OpenAPI docs, and a free event loop."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import service.main
import service.parsing
from service.lifespan import GC_THRESHOLDS
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, stroke

REPO = Path(__file__).resolve().parents[2]


def test_serving_never_imports_torch(tiny_bundle: Path) -> None:
    script = f"""
import sys
import service.main, service.cli
from fastapi.testclient import TestClient
from service.settings import Settings
app = service.main.create_app(Settings(bundle={str(tiny_bundle)!r}))
with TestClient(app) as client:
    assert client.get("/sample", params={{"n": 2}}).status_code == 200
    pixels = {{"pixels": [[[0.5] * 28] * 28]}}
    assert client.post("/elbo", json=pixels, params={{"k": 4}}).status_code == 200
heavy = sorted(m for m in ("torch", "onnx", "onnxscript", "model") if m in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_import_loads_nothing() -> None:
    script = (
        "import sys, service.main; assert 'torch' not in sys.modules; "
        "assert service.main._app is None"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_module_level_app_is_built_lazily(
    monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path
) -> None:
    monkeypatch.setattr(service.main, "_app", None)
    monkeypatch.setattr(service.main, "get_settings", lambda: Settings(bundle=tiny_bundle))
    app = service.main.app
    assert service.main.app is app
    with pytest.raises(AttributeError):
        service.main.nothing  # noqa: B018


def test_openapi_documents_every_route_with_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {
        "/encode",
        "/decode",
        "/sample",
        "/elbo",
        "/reconstruct",
        "/healthz",
        "/readyz",
        "/model",
        "/metrics",
    } <= set(schema["paths"])
    for path in ("/encode", "/elbo", "/reconstruct"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json", "image/*"} <= set(content)
        assert set(content["application/json"]["examples"]) == {"base64", "pixels"}
    decode_body = schema["components"]["schemas"]["DecodeRequest"]
    assert decode_body["examples"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_openapi_examples_work(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    examples = schema["paths"]["/encode"]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]
    for example in examples.values():
        assert client.post("/encode", json=example["value"]).status_code == 200
    for example in schema["components"]["schemas"]["DecodeRequest"]["examples"]:
        assert client.post("/decode", json=example).status_code == 200


def test_unknown_settings_are_logged(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VAE_MAX_IMAGE", "3")
    create_app(Settings(bundle=tiny_bundle))
    assert "ignoring unknown settings (typo?): VAE_MAX_IMAGE" in caplog.text


@pytest.mark.parametrize(
    "pixels, on_loop",
    [
        (stroke(), True),  # a few hundred bytes
        (np.zeros((1024, 1024), np.float32), False),  # a small file declaring 1M pixels
        (np.random.default_rng(0).random((300, 300)), False),  # over 64 KiB
    ],
    ids=["small", "many-pixels", "many-bytes"],
)
def test_only_small_uploads_are_decoded_on_the_event_loop(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, pixels: np.ndarray, on_loop: bool
) -> None:
    original = service.parsing._decode_uploads
    where: list[bool] = []

    def spy(*args):  # type: ignore[no-untyped-def]
        try:
            asyncio.get_running_loop()
            where.append(True)
        except RuntimeError:  # worker threads run no event loop
            where.append(False)
        return original(*args)

    monkeypatch.setattr(service.parsing, "_decode_uploads", spy)
    body = encode(pixels)
    assert on_loop == (len(body) <= 64 * 1024 and pixels.size <= 512 * 512)  # the cases are real
    with make_client() as client:
        response = client.post("/encode", files=files(body))
    assert response.status_code == 200, response.text
    assert where == [on_loop]


def test_serving_sets_the_collector_thresholds_and_restores_them(make_client: MakeClient) -> None:
    outer = gc.get_threshold()  # another module's app may be serving
    gc.set_threshold(700, 10, 10)
    try:
        with make_client() as client:
            assert client.get("/healthz").status_code == 200
            assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*outer)
