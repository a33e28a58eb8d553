"""A real server process on a loopback port, ready once /readyz answers 200: the one way the tests
(e2e, stress, the container recipe) start one. The `live_server` fixture in tests/conftest.py
hands out `live_server` below."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0


class NotReady(RuntimeError):
    """The server exited or did not answer /readyz in time; the message carries its output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vae_serve(bundle: Path, *args: str) -> list[str]:
    """`vae serve` of `bundle` on 127.0.0.1, `{port}` left to fill in."""
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
    return [*command, "--port", "{port}", "--bundle", str(bundle), "--log-level", "warning", *args]


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its VAE_* settings, plus `env`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VAE_")} | dict(env or {})


@dataclass
class LiveServer:
    """A running server: its process, base URL and output (read all along, so it never blocks)."""

    process: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        """Everything the server has printed so far (all of it once stopped)."""
        return "".join(self.lines)

    def client(self, timeout: float = 60.0, **kwargs: Any) -> httpx.Client:
        """An httpx client on the server's URL (`kwargs`: headers and the like)."""
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc/<pid>/status (VmRSS)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.process.pid}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (SIGKILL after `timeout`), the output read to its end; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.reader is not None:
            self.reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll /readyz until 200; NotReady with the output if the server exits or takes long."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    self.stop()
                    code = self.process.returncode
                    raise NotReady(f"the server exited with {code}:\n{self.output}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise NotReady(f"not ready within {timeout:.0f} s:\n{self.output}")
                time.sleep(0.1)


def start(argv: Sequence[str], environ: Mapping[str, str], cwd: Path = REPO) -> LiveServer:
    """Start `argv` (`{port}` filled in with a free port) without waiting for it."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in argv]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=dict(environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = LiveServer(process, f"http://127.0.0.1:{port}")
    assert process.stdout is not None
    server.reader = threading.Thread(
        target=server.lines.extend, args=(process.stdout,), daemon=True
    )
    server.reader.start()
    return server


@contextmanager
def live_server(
    bundle: Path | None = None,
    *args: str,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = START_TIMEOUT,
) -> Iterator[LiveServer]:
    """A ready server, stopped (SIGTERM) on exit: `vae serve` of `bundle` with `args`, or `argv`.

    `env` adds settings to this process's environment (less its own VAE_*); `environ` replaces
    the environment whole; `cwd` is where it runs.
    """
    if argv is None:
        assert bundle is not None, "live_server needs a bundle or an argv"
        argv = vae_serve(bundle, *args)
    server = start(argv, environ if environ is not None else server_env(env), cwd)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()
