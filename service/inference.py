"""Model operations on whole batches: each is one batched onnxruntime call per network.

These functions are synchronous and CPU-bound. Routes hand them to `Model.run`: small work runs
on the event loop (a thread hop would cost more), the rest in a worker thread (onnxruntime
releases the GIL). With micro-batching on, a call's rows may share one onnxruntime call with
other requests' rows (service/batching.py), and routes whose work is under a micro-batch
(/encode, /decode, /sample, /elbo, /reconstruct) await their network calls through a Gatherer,
so that concurrent requests share one thread hop. eps is always drawn per request from the
request's own seed, so results never depend on what a request was batched with or where it ran.
"""

import asyncio
import os
import secrets
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar, Unpack

import numpy as np
from starlette.concurrency import run_in_threadpool

from service import objective
from service.batching import Batcher, Gatherer, RowFunction
from service.bundle import MAX_DECODE_ROWS, Bundle, ScoreName
from service.memory import RELEASE_ROWS
from service.metrics import Metrics
from service.settings import Settings

F32 = objective.F32
F64 = objective.F64
MAX_SEED = 2**63 - 1
T = TypeVar("T")
# Model code as steps: a generator yielding `(network, rows)` for each network call it needs and
# sent that call's outputs; `Model._drive` runs it in the calling thread, `Model._drive_gathered`
# on the event loop.
Steps = Generator[tuple[str, F32], tuple[F32, ...], T]


def fresh_seed() -> int:
    """A random seed to echo back; below 2**53 so JavaScript clients can hold it exactly."""
    return secrets.randbits(53)


def draw_eps(seed: int, shape: tuple[int, ...]) -> F32:
    """Standard normal draws from `np.random.default_rng(seed)`.

    Draws fill in C order, so the first S of an `(N, B, D)` draw equal an `(S, B, D)` draw with
    the same seed: one draw serves the ELBO, IWAE and the anomaly score of a request.
    """
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


class EvaluateOptions(TypedDict):
    """What `Model.evaluate` computes besides the images.

    `score_draws` is the number of draws behind the score (the calibration's `samples` for
    neg_elbo, `k` for neg_iwae); all quantities share one draw of eps (from `seed`), so a shared
    prefix is decoded once.
    """

    samples: int
    k: int | None
    score: ScoreName
    score_draws: int
    seed: int
    anomaly_map: NotRequired[bool]


@dataclass(frozen=True)
class Evaluation:
    """Per-image results of scoring a batch, each `(B,)`; `anomaly_map` `(B, H, W)` if asked."""

    terms: objective.ElboTerms
    iwae: F64 | None
    score: F64
    anomaly_map: F64 | None = None


@dataclass(frozen=True)
class BatchPolicy:
    """How concurrent calls of a network are gathered (service/batching.py)."""

    max_batch_size: int
    max_delay_s: float
    max_queue: int
    workers: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "BatchPolicy | None":
        """The policy `VAE_BATCHING` and friends ask for; None when batching is off."""
        if not settings.batching:
            return None
        return cls(
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue=settings.max_queue,
            workers=parallel_calls(settings),
        )


def parallel_calls(settings: Settings) -> int:
    """onnxruntime calls that keep every usable core busy: each uses VAE_THREADS cores (0: all)."""
    cpus = available_cpus()
    return max(1, cpus // (settings.threads or cpus))


def compute_slots(settings: Settings) -> int:
    """VAE_COMPUTE_SLOTS, with 0 resolved to the calls that keep every core busy."""
    return settings.compute_slots or parallel_calls(settings)


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


class Model:
    """A loaded bundle plus the metrics its calls report to, optionally micro-batched.

    One Model serves one bundle for its whole life; a reload builds a new Model and swaps it in,
    so requests holding the old one finish on it.
    """

    def __init__(
        self,
        bundle: Bundle,
        metrics: Metrics,
        batching: BatchPolicy | None = None,
        inline_max_rows: int = 0,
        compute_slots: int = 0,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.metrics = metrics
        self.inline_max_rows = inline_max_rows
        self._offloaded = 0  # calls now in worker threads, or waiting for a compute slot
        # at most `compute_slots` bounded calls (see `_bounded`) in worker threads; 0: no limit
        self._slots = asyncio.Semaphore(compute_slots) if compute_slots > 0 else None
        self._encoder: Batcher | None = None
        self._decoder: Batcher | None = None
        self._gathers: dict[str, Gatherer] = {}
        # the same model without micro-batching, for work run on the event loop (`run`)
        self.direct: Model = self
        if batching is not None:
            self._encoder = self._batcher("encoder", self._run_encoder, batching)
            self._decoder = self._batcher("decoder", self._run_decoder, batching)
            self.direct = Model(bundle, metrics, None, inline_max_rows, compute_slots)
            self._gathers = {
                "encoder": Gatherer(self._encoder, inline_max_rows),
                "decoder": Gatherer(self._decoder, inline_max_rows),
            }

    def _batcher(self, network: str, fn: RowFunction, policy: BatchPolicy) -> Batcher:
        return Batcher(
            network,
            fn,
            max_batch_size=policy.max_batch_size,
            max_delay_s=policy.max_delay_s,
            max_queue=policy.max_queue,
            workers=policy.workers,
            queue_time=self.metrics.queue_time.labels(network),
        )

    def _run_encoder(self, x: F32) -> tuple[F32, F32]:
        with self.metrics.time_inference("encoder", len(x)):
            return self.bundle.encode(x)

    def _run_decoder(self, z: F32) -> tuple[F32]:
        with self.metrics.time_inference("decoder", len(z)):
            return (self.bundle.decode(z),)

    def inline(self, rows: int) -> bool:
        """Whether work of `rows` network rows runs on the event loop: small, and nothing queued.

        Alone, small work (at most VAE_INLINE_MAX_ROWS rows) is done fastest right on the event
        loop: a worker-thread hop costs more than the onnxruntime call. While other requests'
        work is out in worker threads, it joins them instead, to share their micro-batches and
        leave the event loop to HTTP; measured with bench/serving.py.
        """
        return (
            rows <= self.inline_max_rows
            and self._offloaded == 0
            and not any(g.out for g in self._gathers.values())
        )

    def _bounded(self, rows: int) -> bool:
        """Whether offloaded work of `rows` rows must hold a compute slot (VAE_COMPUTE_SLOTS).

        Without micro-batching, all of it. With it, only work of a full micro-batch or more:
        smaller work spends its worker thread waiting for the batcher, and bounding it would
        only shrink the batches it shares.
        """
        if self._slots is None:
            return False
        return self._encoder is None or rows >= self._encoder.max_batch_size

    async def offload(self, fn: Callable[..., T], *args: Any, rows: int = 0) -> T:
        """`fn(*args)`, work of `rows` rows, in a worker thread, counted while it runs or waits
        for a compute slot (see `inline` and `_bounded`).

        Bounding the threads that compute at once to about the cores leaves the rest of the
        requests waiting on the event loop, where waiting costs nothing, instead of as many
        threads contending for the cores and the GIL: with 2 slots on 2 cores, 64-image /elbo
        requests at concurrency 32 gained a median 28 % in req/s and lost 40 % of their p99
        (interleaved A/B with bench/serving.py's load process, BENCHMARKS.md section 3).
        """
        self._offloaded += 1  # only ever changed on the event loop's thread
        try:
            if self._slots is not None and self._bounded(rows):
                async with self._slots:
                    return await run_in_threadpool(fn, *args)
            return await run_in_threadpool(fn, *args)
        finally:
            self._offloaded -= 1
            if rows >= RELEASE_ROWS:  # a large request's memory goes back, after its answer
                asyncio.get_running_loop().run_in_executor(None, self.bundle.release_memory)

    async def call(self, rows: int, fn: Callable[..., T], *args: Any, small: bool = True) -> T:
        """`fn(*args)`, work of `rows` rows that needs no network (decoding uploads): here on the
        event loop when `small` and at most VAE_INLINE_MAX_ROWS rows, else in a worker thread.
        Unlike `run` it stays here while other work is out: it has no micro-batch to join, and a
        thread hop costs more than decoding a few small images."""
        if small and rows <= self.inline_max_rows:
            return fn(*args)
        return await self.offload(fn, *args, rows=rows)

    async def run(self, rows: int, fn: "Callable[[Model], T]") -> T:
        """`fn(model)` for a request whose work is `rows` network rows: on the event loop with
        the unbatched model when `inline(rows)`, else in a worker thread, micro-batched when on.
        """
        if self.inline(rows):
            return fn(self.direct)
        return await self.offload(fn, self, rows=rows)

    def gathers(self, rows: int) -> bool:
        """Whether a request whose work is `rows` network rows awaits its network calls through
        the gatherers (`encode_gathered` and the like): with micro-batching on, and less than a
        micro-batch."""
        return self._encoder is not None and rows < self._encoder.max_batch_size

    async def encode_gathered(self, x: F32) -> tuple[F32, F32]:
        """`encode(x)` awaited on the event loop, gathered with concurrent requests' calls
        (service/batching.py, Gatherer); only where `gathers(len(x))`."""
        mu, logvar = await self._gathers["encoder"](x)
        return mu, logvar

    @property
    def batching(self) -> bool:
        """Whether network calls go through the micro-batcher."""
        return self._encoder is not None

    def close(self) -> None:
        """Stop the batchers after their queues drain; later calls run unbatched."""
        for batcher in (self._encoder, self._decoder):
            if batcher is not None:
                batcher.close()

    def encode(self, x: F32) -> tuple[F32, F32]:
        """`x (B, C, H, W)` -> `mu, logvar (B, D)`; QueueFull when the batch queue is full."""
        if self._encoder is None:
            return self._run_encoder(x)
        mu, logvar = self._encoder(x)
        return mu, logvar

    def decode(self, z: F32) -> F32:
        """`z (N, D)` -> decoder output `(N, C, H, W)`; QueueFull when the batch queue is full."""
        if self._decoder is None:
            return self._run_decoder(z)[0]
        return self._decoder(z)[0]

    def decode_mean(self, z: F32) -> F32:
        """`z (N, D)` -> the mean of p(x|z), `(N, C, H, W)`; ValueError if it is not finite."""
        return self._mean(self.decode(z))

    async def decode_mean_gathered(self, z: F32) -> F32:
        """`decode_mean(z)` awaited on the event loop, like `encode_gathered`."""
        return self._mean((await self._gathers["decoder"](z))[0])

    def _mean(self, decoded: F32) -> F32:
        with np.errstate(invalid="ignore", over="ignore"):  # reported below as a ValueError
            mean = objective.likelihood_mean(decoded, self.manifest.likelihood)
        bad = ~np.isfinite(mean).all(axis=(1, 2, 3))
        if bad.any():
            raise ValueError(f"the decoder output is not finite for rows {np.flatnonzero(bad)}")
        return mean

    def log_px(self, x: F32, z: F32) -> F64:
        """log p(x|z) for `x (B, C, H, W)` and `z (N, B, D)` -> `(N, B)`, in bounded chunks."""
        return self._drive(self._log_px(x, z))[0]

    def _log_px(self, x: F32, z: F32, mu: F32 | None = None) -> Steps[tuple[F64, F32 | None]]:
        """`log_px (N, B)` and, given `mu (B, D)`, the decoder's output at `z = mu`, decoded in
        the first call with the samples' (one network round trip less for a request)."""
        n, b, d = z.shape
        per_call = max(1, MAX_DECODE_ROWS // b)  # whole samples per decoder call
        chunks, at_mu = [], None
        for start in range(0, n, per_call):
            zs = z[start : start + per_call]
            rows = zs.reshape(-1, d)
            if start == 0 and mu is not None:
                (out,) = yield "decoder", np.concatenate([rows, mu])
                out, at_mu = out[: len(rows)], out[len(rows) :]
            else:
                (out,) = yield "decoder", rows
            chunks.append(
                objective.log_likelihood(
                    x, out.reshape(len(zs), *x.shape), self.manifest.likelihood, self.manifest.sigma
                )
            )
        return np.concatenate(chunks), at_mu

    def evaluate(self, x: F32, **options: Unpack[EvaluateOptions]) -> Evaluation:
        """ELBO with `samples` draws, IWAE with `k` (if given) and the anomaly score
        (EvaluateOptions)."""
        return self._drive(self._evaluate(x, **options))

    async def evaluate_gathered(self, x: F32, **options: Unpack[EvaluateOptions]) -> Evaluation:
        """`evaluate` awaited on the event loop, its network calls gathered with concurrent
        requests' (like `encode_gathered`); only where `gathers` for its rows."""
        return await self._drive_gathered(self._evaluate(x, **options))

    async def _drive_gathered(self, steps: "Steps[T]") -> T:
        """Run model code written as steps on the event loop, each network call gathered."""
        try:
            network, rows = next(steps)
            while True:
                network, rows = steps.send(await self._gathers[network](rows))
        except StopIteration as done:
            result: T = done.value
            return result

    def _drive(self, steps: "Steps[T]") -> T:
        """Run model code written as steps (below), each network call made right here."""
        try:
            network, rows = next(steps)
            while True:
                outputs = self.encode(rows) if network == "encoder" else (self.decode(rows),)
                network, rows = steps.send(outputs)
        except StopIteration as done:
            result: T = done.value
            return result

    def _evaluate(
        self,
        x: F32,
        *,
        samples: int,
        k: int | None,
        score: ScoreName,
        score_draws: int,
        seed: int,
        anomaly_map: bool = False,
    ) -> Steps[Evaluation]:
        """`evaluate` as steps: it yields each network call it needs, `(network, rows)`, and is
        sent that call's outputs, so one body of math serves the thread and the event loop."""
        b = len(x)
        mu, logvar = yield "encoder", x  # (B, D) each
        kl = objective.kl_divergence(mu, logvar)
        n = max(samples, k or 0, score_draws)
        eps = draw_eps(seed, (n, b, self.manifest.latent_dim))
        z = objective.reparameterize(mu, logvar, eps)  # (n, B, D)
        at_mu = score in objective.RECONSTRUCTION_SCORES or anomaly_map
        log_px, decoded = yield from self._log_px(x, z, mu if at_mu else None)  # (n, B)

        terms = objective.elbo(log_px[:samples], kl)
        iwae = objective.iwae(log_px[:k], z[:k], mu, logvar) if k else None
        mean = self._mean(decoded) if decoded is not None else None  # decoder's mean at z = mu
        if score == "neg_elbo":
            values = -objective.elbo(log_px[:score_draws], kl).elbo
        elif score == "neg_iwae":
            values = -objective.iwae(log_px[:score_draws], z[:score_draws], mu, logvar)
        else:  # deterministic: a function of x and the decoder's mean at z = mu
            assert mean is not None
            values = objective.RECONSTRUCTION_SCORES[score](x, mean)
        heat = objective.anomaly_map(x, mean) if anomaly_map and mean is not None else None
        return Evaluation(terms=terms, iwae=iwae, score=values, anomaly_map=heat)

    def reconstruct(self, x: F32) -> F32:
        """The decoder's mean at `z = mu`, `(B, C, H, W)`: what the model makes of each image."""
        return self._drive(self._reconstruct(x))

    async def reconstruct_gathered(self, x: F32) -> F32:
        """`reconstruct` awaited on the event loop, like `evaluate_gathered`."""
        return await self._drive_gathered(self._reconstruct(x))

    def _reconstruct(self, x: F32) -> Steps[F32]:
        mu, _ = yield "encoder", x
        (decoded,) = yield "decoder", mu
        return self._mean(decoded)

    def info(self) -> dict[str, Any]:
        """Labels describing the loaded model."""
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "likelihood": self.manifest.likelihood,
            "latent_dim": str(self.manifest.latent_dim),
            "provider": self.bundle.providers[0],
        }
