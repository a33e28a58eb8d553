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
def bounds(
    model: VAE,
    x: torch.Tensor,
    k: int = 0,
    seed: int = 0,
    binarize: bool = True,
    batch_size: int = 100,
    chunk: int = 100,
    progress: bool = False,
) -> dict[str, float]:
    """Mean single-sample ELBO terms over x, and the IWAE-k bound when k > 0, in nats per image.

    With binarize, each image is binarised once from the seeded generator. The ELBO's eps and
    the IWAE's eps come from generators of their own, so the binarised images and the ELBO do not
    depend on k, and bounds with different k are measured on the very same images.
    """
    g = torch.Generator().manual_seed(seed)  # binarisation
    g_elbo = torch.Generator().manual_seed(seed + 1)
    g_iwae = torch.Generator().manual_seed(seed + 2)
    device = next(model.parameters()).device
    cfg, sigma = model.cfg, model.log_sigma.exp()
    sums = {"elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
    if k:
        sums["iwae"] = 0.0
    for i in tqdm(
        range(0, len(x), batch_size), desc=f"IWAE k={k}", disable=not progress, mininterval=2.0
    ):
        xb = x[i : i + batch_size]
        if binarize:
            xb = data_mod.binarize(xb, g)
        xb = xb.to(device)
        mu, logvar = model.encode(xb)
        eps = torch.randn((1, *mu.shape), generator=g_elbo).to(device)
        t = elbo(model.decode, xb, mu, logvar, eps, cfg.likelihood, sigma, model.prior)
        sums["elbo"] += float(t.elbo.sum())
        sums["reconstruction"] += float(t.reconstruction.sum())
        sums["kl"] += float(t.kl.sum())
        if k:
            eps = torch.randn((k, *mu.shape), generator=g_iwae).to(device)
            bound = iwae(
                model.decode, xb, mu, logvar, eps, cfg.likelihood, sigma, model.prior, chunk
            )
            sums["iwae"] += float(bound.sum())
    return {key: v / len(x) for key, v in sums.items()}


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
    means = bounds(model, x, k, seed, binarize, batch_size, chunk, progress)
    res = {f"test_{key}": v for key, v in means.items()}
    res["test_nll_iwae"] = -res["test_iwae"]
    res["iwae_k"] = k
    res["test_images"] = len(x)
    assert all(math.isfinite(v) for v in res.values())
    return res
