"""Encoder Q(z|X), decoder f(z) and the VAE that ties them (Doersch 2016, section 2)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from model.config import VAEConfig
from model.objective import Mixture


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims):
        layers += [nn.Linear(d_in, d_out), nn.ELU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (B, C, H, W) in [0, 1] -> mu, logvar (B, latent_dim) of Q(z|X)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        C, H, W = cfg.image_shape
        if cfg.architecture == "conv":
            convs: list[nn.Module] = []
            c_in = C
            for c_out in cfg.conv_channels:
                convs += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ELU()]
                c_in = c_out
            s = 2 ** len(cfg.conv_channels)
            self.features: nn.Module = nn.Sequential(*convs, nn.Flatten())
            flat = c_in * (H // s) * (W // s)
        else:
            self.features = nn.Flatten()
            flat = C * H * W
        self.body = _mlp([flat, *cfg.hidden_dims])
        last = cfg.hidden_dims[-1] if cfg.hidden_dims else flat
        self.head = nn.Linear(last, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.features(x))
        mu, logvar = self.head(h).chunk(2, dim=-1)  # (B, D) each
        return mu, logvar


class Decoder(nn.Module):
    """z (B, latent_dim) -> Bernoulli logits or Gaussian mean (B, C, H, W)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        C, H, W = cfg.image_shape
        self.likelihood = cfg.likelihood
        self.body = _mlp([cfg.latent_dim, *reversed(cfg.hidden_dims)])
        last = cfg.hidden_dims[0] if cfg.hidden_dims else cfg.latent_dim
        if cfg.architecture == "conv":
            s = 2 ** len(cfg.conv_channels)
            chans = list(reversed(cfg.conv_channels))
            self.seed_shape = (chans[0], H // s, W // s)
            self.fc = nn.Sequential(nn.Linear(last, math.prod(self.seed_shape)), nn.ELU())
            deconvs: list[nn.Module] = []
            for c_in, c_out in zip(chans, [*chans[1:], C], strict=True):
                deconvs += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ELU()]
            self.up: nn.Module = nn.Sequential(*deconvs[:-1])  # no activation on the output
        else:
            self.seed_shape = (C, H, W)
            self.fc = nn.Sequential(nn.Linear(last, C * H * W))
            self.up = nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.body(z)).view(z.shape[0], *self.seed_shape)
        out: torch.Tensor = self.up(h)  # (B, C, H, W)
        if self.likelihood == "gaussian":
            out = torch.sigmoid(out)  # the mean lives in [0, 1] like the pixels
        return out


class VAE(nn.Module):
    """Q(z|X) and P(X|z) with a fixed or learned scalar sigma for the Gaussian likelihood, and
    P(z): N(0, I), or a learned mixture when cfg.prior_components > 0."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        log_sigma = torch.tensor(math.log(cfg.sigma))
        if cfg.learn_sigma:
            self.log_sigma: torch.Tensor = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        k, d = cfg.prior_components, cfg.latent_dim
        if k:  # a start for training from scratch; model/prior.py fits one to a trained model
            self.prior_logits = nn.Parameter(torch.zeros(k))
            self.prior_means = nn.Parameter(torch.randn(k, d))
            self.prior_logvars = nn.Parameter(torch.zeros(k, d))

    @property
    def prior(self) -> Mixture | None:
        """P(z) for the objective: None for N(0, I)."""
        if not self.cfg.prior_components:
            return None
        return Mixture(self.prior_logits, self.prior_means, self.prior_logvars)

    @property
    def sigma(self) -> float:
        return float(self.log_sigma.detach().exp())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)  # type: ignore[no-any-return]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # type: ignore[no-any-return]
