"""`vae serve --workers N`: N server processes, each listening on its own SO_REUSEPORT socket.

With one listening socket shared by the workers (uvicorn's own `--workers`), a worker that wakes
first can accept a whole burst of connections, and keep-alive clients then stay on it: /encode at
concurrency 32 on 2 cores gave 1,862 req/s when one worker took all 32 connections and 2,963 when
they spread (issue 16's side-by-side run). With a socket per worker the kernel hashes each new
connection to one of them, so they spread evenly. Each worker loads the bundle itself; SIGTERM,
SIGINT and SIGHUP (reload) sent to `vae serve` reach every worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` with SO_REUSEPORT, so other workers can bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(config: dict[str, Any], log_format: str, log_level: int) -> None:
    import uvicorn

    logging.basicConfig(level=log_level, format=log_format)
    server = uvicorn.Server(uvicorn.Config("service.main:create_app", factory=True, **config))
    server.run(sockets=[reuse_port_socket(config["host"], config["port"])])


def run_workers(count: int, config: dict[str, Any], *, log_format: str, log_level: int) -> int:
    """Run `count` workers with uvicorn `config` until they exit; the exit status for `vae serve`.

    When one worker exits (a failed start-up, or a signal), the others are stopped too.
    """
    context = multiprocessing.get_context("spawn")  # nothing of this process's state is shared
    workers = [
        context.Process(target=_worker, args=(config, log_format, log_level), name=f"worker-{i}")
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

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("serving with %d workers on %s:%d", count, config["host"], config["port"])
    wait([worker.sentinel for worker in workers])
    forward(signal.SIGTERM, None)
    for worker in workers:
        worker.join()
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)
    failed = [w.exitcode for w in workers if w.exitcode not in stopped]
    return 1 if failed else 0
