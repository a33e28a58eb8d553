"""Bench-only variants of the server app, started by bench/serving.py with `uvicorn --factory`.

- `noop_app`: the real app (`service.main.create_app()`, same settings) plus `GET /noop`, which
  does nothing: the floor of the HTTP stack (uvicorn, FastAPI, the middlewares).
- `torch_app`: the same app, but the bundle's networks run in PyTorch eager. The shipped bundle
  has no checkpoint, so the networks are rebuilt from `model/` with the manifest's `config` and
  their weights are copied from the ONNX initializers (the exporter names them by their
  state_dict keys); `check_torch_matches_onnx` holds the two to the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI

import service.reload
from service.bundle import DECODER_FILE, ENCODER_FILE, Manifest, load_bundle, read_manifest
from service.main import create_app
from service.settings import Device, get_settings


def noop_app() -> FastAPI:
    """The server app plus `GET /noop`."""
    app = create_app()

    @app.get("/noop", include_in_schema=False)
    async def noop() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _onnx_weights(path: Path) -> dict[str, Any]:
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}


@dataclass(frozen=True)
class TorchBundle:
    """Duck-types service.bundle.Bundle with the model/ networks in torch eager."""

    path: Path
    manifest: Manifest
    vae: Any

    @property
    def providers(self) -> list[str]:
        return ["torch-eager-cpu"]

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            mu, logvar = self.vae.encode(torch.from_numpy(x))
        return mu.numpy(), logvar.numpy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out: np.ndarray = self.vae.decode(torch.from_numpy(z)).numpy()
        return out

    def warm_up(self) -> None:
        c, h, w = self.manifest.input_shape
        mu, _ = self.encode(np.zeros((2, c, h, w), dtype=np.float32))
        self.decode(mu)


def load_torch_bundle(path: Path, *, device: Device = "cpu", threads: int = 1) -> TorchBundle:
    """The bundle at `path` as torch modules, weights from its ONNX files."""
    import torch

    from model.config import VAEConfig
    from model.networks import VAE

    torch.set_num_threads(max(1, threads))
    manifest = read_manifest(path)
    vae = VAE(VAEConfig.from_dict(manifest.config)).eval()
    weights = {**_onnx_weights(path / ENCODER_FILE), **_onnx_weights(path / DECODER_FILE)}
    wanted = {k for k in vae.state_dict() if k != "log_sigma"}
    missing = wanted - set(weights)
    if missing:
        raise RuntimeError(f"{path}: the ONNX initializers lack {sorted(missing)}")
    vae.load_state_dict({k: weights[k] for k in wanted}, strict=False)
    return TorchBundle(path=path, manifest=manifest, vae=vae)


def check_torch_matches_onnx(path: Path) -> float:
    """Largest absolute difference of torch and onnxruntime outputs on random inputs."""
    onnx_bundle, torch_bundle = load_bundle(path, device="cpu"), load_torch_bundle(path)
    rng = np.random.default_rng(0)
    x = rng.random((8, *onnx_bundle.manifest.input_shape), dtype=np.float32)
    z = rng.standard_normal((8, onnx_bundle.manifest.latent_dim), dtype=np.float32)
    diffs = [
        np.abs(a - b).max()
        for a, b in zip(
            (*onnx_bundle.encode(x), onnx_bundle.decode(z)),
            (*torch_bundle.encode(x), torch_bundle.decode(z)),
            strict=True,
        )
    ]
    return float(max(diffs))


def torch_app() -> FastAPI:
    """The server app (with `GET /noop`) serving the bundle through torch eager."""
    service.reload.load_bundle = load_torch_bundle  # type: ignore[assignment]
    get_settings()  # fail on bad settings before torch is imported
    return noop_app()
