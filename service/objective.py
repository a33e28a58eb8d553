"""The VAE objective in numpy: the twin of model/objective.py, same math as docs/BUNDLE.md.

Doersch, "Tutorial on Variational Autoencoders" (arXiv 1606.05908) for the ELBO and the closed-form
KL; Burda et al., "Importance Weighted Autoencoders" (arXiv 1509.00519) for the IWAE bound. Every
value is in nats, summed over pixels and latent dimensions, one number per image. The functions
shared with model/objective.py have its names and argument order (`decode` is the decoder as a
function of `z (N, D)`, `eps` the random draws), so each side reads like the other and
tests/service/test_objective.py holds every pair to the same numbers.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

Likelihood = Literal["bernoulli", "gaussian"]
F32 = np.ndarray[Any, np.dtype[np.float32]]
F64 = np.ndarray[Any, np.dtype[np.float64]]
Decode = Callable[[F32], F32]

LOG_2PI = math.log(2.0 * math.pi)
IMAGE_AXES = (-3, -2, -1)  # (C, H, W)
# 1D binomial filter; its outer product with itself is the 5x5 blur of blur_recon_rel
BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / np.float32(16.0)
# blur_recon_energy's denominator is contrast_energy(x) + ENERGY_FLOOR: the floor keeps a blank
# image's score finite; at 1 (one full-contrast pixel) a colour model that reconstructs a blank
# image closely scored it like a normal one (BENCHMARKS.md section 2)
ENERGY_FLOOR = 0.1


class ElboTerms(NamedTuple):
    """Per-image ELBO and its two terms, each `(B,)`."""

    reconstruction: F64  # E_q[log p(x|z)], estimated with S samples
    kl: F64  # KL(q(z|x) || p(z)): closed form for N(0, I), else estimated with the S samples
    elbo: F64  # reconstruction - kl


@dataclass(frozen=True, eq=False)
class Mixture:
    """A mixture-of-Gaussians prior `p(z) = sum_k softmax(logits)_k N(z; means_k, exp(logvars_k))`
    (a bundle's prior.npz, docs/BUNDLE.md); None in its place is the tutorial's N(0, I)."""

    logits: F32  # (K,)
    means: F32  # (K, D)
    logvars: F32  # (K, D)

    @functools.cached_property
    def expanded(self) -> tuple[F64, F64, F64]:
        """What log_prior needs of the mixture, computed once per loaded bundle (per call it cost
        /elbo a third of its throughput at K = 2,000): `precision.T (D, K)`, `(means *
        precision).T (D, K)` and each component's `log weight + log normaliser - 0.5 * sum(means^2
        * precision)` `(K,)`, in float64."""
        means = self.means.astype(np.float64)
        logvars = self.logvars.astype(np.float64)
        precision = np.exp(-logvars)  # (K, D)
        logits = self.logits.astype(np.float64)
        log_weights = logits - np.max(logits)
        log_weights -= np.log(np.sum(np.exp(log_weights)))
        log_norm = -0.5 * (means.shape[-1] * LOG_2PI + np.sum(logvars, axis=-1))
        constant = log_weights + log_norm - 0.5 * np.sum(np.square(means) * precision, axis=-1)
        return (
            np.ascontiguousarray(precision.T),
            np.ascontiguousarray((means * precision).T),
            constant,
        )


def reparameterize(mu: F32, logvar: F32, eps: F32) -> F32:
    """`z = mu + sigma * eps`; `mu, logvar (B, D)`, `eps (S, B, D)` -> `z (S, B, D)`."""
    z: F32 = (mu + np.exp(0.5 * logvar) * eps).astype(np.float32, copy=False)
    return z


def kl_divergence(mu: F32, logvar: F32) -> F64:
    """KL(q(z|x) || N(0, I)) in closed form (tutorial eq. 7): `(B, D)` -> `(B,)`."""
    terms = np.exp(logvar) + np.square(mu) - 1.0 - logvar
    return np.asarray(0.5 * np.sum(terms, axis=-1, dtype=np.float64), dtype=np.float64)


def softplus(a: F32) -> F32:
    """`log(1 + e^a)`, stable: `max(a, 0) + log1p(e^-|a|)`; 7x faster than np.logaddexp(0, a)."""
    t = np.abs(a)
    np.negative(t, out=t)
    np.exp(t, out=t)
    np.log1p(t, out=t)
    t += np.maximum(a, 0)
    return t


def log_likelihood(x: F32, out: F32, likelihood: Likelihood, sigma: float = 1.0) -> F64:
    """log p(x|z) summed over pixels; `x (B, C, H, W)`, `out (..., B, C, H, W)` -> `(..., B)`.

    `out` is the decoder output: Bernoulli logits (x in [0, 1] used as the probability, no
    binarisation) or the Gaussian mean with the manifest's scalar `sigma`.
    """
    if likelihood == "bernoulli":
        # x * logits - softplus(logits), with softplus(l) = log(1 + e^l) computed stably
        per_pixel = x * out - softplus(out)
    else:
        if sigma <= 0:
            raise ValueError(f"gaussian likelihood needs a positive sigma, got {sigma}")
        per_pixel = -0.5 * np.square((x - out) / np.float32(sigma)) - np.float32(
            math.log(sigma) + 0.5 * LOG_2PI
        )
    log_px: F64 = np.sum(per_pixel, axis=IMAGE_AXES, dtype=np.float64)
    return log_px


def log_normal(z: F32, mu: F32 | float = 0.0, logvar: F32 | float = 0.0) -> F64:
    """log N(z; mu, diag(exp(logvar))) summed over the last axis; defaults give the prior."""
    per_dim = -0.5 * (LOG_2PI + logvar + np.square(z - mu) * np.exp(-np.asarray(logvar)))
    log_p: F64 = np.sum(per_dim, axis=-1, dtype=np.float64)
    return log_p


# Rows of z whose mixture log-density is computed at once: bounds the (rows, K) float64 arrays
# (64 MiB each at K = 2,000).
PRIOR_ROWS = 4096


def log_prior(z: F32, prior: Mixture | None) -> F64:
    """log p(z) summed over the last axis: N(0, I) when `prior` is None, else the mixture's
    logsumexp over its components; `z (..., D)` -> `(...)`, in float64."""
    if prior is None:
        return log_normal(z)
    flat = np.asarray(z, dtype=np.float64).reshape(-1, z.shape[-1])
    chunks = [
        _log_mixture(flat[i : i + PRIOR_ROWS], prior) for i in range(0, len(flat), PRIOR_ROWS)
    ]
    log_p: F64 = np.concatenate(chunks).reshape(z.shape[:-1])
    return log_p


def _log_mixture(z: F64, prior: Mixture) -> F64:
    """`log_prior` of a mixture for `z (N, D)` -> `(N,)`."""
    # (N, 1, D): one vector-matrix product per row, so that a row's value never depends on the
    # rows beside it (BLAS picks its kernel, and its order of summation, by the matrices'
    # shapes): batching must not change a result
    rows = z[:, None, :]
    precision_t, scaled_means_t, constant = prior.expanded
    # log w_k + log N(z; m_k, v_k), with sum_d (z - m)^2 / v expanded into matrix products: no
    # (N, K, D) intermediate
    terms = constant + (rows @ scaled_means_t)[:, 0] - 0.5 * (np.square(rows) @ precision_t)[:, 0]
    peak = np.max(terms, axis=-1, keepdims=True)
    log_p: F64 = (peak + np.log(np.sum(np.exp(terms - peak), axis=-1, keepdims=True)))[:, 0]
    return log_p


def _decode_samples(decode: Decode, x: F32, z: F32, likelihood: Likelihood, sigma: float) -> F64:
    s, b, d = z.shape
    out = decode(z.reshape(s * b, d)).reshape(s, *x.shape)  # (S, B, C, H, W)
    return log_likelihood(x, out, likelihood, sigma)  # (S, B)


def elbo(
    decode: Decode,
    x: F32,
    mu: F32,
    logvar: F32,
    eps: F32,
    likelihood: Likelihood,
    sigma: float = 1.0,
    prior: Mixture | None = None,
) -> ElboTerms:
    """ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)) with S = eps.shape[0] samples; tutorial eq. 5.

    The KL is the closed form (eq. 7) for p(z) = N(0, I); a mixture prior has none, so it is
    estimated from the same S samples as the reconstruction: mean_s log q(z_s|x) - log p(z_s).
    """
    z = reparameterize(mu, logvar, eps)  # (S, B, D)
    reconstruction = np.mean(_decode_samples(decode, x, z, likelihood, sigma), axis=0)
    if prior is None:
        kl = kl_divergence(mu, logvar)
    else:
        kl = np.mean(log_normal(z, mu, logvar) - log_prior(z, prior), axis=0)
    return ElboTerms(reconstruction, kl, reconstruction - kl)


def iwae(
    decode: Decode,
    x: F32,
    mu: F32,
    logvar: F32,
    eps: F32,
    likelihood: Likelihood,
    sigma: float = 1.0,
    prior: Mixture | None = None,
) -> F64:
    """log p(x) >= log mean_k p(x|z_k) p(z_k) / q(z_k|x), k = eps.shape[0]; Burda et al. eq. 8."""
    z = reparameterize(mu, logvar, eps)  # (k, B, D)
    log_w = _decode_samples(decode, x, z, likelihood, sigma) + log_prior(z, prior)
    log_w -= log_normal(z, mu, logvar)  # (k, B)
    peak = np.max(log_w, axis=0)
    bound: F64 = peak + np.log(np.mean(np.exp(log_w - peak), axis=0))
    return bound


def squared_error(x: F32, mean: F32) -> F64:
    """sum over pixels of (x - mean)^2: `x, mean (B, C, H, W)` -> `(B,)`; the recon_error score."""
    err: F64 = np.sum(np.square(x - mean), axis=IMAGE_AXES, dtype=np.float64)
    return err


@functools.cache
def blur_matrix(n: int) -> F32:
    """The 5-tap binomial filter along an axis of length `n`, zero padding 2, as an `(n, n)` band
    matrix: row i weights a[i - 2 .. i + 2] (symmetric, as the taps are)."""
    band = [
        tap * np.eye(n, k=offset, dtype=np.float32) for offset, tap in enumerate(BINOMIAL_5, -2)
    ]
    matrix: F32 = np.sum(band, axis=0, dtype=np.float32)
    return matrix


def blur(a: F32) -> F32:
    """`(..., H, W)` filtered by the 5x5 binomial kernel: separable, zero padding 2, same size;
    two matrix products (one numpy call each, where shifted slices took twenty)."""
    h, w = a.shape[-2:]
    out: F32 = (blur_matrix(h) @ a @ blur_matrix(w)).astype(np.float32, copy=False)
    return out


def blurred_error(x: F32, mean: F32) -> F64:
    """`sum_c blur(x - mean)^2` per pixel, `x, mean (B, C, H, W)` -> `(B, H, W)`: the numerator of
    the blur_recon scores. Blurring the error forgives strokes shifted by a pixel or two."""
    err: F64 = np.sum(np.square(blur(x - mean)), axis=1, dtype=np.float64)
    return err


def blur_recon_rel(x: F32, mean: F32) -> F64:
    """The blur_recon_rel score: `sum(blur(x - mean)^2) / (sum(x) + 1)` per image -> `(B,)`.

    `x, mean (B, C, H, W)`; `mean` is the decoder's mean at `z = mu`. Dividing by the ink stops
    thin digits (a `1`) from looking normal to every model, but assumes bright strokes on a dark
    background (bundles of 2.0 and before chose it by name).
    """
    ink = np.sum(x, axis=IMAGE_AXES, dtype=np.float64)
    score: F64 = np.sum(blurred_error(x, mean), axis=(-2, -1)) / (ink + 1.0)
    return score


def background(x: F32) -> F32:
    """Each image's background: its median per channel, `(B, C, H, W)` -> `(B, C, 1, 1)`."""
    b, c = x.shape[:2]
    median: F32 = np.median(x.reshape(b, c, -1), axis=-1)[:, :, None, None]
    return median


def contrast(x: F32) -> F64:
    """`sum |x - background(x)|` per image: `(B, C, H, W)` -> `(B,)`; blur_recon_contrast's
    normaliser: the ink of a white-on-black digit, as much for the same digit black-on-white."""
    total: F64 = np.sum(np.abs(x - background(x)), axis=IMAGE_AXES, dtype=np.float64)
    return total


def contrast_energy(x: F32) -> F64:
    """`sum (x - background(x))^2` per image: `(B, C, H, W)` -> `(B,)`; blur_recon_energy's
    normaliser.

    It scales with the square of the stroke/background difference, as the reconstruction error
    does, so their ratio is the same for a digit white-on-black, black-on-white or in any two
    colours; `contrast` scales with the difference itself, so colour contrast moved its ratio.
    """
    total: F64 = np.sum(np.square(x - background(x)), axis=IMAGE_AXES, dtype=np.float64)
    return total


def blur_recon_contrast(x: F32, mean: F32) -> F64:
    """`sum(blur(x - mean)^2) / (contrast(x) + 1)` per image -> `(B,)`: the default score of
    bundles calibrated by 2.1 (independent of polarity, not of colour contrast)."""
    score: F64 = np.sum(blurred_error(x, mean), axis=(-2, -1)) / (contrast(x) + 1.0)
    return score


def anomaly_map(x: F32, mean: F32) -> F64:
    """Per-pixel terms of `blur_recon_energy`: `blurred_error / (contrast_energy + ENERGY_FLOOR)`.

    `x, mean (B, C, H, W)` -> `(B, H, W)`; each map sums to the image's blur_recon_energy.
    """
    heat: F64 = blurred_error(x, mean) / (contrast_energy(x) + ENERGY_FLOOR)[:, None, None]
    return heat


def blur_recon_energy(x: F32, mean: F32) -> F64:
    """`sum(blur(x - mean)^2) / (contrast_energy(x) + ENERGY_FLOOR)` per image -> `(B,)`.

    `mean` is the decoder's mean at `z = mu`. The blurred error over the image's own squared
    contrast against its background: unchanged by polarity and by the colours of stroke and
    background, and a blank or near-blank image, which has almost no contrast, gets a high score
    instead of the likelihood's low one (Nalisnick et al. 2019). docs/BUNDLE.md and
    BENCHMARKS.md section 2 give the evidence.
    """
    score: F64 = np.sum(anomaly_map(x, mean), axis=(-2, -1))  # the map's terms, summed
    return score


def likelihood_mean(out: F32, likelihood: Likelihood) -> F32:
    """The mean of p(x|z) from the decoder output: sigmoid(logits) or the Gaussian mean."""
    if likelihood == "bernoulli":
        mean = softplus(-out)  # sigmoid(l) = exp(-softplus(-l)): no overflow, tiny values kept
        np.negative(mean, out=mean)
        np.exp(mean, out=mean)
        return mean.astype(np.float32, copy=False)
    return out


ReconstructionScore = Callable[[F32, F32], F64]
# Scores of an image and the decoder's mean at z = mu, by name (bundle.ScoreName lists these and
# the two likelihood bounds, neg_elbo and neg_iwae). Adding a score: a pure function here, its
# torch twin in model/objective.py, a name in bundle.ScoreName and an entry below.
RECONSTRUCTION_SCORES: dict[str, ReconstructionScore] = {
    "recon_error": squared_error,
    "blur_recon_rel": blur_recon_rel,
    "blur_recon_contrast": blur_recon_contrast,
    "blur_recon_energy": blur_recon_energy,
}


def percentile_of(score: F64, percentiles: list[float], values: list[float]) -> F64:
    """Percentile of `score` in a calibration table by linear interpolation (0 below, 100 above)."""
    percentile: F64 = np.interp(score, values, percentiles, left=0.0, right=100.0)
    return percentile


def value_at(percentile: float, percentiles: list[float], values: list[float]) -> float:
    """The calibration table's score at `percentile` (the default anomaly threshold)."""
    return float(np.interp(percentile, percentiles, values))
