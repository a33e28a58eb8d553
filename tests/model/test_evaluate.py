"""Evaluation: the bounds are ordered as theory says and reproducible with a seed."""

from __future__ import annotations

import torch

from model.config import VAEConfig
from model.evaluate import evaluate
from model.networks import VAE


def test_bounds_are_ordered_and_seeded() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, conv_channels=(4, 8), hidden_dims=(16,))).eval()
    x = torch.rand(30, 1, 28, 28)
    r1 = evaluate(model, x, k=1, seed=1, progress=False)
    r50 = evaluate(model, x, k=50, seed=1, progress=False, chunk=7)
    assert r50 == evaluate(model, x, k=50, seed=1, progress=False, chunk=50)
    # k=1 IWAE is a sampled-KL ELBO: near the analytic-KL one
    assert abs(r1["test_iwae"] - r1["test_elbo"]) < 0.05 * abs(r1["test_elbo"])
    assert r50["test_iwae"] > r1["test_iwae"]
    assert r50["test_nll_iwae"] == -r50["test_iwae"]
    assert r50["test_images"] == 30 and r50["iwae_k"] == 50


def test_images_and_elbo_do_not_depend_on_k() -> None:
    """Bounds with different k are measured on the same binarised images: the single-draw ELBO
    (its own eps) is identical, and the IWAE bound of one model grows with k."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(architecture="mlp", latent_dim=4, hidden_dims=(16,))).eval()
    x = torch.rand(300, 1, 28, 28)
    runs = [evaluate(model, x, k=k, seed=3, progress=False, batch_size=100) for k in (1, 5, 200)]
    assert runs[0]["test_elbo"] == runs[1]["test_elbo"] == runs[2]["test_elbo"]
    assert runs[1]["test_iwae"] < runs[2]["test_iwae"]
