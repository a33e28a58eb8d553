"""`vae train` end to end on small real data, resume, and its bad-input cases."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from model import data as data_mod
from model.cli import build_parser, main
from model.evaluate import bounds
from model.train import load_checkpoint, model_from_checkpoint
from tests.conftest import colour_folder

DIGITS = [
    "--data",
    "digits",
    "--val-size",
    "200",
    "--latent-dim",
    "4",
    "--conv-channels",
    "8,16",
    "--hidden-dims",
    "32",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "digits"
    assert (
        main(["train", *DIGITS, "--epochs", "3", "--out", str(out), "--kl-warmup-epochs", "2"]) == 0
    )
    return out


def test_train_writes_checkpoints_and_curves(run: Path) -> None:
    for name in (
        "checkpoint_best.pt",
        "checkpoint_last.pt",
        "history.csv",
        "history.json",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["beta"]) for r in rows] == [0.5, 1.0, 1.0]
    assert float(rows[-1]["val_elbo"]) > float(rows[0]["val_elbo"])  # it learns
    ckpt = load_checkpoint(run / "checkpoint_last.pt")
    assert ckpt["epoch"] == 3 and ckpt["data"]["val_images"] == 200
    assert ckpt["best_val_bound"] == max(float(r["val_elbo"]) for r in rows)
    assert all(r["val_bound"] == r["val_elbo"] for r in rows)  # the ELBO objective


def test_resume_continues(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    args = ["train", *DIGITS, "--epochs", "4", "--out", str(out), "--kl-warmup-epochs", "2"]
    assert main([*args, "--resume", str(run / "checkpoint_last.pt")]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"epochs": 1, "latent_dim": 3, "lr": 0.01}))
    out = tmp_path / "r"
    # values from the file are defaults: a flag on the command line still wins
    assert main(["train", *DIGITS, "--config", str(cfg), "--out", str(out), "--lr", "0.002"]) == 0
    ckpt = load_checkpoint(out / "checkpoint_last.pt")
    assert ckpt["train"]["epochs"] == 1 and ckpt["train"]["lr"] == 0.002
    assert ckpt["config"]["latent_dim"] == 4  # DIGITS passes --latent-dim 4


def test_same_seed_same_weights(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["train", *DIGITS, "--epochs", "1", "--out", str(tmp_path / name)]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint_last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--latent-dim", "0"], "latent_dim must be positive, got 0"),
        (
            ["--image-size", "10"],
            "image size 10x10 is not divisible by 4, the total stride of 2 conv layers: pass "
            "--image-size with sides that are multiples of 4",
        ),
        (
            ["--val-size", "1797"],
            "--val-size 1797 leaves no training or no validation images: the data has 1797; give "
            "a fraction such as 0.1 or a count below 1797",
        ),
        (["--likelihood", "gaussian", "--binarize", "dynamic"], "use --binarize none"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--data", "/nonexistent/dir"], "--data /nonexistent/dir: not found"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["train", *DIGITS, "--out", str(out), *extra]) == 2
    assert message in caplog.text
    assert not out.exists()


def test_resume_from_another_architecture(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = ["train", *DIGITS, "--latent-dim", "6", "--out", str(tmp_path / "x")]
    assert main([*args, "--resume", str(run / "checkpoint_last.pt")]) == 2
    assert "the checkpoint's model differs; set --latent-dim (checkpoint 4, asked 6)" in caplog.text


def test_resume_from_a_file_that_is_not_a_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["train", *DIGITS, "--out", str(tmp_path / "x"), "--resume", str(bad)]) == 2
    assert f"{bad} is not a readable checkpoint" in caplog.text


def test_unknown_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"epocs": 3}')
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg)])
    assert e.value.code == 2
    assert "unknown keys ['epocs']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--val-size", "inf"], "argument --val-size: must be a finite number, got inf"),
        (["train", "--val-size", "nan"], "argument --val-size: must be a finite number, got nan"),
        (["train", "--patience", "-1"], "argument --patience: must be at least 0, got -1"),
        (["evaluate", "x", "--k", "0"], "argument --k: must be at least 1, got 0"),
        (["evaluate", "x", "--images", "-1"], "argument --images: must be at least 0, got -1"),
        (["export", "x", "--out", "y", "--calibration-k", "0"], "must be at least 1, got 0"),
        (["calibrate", "x", "--calibration-k", "-5"], "must be at least 1, got -5"),
    ],
)
def test_bad_numbers_name_their_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_device_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["train", *DIGITS, "--out", str(tmp_path / "x"), "--device", "bogus"]) == 2
    assert "--device 'bogus' is not one of auto, cpu, cuda or cuda:N" in caplog.text


def test_iwae_fine_tuning_from_weights(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    args = [
        "train",
        *DIGITS,
        "--epochs",
        "1",
        "--objective",
        "iwae",
        "--iwae-k",
        "4",
        "--out",
        str(out),
    ]
    assert main([*args, "--init-from", str(run / "checkpoint_best.pt")]) == 0
    (row,) = json.loads((out / "history.json").read_text())
    ckpt = load_checkpoint(out / "checkpoint_best.pt")
    assert ckpt["best_val_bound"] == row["val_bound"] and ckpt["epoch"] == 1
    # the best checkpoint is chosen on the bound being trained: the validation IWAE-4 bound,
    # recomputed here from the checkpoint on the same held-out split with the same seed
    model, _ = model_from_checkpoint(out / "checkpoint_best.pt")
    full = data_mod.load("digits", "train", 1, None)
    _, val = data_mod.split_validation(full, int(ckpt["train"]["val_size"]), ckpt["train"]["seed"])
    expected = bounds(model.eval(), val.images, 4, ckpt["train"]["seed"], True, batch_size=1000)
    assert row["val_bound"] == pytest.approx(expected["iwae"], rel=1e-6)
    assert row["val_elbo"] == pytest.approx(expected["elbo"], rel=1e-6)


def test_fine_tuning_from_a_bundle_equals_from_its_checkpoint(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--init-from takes a bundle folder from `vae export`: its ONNX files give back the
    checkpoint's exact weights, so fine-tuning from the bundle or from the checkpoint gives the
    same weights; a bundle of another shape or a folder that is no bundle is refused by name."""
    bundle = tmp_path / "bundle"
    export = ["export", str(run / "checkpoint_best.pt"), "--out", str(bundle)]
    assert main([*export, "--name", "digits", "--calibration-k", "2"]) == 0
    from_bundle = load_checkpoint(bundle)
    ckpt = load_checkpoint(run / "checkpoint_best.pt")
    assert from_bundle["config"] == ckpt["config"]
    assert from_bundle["model"].keys() == ckpt["model"].keys()
    for key, value in ckpt["model"].items():
        assert torch.equal(from_bundle["model"][key], value), key
    assert from_bundle["epoch"] == ckpt["epoch"]
    for key in ("data", "classes", "binarize", "seed", "objective"):
        assert from_bundle["train"][key] == ckpt["train"][key], key

    args = ["train", *DIGITS, "--epochs", "1", "--objective", "iwae", "--iwae-k", "2"]
    assert main([*args, "--out", str(tmp_path / "a"), "--init-from", str(bundle)]) == 0
    best = str(run / "checkpoint_best.pt")
    assert main([*args, "--out", str(tmp_path / "b"), "--init-from", best]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint_last.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)

    other = ["train", *DIGITS, "--epochs", "1"]
    other[other.index("--hidden-dims") + 1] = "24"
    assert main([*other, "--out", str(tmp_path / "c"), "--init-from", str(bundle)]) == 2
    assert "model differs; set --hidden-dims (checkpoint [32], asked [24])" in caplog.text
    assert main([*args, "--out", str(tmp_path / "d"), "--init-from", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a bundle: it has no manifest.json" in caplog.text
    assert main([*args, "--out", str(tmp_path / "e"), "--resume", str(bundle)]) == 2
    assert f"--resume {bundle} is a bundle: it holds weights, not a run's optimizer" in caplog.text
    assert main(["export", str(bundle), "--out", str(tmp_path / "f")]) == 2
    assert f"{bundle} is a bundle, not a run's checkpoint: `vae calibrate`" in caplog.text
    # its files are checked as the server checks them: a changed ONNX file is refused by name
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    onnx_file = tampered / "decoder.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last byte
    assert main([*args, "--out", str(tmp_path / "g"), "--init-from", str(tampered)]) == 2
    assert f"{onnx_file} fails its SHA-256 check against manifest.json" in caplog.text
    for name in "cdefg":
        assert not (tmp_path / name).exists()


def test_evaluate_a_bundle_as_its_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vae evaluate BUNDLE` gives the figures of the checkpoint it was exported from."""
    bundle = tmp_path / "bundle"
    export = ["export", str(run / "checkpoint_best.pt"), "--out", str(bundle)]
    assert main([*export, "--name", "digits", "--calibration-k", "2"]) == 0
    capsys.readouterr()
    results = []
    for source in (run / "checkpoint_best.pt", bundle):
        assert main(["evaluate", str(source), "--k", "4", "--images", "60"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["test_images"] == 60
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-6), key


def test_bundle_weights_keep_a_learned_sigma(tiny_gaussian_bundle: Path) -> None:
    """A learned Gaussian sigma is not in the ONNX files: it comes from the manifest."""
    manifest = json.loads((tiny_gaussian_bundle / "manifest.json").read_text())
    weights = load_checkpoint(tiny_gaussian_bundle)["model"]
    assert math.exp(float(weights["log_sigma"])) == pytest.approx(manifest["sigma"], rel=1e-6)


def test_iwae_objective_trains(tmp_path: Path) -> None:
    out = tmp_path / "iwae"
    assert (
        main(
            [
                "train",
                *DIGITS,
                "--epochs",
                "1",
                "--objective",
                "iwae",
                "--iwae-k",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert load_checkpoint(out / "checkpoint_last.pt")["train"]["objective"] == "iwae"


def test_iwae_dreg_fine_tuning_improves_the_bound(run: Path, tmp_path: Path) -> None:
    """--iwae-gradient dreg trains: two epochs of IWAE-8 with the doubly reparameterised
    gradient raise the validation IWAE-8 bound of the ELBO-trained start."""
    out = tmp_path / "dreg"
    args = ["train", *DIGITS, "--epochs", "2", "--objective", "iwae", "--iwae-k", "8"]
    args += ["--iwae-gradient", "dreg", "--lr", "3e-3", "--out", str(out)]
    assert main([*args, "--init-from", str(run / "checkpoint_best.pt")]) == 0
    first, second = json.loads((out / "history.json").read_text())
    assert second["val_bound"] > first["val_bound"]
    assert load_checkpoint(out / "checkpoint_last.pt")["train"]["iwae_gradient"] == "dreg"


def test_iwae_gradient_must_be_known(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", *DIGITS, "--iwae-gradient", "reinforce", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--iwae-gradient" in capsys.readouterr().err


SMALL = ["--latent-dim", "4", "--conv-channels", "8,16", "--hidden-dims", "32", "--threads", "1"]


def epoch_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]


def test_digits_as_typed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No shape, split or likelihood flags: 8x8 grey, a 10 % split, Bernoulli."""
    out = tmp_path / "digits"
    with caplog.at_level(logging.INFO):
        assert main(["train", "--data", "digits", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint_last.pt")
    c = ckpt["config"]
    assert (c["channels"], c["height"], c["width"], c["likelihood"]) == (1, 8, 8, "bernoulli")
    assert c["learn_sigma"] is False and ckpt["train"]["binarize"] == "dynamic"
    assert (ckpt["data"]["train_images"], ckpt["data"]["val_images"]) == (1617, 180)
    (line,) = epoch_lines(caplog)
    assert line.count("val ELBO") == 1 and line.count("val ") == 1, line
    assert "likelihood: bernoulli (pass --likelihood to choose another)" in caplog.text


def test_an_rgb_folder_as_typed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Colour is kept, the size is the images', and the likelihood is a Gaussian with sigma
    learned; each epoch line shows sigma."""
    data = colour_folder(tmp_path / "images", 24, seed=0, size=16)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), *SMALL, "--epochs", "2", "--lr", "3e-3"]
    with caplog.at_level(logging.INFO):
        assert main([*args, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint_last.pt")
    c = ckpt["config"]
    assert (c["channels"], c["height"], c["width"]) == (3, 16, 16)
    assert (c["likelihood"], c["learn_sigma"]) == ("gaussian", True)
    assert ckpt["train"]["binarize"] == "none"
    assert (ckpt["data"]["train_images"], ckpt["data"]["val_images"]) == (22, 2)
    assert float(ckpt["model"]["log_sigma"]) != pytest.approx(math.log(0.1))  # it was learned
    assert all("sigma " in line for line in epoch_lines(caplog))

    # one flag sets both the resizing and the model; grey on request
    small = tmp_path / "small"
    assert main([*args, "--image-size", "8x12", "--channels", "1", "--out", str(small)]) == 0
    c = load_checkpoint(small / "checkpoint_last.pt")["config"]
    assert (c["channels"], c["height"], c["width"]) == (1, 8, 12)


def test_large_images_need_an_explicit_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = colour_folder(tmp_path / "big", 2, seed=0, size=160)
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), *SMALL, "--epochs", "1", "--out", str(out)]) == 2
    assert "has 160x160 images, too large for this model at their own size: pass --image-size" in (
        caplog.text
    )
    assert not out.exists()


def test_a_run_folder_is_never_overwritten_silently(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = (run / "checkpoint_last.pt").read_bytes()
    assert main(["train", *DIGITS, "--epochs", "1", "--out", str(run)]) == 2
    assert (
        f"--out {run} already holds a run (checkpoint_last.pt); pass --resume "
        f"{run / 'checkpoint_last.pt'} to continue it, --force to replace it, or another --out"
    ) in caplog.text
    assert (run / "checkpoint_last.pt").read_bytes() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "history.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    assert main(["train", *DIGITS, "--epochs", "1", "--out", str(copy), "--force"]) == 0
    assert load_checkpoint(copy / "checkpoint_last.pt")["epoch"] == 1
    assert [h["epoch"] for h in json.loads((copy / "history.json").read_text())] == [1]


@pytest.mark.parametrize("command", ["train", "export", "evaluate", "fit-prior"])
def test_help_shows_every_default_once(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "500")  # one line per flag
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_parser = sub.choices[command]
    entries: dict[str, str] = {}  # first token of each flag's entry -> the entry, joined
    current = ""
    for line in command_parser.format_help().splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
    for action in command_parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        name = action.option_strings[0] if action.option_strings else action.dest
        entry = entries[name]
        if action.default is None:
            assert "(default: None)" not in entry, entry
        else:
            assert entry.count("(default: ") == 1, entry
            assert entry.endswith(f"(default: {action.default})"), entry
