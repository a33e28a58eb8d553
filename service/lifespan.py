"""The app's life: load and warm up the bundle, serve, drain on SIGTERM, reload on SIGHUP."""

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

from service.bundle import BundleError
from service.memory import limit_arenas
from service.reload import install_sighup, load_runtime, publish, remove_sighup

log = logging.getLogger(__name__)

# Python's garbage-collector thresholds while serving (its own: 700, 10, 10). Fewer young
# collections leave less of the in-flight requests' garbage to the full collections, whose
# 50-60 ms pauses made the p99 at concurrency 32: /encode p99 ~30 ms instead of 60-78, /elbo ~50
# instead of 68-98, RSS unchanged (BENCHMARKS.md section 3).
GC_THRESHOLDS = (20_000, 20, 20)


def drain_first(app: FastAPI, delay_s: float) -> Callable[[], None]:
    """Wrap the server's SIGTERM/SIGINT handlers (uvicorn's): readiness turns false first.

    On the signal /readyz answers 503 at once; after `delay_s` (SIGTERM only; a second signal
    skips the wait) the signal reaches uvicorn, which stops accepting connections, lets in-flight
    requests finish (`timeout_graceful_shutdown`) and then runs the lifespan shutdown. Returns a
    function that restores the wrapped handlers. A no-op off the main thread (TestClient).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {
        sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)
    }

    def handle(sig: int, frame: FrameType | None) -> None:
        first = not app.state.draining
        app.state.draining = True
        app.state.metrics.ready.set(0)
        handler = previous[sig]
        assert callable(handler)
        if first and sig == signal.SIGTERM and delay_s > 0:
            log.info("SIGTERM: not ready; draining in %.1f s", delay_s)
            loop.call_soon_threadsafe(loop.call_later, delay_s, handler, sig, None)
        else:
            log.info("%s: not ready; draining in-flight requests", signal.Signals(sig).name)
            handler(sig, frame)

    for sig, handler in previous.items():
        if callable(handler):  # only a server's handler is wrapped, never the default action
            signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            if callable(handler):
                signal.signal(sig, handler)

    return restore


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and warm up the bundle before the first request; drain and release it at the end."""
    settings, metrics = app.state.settings, app.state.metrics
    limit_arenas()  # before the worker threads that load and serve allocate
    try:
        app.state.runtime = await load_runtime(settings.bundle, settings, metrics)
    except BundleError as exc:
        log.error("cannot start: %s", exc)
        raise
    publish(metrics, None, app.state.runtime)
    collector = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    app.state.draining = False
    metrics.ready.set(1)
    restore_signals = drain_first(app, settings.shutdown_delay_s)
    sighup = install_sighup(app)
    watch = asyncio.create_task(metrics.watch_event_loop())
    manifest = app.state.runtime.manifest
    log.info("ready: serving %s %s", manifest.name, manifest.version)
    try:
        yield
    finally:  # uvicorn has stopped accepting and drained in-flight requests by now
        watch.cancel()
        app.state.draining = True
        metrics.ready.set(0)
        if sighup:
            remove_sighup()
        restore_signals()
        gc.set_threshold(*collector)
        app.state.runtime = None
