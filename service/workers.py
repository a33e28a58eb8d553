"""`vae serve --workers N`: N server processes, each listening on its own SO_REUSEPORT socket.

With one listening socket shared by the workers (uvicorn's own `--workers`), a worker that wakes
first can accept a whole burst of connections, and keep-alive clients then stay on it: /encode at
concurrency 32 on 2 cores gave 1,862 req/s when one worker took all 32 connections and 2,963 when
they spread (issue 16's side-by-side run). With a socket per worker the kernel hashes each new
connection to one of them, so they spread evenly. Each worker loads the bundle itself; SIGTERM,
SIGINT and SIGHUP (reload) sent to `vae serve` reach every worker.

POST /admin/reload reaches one worker: that worker swaps the bundle in, writes which bundle into
the server's announcement file and signals `vae serve` (SIGUSR1), which sends SIGHUP to the other
workers; a worker reloads on SIGHUP the bundle last announced (else the one it serves). So every
worker serves the same bundle within about a second of the answer, and a later SIGHUP keeps it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

# in a worker of several: the file where a reload announces its bundle to the others
ANNOUNCEMENTS: Path | None = None


def announce_reload(bundle: Path) -> None:
    """After POST /admin/reload swapped `bundle` in, have the other workers load it too."""
    if ANNOUNCEMENTS is None:
        return  # the only process
    text = json.dumps({"bundle": str(bundle), "from": os.getpid()})
    partial = ANNOUNCEMENTS.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(ANNOUNCEMENTS)  # atomic: a reader sees the old or the new announcement
    os.kill(os.getppid(), signal.SIGUSR1)


def announced_bundle() -> Path | None:
    """The bundle a reload last announced to the workers, if any."""
    announced = _announcement(ANNOUNCEMENTS)
    return Path(announced["bundle"]) if announced else None


def _announcement(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` with SO_REUSEPORT, so other workers can bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(config: dict[str, Any], log_format: str, log_level: int, announcements: str) -> None:
    import uvicorn

    global ANNOUNCEMENTS
    ANNOUNCEMENTS = Path(announcements)
    logging.basicConfig(level=log_level, format=log_format)
    server = uvicorn.Server(uvicorn.Config("service.main:create_app", factory=True, **config))
    server.run(sockets=[reuse_port_socket(config["host"], config["port"])])


def run_workers(count: int, config: dict[str, Any], *, log_format: str, log_level: int) -> int:
    """Run `count` workers with uvicorn `config` until they exit; the exit status for `vae serve`.

    When one worker exits (a failed start-up, or a signal), the others are stopped too.
    """
    context = multiprocessing.get_context("spawn")  # nothing of this process's state is shared
    folder = tempfile.TemporaryDirectory(prefix="vae-serve-")
    announcements = Path(folder.name) / "reload.json"
    workers = [
        context.Process(
            target=_worker,
            args=(config, log_format, log_level, str(announcements)),
            name=f"worker-{i}",
        )
        for i in range(count)
    ]
    for worker in workers:
        worker.start()

    def forward(sig: int, frame: FrameType | None) -> None:
        # Ctrl-C already reached the workers (same process group): a second SIGINT would make
        # uvicorn skip the graceful shutdown, so SIGINT goes on as SIGTERM
        sent = signal.SIGTERM if sig == signal.SIGINT else sig
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, sent)

    def spread_reload(sig: int, frame: FrameType | None) -> None:
        announced = _announcement(announcements)
        sender = announced["from"] if announced else None
        for worker in workers:
            if worker.pid not in (None, sender) and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGHUP)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    signal.signal(signal.SIGUSR1, spread_reload)
    log.info("serving with %d workers on %s:%d", count, config["host"], config["port"])
    wait([worker.sentinel for worker in workers])
    forward(signal.SIGTERM, None)
    for worker in workers:
        worker.join()
    folder.cleanup()
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)
    failed = [w.exitcode for w in workers if w.exitcode not in stopped]
    return 1 if failed else 0
