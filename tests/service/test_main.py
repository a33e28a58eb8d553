"""The app factory: no torch, lazy loading, OpenAPI docs, and a free event loop."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import service.deps
import service.main
from service.inference import Model
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


def test_inference_does_not_block_the_event_loop(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Model._run_encoder

    def slow_encode(self: Model, x):  # type: ignore[no-untyped-def]
        time.sleep(1.0)  # stands in for a long onnxruntime call
        return original(self, x)

    # every encoder call (micro-batched, gathered or direct) goes through _run_encoder
    monkeypatch.setattr(Model, "_run_encoder", slow_encode)
    with make_client(inline_max_rows=0) as client:  # every request's work in a worker thread
        slow = threading.Thread(
            target=lambda: client.post("/encode", files=files(encode(stroke())))
        )
        slow.start()
        time.sleep(0.2)
        start = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        assert time.perf_counter() - start < 0.5
        slow.join()


@pytest.mark.parametrize(
    "images, settings, on_loop",
    [
        (1, {}, True),
        (16, {}, True),
        (17, {}, False),
        (1, {"inline_max_rows": 0}, False),
        (1, {"busy": True}, False),
        (1, {"batching": False}, True),
        (17, {"batching": False}, False),
        (1, {"batching": False, "busy": True}, False),
    ],
)
def test_small_work_runs_on_the_event_loop_the_rest_in_a_worker(
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    images: int,
    settings: dict[str, Any],
    on_loop: bool,
) -> None:
    original = Model._run_encoder
    where: list[bool] = []

    def spy(self: Model, x):  # type: ignore[no-untyped-def]
        try:
            asyncio.get_running_loop()
            where.append(True)
        except RuntimeError:  # worker threads run no event loop
            where.append(False)
        return original(self, x)

    monkeypatch.setattr(Model, "_run_encoder", spy)
    busy = settings.pop("busy", False)
    with make_client(**settings) as client:
        model = client.app.state.model  # type: ignore[attr-defined]
        if busy and model.batching:  # a gathered job is out in the batcher: join the batcher
            model._gathers["encoder"].out = 1
        elif busy:  # another request's work is out in a worker thread: join it there
            model._offloaded = 1
        body = [("images", (f"{i}.png", encode(stroke()), "image/png")) for i in range(images)]
        response = client.post("/encode", files=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == images
    assert where == [on_loop]


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
    original = service.deps._decode_uploads
    where: list[bool] = []

    def spy(*args):  # type: ignore[no-untyped-def]
        try:
            asyncio.get_running_loop()
            where.append(True)
        except RuntimeError:  # worker threads run no event loop
            where.append(False)
        return original(*args)

    monkeypatch.setattr(service.deps, "_decode_uploads", spy)
    body = encode(pixels)
    assert on_loop == (len(body) <= 64 * 1024 and pixels.size <= 512 * 512)  # the cases are real
    with make_client() as client:
        response = client.post("/encode", files=files(body))
    assert response.status_code == 200, response.text
    assert where == [on_loop]


def test_serving_sets_the_collector_thresholds_and_restores_them(make_client: MakeClient) -> None:
    before = gc.get_threshold()
    wanted = (12_345, 17, 19)
    assert before != wanted
    with make_client(gc_thresholds=wanted) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_threshold() == wanted
    assert gc.get_threshold() == before
