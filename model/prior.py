"""Fit a mixture-of-Gaussians prior P(z) to a trained VAE, its encoder and decoder held fixed.

For a fixed encoder, the prior that maximises the average ELBO over the training images is their
aggregate posterior, q(z) = mean_n Q(z|x_n) (Hoffman and Johnson, "ELBO surgery", 2016; Tomczak
and Welling, "VAE with a VampPrior", arXiv 1705.07120): the ELBO's KL term to N(0, I) pays for
every place q(z) and N(0, I) differ. `fit_prior` fits a mixture of K diagonal Gaussians to it by
maximum likelihood on draws z ~ Q(z|x) of the training images, which maximises the ELBO's and the
IWAE bound's prior term on those images. The components start at K training images' posteriors,
as the VampPrior's pseudo-inputs do. Held-out images judge it (`vae fit-prior` logs their IWAE
bound with each prior); BENCHMARKS.md section 1 has the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from model import data as data_mod
from model.config import VAEConfig
from model.networks import VAE
from model.objective import Mixture, log_prior, reparameterize


@dataclass(frozen=True)
class PriorFit:
    """How the mixture was fitted, recorded in the checkpoint and the bundle's manifest."""

    components: int = 500
    steps: int = 5000
    lr: float = 1e-2
    batch_size: int = 256
    draws: int = 2  # z ~ Q(z|x) per image and step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.components < 1 or self.steps < 1:
            raise ValueError(
                f"--components and --steps must be positive, got {self.components}, {self.steps}"
            )
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


@torch.no_grad()
def posteriors(
    model: VAE, images: torch.Tensor, binarize: bool, seed: int, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, logvar of Q(z|x) for every image (binarised once from `seed` when asked)."""
    g = torch.Generator().manual_seed(seed)
    mus, logvars = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        mu, logvar = model.encode(data_mod.binarize(x, g) if binarize else x)
        mus.append(mu)
        logvars.append(logvar)
    return torch.cat(mus), torch.cat(logvars)


def fit_prior(
    model: VAE, images: torch.Tensor, fit: PriorFit, binarize: bool, progress: bool = True
) -> VAE:
    """A copy of `model` whose P(z) is a mixture of `fit.components` Gaussians fitted to the
    aggregate posterior of `images` (the training split); the networks are unchanged."""
    n = len(images)
    if fit.components > n:  # checked before encoding them all
        raise ValueError(
            f"--components {fit.components} is more than the {n} training images it starts from"
        )
    model = model.cpu().eval()
    mu, logvar = posteriors(model, images, binarize, fit.seed)
    g = torch.Generator().manual_seed(fit.seed + 1)
    start = torch.randperm(n, generator=g)[: fit.components]
    logits = torch.zeros(fit.components, requires_grad=True)
    means = mu[start].clone().requires_grad_(True)
    logvars = logvar[start].clone().requires_grad_(True)
    opt = torch.optim.Adam([logits, means, logvars], lr=fit.lr)
    # cosine decay to 1 % of lr: the mixture settles at the end instead of moving with the noise
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, fit.steps, eta_min=fit.lr / 100)
    bar = tqdm(range(fit.steps), desc="fitting the prior", disable=not progress, mininterval=2.0)
    for step in bar:
        rows = torch.randint(0, n, (fit.batch_size,), generator=g)
        eps = torch.randn((fit.draws, fit.batch_size, mu.shape[1]), generator=g)
        z = reparameterize(mu[rows], logvar[rows], eps)
        loss = -log_prior(z, Mixture(logits, means, logvars)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        schedule.step()
        if step % 100 == 0:
            bar.set_postfix(cross_entropy=f"{float(loss.detach()):.2f}")
    cfg = VAEConfig.from_dict({**model.cfg.to_dict(), "prior_components": fit.components})
    fitted = VAE(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("prior_")}
    state.update(
        prior_logits=logits.detach(), prior_means=means.detach(), prior_logvars=logvars.detach()
    )
    fitted.load_state_dict(state)
    return fitted.eval()
