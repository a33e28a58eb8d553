"""uvicorn's HTTP protocol (httptools) with the connection limits it lacks.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and, with h11 only, the size of
a request's head; with httptools (the fast parser, taken by default) a request line and headers
of any size are read whole, and a client that sends its head or body slowly, or opens a
connection and sends nothing, is never timed out. This protocol adds, per connection:

- the request line and headers at most MAX_HEAD_BYTES: 431 and the connection closed;
- the head complete within HEAD_TIMEOUT_S of its first byte (of the connection's opening, for
  the first request): 408 and the connection closed;
- no pause longer than BODY_IDLE_TIMEOUT_S while a request body is still arriving, and the body
  no slower on average than MIN_BODY_BYTES_PER_S after BODY_GRACE_S: closed (the request sees a
  disconnect);
- what a chunked body sends besides its data (chunk sizes and extensions, trailers) at most
  MAX_FRAMING_BYTES more than its data: 431 and the connection closed (trailers are dropped:
  uvicorn would append them to the headers the app already holds, without any limit);
- a body that keeps arriving after the answer (a 413 sent on its Content-Length, say) is read and
  dropped at most DRAIN_BYTES_PER_S: the client still gets its answer once it has sent its body,
  and a client that streams huge bodies for nothing costs the machine a bounded amount.

A slow client still holds one connection until these run out; VAE_* cannot bound the number of
connections, uvicorn's `limit_concurrency` does (service/cli.py), and a front proxy should carry
the same limits (docs/DEPLOY.md). Past that limit uvicorn answers 503, except to the health
probes (PROBE_PATHS): a server whose connections a flood of slow clients holds is busy, not
broken, and an orchestrator that restarted it would drop the requests it is serving.
"""

import asyncio
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

# nginx answers 431/400 past 4 x 8 KiB of headers (large_client_header_buffers); 32 KiB here
MAX_HEAD_BYTES = 32 * 1024
# what a chunked body may send besides its data, beyond the data's own size: chunk framing is a
# few bytes a chunk, and trailers a head's worth
MAX_FRAMING_BYTES = 1 << 20
# nginx's client_header_timeout is 60 s; a head is a few hundred bytes, 10 s is ample
HEAD_TIMEOUT_S = 10.0
# the longest silence in the middle of a body (nginx's client_body_timeout is 60 s)
BODY_IDLE_TIMEOUT_S = 30.0
# and the least average rate of a body after its first BODY_GRACE_S: Apache's mod_reqtimeout
# default (body=20,MinRate=500), so that a client sending a byte just inside BODY_IDLE_TIMEOUT_S
# cannot hold its connection for as long as it likes; 500 B/s is a 1 MB image in 33 minutes
BODY_GRACE_S = 20.0
MIN_BODY_BYTES_PER_S = 500
# liveness and readiness probes (ours, deploy/; and KServe's), answered past limit_concurrency
PROBE_PATHS = (b"/healthz", b"/readyz", b"/v2/health/live", b"/v2/health/ready")
# after a refusal, what the client still sends is read and dropped this long before closing, so
# that it reads the answer instead of a connection reset (nginx's lingering close)
LINGER_S = 2.0
HEAD_END = b"\r\n\r\n"
# What a client sends after its answer is dropped at this rate at most per connection. Reading it
# costs the server about 0.36 ms of CPU a MB (a memcpy) and the sender as much again: 8 clients
# streaming 13 MB JSON bodies at a 1 MiB limit moved 0.6 GB/s and held /healthz's p99 near 100 ms
# on 2 cores (BENCHMARKS.md section 7). At this rate such a body still gets its 413 within a second.
DRAIN_BYTES_PER_S = 16 * 1024 * 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with a head size limit and head and body read timeouts."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    body_idle_timeout_s = BODY_IDLE_TIMEOUT_S
    body_grace_s = BODY_GRACE_S
    min_body_bytes_per_s = MIN_BODY_BYTES_PER_S
    drain_bytes_per_s = DRAIN_BYTES_PER_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading_head = True
        self._head_bytes = 0
        self._tail = b""  # the last bytes seen, for a head end split over two reads
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._body_deadline = 0.0  # when the body must be complete at the least rate, so far
        self._too_slow = False
        self._framing = 0  # bytes of the request after its head, less its body data
        self._arm(self.head_timeout_s, self._head_timed_out)

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return  # refused: what follows is dropped
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and cycle.more_body:
            # answered before its body was read: drop the rest, at DRAIN_BYTES_PER_S at most
            self.flow.pause_reading()
            self.loop.call_later(len(data) / self.drain_bytes_per_s, self._resume_draining)
        if self._reading_head:
            window = self._tail + data
            end = window.find(HEAD_END)
            self._head_bytes += len(data) if end < 0 else end + len(HEAD_END) - len(self._tail)
            self._tail = window[-(len(HEAD_END) - 1) :]
            if self._head_bytes > self.max_head_bytes:
                self._refuse(
                    431,
                    f"request line and headers over the limit of {self.max_head_bytes} bytes",
                )
                return
            if self._timer is None:  # the first bytes of a request on a kept-alive connection
                self._arm(self.head_timeout_s, self._head_timed_out)
        elif self.cycle is not None and self.cycle.more_body:
            self._body_deadline += len(data) / self.min_body_bytes_per_s
            self._framing += len(data)
            self._arm_body()
        super().data_received(data)
        if self._framing > MAX_FRAMING_BYTES and not self._refused:
            self._refuse(
                431, f"chunk framing and trailers over the limit of {MAX_FRAMING_BYTES} bytes"
            )

    def _arm_body(self) -> None:
        """The body timer: at the next idle timeout, or at the rate deadline if sooner."""
        to_deadline = self._body_deadline - self.loop.time()
        self._too_slow = to_deadline < self.body_idle_timeout_s  # which of the two it will be
        self._arm(max(0.0, min(self.body_idle_timeout_s, to_deadline)), self._body_timed_out)

    def on_headers_complete(self) -> None:
        self._reading_head, self._head_bytes, self._tail = False, 0, b""
        self._disarm()
        limit = self.limit_concurrency
        if self.url.partition(b"?")[0].endswith(PROBE_PATHS):
            self.limit_concurrency = None  # a probe is answered however many connections are open
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency = limit
        if not self.parser.should_upgrade():
            # uvicorn appends a chunked body's trailers to `headers`, the list the app's scope
            # holds: they go to a list of their own, which no one reads (MAX_FRAMING_BYTES
            # bounds it); an upgrade (which uvicorn refuses here) still reads its headers
            self.headers = []
        if self.cycle is not None and self.cycle.more_body:
            self._body_deadline = self.loop.time() + self.body_grace_s
            self._arm_body()

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._framing = 0
        super().on_message_complete()
        self._reading_head = True  # what follows is the next request's head
        self._disarm()

    def _resume_draining(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._reading_head and not self._refused and not self.transport.is_closing():
            self._refuse(408, f"request head not received within {self.head_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # the app has not taken what arrived: not the client's wait
            now = self.loop.time()
            self._body_deadline = max(self._body_deadline, now + self.body_idle_timeout_s)
            self._arm_body()
        elif not self.transport.is_closing():
            log.info(
                "%s sent its body %s; closing its connection",
                self._peer(),
                f"slower than {self.min_body_bytes_per_s} B/s on average"
                if self._too_slow
                else f"with a pause of {self.body_idle_timeout_s:g} s",
            )
            self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with `message` and close, outside the app (as uvicorn's own 400)."""
        log.info("%s: %d, %s", self._peer(), status, message)
        body = message.encode("ascii")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is all: the client reads it, then EOF
        self._arm(LINGER_S, self.transport.close)
