"""Connection limits of the served HTTP protocol (service/connections.py), on a real uvicorn over
loopback with raw sockets: head size, slow heads and bodies, silent connections, keep-alive."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from service.connections import GuardedHttpToolsProtocol
from service.main import create_app
from service.settings import Settings
from tests.live import free_port
from tests.service.helpers import encode, stroke

TIMEOUT_S = 0.5
GRACE_S = 1.0
MIN_BODY_BYTES_PER_S = 100
DRAIN_BYTES_PER_S = 8 * 1024 * 1024


class QuickProtocol(GuardedHttpToolsProtocol):
    """The served protocol with its timeouts shortened, so the tests wait about a second, and a
    least body rate and a drain rate of its own."""

    head_timeout_s = TIMEOUT_S
    body_idle_timeout_s = TIMEOUT_S
    body_grace_s = GRACE_S
    min_body_bytes_per_s = MIN_BODY_BYTES_PER_S
    drain_bytes_per_s = DRAIN_BYTES_PER_S


@contextmanager
def serving(tiny_bundle: Path, **config: Any) -> Iterator[tuple[str, int]]:
    """A real uvicorn with QuickProtocol on loopback, in a thread; its address."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Settings(bundle=tiny_bundle)),
            host="127.0.0.1",
            port=port,
            http=QuickProtocol,
            log_level="warning",
            lifespan="on",
            **config,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def address(tiny_bundle: Path) -> Iterator[tuple[str, int]]:
    with serving(tiny_bundle) as address:
        yield address


def exchange(address: tuple[str, int], *chunks: bytes, pause: float = 0.0) -> bytes:
    """Send `chunks` (with `pause` between them) and read until the server closes or 5 s pass."""
    with socket.create_connection(address, timeout=5) as sock:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed before all was sent
                break
            time.sleep(pause)
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def get(path: str, extra: bytes = b"", close: bool = True) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + connection + extra + b"\r\n"


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_normal_request_with_large_headers_passes(address: tuple[str, int]) -> None:
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))  # ~20 KB
    assert status(exchange(address, get("/healthz", headers))) == 200


@pytest.mark.parametrize("chunk", [1, 8192, 1 << 20], ids=["byte-by-kb", "8k-reads", "one-write"])
def test_a_head_over_the_limit_is_431(address: tuple[str, int], chunk: int) -> None:
    head = get("/healthz", b"X-Big: " + b"a" * 40_000 + b"\r\n")
    pieces = [head[i : i + max(chunk, 1024)] for i in range(0, len(head), max(chunk, 1024))]
    response = exchange(address, *pieces)
    assert status(response) == 431
    assert response.endswith(b"request line and headers over the limit of 32768 bytes")
    assert status(exchange(address, get("/healthz"))) == 200  # others are served


def test_a_huge_request_line_is_431(address: tuple[str, int]) -> None:
    response = exchange(address, get("/healthz?" + "a" * 100_000))
    assert status(response) == 431


def test_a_slow_head_is_408(address: tuple[str, int]) -> None:
    start = time.monotonic()
    response = exchange(address, b"GET /healthz HTTP/1.1\r\n", b"X-A: 1\r\n", pause=0.3)
    assert status(response) == 408
    assert response.endswith(b"request head not received within 0.5 s")
    assert time.monotonic() - start < 3


def test_a_silent_connection_is_closed(address: tuple[str, int]) -> None:
    start = time.monotonic()
    assert status(exchange(address)) == 408
    assert time.monotonic() - start < 3


def closed_unanswered(
    address: tuple[str, int], caplog: pytest.LogCaptureFixture, *chunks: bytes, pause: float = 0.0
) -> tuple[float, list[str]]:
    """Send `chunks`; assert the server closed the connection without an answer. The seconds it
    took, and the messages logged (a moment allowed for the server's own log lines)."""
    with caplog.at_level(logging.INFO):
        start = time.monotonic()
        assert exchange(address, *chunks, pause=pause) == b""  # closed, nothing answered
        took = time.monotonic() - start
        time.sleep(0.2)
    return took, [r.getMessage() for r in caplog.records]


def test_a_stalled_body_closes_the_connection_in_one_log_line(
    address: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    head = (
        b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 1000\r\n\r\n--b\r\n"
    )
    took, messages = closed_unanswered(address, caplog, head)
    assert took < 3
    assert any("sent its body with a pause of 0.5 s; closing its connection" in m for m in messages)
    assert any(m.endswith("disconnected before sending all of POST /encode") for m in messages)
    assert not any(r.exc_info for r in caplog.records), messages


def test_a_body_that_trickles_in_below_the_least_rate_is_closed(
    address: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    # a byte every 0.1 s never pauses for the idle timeout (0.5 s), but at 10 B/s it is below the
    # least rate (100 B/s) once the grace (1 s) is over: without the rate it would hold the
    # connection for the 1000 bytes' 100 s
    head = (
        b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    took, messages = closed_unanswered(address, caplog, head, *[b"x"] * 40, pause=0.1)
    assert GRACE_S <= took < 3, took
    assert any("sent its body slower than 100 B/s on average; closing" in m for m in messages)


def test_a_body_above_the_least_rate_is_read_whole(address: tuple[str, int]) -> None:
    # an uncompressed image (about 1.9 KB) in 12 pieces a 0.15 s apart: about 1 KB/s for 1.7 s,
    # past the grace and above the least rate, so it is read whole and answered
    body = encode(stroke(), "BMP")
    head = b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/bmp\r\n"
    head += b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    step = -(-len(body) // 12)
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    start = time.monotonic()
    response = exchange(address, head, *chunks, pause=0.15)
    assert status(response) == 200, response
    assert b'"latent_dim":8' in response
    assert time.monotonic() - start > GRACE_S


def chunked(body: bytes, *trailers: bytes) -> bytes:
    """`body` as one chunk of a chunked POST /encode (an image), then `trailers` after the end."""
    head = b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/bmp\r\n"
    head += b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    return head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + b"".join(trailers) + b"\r\n"


def test_a_chunked_body_with_a_trailer_is_answered(address: tuple[str, int]) -> None:
    response = exchange(address, chunked(encode(stroke(), "BMP"), b"X-Checksum: abc\r\n"))
    assert status(response) == 200, response


def test_trailers_past_the_framing_limit_are_431(address: tuple[str, int]) -> None:
    # uvicorn kept every trailer line in memory, without limit: 600 MB grew the server by as much
    line = b"X-T: " + b"a" * 8000 + b"\r\n"
    response = exchange(address, chunked(encode(stroke(), "BMP"), line * 200))  # 1.6 MB
    assert status(response) == 431, response[:200]
    assert response.endswith(b"chunk framing and trailers over the limit of 1048576 bytes")
    assert status(exchange(address, get("/healthz"))) == 200


def test_the_health_probes_are_answered_past_the_connection_limit(tiny_bundle: Path) -> None:
    # uvicorn answers 503 once limit_concurrency connections are open; a flood of slow clients
    # must not fail the liveness probe (an orchestrator would restart a busy server)
    with serving(tiny_bundle, limit_concurrency=3) as address:
        held = [socket.create_connection(address, timeout=5) for _ in range(3)]
        try:
            time.sleep(0.1)
            assert status(exchange(address, get("/model"))) == 503
            for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
                assert status(exchange(address, get(probe))) == 200, probe
        finally:
            for sock in held:
                sock.close()


def test_keep_alive_and_pipelined_requests_still_work(address: tuple[str, int]) -> None:
    # two requests in one write, then a third after a pause shorter than the head timeout
    response = exchange(
        address,
        get("/healthz", close=False) + get("/readyz", close=False),
        get("/healthz"),
        pause=0.2,
    )
    assert response.count(b"HTTP/1.1 200 OK") == 3


def read_response(sock: socket.socket) -> bytes:
    """One response, by its Content-Length, on a connection the server keeps open."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_body_that_keeps_coming_after_its_answer_is_drained_at_a_bounded_rate(
    address: tuple[str, int],
) -> None:
    size = 16 * 1024 * 1024  # JSON over its 1 MiB limit: 413 on the Content-Length, before any body
    head = b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: " + str(size).encode() + b"\r\n\r\n"
    with socket.create_connection(address, timeout=30) as sock:
        start = time.monotonic()
        sock.sendall(head + b" " * size)
        sent = time.monotonic() - start
        response = read_response(sock)
        assert status(response) == 413, response
        assert b"over the limit of 1048576 bytes for JSON" in response
        # the connection stays usable once the dropped body is through
        sock.sendall(get("/healthz", close=False))
        assert status(read_response(sock)) == 200
    # read and dropped at DRAIN_BYTES_PER_S: 2 s for 16 MiB, less what the sockets' buffers take
    # (a few MiB); undrained, loopback takes it in milliseconds
    assert sent >= 0.5 * size / DRAIN_BYTES_PER_S, sent
