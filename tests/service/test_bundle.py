"""Loading a bundle: every way it can be broken stops start-up with a message naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from fastapi.testclient import TestClient

from service.bundle import CPU, CUDA, BundleError, load_bundle, read_manifest, select_providers
from service.main import create_app
from service.settings import Settings
from tests.service.helpers import linear_bundle, rewrite_manifest


def test_loads_the_tiny_bundle(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle, device="cpu")
    assert bundle.providers == [CPU]
    manifest = bundle.manifest
    assert manifest.input_shape == (1, 28, 28)
    assert (manifest.latent_dim, manifest.likelihood, manifest.decoder_output) == (
        8,
        "bernoulli",
        "logits",
    )
    mu, logvar = bundle.encode(np.zeros((3, 1, 28, 28), dtype=np.float32))
    assert mu.shape == logvar.shape == (3, 8)
    assert bundle.decode(mu).shape == (3, 1, 28, 28)


def test_decodes_large_batches_in_chunks(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(tiny_bundle)
    z = np.random.default_rng(0).standard_normal((10, 8), dtype=np.float32)
    whole = bundle.decode(z)
    monkeypatch.setattr("service.bundle.MAX_DECODE_ROWS", 3)
    np.testing.assert_allclose(bundle.decode(z), whole, rtol=1e-5, atol=1e-6)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda b: (b / "manifest.json").unlink(), r"manifest\.json is missing"),
        (
            lambda b: (b / "manifest.json").write_text("{not json"),
            r"manifest\.json is not readable JSON",
        ),
        (lambda b: (b / "encoder.onnx").unlink(), r"encoder\.onnx is missing"),
        (lambda b: _corrupt(b / "decoder.onnx"), r"decoder\.onnx fails its SHA-256 check"),
        (
            lambda b: (b / "encoder.onnx").write_bytes(b"short"),
            r"encoder\.onnx has 5 bytes, the manifest says",
        ),
    ],
    ids=["no-manifest", "manifest-not-json", "no-encoder", "decoder-corrupt", "encoder-truncated"],
)
def test_broken_files_name_the_file(
    tiny_bundle: Path, tmp_path: Path, breakage, message: str
) -> None:
    bundle = rewrite_manifest(tiny_bundle, tmp_path / "b")
    breakage(bundle)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema_version": 3}, "schema_version 3 is not supported"),
        ({"schema_version": "1"}, "schema_version .1. is not supported"),
        ({"latent_dim": None}, "latent_dim: Field required"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"likelihood": "gaussian", "decoder_output": "mean"}, "sigma must be a positive number"),
        ({"decoder_output": "mean"}, "decoder_output must be 'logits'"),
        ({"image": {"channels": 2, "height": 28, "width": 28}}, "image.channels"),
        ({"files": {}}, "files has no entry for encoder.onnx"),
    ],
)
def test_invalid_manifest_is_named(
    tiny_bundle: Path, tmp_path: Path, changes, message: str
) -> None:
    bundle = rewrite_manifest(tiny_bundle, tmp_path / "b", **changes)
    with pytest.raises(BundleError, match=f"manifest.json.*{message}"):
        read_manifest(bundle)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"bundle directory .*nowhere does not exist$"):
        load_bundle(tmp_path / "nowhere")


def test_a_file_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(BundleError, match=r"model.onnx is a file; a bundle is a directory"):
        load_bundle(tmp_path / "model.onnx")


def test_onnx_that_onnxruntime_cannot_load(tmp_path: Path) -> None:
    bundle = linear_bundle(tmp_path / "b")
    garbage = b"this is not an onnx model"
    (bundle / "decoder.onnx").write_bytes(garbage)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"] = {
        "sha256": hashlib.sha256(garbage).hexdigest(),
        "bytes": len(garbage),
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"decoder\.onnx cannot be loaded by onnxruntime"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_name": "image"}, r"encoder\.onnx: inputs are \['image'\], expected \['x'\]"),
        ({"batch": 1}, r"encoder\.onnx: input 'x' has a fixed batch of 1"),
        (
            {"manifest_changes": {"latent_dim": 5}},
            r"encoder\.onnx: output 'mu' has shape .*expected \[batch, 5\]",
        ),
        (
            {"manifest_changes": {"image": {"channels": 1, "height": 32, "width": 32}}},
            r"encoder\.onnx: input 'x' has shape .*expected \[batch, 1, 32, 32\]",
        ),
    ],
)
def test_graph_must_match_manifest(tmp_path: Path, kwargs, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        load_bundle(linear_bundle(tmp_path / "b", **kwargs))


def test_other_layouts_load(tmp_path: Path) -> None:
    bundle = load_bundle(linear_bundle(tmp_path / "b", image=(3, 8, 8), latent_dim=2))
    assert bundle.manifest.input_shape == (3, 8, 8)


@pytest.mark.parametrize(
    "device, available, expected",
    [
        ("auto", [CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(device, available, expected) -> None:
    assert select_providers(device, available) == expected


def test_cuda_without_gpu_fails_clearly() -> None:
    with pytest.raises(
        BundleError, match="device cuda asked for, but onnxruntime has no CUDAExecutionProvider"
    ):
        select_providers("cuda", [CPU])


def test_start_up_fails_on_a_broken_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = rewrite_manifest(tiny_bundle, tmp_path / "b")
    _corrupt(bundle / "encoder.onnx")
    app = create_app(Settings(bundle=bundle))
    with (
        pytest.raises(BundleError, match=r"encoder\.onnx fails its SHA-256 check"),
        TestClient(app),
    ):
        pass


@pytest.mark.skipif(CUDA in onnxruntime.get_available_providers(), reason="this machine has CUDA")
def test_start_up_with_cuda_on_a_cpu_machine_fails(tiny_bundle: Path) -> None:
    app = create_app(Settings(bundle=tiny_bundle, device="cuda"))
    with pytest.raises(BundleError, match="device cuda asked for"), TestClient(app):
        pass


def _with_calibration(tiny_bundle: Path, out: Path, **changes: object) -> Path:
    calibration = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]
    return rewrite_manifest(tiny_bundle, out, calibration={**calibration, **changes})


@pytest.mark.parametrize("where", ["default_score", "scores"])
def test_start_up_refuses_an_unknown_score_by_name(
    tiny_bundle: Path, tmp_path: Path, where: str
) -> None:
    calibration = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]
    if where == "default_score":
        bundle = _with_calibration(tiny_bundle, tmp_path / "b", default_score="likelihood_regret")
    else:
        scores = {**calibration["scores"], "likelihood_regret": calibration["scores"]["neg_elbo"]}
        bundle = _with_calibration(tiny_bundle, tmp_path / "b", scores=scores)
    with (
        pytest.raises(BundleError, match=r"unknown anomaly score 'likelihood_regret': this server"),
        TestClient(create_app(Settings(bundle=bundle))),
    ):
        pass


def test_a_bundle_from_before_the_selection_keeps_its_default(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    calibration = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]
    del calibration["selection"], calibration["false_positive_rate"]
    calibration["default_score"] = "recon_error"
    bundle = rewrite_manifest(tiny_bundle, tmp_path / "old", calibration=calibration)
    with TestClient(create_app(Settings(bundle=bundle))) as client:
        assert client.get("/model").json()["calibration"]["false_positive_rate"] is None
        response = client.post("/elbo", json={"pixels": [[[0.5] * 28] * 28]})
        assert response.status_code == 200 and response.json()["score"] == "recon_error"


def test_a_bundle_calibrated_by_2_1_keeps_blur_recon_contrast(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """2.1 bundles: blur_recon_contrast the default, no blur_recon_energy table, no `missed`."""
    calibration = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]
    del calibration["scores"]["blur_recon_energy"], calibration["selection"]["missed"]
    calibration["default_score"] = "blur_recon_contrast"
    bundle = rewrite_manifest(tiny_bundle, tmp_path / "2.1", calibration=calibration)
    pixels = {"pixels": [[[0.5] * 28] * 28]}
    with TestClient(create_app(Settings(bundle=bundle))) as client:
        body = client.post("/elbo", json=pixels).json()
        assert (body["score"], body["threshold_source"]) == ("blur_recon_contrast", "manifest")
        energy = client.post("/elbo", params={"score": "blur_recon_energy"}, json=pixels).json()
        assert (energy["threshold"], energy["results"][0]["percentile"]) == (None, None)
