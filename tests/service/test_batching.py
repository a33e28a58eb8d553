"""Micro-batching as clients and callers see it: batched equals unbatched, a full queue answers 503,
a failure reaches every caller, and the event loop is never blocked by work that grows."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import service.batching
from service.batching import INLINE_ROWS, MicroBatcher, QueueFull
from service.bundle import Bundle, ScoreName, load_bundle
from service.metrics import Metrics
from service.runtime import Runtime, available_cpus
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise, stroke

REQUESTS = 12
NETWORK_S = 0.02  # a slow network: calls made while one runs queue up and share the next


@pytest.fixture
def slow_networks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every onnxruntime call takes NETWORK_S longer; yields the row counts of encoder calls."""
    encode_rows, decode_rows = Bundle.encode, Bundle.decode
    calls: list[int] = []

    def slow_encode(self: Bundle, x: Any) -> Any:
        calls.append(len(x))
        time.sleep(NETWORK_S)
        return encode_rows(self, x)

    def slow_decode(self: Bundle, z: Any) -> Any:
        time.sleep(NETWORK_S)
        return decode_rows(self, z)

    monkeypatch.setattr(Bundle, "encode", slow_encode)
    monkeypatch.setattr(Bundle, "decode", slow_decode)
    yield calls


def post(client: TestClient, path: str, body: bytes, seed: int, **params: Any) -> Any:
    """POST one image with `seed`; the JSON body."""
    response = client.post(path, files=files(body), params={**params, "seed": seed})
    assert response.status_code == 200, response.text
    return response.json()


def post_all(client: TestClient, path: str, bodies: list[bytes], **params: Any) -> list[Any]:
    """POST one image per request, all at once from as many threads; the JSON bodies, in order."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(
            pool.map(lambda i: post(client, path, bodies[i], i, **params), range(len(bodies)))
        )


@pytest.mark.parametrize(
    "path, params",
    [
        ("/encode", {"sample": "true"}),
        ("/elbo", {"k": 8, "samples": 2}),
        ("/elbo", {"score": "blur_recon_rel"}),
    ],
)
def test_batched_results_equal_unbatched(
    make_client: MakeClient, slow_networks: list[int], path: str, params: dict[str, Any]
) -> None:
    bodies = [encode(noise(seed)) for seed in range(REQUESTS)]
    with make_client() as client:
        alone = [post(client, path, body, i, **params) for i, body in enumerate(bodies)]
        calls_alone = len(slow_networks)
        together = post_all(client, path, bodies, **params)
    assert calls_alone == REQUESTS + 1  # the warm-up, then one call per request
    assert together == alone  # bit for bit: eps is drawn per request, the networks are row-wise
    assert len({str(body["results"]) for body in alone}) == REQUESTS  # distinct images, rows
    assert max(slow_networks) > 1  # concurrent requests did share encoder calls


def test_a_full_queue_answers_503_with_retry_after(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.batching, "MAX_QUEUE", 2)
    gate = threading.Event()
    original = Bundle.encode
    monkeypatch.setattr(Bundle, "encode", lambda self, x: (gate.wait(10), original(self, x))[1])
    gate.set()  # the warm-up passes
    with make_client() as client:
        gate.clear()
        body = files(*[encode(stroke())] * (INLINE_ROWS + 1))  # computed in worker threads
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client.post, "/encode", files=body) for _ in range(12)]
            deadline = time.monotonic() + 10
            while not any(f.done() for f in futures) and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            responses = [f.result() for f in futures]
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.status_code == 200 for r in responses if r not in busy)
    assert busy[0].headers["retry-after"] == "1"
    assert busy[0].json()["detail"] == "server busy: 2 requests wait for the encoder; retry later"


def test_work_that_grows_never_blocks_the_event_loop(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request over INLINE_ROWS rows computes in a worker thread: /healthz answers meanwhile."""
    original = Bundle.encode
    slow = threading.Event()

    def slow_encode(self: Bundle, x: Any) -> Any:
        if slow.is_set():
            time.sleep(1.0)  # stands in for a long onnxruntime call
        return original(self, x)

    monkeypatch.setattr(Bundle, "encode", slow_encode)
    with make_client() as client:
        slow.set()
        body = files(*[encode(stroke(i % 20)) for i in range(INLINE_ROWS + 1)])
        request = threading.Thread(target=lambda: client.post("/encode", files=body))
        request.start()
        time.sleep(0.2)
        start = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        assert time.perf_counter() - start < 0.5
        request.join()


@pytest.fixture(scope="module")
def runtime(tiny_bundle: Path) -> Runtime:
    return Runtime(load_bundle(tiny_bundle), Metrics(), max_rows=8192, parallel_calls=2)


@pytest.mark.parametrize("score", ["neg_elbo", "neg_iwae", "recon_error", "blur_recon_rel"])
def test_concurrent_evaluations_equal_each_alone(
    runtime: Runtime, slow_networks: list[int], score: ScoreName
) -> None:
    inputs = [np.stack([stroke(4 + i), noise(i)])[:, None] for i in range(5)]  # (2, 1, 28, 28)
    options: dict[str, Any] = {"samples": 2, "k": 5, "score": score, "score_draws": 5, "seed": 3}

    async def alone() -> list[Any]:
        return [await runtime.evaluate(x, **options) for x in inputs]

    async def together() -> list[Any]:
        return await asyncio.gather(*(runtime.evaluate(x, **options) for x in inputs))

    for got, want in zip(asyncio.run(together()), asyncio.run(alone()), strict=True):
        for a, b in [
            (got.terms.elbo, want.terms.elbo),
            (got.terms.kl, want.terms.kl),
            (got.iwae, want.iwae),
            (got.score, want.score),
        ]:
            np.testing.assert_array_equal(a, b)
    assert max(slow_networks) > 2  # the evaluations shared encoder calls


def test_concurrent_reconstructions_and_decodes_equal_each_alone(
    runtime: Runtime, slow_networks: list[int]
) -> None:
    inputs = [np.stack([stroke(4 + i), noise(i)])[:, None] for i in range(4)]
    z = [np.random.default_rng(i).standard_normal((1 + i, 8), dtype=np.float32) for i in range(4)]

    async def together() -> tuple[list[Any], list[Any]]:
        recon = asyncio.gather(*(runtime.reconstruct(x) for x in inputs))
        decoded = asyncio.gather(*(runtime.decode(rows) for rows in z))
        return await recon, await decoded

    async def alone() -> tuple[list[Any], list[Any]]:
        return [await runtime.reconstruct(x) for x in inputs], [await runtime.decode(r) for r in z]

    (recon, decoded), (recon_alone, decoded_alone) = asyncio.run(together()), asyncio.run(alone())
    for got, want in zip(recon + decoded, recon_alone + decoded_alone, strict=True):
        np.testing.assert_array_equal(got, want)


def rows_times_ten(x: Any) -> tuple[Any, ...]:
    time.sleep(0.01)
    return (x * 10, x[:, :1])


def test_each_caller_gets_exactly_its_own_rows() -> None:
    batcher = MicroBatcher(
        "test", rows_times_ten, parallel_calls=1, queue_time=Metrics().queue_time.labels("t")
    )
    inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(20)]

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(batcher(x) for x in inputs))

    for x, (times_ten, first) in zip(inputs, asyncio.run(scenario()), strict=True):
        np.testing.assert_array_equal(times_ten, x * 10)
        np.testing.assert_array_equal(first, x[:, :1])


def test_a_failing_call_fails_every_caller_and_the_next_calls_run() -> None:
    failing = threading.Event()

    def fn(x: Any) -> tuple[Any, ...]:
        time.sleep(0.01)
        if failing.is_set():
            raise RuntimeError("onnxruntime failed")
        return (x,)

    batcher = MicroBatcher(
        "test", fn, parallel_calls=1, queue_time=Metrics().queue_time.labels("t")
    )

    async def scenario() -> list[Any]:
        calls = [batcher(np.full((1, 2), i, np.float32)) for i in range(6)]
        return await asyncio.gather(*calls, return_exceptions=True)

    failing.set()
    assert all(isinstance(r, RuntimeError) for r in asyncio.run(scenario()))
    failing.clear()
    assert [r[0][0, 0] for r in asyncio.run(scenario())] == list(range(6))


def test_a_cancelled_caller_leaves_the_others_their_rows() -> None:
    batcher = MicroBatcher(
        "test", rows_times_ten, parallel_calls=1, queue_time=Metrics().queue_time.labels("t")
    )

    async def scenario() -> list[Any]:
        tasks = [asyncio.ensure_future(batcher(np.full((1, 2), i, np.float32))) for i in range(5)]
        await asyncio.sleep(0)  # all queued; the first call is out
        tasks[2].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r[0][0, 0] for i, r in enumerate(results) if i != 2] == [0, 10, 30, 40]


def test_a_full_queue_refuses_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service.batching, "MAX_QUEUE", 3)
    batcher = MicroBatcher(
        "test", rows_times_ten, parallel_calls=1, queue_time=Metrics().queue_time.labels("t")
    )

    async def scenario() -> list[Any]:
        calls = [batcher(np.full((1, 2), i, np.float32)) for i in range(6)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(scenario())
    assert [isinstance(r, QueueFull) for r in results] == [False] * 3 + [True] * 3


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
