"""Test-set ELBO and IWAE log-likelihood in nats, comparable with the literature's MNIST figures."""

from __future__ import annotations

import logging
import math

import torch
from tqdm import tqdm

from model import data as data_mod
from model.networks import VAE
from model.objective import elbo, iwae

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: VAE,
    x: torch.Tensor,
    k: int = 1000,
    seed: int = 0,
    binarize: bool = True,
    batch_size: int = 100,
    chunk: int = 100,
    progress: bool = True,
) -> dict[str, float]:
    """Mean test ELBO (1 sample) and IWAE-k bound over x, and NLL = -IWAE, in nats per image.

    With binarize, each test image is binarised once with a fixed seed (dynamic binarisation of
    the test set, as Burda et al. 2015 evaluate).
    """
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    cfg, sigma = model.cfg, model.log_sigma.exp()
    sums = {"elbo": 0.0, "reconstruction": 0.0, "kl": 0.0, "iwae": 0.0}
    for i in tqdm(
        range(0, len(x), batch_size), desc=f"IWAE k={k}", disable=not progress, mininterval=2.0
    ):
        xb = x[i : i + batch_size]
        if binarize:
            xb = data_mod.binarize(xb, g)
        xb = xb.to(device)
        mu, logvar = model.encode(xb)
        eps = torch.randn((1, *mu.shape), generator=g).to(device)
        t = elbo(model.decode, xb, mu, logvar, eps, cfg.likelihood, sigma)
        eps = torch.randn((k, *mu.shape), generator=g).to(device)
        bound = iwae(model.decode, xb, mu, logvar, eps, cfg.likelihood, sigma, chunk=chunk)
        sums["elbo"] += float(t.elbo.sum())
        sums["reconstruction"] += float(t.reconstruction.sum())
        sums["kl"] += float(t.kl.sum())
        sums["iwae"] += float(bound.sum())
    n = len(x)
    res = {f"test_{key}": v / n for key, v in sums.items()}
    res["test_nll_iwae"] = -res["test_iwae"]
    res["iwae_k"] = k
    res["test_images"] = n
    assert all(math.isfinite(v) for v in res.values())
    return res
