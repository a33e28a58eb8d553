"""The ELBO and the importance-weighted bound as small pure functions, in nats per image.

Doersch, "Tutorial on Variational Autoencoders" (arXiv 1606.05908), eq. 5 and 7; Burda, Grosse and
Salakhutdinov, "Importance Weighted Autoencoders" (arXiv 1509.00519), eq. 8. The numpy twin in
service/objective.py mirrors every function here; tests/test_objective_parity.py holds them equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
ENERGY_FLOOR = 0.1  # blur_recon_energy's floor (service/objective.py says why)

Decode = Callable[[torch.Tensor], torch.Tensor]


class ElboTerms(NamedTuple):
    reconstruction: torch.Tensor  # (B,) E_q[log P(X|z)], estimated with S samples
    kl: torch.Tensor  # (B,) KL(Q(z|X) || P(z)): closed form for N(0, I), else S samples
    elbo: torch.Tensor  # (B,) reconstruction - kl


class Mixture(NamedTuple):
    """A mixture-of-Gaussians prior P(z) = sum_k softmax(logits)_k N(z; means_k, exp(logvars_k)).

    None in its place is the tutorial's N(0, I). Tomczak and Welling, "VAE with a VampPrior"
    (arXiv 1705.07120), section 2: the prior that maximises the ELBO is the aggregate posterior,
    and a mixture fitted to it closes part of the gap that N(0, I) leaves.
    """

    logits: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    logvars: torch.Tensor  # (K, D)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row; tutorial eq. 7."""
    # 1/2 (tr(Sigma) + mu^T mu - k - log det Sigma)
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(dim=-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + Sigma^(1/2) * eps; eps (S, B, D) broadcasts over mu, logvar (B, D)."""
    return mu + (0.5 * logvar).exp() * eps


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z | mu, diag exp(logvar)) summed over the last axis."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * (-logvar).exp()).sum(dim=-1)


def log_prior(z: torch.Tensor, prior: Mixture | None) -> torch.Tensor:
    """log P(z) summed over the last axis: N(0, I) when `prior` is None, else the mixture's
    logsumexp over components; `z (..., D)` -> `(...)`."""
    if prior is None:
        zeros = z.new_zeros(z.shape[-1])
        return log_normal(z, zeros, zeros)
    # sum_d (z - m)^2 / v expanded into matrix products: no (..., K, D) intermediate
    precision = (-prior.logvars).exp()  # (K, D)
    quad = (
        z.pow(2) @ precision.T
        - 2.0 * z @ (prior.means * precision).T
        + (prior.means.pow(2) * precision).sum(dim=-1)
    )  # (..., K)
    log_norm = -0.5 * (z.shape[-1] * LOG_2PI + prior.logvars.sum(dim=-1))  # (K,)
    log_weights = torch.log_softmax(prior.logits, dim=0)
    return torch.logsumexp(log_weights + log_norm - 0.5 * quad, dim=-1)


def log_likelihood(
    x: torch.Tensor, out: torch.Tensor, likelihood: str, sigma: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """log P(X|z) per image: x (..., C, H, W), out = decoder logits or mean of the same shape."""
    if likelihood == "bernoulli":
        # x in [0, 1] is the probability; x*logits - softplus(logits) = x log p + (1-x) log(1-p)
        ll = x * out - F.softplus(out)
    elif likelihood == "gaussian":
        sigma_t = torch.as_tensor(sigma, dtype=out.dtype, device=out.device)
        ll = -0.5 * ((x - out) / sigma_t).pow(2) - sigma_t.log() - 0.5 * LOG_2PI
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return ll.flatten(start_dim=-3).sum(dim=-1)


def _decode_samples(
    decode: Decode, x: torch.Tensor, z: torch.Tensor, likelihood: str, sigma: float | torch.Tensor
) -> torch.Tensor:
    S, B, D = z.shape
    out = decode(z.reshape(S * B, D)).view(S, B, *x.shape[1:])  # (S, B, C, H, W)
    return log_likelihood(x.unsqueeze(0), out, likelihood, sigma)  # (S, B)


def _log_weights(
    decode: Decode,
    x: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    sigma: float | torch.Tensor,
    prior: Mixture | None,
) -> torch.Tensor:
    """log P(x|z) + log P(z) - log Q(z|x), Q = N(mu, diag exp(logvar)), for z (k, B, D): (k, B)."""
    log_pz = log_prior(z, prior)
    return _decode_samples(decode, x, z, likelihood, sigma) + log_pz - log_normal(z, mu, logvar)


def elbo(
    decode: Decode,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    likelihood: str,
    sigma: float | torch.Tensor = 1.0,
    prior: Mixture | None = None,
) -> ElboTerms:
    """ELBO = E_q[log P(X|z)] - KL(Q(z|X) || P(z)) with S = eps.shape[0] samples; tutorial eq. 5.

    The KL is the closed form (eq. 7) for P(z) = N(0, I); a mixture prior has none, so it is
    estimated from the same S samples as the reconstruction: mean_s log Q(z_s|X) - log P(z_s).
    """
    z = reparameterize(mu, logvar, eps)  # (S, B, D)
    reconstruction = _decode_samples(decode, x, z, likelihood, sigma).mean(dim=0)
    if prior is None:
        kl = kl_divergence(mu, logvar)
    else:
        kl = (log_normal(z, mu, logvar) - log_prior(z, prior)).mean(dim=0)
    return ElboTerms(reconstruction, kl, reconstruction - kl)


def iwae(
    decode: Decode,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    likelihood: str,
    sigma: float | torch.Tensor = 1.0,
    prior: Mixture | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """log p(x) >= log mean_k P(x|z_k) P(z_k) / Q(z_k|x), k = eps.shape[0]; Burda et al. eq. 8.

    chunk > 0 decodes that many samples at a time, to bound memory for k in the thousands.
    """
    K = eps.shape[0]
    step = chunk if chunk > 0 else K
    log_w = []
    for i in range(0, K, step):
        z = reparameterize(mu, logvar, eps[i : i + step])  # (k, B, D)
        log_w.append(_log_weights(decode, x, z, mu, logvar, likelihood, sigma, prior))
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(K)  # (B,)


def iwae_dreg(
    decode: Decode,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    likelihood: str,
    sigma: float | torch.Tensor = 1.0,
    prior: Mixture | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A surrogate whose gradient is the doubly reparameterised IWAE gradient, and the bound.

    Tucker, Lawson, Gu and Maddison, "Doubly Reparameterized Gradient Estimators for Monte Carlo
    Objectives" (arXiv 1810.04152), eq. 5. With normalised weights w_i = softmax(log w)_i held
    constant, the decoder gets the IWAE gradient sum_i w_i d log w_i, and the encoder
    sum_i w_i^2 (d log w_i / d z_i)(d z_i / d phi), with log q's own parameters held constant:
    the score-function part of the IWAE's encoder gradient, whose signal-to-noise ratio falls as
    k grows (Rainforth et al. 2018), is replaced by its reparameterised equal in expectation.
    Both come from one backward pass: the surrogate is sum_i w_i log w_i, and a hook on z scales
    the gradient reaching the encoder by w_i once more. Returns `(surrogate, bound)`, each
    `(B,)`; the bound is the IWAE bound's value, as `iwae` gives it for the same eps.
    """
    z = reparameterize(mu, logvar, eps)  # (k, B, D)
    log_w = _log_weights(decode, x, z, mu.detach(), logvar.detach(), likelihood, sigma, prior)
    w = torch.softmax(log_w.detach(), dim=0)  # (k, B)
    if z.requires_grad:
        z.register_hook(lambda grad: grad * w.unsqueeze(-1))  # type: ignore[no-untyped-call]
    bound = torch.logsumexp(log_w.detach(), dim=0) - math.log(eps.shape[0])
    return (w * log_w).sum(dim=0), bound


def squared_error(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`sum((x - mean)^2)` per image, `x, mean (B, C, H, W)` -> `(B,)`; the score recon_error."""
    return (x - mean).pow(2).flatten(1).sum(1)


def blur(a: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` filtered per channel by the 5x5 binomial kernel, zero padding 2, same size;
    a 2D convolution here and a separable filter in service/objective.py."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=a.dtype, device=a.device) / 16.0
    channels = a.shape[1]
    kernel = torch.outer(taps, taps).expand(channels, 1, 5, 5)
    return F.conv2d(a, kernel, padding=2, groups=channels)


def blurred_error(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`sum_c blur(x - mean)^2` per pixel, `(B, C, H, W)` -> `(B, H, W)`: the blur_recon scores'
    numerator."""
    return blur(x - mean).pow(2).sum(1)


def blur_recon_rel(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`sum(blur(x - mean)^2) / (sum(x) + 1)` per image: the score blur_recon_rel (bundles of
    2.0 and before chose it by name; it assumes bright strokes on a dark background)."""
    return blurred_error(x, mean).flatten(1).sum(1) / (x.flatten(1).sum(1) + 1.0)


def background(x: torch.Tensor) -> torch.Tensor:
    """Each channel's median over the image (numpy's: the two middle values' mean),
    `(B, C, H, W)` -> `(B, C, 1, 1)`."""
    return torch.quantile(x.flatten(2), 0.5, dim=-1)[..., None, None]


def contrast(x: torch.Tensor) -> torch.Tensor:
    """`sum |x - background(x)|` per image, `(B, C, H, W)` -> `(B,)`."""
    return (x - background(x)).abs().flatten(1).sum(1)


def contrast_energy(x: torch.Tensor) -> torch.Tensor:
    """`sum (x - background(x))^2` per image, `(B, C, H, W)` -> `(B,)`: scales with the colour
    contrast squared, as the reconstruction error does."""
    return (x - background(x)).pow(2).flatten(1).sum(1)


def blur_recon_contrast(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`sum(blur(x - mean)^2) / (contrast(x) + 1)` per image: the default of bundles calibrated
    by 2.1."""
    return blurred_error(x, mean).flatten(1).sum(1) / (contrast(x) + 1.0)


def anomaly_map(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-pixel terms of blur_recon_energy, `(B, C, H, W)` -> `(B, H, W)`."""
    return blurred_error(x, mean) / (contrast_energy(x) + ENERGY_FLOOR)[:, None, None]


def blur_recon_energy(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`sum(blur(x - mean)^2) / (contrast_energy(x) + ENERGY_FLOOR)` per image: the blurred error
    over the image's squared contrast (service/objective.py says why); the sum of anomaly_map."""
    return anomaly_map(x, mean).flatten(1).sum(1)
