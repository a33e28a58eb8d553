"""Dynamic micro-batching: concurrent calls of one network are gathered into one onnxruntime call.

Like Triton's dynamic batcher: a caller's rows wait in a bounded queue until `max_batch_size`
rows are queued or the oldest has waited `max_delay_s`; one worker then runs the concatenated
rows and hands every caller back exactly its own slice. Calls are row-wise (row i of the output
depends only on row i of the input), so what a request is batched with never changes its result;
everything random (eps) is drawn per request before its rows reach the queue.

Callers are the route's worker threads (the model code is synchronous), so a caller blocks on a
`concurrent.futures.Future`; onnxruntime releases the GIL, so workers run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

from service.objective import F32

log = logging.getLogger(__name__)

Outputs = tuple[F32, ...]
RowFunction = Callable[[F32], Outputs]
CLOSE_TIMEOUT_S = 10.0


class QueueFull(RuntimeError):
    """The batch queue holds `max_queue` requests; the server answers 503 with Retry-After."""


@dataclass
class _Job:
    x: F32
    requests: int = 1
    arrived: float = field(default_factory=time.perf_counter)
    future: Future[Outputs] = field(default_factory=Future)


class Batcher:
    """Gathers concurrent `fn(x)` calls on row batches into one call of `fn` on all the rows."""

    def __init__(
        self,
        name: str,
        fn: RowFunction,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        workers: int,
        queue_time: Histogram,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or workers < 1 or max_delay_s < 0:
            raise ValueError(
                f"batcher {name}: max_batch_size ({max_batch_size}), max_queue ({max_queue}) and "
                f"workers ({workers}) must be >= 1 and max_delay_s ({max_delay_s}) >= 0"
            )
        self.name = name
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.queue_time = queue_time
        self._queue: deque[_Job] = deque()
        self._rows = 0  # rows in the queue
        self._requests = 0  # requests in the queue
        self._closed = False
        self._ready = threading.Condition()
        self._gathering = threading.Lock()  # one worker gathers while the others run
        self._workers = [
            threading.Thread(target=self._work, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def __call__(self, x: F32) -> Outputs:
        """`fn(x)`, run in a batch with concurrent callers; QueueFull when the queue is full.

        A request with `max_batch_size` rows or more is a full batch by itself and runs at once
        in the caller's thread, as does every call after `close()` (in-flight requests finish).
        """
        if len(x) >= self.max_batch_size:
            return self.fn(x)
        future = self.submit(x)
        if future is None:
            return self.fn(x)
        return future.result()

    def submit(self, x: F32, requests: int = 1) -> Future[Outputs] | None:
        """Queue `x`, the rows of `requests` requests, without waiting for it; None once closed
        (the caller then runs `fn` itself).

        QueueFull when `max_queue` requests already wait; a job is taken whole, so the queue may
        go over by less than one job.
        """
        job = _Job(x, requests)
        with self._ready:
            if self._closed:
                return None
            if self._requests >= self.max_queue:
                raise QueueFull(
                    f"server busy: the {self.name} batch queue holds {self._requests} "
                    f"requests (VAE_MAX_QUEUE = {self.max_queue}); retry later"
                )
            self._queue.append(job)
            self._rows += len(x)
            self._requests += requests
            self._ready.notify()
        return job.future

    def close(self) -> None:
        """Run what is queued, stop the workers; later calls run unbatched in their own thread."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for worker in self._workers:
            worker.join(timeout=CLOSE_TIMEOUT_S)

    def _work(self) -> None:
        while True:
            with self._gathering:
                jobs = self._gather()
            if not jobs:
                return
            self._run(jobs)

    def _gather(self) -> list[_Job]:
        """Wait for the first job, then for more until the batch is full or the delay is up."""
        with self._ready:
            while not self._queue:
                if self._closed:
                    return []
                self._ready.wait()
            deadline = self._queue[0].arrived + self.max_delay_s
            while self._rows < self.max_batch_size and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            jobs = [self._queue.popleft()]
            rows = len(jobs[0].x)
            while self._queue and rows + len(self._queue[0].x) <= self.max_batch_size:
                jobs.append(self._queue.popleft())
                rows += len(jobs[-1].x)
            self._rows -= rows
            self._requests -= sum(job.requests for job in jobs)
            return jobs

    def _run(self, jobs: Sequence[_Job]) -> None:
        start = time.perf_counter()
        for job in jobs:
            self.queue_time.observe(start - job.arrived)
        try:
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([job.x for job in jobs])
            outputs = self.fn(x)
        except BaseException as exc:  # every caller must hear about it, never hang
            _fail([(job.x, job.future) for job in jobs], exc)
            if not isinstance(exc, Exception):
                raise
            return
        _deliver([(job.x, job.future) for job in jobs], outputs)


# Parked rows are handed to the batcher as soon as there are this many, rather than only once
# the event loop has run everything ready: with 32 requests arriving together, a worker starts
# on the first ones while the loop still parses the rest, instead of the loop and the workers
# taking turns. /encode (1 PNG) at concurrency 32, bench/serving.py's load, three rounds
# interleaved: 8 rows 2,652 / 2,479 / 2,436 req/s; 4 rows 2,405 / 2,394 / 2,350; 1 row 2,290 /
# 2,428 / 2,075; only at the end of the loop's round 2,256 / 2,311 / 2,120.
EARLY_ROWS = 8
_Parked = tuple[F32, "asyncio.Future[Outputs]"]  # a call's rows and the future it awaits
# a caller's rows and its future: a thread's (Batcher) or the event loop's (Gatherer)
_Waiting = tuple[F32, "Future[Outputs] | asyncio.Future[Outputs]"]


class Gatherer:
    """Gathers one network's calls made on the event loop, so that concurrent requests share one
    thread hop instead of paying one each.

    A call parks its rows and awaits them. Parked calls are taken together once the event loop
    has run everything that was ready before them (`loop.call_soon`), so requests that arrived
    together meet, or as soon as two or more calls have EARLY_ROWS rows parked. A lone call of
    at most `inline_max_rows` rows, with nothing of this gatherer's out in the batcher, runs
    right there on the event loop (no hop: the lowest latency for an idle server); otherwise the
    parked calls go to the batcher as one job per `max_batch_size` rows, and the event loop
    serves HTTP while a worker thread runs them.
    """

    def __init__(self, batcher: Batcher, inline_max_rows: int) -> None:
        self.batcher = batcher
        self.inline_max_rows = inline_max_rows
        self.out = 0  # jobs handed to the batcher and not yet back
        self._parked: list[_Parked] = []
        self._parked_rows = 0
        self._scheduled = False
        self.early_rows = min(EARLY_ROWS, batcher.max_batch_size)

    async def __call__(self, x: F32) -> Outputs:
        """`fn(x)`; QueueFull when the batcher's queue is full."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        self._parked.append((x, future))
        self._parked_rows += len(x)
        if len(self._parked) > 1 and self._parked_rows >= self.early_rows:  # see EARLY_ROWS
            self._take(loop)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._scheduled_take, loop)
        return await future

    def _scheduled_take(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._take(loop)

    def _take(self, loop: asyncio.AbstractEventLoop) -> None:
        parked, self._parked, self._parked_rows = self._parked, [], 0
        if not parked:  # taken early already
            return
        if len(parked) == 1 and self.out == 0 and len(parked[0][0]) <= self.inline_max_rows:
            try:
                outputs = self.batcher.fn(parked[0][0])
            except Exception as exc:
                _fail(parked, exc)
            else:
                _deliver(parked, outputs)
            return
        group: list[_Parked] = []
        rows = 0
        for x, future in parked:
            if group and rows + len(x) > self.batcher.max_batch_size:
                self._hand_over(group, loop)
                group, rows = [], 0
            group.append((x, future))
            rows += len(x)
        self._hand_over(group, loop)

    def _hand_over(self, group: list[_Parked], loop: asyncio.AbstractEventLoop) -> None:
        x = group[0][0] if len(group) == 1 else np.concatenate([x for x, _ in group])
        try:
            job = self.batcher.submit(x, requests=len(group))
        except QueueFull as exc:
            _fail(group, exc)
            return
        self.out += 1
        if job is None:  # closed: the model is being replaced; finish these in a worker thread
            loop.run_in_executor(None, self.batcher.fn, x).add_done_callback(
                lambda done: self._back(group, done)
            )
        else:
            job.add_done_callback(lambda done: loop.call_soon_threadsafe(self._back, group, done))

    def _back(self, group: list[_Parked], done: Future[Outputs] | asyncio.Future[Outputs]) -> None:
        self.out -= 1
        exc = done.exception()
        if exc is None:
            _deliver(group, done.result())
        else:
            _fail(group, exc)


def _fail(group: Sequence[_Waiting], exc: BaseException) -> None:
    for _, future in group:
        if not future.done():  # done: cancelled, its client gone
            future.set_exception(exc)


def _deliver(group: Sequence[_Waiting], outputs: Outputs) -> None:
    """Give each caller exactly its own rows of the group's outputs."""
    offset = 0
    for x, future in group:
        rows = slice(offset, offset + len(x))
        offset = rows.stop
        if not future.done():
            future.set_result(tuple(out[rows] for out in outputs))
