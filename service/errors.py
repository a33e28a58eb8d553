"""Errors and HTTP details every route shares: body limits, HEAD, 422/503 bodies, disconnects."""

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import HTTPException, Request, responses
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MAX_ECHOED_INPUT = 200  # characters of a rejected value echoed back in a 422
# JSON is parsed holding the GIL, about 40 ms a megabyte of numbers on this project's 2 cores, so a
# larger body would stall every other request; 1 MiB holds 64 MNIST images as pixel arrays, and
# large inputs have faster ways in (files, a raw image, .npy)
MAX_JSON_BYTES = 1 << 20
# Content-Encoding a request body may carry: the service reads bodies as sent, never decompressed
IDENTITY = (b"", b"identity")
V2_PREFIX = "/v2/"  # the Open Inference Protocol's paths, whose errors are {"error": ...}
_ANY_JSON: TypeAdapter[Any] = TypeAdapter(Any)


def json_bytes(content: Any) -> bytes:
    """`content` as compact JSON, serialised by pydantic's compiled core (8 times the standard
    library's speed on a 6-million-float v2 answer, which holds the GIL while it runs).

    A string holding an unpaired surrogate, which a client can send in JSON ("\\ud800") but
    UTF-8 cannot encode, goes back escaped as the client wrote it, not as a 500."""
    try:
        return _ANY_JSON.dump_json(content)
    except PydanticSerializationError:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def json_array(elements: Iterable[Iterable[bytes]]) -> Iterator[bytes]:
    """The pieces of a JSON array whose elements are each given as the pieces of their JSON text,
    for one `b"".join` at the end: a large answer written piece by piece lets the event loop run
    between the pieces, where writing it whole held the GIL for up to half a second."""
    yield b"["
    for i, element in enumerate(elements):
        if i:
            yield b","
        yield from element
    yield b"]"


class JSONResponse(responses.JSONResponse):
    """The service's JSON answers, every one of them (the app's default response class)."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def _codings(value: bytes) -> list[bytes]:
    return [coding.strip().lower() for coding in value.split(b",") if coding.strip()]


def path_below_root(scope: Scope) -> str:
    """The request's path below the app's root path, as Starlette's router sees it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def is_v2(scope: Scope) -> bool:
    """Whether the request is for the Open Inference Protocol's API."""
    return path_below_root(scope).startswith(V2_PREFIX)


def error_response(scope: Scope, status: int, detail: Any, headers: Any = None) -> JSONResponse:
    """An error's answer: `{"detail": ...}` as FastAPI's, `{"error": "..."}` on /v2 paths."""
    body = {"error": str(detail)} if is_v2(scope) else {"detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes` (JSON: MAX_JSON_BYTES), by Content-Length up front
    or while streaming; 400 for a request with two Content-Type headers (the limit and the route
    would each read another one); 415 for a compressed body (Content-Encoding) and 501 for a
    transfer coding other than chunked (RFC 9112 6.1), which the service would otherwise read as
    they are.

    Starlette ships a limiter too, but its 413 does not name the limit or the setting.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self, size: str, limit: int) -> str:
        if limit < self.max_bytes:
            return (
                f"JSON request body {size} over the limit of {limit} bytes for JSON; send "
                "large inputs as files (multipart), a raw image or an application/x-npy body"
            )
        return f"request body {size} over the limit of {limit} bytes (VAE_MAX_UPLOAD_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = None
        if sum(name == b"content-type" for name, _ in scope["headers"]) > 1:
            refusal = 400, "the request has more than one Content-Type header; send one"
        elif set(_codings(headers.get(b"transfer-encoding", b""))) - {b"chunked"}:
            coding = headers[b"transfer-encoding"].decode("latin-1")
            refusal = 501, f"Transfer-Encoding {coding!r} is not supported; send it chunked"
        elif (encoding := headers.get(b"content-encoding", b"").strip().lower()) not in IDENTITY:
            coding = encoding.decode("latin-1")
            refusal = 415, f"Content-Encoding {coding!r} is not supported: send the body as it is"
        kind = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
        is_json = kind == b"application/json" or kind.endswith(b"+json")
        limit = min(self.max_bytes, MAX_JSON_BYTES) if is_json else self.max_bytes
        length = headers.get(b"content-length")
        if refusal is None and length is not None and length.isdigit() and int(length) > limit:
            refusal = 413, self._detail(f"is {int(length)} bytes,", limit)
        if refusal is not None:
            await error_response(scope, *refusal)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # raised inside the route's body read: the app's handler renders the 413
                    raise HTTPException(status_code=413, detail=self._detail("is", limit))
            return message

        await self.app(scope, limited_receive, send)


class HeadMiddleware:
    """HEAD on any GET route: answered as the GET without its body (RFC 9110 9.3.2), so the
    routes and the OpenAPI document name GET alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _json_safe(value: Any) -> bool:
    try:
        return len(json.dumps(value, allow_nan=False)) <= MAX_ECHOED_INPUT
    except (TypeError, ValueError):
        return False


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body, minus echoed inputs that are huge or not JSON (NaN, infinity)."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        error = dict(error)
        if "input" in error and not _json_safe(error["input"]):
            error.pop("input")
        if "ctx" in error:
            error["ctx"] = {
                key: value if _json_safe(value) else str(value)
                for key, value in error["ctx"].items()
            }
        errors.append(error)
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an HTTPException, rendered by `JSONResponse`; `{"error": ...}` on /v2
    paths (a 405 or 404 there comes from the router, before any v2 route)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code < 200 or exc.status_code in (204, 205, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return error_response(request.scope, exc.status_code, exc.detail, exc.headers)


async def disconnect_handler(request: Request, exc: Exception) -> Response:
    """A client that hung up before its request was read: one log line, not a traceback."""
    peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    log.info("%s disconnected before sending all of %s %s", peer, request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request", for the metrics only


async def busy_handler(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After when the micro-batch queue is full."""
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})


def _unprocessable(kind: str, message: str) -> JSONResponse:
    """A 422 in FastAPI's error format, about the request as a whole."""
    return JSONResponse({"detail": [{"type": kind, "loc": ["request"], "msg": message}]}, 422)


async def over_budget_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 when a request needs more network rows than VAE_MAX_ROWS."""
    return _unprocessable("over_budget", str(exc))


async def not_finite_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 when the decoder's output overflows: the latents are far outside the prior."""
    hint = "send latent values of a sensible size (or a lower temperature, fewer extreme images)"
    return _unprocessable("not_finite", f"{exc}; {hint}")
