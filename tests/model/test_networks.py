"""Config validation and network shapes for both architectures and channel counts."""

from __future__ import annotations

import pytest
import torch

from model.config import VAEConfig
from model.networks import VAE


@pytest.mark.parametrize(
    "cfg",
    [
        VAEConfig(),
        VAEConfig(channels=3, height=32, width=16, latent_dim=5, conv_channels=(8, 8, 8)),
        VAEConfig(architecture="mlp", hidden_dims=(64, 32)),
        VAEConfig(likelihood="gaussian", learn_sigma=True, sigma=0.5),
    ],
)
@torch.no_grad()
def test_shapes(cfg: VAEConfig) -> None:
    model = VAE(cfg)
    x = torch.rand(3, *cfg.image_shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, cfg.latent_dim)
    out = model.decode(mu)
    assert out.shape == (3, *cfg.image_shape)
    if cfg.likelihood == "gaussian":
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert abs(model.sigma - cfg.sigma) < 1e-6
        assert any(p is model.log_sigma for p in model.parameters()) == cfg.learn_sigma


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"latent_dim": 0}, "latent_dim must be positive, got 0"),
        ({"channels": 2}, "channels must be 1 or 3, got 2"),
        ({"height": 30}, "image size 30x28 is not divisible by 4"),
        ({"architecture": "rnn"}, "architecture must be 'conv' or 'mlp'"),
        ({"likelihood": "poisson"}, "likelihood must be 'bernoulli' or 'gaussian'"),
        ({"sigma": 0.0}, "sigma must be positive"),
        ({"hidden_dims": (0,)}, "must be positive"),
    ],
)
def test_bad_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**kwargs)  # type: ignore[arg-type]


def test_mlp_needs_no_divisible_size() -> None:
    assert VAEConfig(architecture="mlp", height=30, width=7).image_shape == (1, 30, 7)


def test_config_round_trip() -> None:
    cfg = VAEConfig(channels=3, height=32, width=32, conv_channels=(8, 16, 32), hidden_dims=(64,))
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown VAEConfig keys: \\['depth'\\]"):
        VAEConfig.from_dict({**cfg.to_dict(), "depth": 3})
