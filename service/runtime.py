"""The loaded bundle as a `Runtime`: every model operation, written once as `async def`.

Each network call goes through the network's micro-batcher (service/batching.py), so concurrent
requests share onnxruntime calls; the numpy math around the calls runs on the event loop when it
is small and in a worker thread otherwise (`off_loop`). eps is drawn per request from the
request's own seed, so a result never depends on what the request was batched with.
"""

import asyncio
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from service import objective
from service.batching import INLINE_ROWS, MicroBatcher
from service.bundle import Bundle, ScoreName
from service.memory import RELEASE_ROWS
from service.metrics import Metrics

F32 = objective.F32
F64 = objective.F64
MAX_SEED = 2**63 - 1
P = ParamSpec("P")
T = TypeVar("T")


class OverBudget(ValueError):
    """A request needs more network rows than VAE_MAX_ROWS allows; the server answers 422."""


class NotFinite(ValueError):
    """The decoder output is not finite (latents far outside the prior); answered with a 422."""


async def off_loop(rows: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)`, work that grows with `rows`: here when small, else in a thread.

    The event loop serves every connection, so work that grows with the input beyond INLINE_ROWS
    rows leaves it (numpy and onnxruntime release the GIL for their heavy parts).
    """
    if rows <= INLINE_ROWS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def fresh_seed() -> int:
    """A random seed to echo back; below 2**53 so JavaScript clients can hold it exactly."""
    return secrets.randbits(53)


def draw_eps(seed: int, shape: tuple[int, ...]) -> F32:
    """Standard normal draws from `np.random.default_rng(seed)`.

    Draws fill in C order, so the first S of an `(N, B, D)` draw equal an `(S, B, D)` draw with
    the same seed: one draw serves the ELBO, IWAE and the anomaly score of a request.
    """
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def draw_prior(
    seed: int, n: int, d: int, prior: objective.Mixture | None, temperature: float
) -> F32:
    """`n` latent vectors from p(z), each component's spread scaled by `temperature`.

    N(0, I): `temperature * eps`, with eps the `(n, d)` draw_eps of `seed`. A mixture: the same
    eps, then a component per row from the same generator, `means_k + temperature * std_k * eps`.
    """
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((n, d), dtype=np.float32)
    if prior is None:
        return eps * np.float32(temperature)
    weights = np.exp(prior.logits.astype(np.float64) - np.max(prior.logits))
    k = rng.choice(len(weights), size=n, p=weights / weights.sum())
    std = np.exp(np.float32(0.5) * prior.logvars[k])
    z: F32 = prior.means[k] + np.float32(temperature) * std * eps
    return z


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            return max(1, min(cpus or 1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus or 1)


def parallel_calls(threads: int) -> int:
    """onnxruntime calls that keep every usable core busy, each using `threads` cores (0: all)."""
    cpus = available_cpus()
    return max(1, cpus // (threads or cpus))


@dataclass(frozen=True)
class Evaluation:
    """Per-image results of scoring a batch, each `(B,)`; `anomaly_map` `(B, H, W)` if asked."""

    terms: objective.ElboTerms
    iwae: F64 | None
    score: F64
    mu: F32  # (B, D): the mean of q(z|x)
    anomaly_map: F64 | None = None


def _prefix_decoder(z: F32, out: F32) -> objective.Decode:
    """The decoder as a function, for the pure objective, serving rows decoded beforehand.

    `out` is the decoder's output for all of `z (N, B, D)`, decoded once through the batcher; the
    ELBO, IWAE and score each use the first draws of the same eps, so each asks for a prefix.
    """
    flat = z.reshape(-1, z.shape[-1])

    def decode(rows: F32) -> F32:
        if not np.array_equal(rows, flat[: len(rows)]):
            raise ValueError("decode: rows are not a prefix of the draws decoded beforehand")
        return out[: len(rows)]

    return decode


def decodes_at_mu(score: ScoreName, anomaly_map: bool) -> bool:
    """Whether an evaluation decodes one more row per image, at z = mu: for a score of the
    reconstruction or a map (which share it). VAE_MAX_ROWS counts that row."""
    return score in objective.RECONSTRUCTION_SCORES or anomaly_map


class Runtime:
    """A loaded bundle, its two micro-batchers and the metrics its calls report to.

    One Runtime serves one bundle for its whole life; a reload builds a new one and swaps it in,
    so requests holding the old one finish on it.
    """

    def __init__(
        self, bundle: Bundle, metrics: Metrics, *, max_rows: int, parallel_calls: int = 1
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.metrics = metrics
        self.max_rows = max_rows
        self.encoder = MicroBatcher(
            "encoder",
            self._encode_rows,
            parallel_calls=parallel_calls,
            queue_time=metrics.queue_time.labels("encoder"),
        )
        self.decoder = MicroBatcher(
            "decoder",
            self._decode_rows,
            parallel_calls=parallel_calls,
            queue_time=metrics.queue_time.labels("decoder"),
        )

    def _encode_rows(self, x: F32) -> tuple[F32, F32]:
        with self.metrics.time_inference("encoder", len(x)):
            return self.bundle.encode(x)

    def _decode_rows(self, z: F32) -> tuple[F32]:
        with self.metrics.time_inference("decoder", len(z)):
            return (self.bundle.decode(z),)

    def release_after(self, rows: int) -> None:
        """After a large request (RELEASE_ROWS rows or more), give its memory back to the OS in the
        background (service/memory.py)."""
        if rows >= RELEASE_ROWS:
            asyncio.get_running_loop().run_in_executor(None, self.bundle.release_memory)

    def check_rows(self, rows: int, what: str) -> None:
        """OverBudget when a request needs more than VAE_MAX_ROWS network rows."""
        if rows > self.max_rows:
            raise OverBudget(
                f"this request needs {what} = {rows} network rows, over the per-request budget "
                f"of {self.max_rows} rows (VAE_MAX_ROWS); send fewer images or draws"
            )

    async def encode(self, x: F32) -> tuple[F32, F32]:
        """`x (B, C, H, W)` -> `mu, logvar (B, D)` of q(z|x)."""
        self.check_rows(len(x), f"{len(x)} images")
        mu, logvar = await self.encoder(x)
        self.release_after(len(x))
        return mu, logvar

    async def decode(self, z: F32) -> F32:
        """`z (N, D)` -> the mean of p(x|z), `(N, C, H, W)`; NotFinite if it is not finite."""
        self.check_rows(len(z), f"{len(z)} latent vectors")
        (out,) = await self.decoder(z)
        self.release_after(len(z))
        return await off_loop(len(z), self._mean, out)

    def _mean(self, out: F32) -> F32:
        with np.errstate(invalid="ignore", over="ignore"):  # reported below as NotFinite
            mean = objective.likelihood_mean(out, self.manifest.likelihood)
        bad = ~np.isfinite(mean).all(axis=(1, 2, 3))
        if bad.any():
            raise NotFinite(f"the decoder output is not finite for rows {np.flatnonzero(bad)}")
        return mean

    async def reconstruct(self, x: F32) -> F32:
        """The decoder's mean at `z = mu`, `(B, C, H, W)`: what the model makes of each image."""
        mu, _ = await self.encode(x)
        return await self.decode(mu)

    async def evaluate(
        self,
        x: F32,
        *,
        samples: int,
        k: int | None,
        score: ScoreName,
        score_draws: int,
        seed: int,
        anomaly_map: bool = False,
        each_alone: bool = False,
    ) -> Evaluation:
        """ELBO with `samples` draws, IWAE with `k` (if given) and the anomaly score `score`.

        `score_draws` is the number of draws behind neg_elbo or neg_iwae (the calibration's, so
        that scores compare with its table). All share one draw of eps from `seed`, decoded once:
        `(n, B, D)`, so image i's draws depend on B; with `each_alone` one `(n, 1, D)` draw serves
        every image, and each gets what it would get alone in a request (`vae score`).
        `anomaly_map` adds the per-pixel map of blur_recon_energy (at the decoder's mean).
        """
        b, d = len(x), self.manifest.latent_dim
        n = max(samples, k or 0, score_draws)
        at_mu = decodes_at_mu(score, anomaly_map)
        rows = b * (n + at_mu)
        extra = " + 1 map" if anomaly_map else " + 1 reconstruction"
        self.check_rows(rows, f"{b} images x " + (f"({n} draws{extra})" if at_mu else f"{n} draws"))
        mu, logvar = await self.encode(x)  # (B, D) each

        def draw() -> tuple[F32, F32]:
            eps = draw_eps(seed, (n, 1 if each_alone else b, d))
            return eps, objective.reparameterize(mu, logvar, eps)  # (n, B, D) each

        eps, z = await off_loop(b * n, draw)
        # the draws' rows, and for a score of the reconstruction or a map the B rows of z = mu
        # behind them, decoded in one call: (n * B [+ B], C, H, W)
        rows_in = z.reshape(n * b, d)
        (out,) = await self.decoder(np.concatenate([rows_in, mu]) if at_mu else rows_in)
        mean = await off_loop(b, self._mean, out[n * b :]) if at_mu else None
        out = out[: n * b]
        decode = _prefix_decoder(z, out)
        likelihood, sigma = self.manifest.likelihood, self.manifest.sigma or 1.0
        prior = self.bundle.prior

        def elbo(draws: int) -> objective.ElboTerms:
            return objective.elbo(decode, x, mu, logvar, eps[:draws], likelihood, sigma, prior)

        def iwae(draws: int) -> F64:
            return objective.iwae(decode, x, mu, logvar, eps[:draws], likelihood, sigma, prior)

        def bounds() -> Evaluation:
            terms = elbo(samples)
            bound = iwae(k) if k else None
            if mean is not None and score in objective.RECONSTRUCTION_SCORES:
                values = objective.RECONSTRUCTION_SCORES[score](x, mean)
            elif score == "neg_elbo":
                values = -(terms if score_draws == samples else elbo(score_draws)).elbo
            else:
                values = -(bound if bound is not None and score_draws == k else iwae(score_draws))
            heat = objective.anomaly_map(x, mean) if anomaly_map and mean is not None else None
            return Evaluation(terms=terms, iwae=bound, score=values, anomaly_map=heat, mu=mu)

        result = await off_loop(rows, bounds)
        self.release_after(rows)
        return result

    def info(self) -> dict[str, Any]:
        """Labels describing the loaded bundle."""
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "likelihood": self.manifest.likelihood,
            "latent_dim": str(self.manifest.latent_dim),
            "provider": self.bundle.providers[0],
        }
