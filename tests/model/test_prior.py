"""`vae fit-prior`: a mixture prior fitted to a trained model, exported as a schema-2 bundle, read
back as a checkpoint, and trained further with the networks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from model.cli import main
from model.export import bundle_checkpoint
from model.train import load_checkpoint, model_from_checkpoint
from tests.model.test_train import DIGITS


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small model trained on scikit-learn's digits, and its checkpoint with a fitted prior."""
    root = tmp_path_factory.mktemp("prior")
    assert main(["train", *DIGITS, "--epochs", "3", "--out", str(root / "run")]) == 0
    source = root / "run" / "checkpoint_best.pt"
    out = root / "fitted.pt"
    args = ["fit-prior", str(source), "--out", str(out), "--components", "20", "--steps", "300"]
    assert main([*args, "--threads", "1"]) == 0
    return source, out


def test_the_fit_keeps_the_networks_and_raises_the_held_out_bound(
    fitted: tuple[Path, Path],
) -> None:
    source, out = fitted
    before, _ = model_from_checkpoint(source)
    after, ckpt = model_from_checkpoint(out)
    assert after.cfg.prior_components == 20 and before.cfg.prior_components == 0
    after_state = after.state_dict()
    for key, value in before.state_dict().items():
        torch.testing.assert_close(after_state[key], value, rtol=0, atol=0)
    fit = ckpt["training"]["prior_fit"]
    assert (fit["components"], fit["steps"], fit["from"]) == (20, 300, str(source))
    # the mixture fitted to the aggregate posterior beats N(0, I) on held-out images
    assert fit["val_iwae_50_after"] > fit["val_iwae_50_before"]
    assert "optimizer" not in ckpt and ckpt["best_val_bound"] is None


def test_a_fitted_checkpoint_cannot_be_resumed(
    fitted: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, out = fitted
    args = ["train", *DIGITS, "--prior-components", "20", "--out", str(tmp_path / "r")]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--resume", str(out)]) == 2
    assert "holds weights but no optimizer" in caplog.text and "--init-from" in caplog.text


def test_training_goes_on_with_the_prior(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = fitted
    run = tmp_path / "joint"
    args = ["train", *DIGITS, "--prior-components", "20", "--epochs", "1", "--out", str(run)]
    assert main([*args, "--init-from", str(out), "--objective", "iwae", "--iwae-k", "3"]) == 0
    trained = load_checkpoint(run / "checkpoint_last.pt")["model"]
    start = load_checkpoint(out)["model"]
    assert trained["prior_means"].shape == (20, 4)
    assert not torch.equal(trained["prior_means"], start["prior_means"])  # learned with the nets


def test_export_and_read_back(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = fitted
    bundle = tmp_path / "bundle"
    assert main(["export", str(out), "--out", str(bundle), "--calibration-k", "4"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["prior"]["components"] == 20
    assert manifest["training"]["prior_fit"]["components"] == 20  # how it was made
    # the bundle's weights are the checkpoint's, prior included
    want = load_checkpoint(out)["model"]
    got = bundle_checkpoint(bundle)["model"]
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    # and it evaluates as the checkpoint does (bench.quality reads bundles this way)
    results = []
    for path in (out, bundle):
        capsys.readouterr()
        assert main(["evaluate", str(path), "--k", "5", "--images", "50", "--threads", "1"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--lr=-0.01"], "--lr must be positive, got -0.01"),
        (["--components", "5000"], "--components 5000 is more than the"),
        (["--out", "{tmp}", "--force"], "is a directory; name the checkpoint file to write"),
        (["--out", "{tmp}/taken.pt"], "exists; pass --force to replace it"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(
    fitted: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    flags: list[str],
    message: str,
) -> None:
    source, _ = fitted
    (tmp_path / "taken.pt").write_bytes(b"mine")
    args = ["fit-prior", str(source), "--out", str(tmp_path / "new.pt"), "--steps", "5"]
    with caplog.at_level(logging.ERROR):
        assert main([*args, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    assert message in caplog.text
    assert not (tmp_path / "new.pt").exists()
    assert (tmp_path / "taken.pt").read_bytes() == b"mine"
