"""Model versions and hot reload: load, verify and warm up a bundle, then swap it in atomically.

A reload (POST /admin/reload or SIGHUP) builds a complete new `Model` beside the one serving —
manifest validated, checksums verified, sessions opened, one warm-up inference run — and only then
replaces `app.state.model` in one assignment. A request resolves the model once, when it starts,
so requests in flight finish on the model they started with; the old model's batchers drain and
then run any late calls unbatched. A bundle that fails any check is refused and the old model
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.bundle import BundleError, load_bundle
from service.inference import BatchPolicy, Model, compute_slots
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class ReloadInProgress(RuntimeError):
    """Another reload has not finished yet."""


@dataclass(frozen=True)
class Swap:
    """What a reload replaced."""

    previous: Model | None
    current: Model
    seconds: float


async def load_model(path: Path, settings: Settings, metrics: Metrics) -> Model:
    """Load, verify and warm up the bundle at `path`; BundleError names what is wrong."""
    bundle = await run_in_threadpool(
        load_bundle, path, device=settings.device, threads=settings.threads
    )
    await run_in_threadpool(bundle.warm_up)
    return Model(
        bundle,
        metrics,
        BatchPolicy.from_settings(settings),
        settings.inline_max_rows,
        compute_slots(settings),
    )


def publish(metrics: Metrics, previous: Model | None, current: Model | None) -> None:
    """Point the bundle-info and readiness gauges at the model now serving."""
    if previous is not None:
        with contextlib.suppress(KeyError):  # labels already gone
            metrics.bundle_info.remove(*previous.info().values())
    if current is not None:
        metrics.bundle_info.labels(**current.info()).set(1)


async def reload_model(app: FastAPI, path: Path | None = None) -> Swap:
    """Swap in the bundle at `path` (default: the one serving now) once it is loaded and warm.

    Raises ReloadInProgress while another reload runs, BundleError (naming the file) for a bundle
    that cannot be served; in both cases the old model keeps serving.
    """
    lock: asyncio.Lock = app.state.reload_lock
    metrics: Metrics = app.state.metrics
    if lock.locked():
        raise ReloadInProgress("a reload is already in progress; retry when it has finished")
    async with lock:
        start = time.perf_counter()
        previous: Model | None = app.state.model
        target = path or (previous.bundle.path if previous else app.state.settings.bundle)
        try:
            current = await load_model(target, app.state.settings, metrics)
        except BundleError:
            metrics.reloads.labels("refused").inc()
            raise
        app.state.model = current  # the swap: new requests resolve the new model from here on
        publish(metrics, previous, current)
        metrics.reloads.labels("swapped").inc()
        if previous is not None:
            await run_in_threadpool(previous.close)
        seconds = time.perf_counter() - start
        log.info(
            "reloaded %s %s from %s in %.2f s (was %s)",
            current.manifest.name,
            current.manifest.version,
            target,
            seconds,
            f"{previous.manifest.name} {previous.manifest.version}" if previous else "nothing",
        )
        return Swap(previous=previous, current=current, seconds=seconds)


async def _reload_logged(app: FastAPI) -> None:
    try:
        await reload_model(app)
    except (BundleError, ReloadInProgress) as exc:
        log.error("SIGHUP reload refused, still serving the old model: %s", exc)


def install_sighup(app: FastAPI) -> bool:
    """Reload the served bundle on SIGHUP; False off the main thread, where signals cannot go."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload_logged(app))
        tasks.add(task)  # keep a reference until it finishes
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    return True


def remove_sighup() -> None:
    """Undo install_sighup."""
    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
