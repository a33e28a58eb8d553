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
        job = _Job(x)
        with self._ready:
            closed = self._closed
            if not closed:
                if len(self._queue) >= self.max_queue:
                    raise QueueFull(
                        f"server busy: the {self.name} batch queue holds {self.max_queue} "
                        "requests (VAE_MAX_QUEUE); retry later"
                    )
                self._queue.append(job)
                self._rows += len(x)
                self._ready.notify()
        if closed:
            return self.fn(x)
        return job.future.result()

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
            return jobs

    def _run(self, jobs: Sequence[_Job]) -> None:
        start = time.perf_counter()
        for job in jobs:
            self.queue_time.observe(start - job.arrived)
        try:
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([job.x for job in jobs])
            outputs = self.fn(x)
        except BaseException as exc:  # every caller must hear about it, never hang
            for job in jobs:
                job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        offset = 0
        for job in jobs:
            rows = slice(offset, offset + len(job.x))
            job.future.set_result(tuple(out[rows] for out in outputs))
            offset = rows.stop
