"""Export a trained VAE as a servable bundle: encoder.onnx, decoder.onnx and manifest.json, and
prior.npz when P(z) is a mixture.

The bundle format is specified in docs/BUNDLE.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.calibrate import calibrate
from model.config import VAEConfig
from model.networks import VAE
from service.bundle import (
    DECODER_FILE,
    ENCODER_FILE,
    PRIOR_FILE,
    read_manifest,
    read_prior,
    verify_file,
)

log = logging.getLogger(__name__)

BUNDLE_FILES = frozenset({"manifest.json", ENCODER_FILE, DECODER_FILE, PRIOR_FILE})

MAX_ABS_ERROR = 1e-4


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _export_onnx(
    module: torch.nn.Module, example: torch.Tensor, path: Path, inp: str, outs: list[str]
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[inp],
            output_names=outs,
            dynamic_shapes={inp: {0: batch}},  # inp is the forward() argument's name
            dynamo=True,
            external_data=False,  # one self-contained file per graph
            opset_version=18,
            verbose=False,
        )


class _DecoderOnly(torch.nn.Module):
    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # type: ignore[no-any-return]


class _EncoderOnly(torch.nn.Module):
    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)  # type: ignore[no-any-return]


def bundle_checkpoint(bundle: Path) -> dict[str, Any]:
    """A bundle written by `export_bundle`, as `load_checkpoint` gives a checkpoint: the network's
    config and weights, and what the manifest records of the data and the training.

    The exporter keeps each parameter's name on its ONNX initializer, so the weights come back
    exactly; a learned sigma comes from the manifest. This is what lets `vae evaluate`,
    bench.quality and `vae train --init-from` take a bundle whose checkpoint is gone. It has no
    optimizer state or history: `--resume` and `vae export` still need a run's checkpoint.
    """
    import onnx
    from onnx import numpy_helper

    if not (bundle / "manifest.json").is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: it has no manifest.json")
    manifest = read_manifest(bundle)  # validated as the server validates it
    config = manifest.config
    expected = VAE(VAEConfig.from_dict(config)).state_dict()
    found: dict[str, torch.Tensor] = {}
    for name in manifest.file_names:
        verify_file(bundle / name, manifest.files[name])  # size and SHA-256, as the server does
    if manifest.prior is not None:
        prior = read_prior(bundle / PRIOR_FILE, manifest.prior, manifest.latent_dim)
        for name in ("logits", "means", "logvars"):
            found[f"prior_{name}"] = torch.from_numpy(getattr(prior, name).copy())
    for name in (ENCODER_FILE, DECODER_FILE):
        graph = onnx.load(str(bundle / name)).graph
        for init in graph.initializer:
            if init.name in expected:
                found[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy())
    sigma = manifest.sigma if manifest.sigma is not None else config["sigma"]
    found["log_sigma"] = torch.tensor(math.log(sigma))  # learned sigma: the manifest's value
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{bundle}: the ONNX files lack the weights {', '.join(missing)}")
    for key, value in found.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{bundle}: {key} has shape {tuple(value.shape)} in the ONNX files, "
                f"but the manifest's config gives {tuple(expected[key].shape)}"
            )
    data, training = manifest.data, manifest.training
    return {
        "config": config,
        "model": found,
        "epoch": training.get("epochs"),
        "training": dict(training),
        "data": data,
        "train": {
            "data": data.get("source"),
            "classes": data.get("classes"),
            "binarize": data.get("binarize", "none"),
            "val_size": data.get("val_images"),
            "seed": training.get("seed", 0),
            "objective": training.get("objective"),
        },
    }


@torch.no_grad()
def check_onnx(model: VAE, directory: Path, batch: int = 7, seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch on random inputs; raises above 1e-4."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.rand((batch, *cfg.image_shape), generator=g)
    z = torch.randn((batch, cfg.latent_dim), generator=g)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc = ort.InferenceSession(str(directory / "encoder.onnx"), opts, ["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(directory / "decoder.onnx"), opts, ["CPUExecutionProvider"])
    mu, logvar = enc.run(["mu", "logvar"], {"x": x.numpy()})
    (out,) = dec.run(None, {"z": z.numpy()})
    t_mu, t_logvar = model.encode(x)
    t_out = model.decode(z)
    err = max(
        float(np.abs(mu - t_mu.numpy()).max()),
        float(np.abs(logvar - t_logvar.numpy()).max()),
        float(np.abs(out - t_out.numpy()).max()),
    )
    if err > MAX_ABS_ERROR:
        raise RuntimeError(f"ONNX export differs from PyTorch by {err:.2e} > {MAX_ABS_ERROR}")
    return err


def _replaceable(out: Path) -> bool:
    """Whether --overwrite may replace `out`: an empty directory, or a bundle and nothing else
    (never a directory of the user's own files, which it would delete)."""
    if not out.is_dir() or out.is_symlink():
        return False
    names = {p.name for p in out.iterdir()}
    return not names or ("manifest.json" in names and names <= BUNDLE_FILES)


def export_bundle(
    model: VAE,
    out: Path,
    calibration_images: torch.Tensor,
    *,
    name: str = "vae",
    version: str | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    calibration_description: str = "held-out validation images, raw intensities",
    calibration_k: int = 64,
    default_score: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the bundle into a temporary sibling of `out` and rename it into place.

    The calibration (model/calibrate.py) runs on the written ONNX files, as the server will, and
    chooses the default score unless `default_score` names one.
    """
    model = model.cpu().eval()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not _replaceable(out):
        raise FileExistsError(
            f"{out} is not a bundle, and --overwrite replaces only a bundle (a directory holding "
            f"no more than {', '.join(sorted(BUNDLE_FILES))}): choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a bundle is read by the server's own user
    try:
        cfg = model.cfg
        _export_onnx(
            _EncoderOnly(model),
            torch.rand(2, *cfg.image_shape),
            tmp / "encoder.onnx",
            "x",
            ["mu", "logvar"],
        )
        output = "logits" if cfg.likelihood == "bernoulli" else "mean"
        _export_onnx(
            _DecoderOnly(model), torch.randn(2, cfg.latent_dim), tmp / "decoder.onnx", "z", [output]
        )
        err = check_onnx(model, tmp)
        files = [ENCODER_FILE, DECODER_FILE]
        prior_spec = None
        if model.prior is not None:
            # the mixture's arrays; schema 2 (docs/BUNDLE.md). N(0, I) bundles stay schema 1.
            arrays = {k: v.detach().numpy() for k, v in model.prior._asdict().items()}
            np.savez(tmp / PRIOR_FILE, **arrays)
            files.append(PRIOR_FILE)
            prior_spec = {"kind": "mixture", "components": cfg.prior_components, "file": PRIOR_FILE}
        now = dt.datetime.now(dt.UTC)
        manifest = {
            "schema_version": 2 if prior_spec else 1,
            "name": name,
            "version": version or now.strftime("%Y.%m.%d-%H%M%S"),
            "created": now.isoformat(timespec="seconds"),
            "image": {"channels": cfg.channels, "height": cfg.height, "width": cfg.width},
            "latent_dim": cfg.latent_dim,
            "likelihood": cfg.likelihood,
            "sigma": model.sigma if cfg.likelihood == "gaussian" else None,
            "decoder_output": output,
            "architecture": cfg.architecture,
            "config": cfg.to_dict(),
            "data": data or {},
            "training": training or {},
            "metrics": {**(metrics or {}), "onnx_max_abs_error": err},
            "files": {
                f: {"sha256": sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files
            },
            **({"prior": prior_spec} if prior_spec else {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        manifest["calibration"] = calibrate(
            tmp,
            calibration_images.numpy(),
            calibration_description,
            k=calibration_k,
            default_score=default_score,
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote bundle %s (ONNX max abs error %.1e)", out, err)
    return out
