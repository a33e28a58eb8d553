"""Lifecycle of a real `vae serve` process: hot reload under load, SIGHUP, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live import live_server
from tests.service.helpers import encode, files, noise, rewrite_manifest

SLOW = {"k": 1000}  # 64 images x k=1000: 64,000 decoder rows, about 3 s on two cores
KEY = {"X-API-Key": "s3cret"}


def slow_body(count: int = 64) -> list[tuple[str, tuple[str, bytes, str]]]:
    return files(*[encode(noise(seed)) for seed in range(count)])


@contextmanager
def server(
    bundle: Path, **env: str
) -> Iterator[tuple[subprocess.Popen[str], httpx.Client, list[str]]]:
    """A ready server (its budget raised for SLOW requests, admin on with KEY); yields the process,
    a client sending KEY and, after it stops, its output."""
    env = {"VAE_MAX_ROWS": "64000", "VAE_API_KEY": KEY["X-API-Key"], **env}
    output: list[str] = []
    with (
        live_server(bundle, "--log-level", "info", env=env) as running,
        running.client(headers=KEY) as client,
    ):
        try:
            yield running.process, client, output
        finally:
            running.stop()
            output.append(running.output)


def in_background(call: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """Start `call(*args, **kwargs)` in a thread; the list receives its result."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call(*args, **kwargs)))
    thread.start()
    return thread, result


def wait_in_flight(client: httpx.Client, endpoint: str, count: int = 1) -> None:
    """Wait until the server has decoded the uploads of `count` requests to `endpoint`."""
    needle = f'vae_request_images_count{{endpoint="{endpoint}"}} '
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = client.get("/metrics").text
        if needle in text and float(text.split(needle)[1].split()[0]) >= count:
            return
        time.sleep(0.02)
    pytest.fail(f"no request reached {endpoint}")


def test_requests_in_flight_finish_on_the_model_they_started_with(
    tiny_bundle: Path, tiny_gaussian_bundle: Path, tmp_path: Path
) -> None:
    body = slow_body(32)
    # reload loads by name from the directory holding VAE_BUNDLE: both bundles side by side
    shutil.copytree(tiny_bundle, tmp_path / "bernoulli")
    shutil.copytree(tiny_gaussian_bundle, tmp_path / "gaussian")
    with server(tmp_path / "bernoulli") as (_, client, _output):
        before = client.post("/elbo", files=body, params=SLOW)
        assert before.status_code == 200
        thread, during = in_background(client.post, "/elbo", files=body, params=SLOW)
        wait_in_flight(client, "/elbo", count=2)
        swap = client.post("/admin/reload", json={"bundle": "gaussian"})
        assert swap.status_code == 200, swap.text
        assert swap.json()["current"]["name"] == "tiny-gaussian"
        assert client.get("/model").json()["likelihood"] == "gaussian"
        thread.join(timeout=60)
        assert during[0].status_code == 200
        assert during[0].json() == before.json()  # computed on the Bernoulli model throughout
        after = client.post("/elbo", files=body[:2], params={"k": 8}).json()["results"]
        assert after[0]["elbo"] != before.json()["results"][0]["elbo"]


def test_sighup_reloads_and_refuses_a_bad_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    rewrite_manifest(tiny_bundle, live)
    with server(live) as (process, client, output):
        assert client.get("/model").json()["version"] == "0.0.1"
        manifest = json.loads((live / "manifest.json").read_text())
        (live / "manifest.json").write_text(json.dumps({**manifest, "version": "0.0.2"}))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while client.get("/model").json()["version"] != "0.0.2":
            assert time.monotonic() < deadline, "SIGHUP did not reload the bundle"
            time.sleep(0.05)

        (live / "encoder.onnx").write_bytes(b"garbage")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while 'vae_model_reloads_total{result="refused"} 1.0' not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the bad bundle's reload was not refused"
            time.sleep(0.05)
        assert client.get("/model").json()["version"] == "0.0.2"
        assert client.post("/encode", json={"pixels": [[[0.5]]]}).status_code == 200
    assert "SIGHUP reload refused, still serving the old model" in output[0]
    assert "encoder.onnx has 7 bytes, the manifest says" in output[0]


def test_sigterm_turns_unready_then_drains_in_flight_requests(tiny_bundle: Path) -> None:
    env = {"VAE_SHUTDOWN_DELAY_S": "1.0"}
    with server(tiny_bundle, **env) as (process, client, output):
        url = str(client.base_url)
        thread, slow = in_background(client.post, "/elbo", files=slow_body(), params=SLOW)
        wait_in_flight(client, "/elbo")
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        readiness = []
        with httpx.Client(base_url=url, timeout=5.0) as probe:  # new connections, like a kubelet
            while thread.is_alive() and time.monotonic() - sent < 30:
                try:
                    readiness.append(probe.get("/readyz").status_code)
                except httpx.TransportError:
                    readiness.append(0)  # refused: uvicorn has stopped accepting
                time.sleep(0.05)
        thread.join(timeout=60)
        assert slow and slow[0].status_code == 200, "the in-flight request did not complete"
        assert len(slow[0].json()["results"]) == 64
        assert readiness[0] == 503 and 200 not in readiness
        assert set(readiness) <= {503, 0}
        process.wait(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM)
    assert "SIGTERM: not ready; draining in 1.0 s" in output[0]
    assert "Traceback" not in output[0]


@pytest.mark.parametrize("delay", ["0"])
def test_sigterm_without_delay_still_finishes_the_request(tiny_bundle: Path, delay: str) -> None:
    with server(tiny_bundle, VAE_SHUTDOWN_DELAY_S=delay) as (process, client, output):
        thread, slow = in_background(client.post, "/elbo", files=slow_body(), params=SLOW)
        wait_in_flight(client, "/elbo")
        os.kill(process.pid, signal.SIGTERM)
        thread.join(timeout=60)
        assert slow and slow[0].status_code == 200
        process.wait(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in output[0]


def test_workers_each_serve_on_their_own_socket_and_share_signals(tiny_bundle: Path) -> None:
    """`vae serve --workers 2`: two processes serve the port; SIGHUP reloads and SIGTERM stops
    both."""
    with live_server(tiny_bundle, "--workers", "2", "--log-level", "info") as running:
        children = Path(f"/proc/{running.process.pid}/task/{running.process.pid}/children")
        workers = [  # multiprocessing also starts its resource tracker
            pid
            for pid in children.read_text().split()
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 2
        deadline = time.monotonic() + 30  # the second worker may still be loading
        while running.output.count("ready: serving tiny-bernoulli") < 2:
            assert time.monotonic() < deadline, running.output
            time.sleep(0.1)
        for _ in range(8):  # a new connection each time: the kernel picks a worker for each
            with running.client() as client:
                assert client.post("/encode", json={"pixels": [[[0.5]]]}).status_code == 200
        running.process.send_signal(signal.SIGHUP)
        while running.output.count("reloaded tiny-bernoulli") < 2:
            assert time.monotonic() < deadline + 30, running.output
            time.sleep(0.1)
        assert running.stop() == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    assert "Traceback" not in running.output


def test_admin_reload_reaches_every_worker(tiny_bundle: Path, tmp_path: Path) -> None:
    """POST /admin/reload answered by one of two workers: the other loads the same bundle, and a
    later SIGHUP keeps it (both reload the announced bundle, not their start-up one)."""
    shutil.copytree(tiny_bundle, tmp_path / "v1")
    rewrite_manifest(tiny_bundle, tmp_path / "v2", version="0.0.2")
    env = {"VAE_API_KEY": KEY["X-API-Key"]}
    with live_server(tmp_path / "v1", "--workers", "2", "--log-level", "info", env=env) as running:
        deadline = time.monotonic() + 60  # the second worker may still be loading
        while running.output.count("ready: serving tiny-bernoulli") < 2:
            assert time.monotonic() < deadline, running.output
            time.sleep(0.1)

        def versions(connections: int = 24) -> set[str]:
            """The versions served, over new connections (the kernel spreads them)."""
            seen = set()
            for _ in range(connections):
                with running.client(headers=KEY) as client:
                    seen.add(client.get("/model").json()["version"])
            return seen

        assert versions() == {"0.0.1"}
        with running.client(headers=KEY) as client:
            swap = client.post("/admin/reload", json={"bundle": "v2"})
        assert swap.status_code == 200, swap.text
        assert swap.json()["current"]["version"] == "0.0.2"
        while running.output.count("reloaded tiny-bernoulli 0.0.2") < 2:
            assert time.monotonic() < deadline, running.output
            time.sleep(0.1)
        assert versions() == {"0.0.2"}
        running.process.send_signal(signal.SIGHUP)
        while running.output.count("reloaded tiny-bernoulli 0.0.2") < 4:
            assert time.monotonic() < deadline + 30, running.output
            time.sleep(0.1)
        assert versions() == {"0.0.2"}
        assert running.stop() == 0
    assert "Traceback" not in running.output
