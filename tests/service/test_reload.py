"""POST /admin/reload: who may call it, what a good and a bad bundle do to the served model."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest

from service.main import create_app
from service.reload import ReloadInProgress, reload_model
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import rewrite_manifest

KEY = {"X-API-Key": "s3cret"}


def test_admin_is_disabled_without_an_api_key(make_client: MakeClient) -> None:
    with make_client() as client:
        response = client.post("/admin/reload")
    assert response.status_code == 403
    assert response.json()["detail"].startswith(
        "admin endpoints are disabled: no VAE_API_KEY is configured"
    )


@pytest.mark.parametrize(
    "headers, status_code",
    [
        ({}, 401),
        ({"X-API-Key": "wrong"}, 401),
        (KEY, 200),
        ({"Authorization": "Bearer s3cret"}, 200),
    ],
)
def test_admin_needs_the_api_key(
    make_client: MakeClient, headers: dict[str, str], status_code: int
) -> None:
    with make_client(api_key="s3cret") as client:
        assert client.post("/admin/reload", headers=headers).status_code == status_code


def test_admin_is_off_without_a_key(make_client: MakeClient) -> None:
    with make_client() as client:
        response = client.post("/admin/reload")
    assert response.status_code == 403
    assert response.json()["detail"].startswith("admin endpoints are disabled: no VAE_API_KEY")


def test_reload_without_a_body_reloads_the_bundle_serving(make_client: MakeClient) -> None:
    with make_client(api_key="s3cret") as client:
        response = client.post("/admin/reload", headers=KEY)
    assert response.status_code == 200
    body = response.json()
    assert body["previous"]["name"] == body["current"]["name"] == "tiny-bernoulli"


def test_reload_swaps_in_a_new_version(
    make_client: MakeClient, tiny_bundle: Path, tmp_path: Path
) -> None:
    # the models root is the directory holding VAE_BUNDLE: v1 and v2 side by side
    shutil.copytree(tiny_bundle, tmp_path / "v1")
    rewrite_manifest(tiny_bundle, tmp_path / "v2", version="0.0.2")
    with make_client(tmp_path / "v1", api_key="s3cret") as client:
        before = client.post("/encode", json={"pixels": [[[0.5]]]}, headers=KEY).json()
        response = client.post("/admin/reload", json={"bundle": "v2"}, headers=KEY)
        assert response.status_code == 200, response.text
        assert response.json()["previous"] == {
            "name": "tiny-bernoulli",
            "version": "0.0.1",
            "path": "v1",  # relative to the models root: no server path
        }
        assert response.json()["current"] == {
            "name": "tiny-bernoulli",
            "version": "0.0.2",
            "path": "v2",  # relative to the models root, never the server's absolute path
        }
        assert client.get("/model", headers=KEY).json()["version"] == "0.0.2"
        after = client.post("/encode", json={"pixels": [[[0.5]]]}, headers=KEY).json()
        assert after == before  # same weights, served by the new model
        metrics = client.get("/metrics").text
        # an empty body reloads the bundle serving now, not the configured one
        again = client.post("/admin/reload", headers=KEY).json()
    assert again["current"]["path"] == "v2"
    assert 'vae_model_reloads_total{result="swapped"} 1.0' in metrics
    assert 'version="0.0.2"' in metrics and 'version="0.0.1"' not in metrics


def corrupt(tiny_bundle: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "decoder.onnx").write_bytes(b"garbage")
    return broken


def bad_manifest(tiny_bundle: Path, tmp_path: Path) -> Path:
    return rewrite_manifest(tiny_bundle, tmp_path / "bad", latent_dim=0)


def unknown_score(tiny_bundle: Path, tmp_path: Path) -> Path:
    calibration = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]
    calibration["default_score"] = "likelihood_regret"
    return rewrite_manifest(tiny_bundle, tmp_path / "unknown", calibration=calibration)


@pytest.mark.parametrize(
    "make_bundle, message",
    [
        (corrupt, "decoder.onnx has 7 bytes, the manifest says"),
        (bad_manifest, "manifest.json is invalid: latent_dim"),
        (unknown_score, "unknown anomaly score 'likelihood_regret'"),
    ],
)
def test_a_bad_bundle_is_refused_and_the_old_keeps_serving(
    make_client: MakeClient,
    tiny_bundle: Path,
    tmp_path: Path,
    make_bundle: object,
    message: str,
) -> None:
    path = make_bundle(tiny_bundle, tmp_path)  # type: ignore[operator]
    shutil.copytree(tiny_bundle, tmp_path / "serving")
    with make_client(tmp_path / "serving", api_key="s3cret") as client:
        response = client.post("/admin/reload", json={"bundle": path.name}, headers=KEY)
        assert response.status_code == 409
        detail = response.json()["detail"]
        assert detail.startswith(f"bundle refused: {path.name}/") and message in detail
        assert str(tmp_path) not in detail  # no absolute server path
        assert detail.endswith("; still serving tiny-bernoulli 0.0.1")
        assert client.get("/model", headers=KEY).json()["name"] == "tiny-bernoulli"
        assert client.get("/readyz").status_code == 200
        assert client.post("/encode", json={"pixels": [[[0.5]]]}, headers=KEY).status_code == 200
        assert 'vae_model_reloads_total{result="refused"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize(
    "content, media, status_code, message",
    [
        (
            json.dumps({"bundle": "/nowhere"}),
            "application/json",
            422,
            "'/nowhere' must be a bundle name relative to the models root (the directory "
            "holding VAE_BUNDLE), with no '..'",
        ),
        (
            json.dumps({"bundle": "../../etc"}),
            "application/json",
            422,
            "'../../etc' must be a bundle name relative to the models root",
        ),
        (
            json.dumps({"bundle": "nowhere"}),
            "application/json",
            404,
            "no bundle 'nowhere' under the models root (No such file or directory)",
        ),
        (
            json.dumps({"bundle": "é" * 200}),  # 400 bytes: one path component over NAME_MAX
            "application/json",
            404,
            "under the models root (File name too long)",
        ),
        (
            json.dumps({"bundle": "a\u0000b"}),
            "application/json",
            422,
            "holds a NUL character, which no file name can",
        ),
        (
            json.dumps({"bundle": "."}),
            "application/json",
            422,
            "names the models root itself, not a bundle under it",
        ),
        # an unpaired surrogate: valid JSON, not Unicode; its 422 echoes it escaped (not a 500)
        (json.dumps({"bundle": "\ud800"}), "application/json", 422, "as a unicode string"),
        (json.dumps({"bundle": ""}), "application/json", 422, "at least 1 character"),
        (
            json.dumps({"bundel": "/srv/b"}),
            "application/json",
            422,
            "unknown key(s) 'bundel'; this body accepts 'bundle'",
        ),
        (json.dumps({"bundle": 3}), "application/json", 422, "valid string"),
        ("[1]", "application/json", 422, "valid dictionary"),
        ("{bad", "application/json", 422, "JSON decode error"),
        ("models/mnist", "text/plain", 415, "unsupported media type: Content-Type text/plain"),
    ],
)
def test_bad_reload_bodies(
    make_client: MakeClient, content: str, media: str, status_code: int, message: str
) -> None:
    with make_client(api_key="s3cret") as client:
        headers = {"Content-Type": media, **KEY}
        response = client.post("/admin/reload", content=content, headers=headers)
        assert client.get("/model", headers=KEY).json()["name"] == "tiny-bernoulli"
    assert response.status_code == status_code, response.text
    assert message in response.text


def test_one_reload_at_a_time(tiny_bundle: Path) -> None:
    app = create_app(Settings(bundle=tiny_bundle))

    async def race() -> list[object]:
        async with app.router.lifespan_context(app):
            return await asyncio.gather(
                reload_model(app), reload_model(app), return_exceptions=True
            )

    first, second = asyncio.run(race())
    assert not isinstance(first, BaseException)
    assert isinstance(second, ReloadInProgress)
    assert str(second) == "a reload is already in progress; retry when it has finished"


def test_reload_stays_inside_the_models_root(
    make_client: MakeClient, tiny_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "escape").symlink_to(tiny_bundle)  # a real bundle, but outside the root
    (root / "notes.txt").write_text("not a bundle")
    shutil.copytree(tiny_bundle, root / "serving")
    with make_client(root / "serving", api_key="s3cret") as client:
        escape = client.post("/admin/reload", json={"bundle": "escape"}, headers=KEY)
        text = client.post("/admin/reload", json={"bundle": "notes.txt"}, headers=KEY)
    assert escape.status_code == text.status_code == 422
    assert escape.json()["detail"][0]["msg"] == (
        "'escape' leads out of the models root (the directory holding VAE_BUNDLE)"
    )
    assert text.json()["detail"][0]["msg"] == "'notes.txt' is not a directory under the models root"


def test_a_replaced_model_and_its_sessions_are_freed_by_the_reload(tiny_bundle: Path) -> None:
    # a Model sits in reference cycles, so without the reload's own collection it (and its
    # onnxruntime sessions) lived until a rare full collection: memory grew with every reload
    app = create_app(Settings(bundle=tiny_bundle))

    async def reload_twice() -> list[bool]:
        async with app.router.lifespan_context(app):
            alive = []
            for _ in range(2):
                model = weakref.ref(app.state.runtime)
                session = weakref.ref(app.state.runtime.bundle.encoder)
                await reload_model(app)
                alive += [model() is not None, session() is not None]
            return alive

    gc.disable()  # no automatic collection may stand in for the reload's
    try:
        assert asyncio.run(reload_twice()) == [False] * 4
    finally:
        gc.enable()
