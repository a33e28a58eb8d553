"""The one config object that builds the networks; saved in every checkpoint and bundle manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Architecture = Literal["conv", "mlp"]
Likelihood = Literal["bernoulli", "gaussian"]


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the data and of the encoder/decoder networks."""

    channels: int = 1
    height: int = 28
    width: int = 28
    latent_dim: int = 32
    architecture: Architecture = "conv"
    conv_channels: tuple[int, ...] = (32, 64)  # one stride-2 conv per entry
    hidden_dims: tuple[int, ...] = (512,)  # fully connected layers (after the convs for "conv")
    likelihood: Likelihood = "bernoulli"
    sigma: float = 0.1  # Gaussian P(X|z) = N(f(z), sigma^2 I); the initial value when learned
    learn_sigma: bool = False
    # P(z): 0 is the tutorial's N(0, I); K > 0 a learned mixture of K diagonal Gaussians
    # (model/prior.py fits one to a trained model; docs/BUNDLE.md, schema 2)
    prior_components: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.latent_dim <= 0:
            raise ValueError(f"latent_dim must be positive, got {self.latent_dim}")
        if self.architecture not in ("conv", "mlp"):
            raise ValueError(f"architecture must be 'conv' or 'mlp', got {self.architecture!r}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(
                f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}"
            )
        if self.sigma <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if self.prior_components < 0:
            raise ValueError(f"prior_components must be 0 or more, got {self.prior_components}")
        if any(d <= 0 for d in (*self.conv_channels, *self.hidden_dims)):
            raise ValueError("conv_channels and hidden_dims must be positive")
        if self.architecture == "conv":
            if not self.conv_channels:
                raise ValueError("a conv architecture needs at least one entry in conv_channels")
            stride = 2 ** len(self.conv_channels)
            if self.height % stride or self.width % stride:
                raise ValueError(
                    f"image size {self.height}x{self.width} is not divisible by {stride}, the "
                    f"total stride of {len(self.conv_channels)} conv layers: pass --image-size "
                    f"with sides that are multiples of {stride}, fewer --conv-channels, or "
                    "--architecture mlp"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_channels"] = list(self.conv_channels)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VAEConfig keys: {sorted(unknown)}")
        kw = dict(d)
        for key in ("conv_channels", "hidden_dims"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)
