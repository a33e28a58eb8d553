"""`vae train | fit-prior | export | calibrate | evaluate`: the torch side of the command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from model import data as data_mod
from model.calibrate import calibrate, write_calibration
from model.config import VAEConfig
from model.evaluate import bounds, evaluate
from model.export import export_bundle
from model.prior import PriorFit, fit_prior
from model.train import (
    TrainConfig,
    model_from_checkpoint,
    pick_device,
    previous_run,
    save_atomic,
    train,
)
from service.bundle import SCORE_NAMES, BundleError, read_manifest
from service.cli import HelpFormatter, int_in_range

log = logging.getLogger("vae")


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _finite(s: str) -> float:
    """An argparse type: a finite number."""
    value = float(s)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return value


def _size(s: str) -> tuple[int, int]:
    v = _ints(s.lower().replace("x", ","))
    if len(v) == 1:
        v = (v[0], v[0])
    if len(v) != 2 or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW or one side N for NxN, got {s!r}")
    return (v[0], v[1])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int_in_range(0), default=0, help="torch threads; 0 = torch's default"
    )


def _checkpoint_argument(p: argparse.ArgumentParser) -> None:
    """The positional checkpoint of the commands that also take a bundle folder."""
    p.add_argument(
        "checkpoint", type=Path, help="a checkpoint written by vae train, or a bundle folder"
    )


def _train_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "train", help="train a VAE", formatter_class=HelpFormatter
    )
    p.add_argument("--config", type=Path, help="JSON file of flag values (keys as flag dests)")
    p.add_argument(
        "--data",
        default="mnist",
        help="a folder of images (sub-folders are classes) or of IDX files; 'digits' "
        "(scikit-learn's, offline); or 'mnist' / 'fashion-mnist' to download",
    )
    p.add_argument("--out", default="runs/vae", help="run folder for checkpoints and curves")
    p.add_argument(
        "--force", action="store_true", help="replace the run already in --out (else refused)"
    )
    p.add_argument("--classes", type=_ints, help="train on these labels only, e.g. 3 or 1,7")
    p.add_argument(
        "--image-size",
        type=_size,
        help="HxW (or N for NxN): resize every image to it and build the model for it; "
        "default: the data's own size",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        help="1 (grey) or 3 (RGB); default: 3 when any image has colour, else 1",
    )
    p.add_argument("--latent-dim", type=int, default=32, help="dimension of z")
    p.add_argument(
        "--architecture", choices=["conv", "mlp"], default="conv", help="encoder/decoder type"
    )
    p.add_argument(
        "--conv-channels",
        type=_ints,
        default="32,64",
        help="channels of the stride-2 convolutions (the image size must divide by 2^count)",
    )
    p.add_argument(
        "--hidden-dims", type=_ints, default="512", help="fully connected layers' widths"
    )
    p.add_argument(
        "--prior-components",
        type=int_in_range(0, 65536),
        default=0,
        help="P(z): 0 for N(0, I), K for a mixture of K Gaussians learned with the networks "
        "(vae fit-prior fits one to a trained model, which is how the shipped one was made)",
    )
    p.add_argument(
        "--likelihood",
        choices=["auto", "bernoulli", "gaussian"],
        default="auto",
        help="P(X|z); auto: bernoulli for binary-like grey images (mostly near 0 or 1), "
        "gaussian N(f(z), sigma^2 I) otherwise (README: 'Which likelihood')",
    )
    p.add_argument(
        "--sigma", type=float, default=0.1, help="Gaussian sigma (the initial value if learned)"
    )
    p.add_argument(
        "--learn-sigma",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learn the Gaussian sigma with the weights (--no-learn-sigma: fixed at --sigma)",
    )
    p.add_argument(
        "--val-size",
        type=_finite,
        default=0.1,
        help="validation images: a fraction when < 1, else a count",
    )
    p.add_argument(
        "--binarize",
        choices=["auto", "dynamic", "none"],
        default="auto",
        help="dynamic: draw binary pixels afresh each epoch (Bernoulli only); auto: dynamic for "
        "bernoulli, none for gaussian",
    )
    p.add_argument("--epochs", type=int, default=50, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--lr-schedule", choices=["cosine", "constant"], default="cosine", help="learning rate"
    )
    p.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument(
        "--kl-warmup-epochs", type=int, default=0, help="epochs to ramp the KL weight to 1"
    )
    p.add_argument(
        "--objective", choices=["elbo", "iwae"], default="elbo", help="the bound maximised"
    )
    p.add_argument("--iwae-k", type=int, default=5, help="importance samples of the IWAE bound")
    p.add_argument(
        "--iwae-gradient",
        choices=["standard", "dreg"],
        default="standard",
        help="IWAE gradient estimator; dreg: doubly reparameterised (Tucker et al. 2018), a "
        "lower-variance encoder gradient for large k",
    )
    p.add_argument("--patience", type=int_in_range(0), default=0, help="early stopping; 0 = off")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _threads_option(p)
    p.add_argument("--resume", help="checkpoint to resume from (same run, same schedule)")
    p.add_argument(
        "--init-from",
        help="start from the weights of a checkpoint or of a bundle folder from `vae export`, "
        "with a new optimizer and schedule (fine-tuning, e.g. with --objective iwae)",
    )
    _common(p)
    return p


def _export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint as an ONNX bundle",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint_best.pt or checkpoint_last.pt")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", default="vae", help="model name in the manifest and /model")
    p.add_argument("--version", help="bundle version (default: a timestamp)")
    p.add_argument("--data", help="data for calibration and metrics (default: the training data)")
    p.add_argument(
        "--calibration-k", type=int_in_range(1), default=64, help="k for the -IWAE score table"
    )
    _default_score_option(p)
    p.add_argument(
        "--eval-k",
        type=int_in_range(0),
        default=0,
        help="also measure test IWAE NLL with this k and store it (0 = skip)",
    )
    p.add_argument(
        "--eval-images", type=int_in_range(0), default=0, help="test images to evaluate; 0 = all"
    )
    p.add_argument("--metrics", type=Path, help="JSON file of metrics to store (from evaluate)")
    p.add_argument("--overwrite", action="store_true", help="replace a bundle already in --out")
    _common(p)


def _default_score_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--default-score",
        choices=SCORE_NAMES,
        help="the anomaly score /elbo uses when asked for none (default: the calibration's "
        "choice on held-out images against synthesised outliers, docs/BUNDLE.md)",
    )


def _calibrate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="recalibrate a bundle's anomaly scores from its ONNX files (no checkpoint needed)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("bundle", type=Path, help="the bundle directory; its manifest.json is rewritten")
    p.add_argument("--data", help="the bundle's training data (default: its manifest's source)")
    p.add_argument("--version", help="new bundle version (default: unchanged)")
    p.add_argument(
        "--calibration-k", type=int_in_range(1), default=64, help="k for the -IWAE score table"
    )
    _default_score_option(p)
    _common(p)


def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="test ELBO and IWAE log-likelihood",
        formatter_class=HelpFormatter,
    )
    _checkpoint_argument(p)
    p.add_argument("--data", help="test data (default: the training data's test split)")
    p.add_argument("--k", type=int_in_range(1), default=1000, help="IWAE samples per image")
    p.add_argument(
        "--images",
        type=int_in_range(0),
        default=0,
        help="evaluate the first N test images; 0 = all",
    )
    p.add_argument(
        "--binarize",
        choices=["auto", "dynamic", "none"],
        default="auto",
        help="binarise the test images; auto: as the model was trained",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _threads_option(p)
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    _common(p)


def _fit_prior_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fit-prior",
        help="fit a mixture-of-Gaussians prior P(z) to a trained model (networks unchanged)",
        formatter_class=HelpFormatter,
    )
    _checkpoint_argument(p)
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write (for export)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--data", help="the training data (default: the checkpoint's)")
    fit = PriorFit()
    p.add_argument(
        "--components",
        type=int_in_range(1, 65536),
        default=fit.components,
        help="K, the mixture's components (the shipped model: 2000; on MNIST more components "
        "and steps fitted held-out images better, BENCHMARKS.md section 1)",
    )
    p.add_argument(
        "--steps",
        type=int_in_range(1),
        default=fit.steps,
        help="Adam steps, the learning rate decaying to 1 %% by a cosine (the shipped model: "
        "20000)",
    )
    p.add_argument("--lr", type=_finite, default=fit.lr, help="Adam learning rate")
    _threads_option(p)
    _common(p)


def _data_source(ckpt: dict[str, Any], override: str | None) -> str:
    return override or str(ckpt["train"]["data"])


def _test_images(source: str, cfg: VAEConfig, ckpt: dict[str, Any], limit: int) -> torch.Tensor:
    ds = data_mod.load(source, "test", cfg.channels, (cfg.height, cfg.width))
    classes = ckpt["train"].get("classes")
    x = ds.images if not classes else data_mod.filter_classes(ds, classes).images
    return x[:limit] if limit else x


# Images larger than this (pixels) are not taken at their own size without --image-size: the
# dense layers of these networks grow with the image (a 1000x1000 photo: billions of weights).
MAX_INFERRED_PIXELS = 128 * 128


def cmd_train(args: argparse.Namespace) -> int:
    previous_run(args.out, args.resume, args.force)  # refused before the data is loaded
    # the data first: the model's shape and likelihood default to what suits it
    full = data_mod.load(args.data, "train", args.channels, args.image_size)
    channels, height, width = full.images.shape[1:]
    if args.image_size is None and height * width > MAX_INFERRED_PIXELS:
        raise ValueError(
            f"--data {args.data} has {height}x{width} images, too large for this model at their "
            "own size: pass --image-size, e.g. --image-size 64 (or larger, knowing the model "
            "grows with it)"
        )
    likelihood = args.likelihood
    if likelihood == "auto":
        likelihood = data_mod.suggest_likelihood(full.images)
        log.info("likelihood: %s (pass --likelihood to choose another)", likelihood)
    binarize = args.binarize
    if binarize == "auto":
        binarize = "dynamic" if likelihood == "bernoulli" else "none"
    elif binarize == "dynamic" and likelihood == "gaussian":
        raise ValueError(
            "--binarize dynamic draws binary pixels for a Bernoulli model; with "
            "--likelihood gaussian use --binarize none"
        )
    cfg = VAEConfig(
        channels=channels,
        height=height,
        width=width,
        latent_dim=args.latent_dim,
        architecture=args.architecture,
        conv_channels=tuple(args.conv_channels),
        hidden_dims=tuple(args.hidden_dims),
        likelihood=likelihood,
        sigma=args.sigma,
        learn_sigma=args.learn_sigma and likelihood == "gaussian",
        prior_components=args.prior_components,
    )
    names = {f.name for f in fields(TrainConfig)} - {"extra"}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["classes"] = list(args.classes) if args.classes else None
    kw["binarize"] = binarize
    tc = TrainConfig(**kw)
    result = train(cfg, tc, full)
    log.info("done: %s", json.dumps(result.summary))
    return 0


def _splits(
    ckpt: dict[str, Any], cfg: VAEConfig, source: str
) -> tuple[data_mod.Dataset, data_mod.Dataset]:
    """The training and validation splits the checkpoint's run used."""
    full = data_mod.load(source, "train", cfg.channels, (cfg.height, cfg.width))
    classes = ckpt["train"].get("classes")
    if classes:
        full = data_mod.filter_classes(full, classes)
    return data_mod.split_validation(full, ckpt["train"]["val_size"], ckpt["train"]["seed"])


def _training_record(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of the training: a run checkpoint's, computed from its history;
    a bundle's or a fitted prior's, as recorded."""
    if "training" in ckpt:
        return dict(ckpt["training"])
    return {
        "epochs": ckpt["epoch"],
        "seed": ckpt["train"]["seed"],
        "objective": ckpt["train"]["objective"],
        "init_from": ckpt["train"].get("init_from"),
        "batch_size": ckpt["train"]["batch_size"],
        "seconds": sum(h["seconds"] for h in ckpt["history"]),
        "world_size": ckpt.get("world_size", 1),
    }


# IWAE samples of the held-out bound `vae fit-prior` reports before and after the fit
FIT_CHECK_K = 50


def cmd_fit_prior(args: argparse.Namespace) -> int:
    # everything about the flags is checked before minutes of fitting
    fit = PriorFit(components=args.components, steps=args.steps, lr=args.lr, seed=args.seed)
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; name the checkpoint file to write")
    if args.out.exists() and not args.force:
        raise FileExistsError(f"--out {args.out} exists; pass --force to replace it")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, ckpt = model_from_checkpoint(args.checkpoint)
    source = _data_source(ckpt, args.data)
    train_ds, val = _splits(ckpt, model.cfg, source)
    binarize = ckpt["train"]["binarize"] == "dynamic"
    t0 = time.time()
    fitted = fit_prior(model, train_ds.images, fit, binarize)
    seconds = time.time() - t0
    checks = {
        name: bounds(m, val.images, FIT_CHECK_K, args.seed, binarize, batch_size=500)["iwae"]
        for name, m in (("before", model), ("after", fitted))
    }
    log.info(
        "held-out IWAE-%d (%d validation images): %.3f with %s, %.3f with the mixture (%+.3f)",
        FIT_CHECK_K,
        len(val.images),
        checks["before"],
        "its prior" if model.cfg.prior_components else "N(0, I)",
        checks["after"],
        checks["after"] - checks["before"],
    )
    record = {
        **asdict(fit),
        "from": str(args.checkpoint),
        "seconds": round(seconds, 1),
        "data": f"the training split of {source}",
        f"val_iwae_{FIT_CHECK_K}_before": checks["before"],
        f"val_iwae_{FIT_CHECK_K}_after": checks["after"],
    }
    out = {
        **{k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler")},
        "config": fitted.cfg.to_dict(),
        "model": fitted.state_dict(),
        "training": {**_training_record(ckpt), "prior_fit": record},
        "best_val_bound": None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(out, args.out)
    print(args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.checkpoint.is_dir():
        raise ValueError(
            f"{args.checkpoint} is a bundle, not a run's checkpoint: `vae calibrate` "
            "recalibrates a bundle"
        )
    model, ckpt = model_from_checkpoint(args.checkpoint)
    cfg = model.cfg
    source = _data_source(ckpt, args.data)
    _, val = _splits(ckpt, cfg, source)
    best = ckpt.get("best_val_bound", ckpt.get("best_val_elbo"))  # older checkpoints: _elbo
    metrics: dict[str, Any] = {"best_val_bound": best}
    if args.metrics:
        metrics.update(json.loads(args.metrics.read_text()))
    if args.eval_k:
        x = _test_images(source, cfg, ckpt, args.eval_images)
        metrics.update(evaluate(model, x, k=args.eval_k, seed=args.seed))
    training = _training_record(ckpt)
    export_bundle(
        model,
        args.out,
        val.images,
        name=args.name,
        version=args.version,
        data={**ckpt["data"], "source": source},
        training=training,
        metrics=metrics,
        calibration_description=f"validation split of {source}, raw intensities",
        calibration_k=args.calibration_k,
        default_score=args.default_score,
        overwrite=args.overwrite,
    )
    print(args.out)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Recompute the bundle's validation split from its manifest and calibrate on it."""
    checked = read_manifest(args.bundle)  # BundleError naming what is wrong, as vae serve's
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    data, seed = manifest.get("data") or {}, (manifest.get("training") or {}).get("seed")
    if not isinstance(data.get("val_images"), int) or not isinstance(seed, int):
        raise ValueError(
            f"{args.bundle}/manifest.json records no data.val_images or training.seed: calibrate "
            "re-creates the validation split of vae train, so it needs a bundle from vae export"
        )
    source = args.data or data.get("source")
    if not source:
        raise ValueError(f"{args.bundle}/manifest.json names no data source; pass --data")
    full = data_mod.load(source, "train", checked.image.channels)
    if data.get("classes"):
        full = data_mod.filter_classes(full, data["classes"])
    _, val = data_mod.split_validation(full, data["val_images"], seed)
    calibration = calibrate(
        args.bundle,
        val.images.numpy(),
        f"validation split of {source}, raw intensities",
        k=args.calibration_k,
        seed=args.seed,
        default_score=args.default_score,
    )
    write_calibration(args.bundle, calibration, args.version)
    log.info("calibrated %s: default score %s", args.bundle, calibration["default_score"])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, ckpt = model_from_checkpoint(args.checkpoint)
    model.to(pick_device(args.device))
    x = _test_images(_data_source(ckpt, args.data), model.cfg, ckpt, args.images)
    binarize = ckpt["train"]["binarize"] if args.binarize == "auto" else args.binarize
    res = evaluate(model, x, k=args.k, seed=args.seed, binarize=binarize == "dynamic")
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `vae` parser and its `train` sub-parser (which takes defaults from --config)."""
    parser = argparse.ArgumentParser(prog="vae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = _train_parser(sub)
    _export_parser(sub)
    _calibrate_parser(sub)
    _evaluate_parser(sub)
    _fit_prior_parser(sub)
    return parser, train_parser


def main(argv: list[str] | None = None) -> int:
    parser, train_parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config:
        try:
            values = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {args.config}: {e}")
        dests = {a.dest for a in train_parser._actions}
        unknown = set(values) - dests
        if unknown:
            parser.error(f"--config {args.config}: unknown keys {sorted(unknown)}")
        train_parser.set_defaults(**values)
        args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("onnxscript", "onnx_ir", "matplotlib", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "torchvision is not installed. Skipping torchvision::nms" and seven more on every export:
    # the exporter lists torchvision's operators, which a VAE never uses
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        commands = {
            "train": cmd_train,
            "export": cmd_export,
            "calibrate": cmd_calibrate,
            "evaluate": cmd_evaluate,
            "fit-prior": cmd_fit_prior,
        }
        return commands[args.command](args)
    except (data_mod.DataError, BundleError, ValueError, FileNotFoundError, FileExistsError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
