"""Model versions and hot reload: load, verify and warm up a bundle, then swap it in atomically.

A reload (POST /admin/reload or SIGHUP) builds a complete new `Runtime` beside the one serving —
manifest validated, checksums verified, sessions opened, one warm-up inference run — and only then
replaces `app.state.runtime` in one assignment. A request resolves the model once, when it starts,
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

from service import workers
from service.bundle import BundleError, load_bundle
from service.memory import trim
from service.metrics import Metrics
from service.runtime import Runtime, parallel_calls
from service.settings import Settings

log = logging.getLogger(__name__)

# seconds after a reload for the requests that started on the replaced model to have finished
LATE_TRIM_S = 10.0


class ReloadInProgress(RuntimeError):
    """Another reload has not finished yet."""


class BundleNotFound(LookupError):
    """No bundle of that name under the models root."""


def resolve_bundle(root: Path, name: str) -> Path:
    """The bundle directory `name` under the models root `root` (absolute, symlinks resolved);
    BundleNotFound when there is none, ValueError naming the problem for a name that leaves the
    root or names something else than a directory.

    Names are relative to the root, so a client cannot point the server at any other path, and
    the server's own layout never appears in an answer (see `public_path`).
    """
    if "\x00" in name:
        raise ValueError(f"{name!r} holds a NUL character, which no file name can")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(
            f"{name!r} must be a bundle name relative to the models root (the directory "
            "holding VAE_BUNDLE), "
            "with no '..'"
        )
    try:
        path = (root / relative).resolve(strict=True)
        is_dir = path.is_dir()
    except (OSError, RuntimeError, ValueError) as exc:  # missing, too long, a loop, NUL, no access
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise BundleNotFound(f"no bundle {name!r} under the models root ({reason})") from None
    if not path.is_relative_to(root):
        raise ValueError(
            f"{name!r} leads out of the models root (the directory holding VAE_BUNDLE)"
        )
    if path == root:
        raise ValueError(f"{name!r} names the models root itself, not a bundle under it")
    if not is_dir:
        raise ValueError(f"{name!r} is not a directory under the models root")
    return path


def public_path(path: Path, root: Path) -> str:
    """How a client sees a bundle path: relative to the models root, else its name alone."""
    absolute = path.absolute()
    return str(absolute.relative_to(root)) if absolute.is_relative_to(root) else path.name


def public_message(message: str, root: Path) -> str:
    """`message` (naming files under the models root) with the root's absolute path left out."""
    return message.replace(f"{root}/", "")


@dataclass(frozen=True)
class Version:
    """Which bundle a model serves; holds no model, so that a replaced one can be freed."""

    name: str
    version: str
    path: Path

    @classmethod
    def of(cls, model: Runtime) -> Version:
        return cls(model.manifest.name, model.manifest.version, model.bundle.path)


@dataclass(frozen=True)
class Swap:
    """What a reload replaced."""

    previous: Version | None
    current: Version
    seconds: float


async def load_runtime(path: Path, settings: Settings, metrics: Metrics) -> Runtime:
    """Load, verify and warm up the bundle at `path`; BundleError names what is wrong."""
    bundle = await run_in_threadpool(
        load_bundle, path, device=settings.device, threads=settings.threads
    )
    await run_in_threadpool(bundle.warm_up)
    return Runtime(
        bundle,
        metrics,
        max_rows=settings.max_rows,
        parallel_calls=parallel_calls(settings.threads),
    )


def publish(metrics: Metrics, previous: Runtime | None, current: Runtime | None) -> None:
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
        previous: Runtime | None = app.state.runtime
        target = path or (previous.bundle.path if previous else app.state.settings.bundle)
        try:
            current = await load_runtime(target, app.state.settings, metrics)
        except BundleError:
            metrics.reloads.labels("refused").inc()
            raise
        app.state.runtime = current  # the swap: new requests resolve the new model from here on
        publish(metrics, previous, current)
        metrics.reloads.labels("swapped").inc()
        replaced = Version.of(previous) if previous is not None else None
        # A Runtime sits in reference cycles (its batchers hold its bound methods): only a full
        # collection frees it and its sessions (about 25 MB for the shipped bundle), and with
        # GC_THRESHOLDS those are rare, so every reload kept one more. Collected here, or at the
        # next reload if a request still holds it.
        del previous
        await run_in_threadpool(trim)
        # requests still in flight keep the replaced model alive a while: once more, later
        loop = asyncio.get_running_loop()
        loop.call_later(LATE_TRIM_S, loop.run_in_executor, None, trim)
        seconds = time.perf_counter() - start
        log.info(
            "reloaded %s %s from %s in %.2f s (was %s)",
            current.manifest.name,
            current.manifest.version,
            target,
            seconds,
            f"{replaced.name} {replaced.version}" if replaced else "nothing",
        )
        return Swap(previous=replaced, current=Version.of(current), seconds=seconds)


async def _reload_logged(app: FastAPI) -> None:
    try:
        # with several workers, the bundle a POST /admin/reload announced (service/workers.py)
        await reload_model(app, workers.announced_bundle())
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
