"""One asyncio micro-batcher per network, in the style of Ray Serve's `@serve.batch`.

Callers `await batcher(x)` with a request's rows and get back exactly the outputs of those rows.
Calls that wait while the network is busy are concatenated into one onnxruntime call of at most
MAX_BATCH_ROWS rows, run in a worker thread (onnxruntime releases the GIL), and each caller is
handed its own slice. Calls are row-wise (row i of the output depends only on row i of the input)
and everything random (eps) is drawn per request before its rows arrive here, so what a request
is batched with never changes its result.

At most `parallel_calls` onnxruntime calls run at once (one per usable core by default); the
rest wait on the event loop, where waiting costs nothing, and the queue of waiting requests is
bounded (503 above). A lone call of at most INLINE_ROWS rows on an idle network runs at once on
the event loop: a thread hop would cost more than such a call.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Histogram

F32 = np.ndarray[Any, np.dtype[np.float32]]
Outputs = tuple[F32, ...]
RowFunction = Callable[[F32], Outputs]

# Rows per onnxruntime call: on CPU, images/s of the MNIST networks stop growing past ~64 rows
# (bench/serving.py, in-process table), while a larger call only holds its callers longer.
MAX_BATCH_ROWS = 64
# A call this small on an idle network runs on the event loop: ~30 us of onnxruntime against
# ~60 us for a thread hop and back (bench/serving.py, /encode at concurrency 1).
INLINE_ROWS = 16
# Requests waiting per network before new ones get 503 + Retry-After: at the MNIST encoder's
# ~2,500 req/s on 2 cores this is a tenth of a second of work, so retrying beats waiting longer.
MAX_QUEUE = 256
# Queued rows that start a call at once, rather than after the event loop has run everything that
# was ready: with 32 requests arriving together a worker starts on the first ones while the loop
# still parses the rest (bench/serving.py, /encode at concurrency 32: 8 rows 2,652 / 2,479 / 2,436
# req/s; only at the end of the loop's round 2,256 / 2,311 / 2,120).
EARLY_ROWS = 8


class QueueFull(RuntimeError):
    """The network's queue holds MAX_QUEUE requests; the server answers 503 with Retry-After."""


@dataclass
class _Call:
    x: F32
    future: asyncio.Future[Outputs]
    arrived: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """`await batcher(x)` is `fn(x)`, run in one onnxruntime call with concurrent callers' rows."""

    def __init__(
        self, name: str, fn: RowFunction, *, parallel_calls: int, queue_time: Histogram
    ) -> None:
        if parallel_calls < 1:
            raise ValueError(f"batcher {name}: parallel_calls must be >= 1, got {parallel_calls}")
        self.name = name
        self.fn = fn
        self.parallel_calls = parallel_calls
        self.queue_time = queue_time
        self._queue: deque[_Call] = deque()
        self._queued_rows = 0
        self._running = 0  # calls of `fn` now in worker threads
        self._scheduled = False

    async def __call__(self, x: F32) -> Outputs:
        """`fn(x)`; QueueFull when MAX_QUEUE requests already wait."""
        if len(self._queue) >= MAX_QUEUE:
            raise QueueFull(
                f"server busy: {len(self._queue)} requests wait for the {self.name}; retry later"
            )
        loop = asyncio.get_running_loop()
        call = _Call(x, loop.create_future())
        self._queue.append(call)
        self._queued_rows += len(x)
        if self._queued_rows >= EARLY_ROWS and len(self._queue) > 1:
            self._start(loop)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._scheduled_start, loop)
        return await call.future

    def _scheduled_start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once the loop has run everything that was ready: a lone small call runs right here."""
        self._scheduled = False
        if self._running == 0 and len(self._queue) == 1 and self._queued_rows <= INLINE_ROWS:
            call = self._queue.popleft()
            self._queued_rows = 0
            if not call.future.done():
                try:
                    call.future.set_result(self.fn(call.x))
                except Exception as exc:
                    call.future.set_exception(exc)
            return
        self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start calls on the queued rows while fewer than `parallel_calls` run."""
        while self._queue and self._running < self.parallel_calls:
            if self._queue[0].future.done():  # cancelled while queued: its client went away
                self._queued_rows -= len(self._queue.popleft().x)
                continue
            calls = [self._queue.popleft()]
            rows = len(calls[0].x)  # a call of MAX_BATCH_ROWS rows or more runs alone
            while self._queue and rows + len(self._queue[0].x) <= MAX_BATCH_ROWS:
                calls.append(self._queue.popleft())
                rows += len(calls[-1].x)
            self._queued_rows -= rows
            started = time.perf_counter()
            for call in calls:
                self.queue_time.observe(started - call.arrived)
            x = calls[0].x if len(calls) == 1 else np.concatenate([call.x for call in calls])
            self._running += 1
            done = loop.run_in_executor(None, self.fn, x)
            done.add_done_callback(functools.partial(self._finish, loop, calls))

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        calls: list[_Call],
        done: asyncio.Future[Outputs],
    ) -> None:
        self._running -= 1
        offset = 0
        for call in calls:
            rows = slice(offset, offset + len(call.x))
            offset = rows.stop
            if call.future.done():  # cancelled: its client went away
                continue
            if done.cancelled():  # the loop is closing
                call.future.cancel()
            elif (exc := done.exception()) is not None:
                call.future.set_exception(exc)
            else:
                call.future.set_result(tuple(out[rows] for out in done.result()))
        self._start(loop)
