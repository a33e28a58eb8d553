"""`vae export`: ONNX agrees with PyTorch, the manifest is whole, a failed export leaves nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model import export as export_mod
from model.cli import main
from model.config import VAEConfig
from model.export import export_bundle
from model.networks import VAE
from service import objective as service_objective
from service.bundle import SCORE_NAMES


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_onnx_matches_pytorch(
    tiny_bundle: Path, tiny_gaussian_bundle: Path, likelihood: str
) -> None:
    bundle = tiny_bundle if likelihood == "bernoulli" else tiny_gaussian_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    enc, dec = _session(bundle / "encoder.onnx"), _session(bundle / "decoder.onnx")
    assert [i.name for i in enc.get_inputs()] == ["x"]
    assert [o.name for o in enc.get_outputs()] == ["mu", "logvar"]
    assert [o.name for o in dec.get_outputs()] == [manifest["decoder_output"]]
    assert manifest["decoder_output"] == ("logits" if likelihood == "bernoulli" else "mean")
    # the dynamic batch axis takes 1 and 33 alike
    for batch in (1, 33):
        x = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
        mu, logvar = enc.run(None, {"x": x})
        assert mu.shape == logvar.shape == (batch, 8)
        (out,) = dec.run(None, {"z": mu})
        assert out.shape == (batch, 1, 28, 28)
    assert manifest["metrics"]["onnx_max_abs_error"] <= 1e-4


def test_export_round_trip_against_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = VAE(
        VAEConfig(
            channels=3, height=16, width=16, latent_dim=6, conv_channels=(8, 16), hidden_dims=(32,)
        )
    ).eval()
    out = export_bundle(model, tmp_path / "b", torch.rand(20, 3, 16, 16), calibration_k=4)
    x = torch.rand(5, 3, 16, 16)
    mu, logvar = _session(out / "encoder.onnx").run(None, {"x": x.numpy()})
    with torch.no_grad():
        t_mu, t_logvar = model.encode(x)
        (logits,) = _session(out / "decoder.onnx").run(None, {"z": t_mu.numpy()})
        t_logits = model.decode(t_mu)
    assert np.abs(mu - t_mu.numpy()).max() <= 1e-4
    assert np.abs(logvar - t_logvar.numpy()).max() <= 1e-4
    assert np.abs(logits - t_logits.numpy()).max() <= 1e-4


def test_manifest(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert sorted(p.name for p in tiny_bundle.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
    ]
    assert m["schema_version"] == 1
    assert m["image"] == {"channels": 1, "height": 28, "width": 28}
    assert m["latent_dim"] == 8 and m["likelihood"] == "bernoulli" and m["sigma"] is None
    assert VAEConfig.from_dict(m["config"]).latent_dim == 8
    for name in ("encoder.onnx", "decoder.onnx"):
        data = (tiny_bundle / name).read_bytes()
        assert m["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    cal = m["calibration"]
    assert cal["default_score"] == "neg_elbo" and cal["threshold_percentile"] == 99.0
    assert cal["selection"]["default_from"] == "--default-score"
    assert cal["images"] + cal["false_positive_rate"]["images"] == 64
    for score in SCORE_NAMES:
        table = cal["scores"][score]
        assert len(table["percentiles"]) == len(table["values"]) == 1001
        assert table["percentiles"][0] == 0.0 and table["percentiles"][-1] == 100.0
        assert np.all(np.diff(table["values"]) >= 0)
    # -IWAE is a tighter (smaller) bound on -log p(x) than -ELBO, on the median
    assert cal["scores"]["neg_iwae"]["values"][500] < cal["scores"]["neg_elbo"]["values"][500]


def test_failed_export_leaves_no_half_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> float:
        raise RuntimeError("ONNX export differs from PyTorch by 1.00e-01 > 0.0001")

    monkeypatch.setattr(export_mod, "check_onnx", broken)
    model = VAE(VAEConfig(latent_dim=2, conv_channels=(4, 4), hidden_dims=(8,)))
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_bundle(model, tmp_path / "bundle", torch.rand(4, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite(tiny_bundle: Path) -> None:
    model = VAE(VAEConfig(latent_dim=2, conv_channels=(4, 4), hidden_dims=(8,)))
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_bundle(model, tiny_bundle, torch.rand(4, 1, 28, 28))


def test_overwrite_replaces_only_a_bundle(tmp_path: Path) -> None:
    # --overwrite on a folder of the user's own files would have deleted them
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    (photos / "a.png").write_bytes(b"mine")
    (photos / "nested" / "b.png").write_bytes(b"mine too")
    model = VAE(VAEConfig(latent_dim=2, conv_channels=(4, 4), hidden_dims=(8,)))
    images = torch.rand(4, 1, 28, 28)
    with pytest.raises(FileExistsError, match="is not a bundle, and --overwrite replaces only"):
        export_bundle(model, photos, images, overwrite=True)
    assert (photos / "a.png").read_bytes() == b"mine"
    assert (photos / "nested" / "b.png").read_bytes() == b"mine too"
    bundle = export_bundle(model, tmp_path / "bundle", images)
    first = json.loads((bundle / "manifest.json").read_text())["created"]
    assert export_bundle(model, bundle, images, overwrite=True, version="2") == bundle
    assert json.loads((bundle / "manifest.json").read_text())["version"] == "2", first
    # a model with N(0, I) has no prior.npz
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        export_mod.BUNDLE_FILES - {"prior.npz"}
    )
    (tmp_path / "empty").mkdir()
    export_bundle(model, tmp_path / "empty", images, overwrite=True)


def test_cli_export_and_evaluate(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = [
        "--data",
        "digits",
        "--val-size",
        "100",
        "--latent-dim",
        "3",
        "--conv-channels",
        "8,8",
        "--hidden-dims",
        "16",
        "--epochs",
        "1",
    ]
    assert main(["train", *args, "--out", str(run)]) == 0
    capfd.readouterr()
    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                "export",
                str(run / "checkpoint_best.pt"),
                "--out",
                str(bundle),
                "--name",
                "digits",
                "--calibration-k",
                "4",
                "--eval-k",
                "5",
                "--eval-images",
                "50",
            ]
        )
        == 0
    )
    out, err = capfd.readouterr()
    assert out == f"{bundle}\n"
    assert "Traceback" not in err  # stderr's quiet in a fresh process: tests/e2e/test_walk.py
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["name"] == "digits" and m["image"] == {"channels": 1, "height": 8, "width": 8}
    cal = m["calibration"]
    assert m["data"]["val_images"] == 100
    assert cal["images"] == cal["false_positive_rate"]["images"] == 50
    assert cal["default_score"] == cal["selection"]["chosen"]
    # `vae calibrate` on the bundle finds the same validation split and writes the same tables
    assert main(["calibrate", str(bundle), "--calibration-k", "4", "--version", "9.9.9"]) == 0
    again = json.loads((bundle / "manifest.json").read_text())
    assert again["version"] == "9.9.9" and again["files"] == m["files"]
    assert again["calibration"] == cal
    assert m["metrics"]["iwae_k"] == 5 and m["metrics"]["test_images"] == 50
    assert main(["evaluate", str(run / "checkpoint_best.pt"), "--k", "5", "--images", "50"]) == 0
    res = json.loads(capfd.readouterr().out)
    assert res["test_nll_iwae"] == pytest.approx(m["metrics"]["test_nll_iwae"])
    assert res["test_elbo"] == pytest.approx(res["test_reconstruction"] - res["test_kl"])


def test_export_of_a_missing_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "checkpoint not found" in caplog.text
    assert not (tmp_path / "b").exists()


def test_recon_error_calibration_matches_onnx(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = VAE(VAEConfig(latent_dim=4, conv_channels=(4, 8), hidden_dims=(16,))).eval()
    x = torch.rand(50, 1, 28, 28)
    out = export_bundle(model, tmp_path / "b", x, calibration_k=4, default_score="recon_error")
    cal = json.loads((out / "manifest.json").read_text())["calibration"]
    assert cal["default_score"] == "recon_error"
    # independently, through onnxruntime: sum((x - sigmoid(decoder(mu)))^2)
    (mu, _) = _session(out / "encoder.onnx").run(None, {"x": x.numpy()})
    (logits,) = _session(out / "decoder.onnx").run(None, {"z": mu})
    err = ((x.numpy() - 1 / (1 + np.exp(-logits))) ** 2).sum(axis=(1, 2, 3))
    half = np.random.default_rng(0).permutation(50)[:25]  # the tables' half (seed 0)
    err = err[half]
    table = cal["scores"]["recon_error"]
    np.testing.assert_allclose(table["values"], np.percentile(err, table["percentiles"]), rtol=1e-4)
    # blur_recon_rel from the same ONNX reconstruction, by the service's numpy twin
    mean = (1 / (1 + np.exp(-logits))).astype(np.float32)
    rel = service_objective.blur_recon_rel(x.numpy(), mean)[half]
    table = cal["scores"]["blur_recon_rel"]
    np.testing.assert_allclose(table["values"], np.percentile(rel, table["percentiles"]), rtol=1e-4)
    with pytest.raises(ValueError, match="default score must be one of"):
        export_bundle(model, tmp_path / "c", x, default_score="mse")
