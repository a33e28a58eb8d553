"""Dynamic micro-batching: the Batcher itself, and /encode and /elbo through it over HTTP."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import Histogram
from pydantic import ValidationError

from service.batching import Batcher, QueueFull
from service.inference import available_cpus
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise

F32 = np.ndarray[Any, np.dtype[np.float32]]
REQUESTS = 48


def histogram() -> Any:
    return Histogram("queue_seconds", "test", ["network"], registry=None).labels("test")


class Recorder:
    """A row-wise function (rows times two, and their sum) that records the batch sizes it saw."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, x: F32) -> tuple[F32, F32]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append(len(x))
        return 2 * x, x.sum(axis=1)


def batcher(fn: Callable[[F32], tuple[F32, ...]], **policy: Any) -> Batcher:
    options = {"max_batch_size": 64, "max_delay_s": 0.05, "max_queue": 256, "workers": 1}
    return Batcher("test", fn, **{**options, **policy}, queue_time=histogram())


def test_each_caller_gets_exactly_its_own_rows() -> None:
    fn = Recorder()
    batches = batcher(fn)
    inputs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(REQUESTS)]
    with ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(batches, inputs))
    batches.close()
    for x, (doubled, total) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(doubled, 2 * x)
        np.testing.assert_array_equal(total, x.sum(axis=1))
    assert sum(fn.calls) == sum(len(x) for x in inputs)
    assert len(fn.calls) < REQUESTS / 4 and max(fn.calls) <= 64  # really batched, never over


def test_a_lone_request_waits_at_most_the_delay() -> None:
    batches = batcher(Recorder(), max_delay_s=0.02)
    start = time.perf_counter()
    batches(np.ones((1, 4), dtype=np.float32))
    assert time.perf_counter() - start < 0.5
    batches.close()


def test_a_full_batch_runs_at_once_in_the_callers_thread() -> None:
    fn = Recorder()
    batches = batcher(fn, max_batch_size=4, max_delay_s=10.0)
    doubled, _ = batches(np.ones((4, 2), dtype=np.float32))
    assert fn.calls == [4] and doubled.shape == (4, 2)
    batches.close()


def test_a_full_queue_refuses_and_the_rest_complete() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    batches = batcher(fn, max_queue=2, max_batch_size=2, max_delay_s=0.0)
    x = np.ones((1, 4), dtype=np.float32)
    with ThreadPoolExecutor(8) as pool:
        running = pool.submit(batches, x)
        assert fn.entered.wait(10)  # the worker holds it: the queue is empty again
        futures = [pool.submit(batches, x) for _ in range(7)]
        deadline = time.monotonic() + 5
        while sum(f.done() for f in futures) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        outcomes = [f.exception(timeout=10) for f in futures]
    assert running.exception() is None
    refused = [e for e in outcomes if e is not None]
    # 1 running, 2 waiting, 5 refused
    assert len(refused) == 5 and all(isinstance(e, QueueFull) for e in refused)
    assert "batch queue holds 2 requests (VAE_MAX_QUEUE); retry later" in str(refused[0])
    assert sum(fn.calls) == 3
    batches.close()


def test_a_failing_call_fails_every_caller_of_the_batch() -> None:
    def broken(x: F32) -> tuple[F32]:
        raise RuntimeError("onnxruntime fell over")

    batches = batcher(broken)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batches, np.ones((1, 2), dtype=np.float32)) for _ in range(4)]
        for future in futures:
            with pytest.raises(RuntimeError, match="fell over"):
                future.result(timeout=10)
    batches.close()


def test_after_close_calls_run_unbatched() -> None:
    fn = Recorder()
    batches = batcher(fn)
    batches.close()
    doubled, _ = batches(np.ones((1, 2), dtype=np.float32))
    assert fn.calls == [1] and doubled.tolist() == [[2.0, 2.0]]


@pytest.mark.parametrize(
    "setting, value",
    [
        ("max_batch_size", 0),
        ("max_batch_delay_ms", -1),
        ("max_queue", 0),
        ("batching", "maybe"),
        ("inline_max_rows", -1),
        ("inline_max_rows", 70000),
    ],
)
def test_bad_batching_settings_stop_start_up(setting: str, value: object) -> None:
    with pytest.raises(ValidationError, match=setting):
        Settings(**{setting: value})


def images(count: int) -> list[bytes]:
    return [encode(noise(seed)) for seed in range(count)]


def post_all(client: TestClient, path: str, bodies: list[bytes], **params: Any) -> list[Any]:
    """POST one image per request, all at once from as many threads; the JSON bodies, in order."""

    def post(i: int) -> Any:
        response = client.post(path, files=files(bodies[i]), params={**params, "seed": i})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, range(len(bodies))))


@pytest.mark.parametrize(
    "path, params", [("/encode", {"sample": "true"}), ("/elbo", {"k": 8, "samples": 2})]
)
def test_batched_results_equal_unbatched(
    make_client: MakeClient, path: str, params: dict[str, Any]
) -> None:
    bodies = images(REQUESTS)
    with make_client(batching=False, inline_max_rows=0) as client:
        alone = post_all(client, path, bodies, **params)
    with make_client(batching=True) as client:  # small requests run on the event loop
        inline = post_all(client, path, bodies, **params)
    with make_client(batching=True, max_batch_delay_ms=20, inline_max_rows=0) as client:
        batched = post_all(client, path, bodies, **params)
        metrics = client.get("/metrics").text
    assert batched == alone  # bit for bit: eps is drawn per request, the networks are row-wise
    assert inline == alone
    assert len({str(body["results"]) for body in alone}) == REQUESTS  # distinct images, rows
    calls = float(metrics.split('vae_batch_size_count{network="encoder"} ')[1].split()[0])
    assert calls < REQUESTS  # some requests shared an encoder call (plus the warm-up)
    assert 'vae_batch_queue_seconds_bucket{le="0.001",network="encoder"}' in metrics


def test_a_full_queue_answers_503_with_retry_after(make_client: MakeClient) -> None:
    gate = threading.Event()
    with make_client(
        batching=True, max_queue=1, max_batch_size=2, max_batch_delay_ms=0, inline_max_rows=0
    ) as client:
        model = client.app.state.model  # type: ignore[attr-defined]
        run = model._encoder.fn
        model._encoder.fn = lambda x: (gate.wait(10), run(x))[1]
        body = images(1)[0]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client.post, "/encode", files=files(body)) for _ in range(12)]
            deadline = time.monotonic() + 10
            while not any(f.done() for f in futures) and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            responses = [f.result() for f in futures]
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.status_code == 200 for r in responses if r not in busy)
    assert busy[0].headers["retry-after"] == "1"
    assert "encoder batch queue holds 1 requests (VAE_MAX_QUEUE)" in busy[0].json()["detail"]


@pytest.mark.parametrize(
    "cpu_max, expected",
    [("max 100000", None), ("200000 100000", 2), ("50000 100000", 1), ("garbage", None)],
)
def test_available_cpus_honours_a_cgroup_quota(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "cpu.max") == min(expected or affinity, affinity)
    assert available_cpus(tmp_path / "absent") == affinity
