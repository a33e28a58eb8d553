"""Dynamic micro-batching: the Batcher itself, and /encode and /elbo through it over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
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

from service.batching import EARLY_ROWS, Batcher, Gatherer, QueueFull
from service.bundle import ScoreName as Score
from service.bundle import load_bundle
from service.inference import BatchPolicy, Model, available_cpus
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, noise, stroke

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
    assert "batch queue holds 2 requests (VAE_MAX_QUEUE = 2); retry later" in str(refused[0])
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


class ThreadRecorder(Recorder):
    """A Recorder that also notes whether each call ran on the event loop's thread."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__(gate)
        self.on_loop: list[bool] = []

    def __call__(self, x: F32) -> tuple[F32, F32]:
        self.on_loop.append(threading.current_thread() is threading.main_thread())
        return super().__call__(x)


def gather(fn: Recorder, inline_max_rows: int = 16, **policy: Any) -> Gatherer:
    options = {"max_delay_s": 0.0, **policy}
    return Gatherer(batcher(fn, **options), inline_max_rows)


async def call_all(gatherer: Gatherer, inputs: list[F32]) -> list[Any]:
    """Every input in its own task, all at once; each outcome (outputs or exception), in order."""
    return await asyncio.gather(*(gatherer(x) for x in inputs), return_exceptions=True)


def test_gathered_calls_share_jobs_and_each_gets_exactly_its_own_rows() -> None:
    fn = ThreadRecorder()
    gatherer = gather(fn, max_batch_size=8)
    inputs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(REQUESTS)]
    results = asyncio.run(call_all(gatherer, inputs))
    gatherer.batcher.close()
    for x, (doubled, total) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(doubled, 2 * x)
        np.testing.assert_array_equal(total, x.sum(axis=1))
    assert sum(fn.calls) == sum(len(x) for x in inputs)
    assert max(fn.calls) <= 8 and len(fn.calls) < REQUESTS / 2  # shared, never over a batch
    assert not any(fn.on_loop) and gatherer.out == 0  # in the batcher's thread, all back


@pytest.mark.parametrize(
    "rows, inline_max_rows, on_loop",
    [(1, 16, True), (16, 16, True), (17, 16, False), (1, 0, False)],
)
def test_a_lone_small_call_runs_on_the_event_loop(
    rows: int, inline_max_rows: int, on_loop: bool
) -> None:
    fn = ThreadRecorder()
    gatherer = gather(fn, inline_max_rows)
    x = np.ones((rows, 2), dtype=np.float32)
    doubled, _ = asyncio.run(gatherer(x))
    gatherer.batcher.close()
    np.testing.assert_array_equal(doubled, 2 * x)
    assert fn.on_loop == [on_loop]


def test_while_a_job_is_out_a_lone_call_joins_the_batcher() -> None:
    gate = threading.Event()
    fn = ThreadRecorder(gate)
    gatherer = gather(fn)
    x = np.ones((1, 2), dtype=np.float32)

    async def scenario() -> None:
        first = asyncio.gather(*(gatherer(x) for _ in range(2)))  # two: handed to the batcher
        while not fn.entered.is_set():
            await asyncio.sleep(0.001)
        assert gatherer.out == 1
        second = asyncio.ensure_future(gatherer(x))  # alone, but one job is out
        await asyncio.sleep(0.01)
        gate.set()
        await first
        await second

    asyncio.run(scenario())
    gatherer.batcher.close()
    assert fn.on_loop == [False, False] and fn.calls == [2, 1]


def test_parked_rows_go_to_the_batcher_early_once_enough_are_parked() -> None:
    fn = Recorder()
    gatherer = gather(fn)
    assert gatherer.early_rows == EARLY_ROWS == 8
    submitted: list[tuple[int, int]] = []
    submit = gatherer.batcher.submit

    def spy(x: F32, requests: int = 1) -> Any:
        submitted.append((len(x), requests))
        return submit(x, requests)

    gatherer.batcher.submit = spy  # type: ignore[method-assign]
    inputs = [np.full((4, 2), i, dtype=np.float32) for i in range(3)]
    results = asyncio.run(call_all(gatherer, inputs))
    gatherer.batcher.close()
    # the first two (8 rows) left as soon as the second was parked; the third at the round's end
    assert submitted == [(8, 2), (4, 1)]
    for x, (doubled, _) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(doubled, 2 * x)


def test_a_full_queue_refuses_whole_groups_and_the_rest_complete() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    gatherer = gather(fn, inline_max_rows=0, max_queue=2, workers=1)
    x = np.ones((1, 2), dtype=np.float32)

    async def scenario() -> list[Any]:
        running = asyncio.ensure_future(gatherer(x))
        while not fn.entered.is_set():  # the worker holds it: the queue is empty again
            await asyncio.sleep(0.001)
        waiting = asyncio.ensure_future(call_all(gatherer, [x] * 3))  # one job of 3 requests
        await asyncio.sleep(0.01)
        refused = await call_all(gatherer, [x] * 2)  # 3 wait, over VAE_MAX_QUEUE = 2
        gate.set()
        return [await running, *await waiting, *refused]

    outcomes = asyncio.run(scenario())
    gatherer.batcher.close()
    assert all(isinstance(o, tuple) for o in outcomes[:4])
    assert all(isinstance(o, QueueFull) for o in outcomes[4:])
    assert "batch queue holds 3 requests (VAE_MAX_QUEUE = 2); retry later" in str(outcomes[4])
    assert fn.calls == [1, 3] and gatherer.out == 0


@pytest.mark.parametrize("inline_max_rows", [16, 0])
def test_a_failing_call_fails_every_gathered_caller(inline_max_rows: int) -> None:
    def broken(x: F32) -> tuple[F32]:
        raise RuntimeError("onnxruntime fell over")

    gatherer = Gatherer(batcher(broken), inline_max_rows)
    inputs = [np.ones((1, 2), dtype=np.float32)] * 4
    for outcome in [
        *asyncio.run(call_all(gatherer, inputs)),
        *asyncio.run(call_all(gatherer, inputs[:1])),
    ]:
        assert isinstance(outcome, RuntimeError) and "fell over" in str(outcome)
    gatherer.batcher.close()
    assert gatherer.out == 0


def test_after_close_gathered_calls_still_complete_off_the_loop() -> None:
    fn = ThreadRecorder()
    gatherer = gather(fn)
    gatherer.batcher.close()
    inputs = [np.full((1, 2), i, dtype=np.float32) for i in range(3)]
    results = asyncio.run(call_all(gatherer, inputs))
    assert [r[0].tolist() for r in results] == [[[0.0, 0.0]], [[2.0, 2.0]], [[4.0, 4.0]]]
    assert fn.calls == [3] and fn.on_loop == [False] and gatherer.out == 0


def test_a_cancelled_caller_leaves_the_others_their_rows() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    gatherer = gather(fn)
    inputs = [np.full((1, 2), i, dtype=np.float32) for i in range(3)]

    async def scenario() -> list[Any]:
        tasks = [asyncio.ensure_future(gatherer(x)) for x in inputs]
        while not fn.entered.is_set():
            await asyncio.sleep(0.001)
        tasks[1].cancel()  # its client went away while the batch ran
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, cancelled, last = asyncio.run(scenario())
    gatherer.batcher.close()
    assert isinstance(cancelled, asyncio.CancelledError)
    assert first[0].tolist() == [[0.0, 0.0]] and last[0].tolist() == [[4.0, 4.0]]


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
    # a gathered job is taken whole, so more than VAE_MAX_QUEUE requests may be waiting
    assert re.search(
        r"encoder batch queue holds \d+ requests \(VAE_MAX_QUEUE = 1\); retry later",
        busy[0].json()["detail"],
    )


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


def test_gathered_decoder_calls_equal_unbatched(make_client: MakeClient) -> None:
    """/sample and /decode from many threads at once, through the gatherer, against no batching."""

    def run_all(client: TestClient) -> list[Any]:
        def one(i: int) -> Any:
            sample = client.get("/sample", params={"n": 1 + i % 3, "seed": i, "format": "arrays"})
            z = sample.json()["z"]
            decoded = client.post("/decode", json={"z": z}, params={"format": "arrays"})
            assert sample.status_code == decoded.status_code == 200, decoded.text
            return sample.json()["arrays"], decoded.json()["arrays"]

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(one, range(REQUESTS)))

    with make_client(batching=False, inline_max_rows=0) as client:
        alone = run_all(client)
    with make_client(batching=True) as client:
        gathered = run_all(client)
    assert gathered == alone
    assert all(sampled == decoded for sampled, decoded in gathered)  # same z, same images


@pytest.mark.parametrize("score", ["neg_elbo", "neg_iwae", "recon_error", "blur_recon_rel"])
def test_evaluate_gathered_equals_evaluate(tiny_bundle: Path, score: Score) -> None:
    """The same steps of math, network calls gathered on the event loop or made in the thread."""
    bundle = load_bundle(tiny_bundle)
    policy = BatchPolicy(max_batch_size=64, max_delay_s=0.0, max_queue=256, workers=1)
    model = Model(bundle, Metrics(), policy, inline_max_rows=16)
    x = np.stack([stroke(4 + 2 * i) for i in range(3)])[:, None]  # (3, 1, 28, 28)
    options: dict[str, Any] = {"samples": 2, "k": 5, "score": score, "score_draws": 5, "seed": 3}

    async def concurrently() -> list[Any]:  # several at once: their calls share jobs
        return await asyncio.gather(*(model.evaluate_gathered(x, **options) for _ in range(4)))

    gathered = asyncio.run(concurrently())
    alone = Model(bundle, Metrics()).evaluate(x, **options)
    model.close()
    for result in gathered:
        for got, want in [
            (result.terms.elbo, alone.terms.elbo),
            (result.terms.kl, alone.terms.kl),
            (result.iwae, alone.iwae),
            (result.score, alone.score),
        ]:
            np.testing.assert_array_equal(got, want)


def test_reconstruct_gathered_equals_reconstruct(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    policy = BatchPolicy(max_batch_size=64, max_delay_s=0.0, max_queue=256, workers=1)
    model = Model(bundle, Metrics(), policy, inline_max_rows=16)
    inputs = [np.stack([stroke(4 + i), noise(i)])[:, None] for i in range(4)]

    async def concurrently() -> list[Any]:
        return await asyncio.gather(*(model.reconstruct_gathered(x) for x in inputs))

    gathered = asyncio.run(concurrently())
    model.close()
    alone = Model(bundle, Metrics())
    for x, got in zip(inputs, gathered, strict=True):
        np.testing.assert_array_equal(got, alone.reconstruct(x))
