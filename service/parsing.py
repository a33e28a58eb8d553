"""Requests into model inputs: images in every accepted form, JSON, query strings, 4xx errors.

Model endpoints (service/routing.py) read their query string with `read_query` and their body
with `read_images` (the request's images as one float32 batch at the model's size) or `read_json`.
"""

import asyncio
import copy
import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from service.batching import INLINE_ROWS
from service.deps import Served
from service.imaging import (
    NPY_MEDIA,
    SMALL_BYTES,
    ImageError,
    check_pixels,
    decode_image,
    fit_array,
    plan_uploads,
    read_npy,
)
from service.runtime import F32, Runtime, off_loop
from service.schemas import BLACK_28X28_PNG, ImagesRequest
from service.settings import Settings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

JSON_TYPES = ("application/json",)
IMAGE_MEDIA = (
    "multipart/form-data, application/json, image/* (one raw image) or application/x-npy "
    "(a NumPy array)"
)
# A JSON or multipart body up to this size is parsed on the event loop (about a millisecond of
# JSON, 3 ms of multipart headers at most); a larger one in a worker thread. JSON is parsed holding
# the GIL, about 20 ms a MiB on this project's 2 cores, and the loop gets it back between the parse
# and the validation; python-multipart is Python, 8,192 small parts take about 70 ms.
INLINE_BODY_BYTES = 64 * 1024
T = TypeVar("T")
Q = TypeVar("Q", bound=BaseModel)
# python-multipart logs each malformed body it stops at, at warning level; the client gets a 400
# naming the problem instead, and cannot flood the log
logging.getLogger("python_multipart").setLevel(logging.ERROR)
# .npy bodies up to this size are converted on the event loop (a copy and a scale: microseconds)
NPY_INLINE_BYTES = 1 << 20


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def is_json(kind: str) -> bool:
    """Whether a media type is JSON (`application/json` or a `+json` type)."""
    return kind in JSON_TYPES or kind.endswith("+json")


def unsupported_media(kind: str, expected: str) -> HTTPException:
    """A 415 naming what was sent and what is accepted."""
    sent = f"Content-Type {kind}" if kind else "no Content-Type"
    return HTTPException(status_code=415, detail=f"unsupported media type: {sent}; use {expected}")


async def require_json(request: Request) -> None:
    """415 unless the body is JSON (FastAPI itself would answer 422 for other media types)."""
    kind = media_type(request)
    if not is_json(kind):
        raise unsupported_media(kind, "application/json")


Loc = Sequence[str | int]


def invalid(loc: Loc, msg: str, type_: str = "value_error") -> RequestValidationError:
    """A 422 in FastAPI's own error format, so every validation error reads alike."""
    return RequestValidationError([{"type": type_, "loc": tuple(loc), "msg": msg}])


def over_limit(loc: Loc, value: int, limit: int, setting: str) -> RequestValidationError:
    """A 422 for a count above a configured limit, naming the limit's setting."""
    return invalid(
        loc,
        f"Input should be less than or equal to {limit} ({setting}); got {value}",
        "less_than_equal",
    )


def body_errors(exc: ValidationError) -> RequestValidationError:
    errors = exc.errors(include_url=False)
    return RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in errors])


async def parse_body(body: bytes, parse: Callable[[bytes], T]) -> T:
    """`parse(body)`: on the event loop up to INLINE_BODY_BYTES, else in a worker thread."""
    if len(body) <= INLINE_BODY_BYTES:
        return parse(body)
    return await asyncio.to_thread(parse, body)


def decode_json(data: bytes) -> Any:
    """`json.loads(data)`, refusing an object that names a key twice: the last would silently
    win, and `{"images": [a, b], "images": [a]}` be scored as one image."""
    return json.loads(data, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) < len(pairs):  # one pass to name the key: a 1 MiB object holds 100,000 keys
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise json.JSONDecodeError(f"key {key!r} given twice; give each key once", "", 0)
            seen.add(key)
    return found


async def load_json(body: bytes) -> Any:
    """`decode_json(body)`, off the event loop when large (parse_body)."""
    return await parse_body(body, decode_json)


class JSONRequest(Request):
    """A request whose `json()`, which FastAPI's body parameters call, is `load_json`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await load_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose JSON body parameter is parsed off the event loop when large (JSONRequest)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(JSONRequest(request.scope, request.receive))

        return route_handler


async def read_json(request: Request, model: type[Q]) -> Q:
    """The JSON body validated as `model`, both steps off the event loop when the body is large
    (parse_body); 422 in FastAPI's format when it is missing, not JSON or not valid."""
    body = await request.body()
    if not body:
        raise invalid(("body",), "Field required", "missing")
    try:
        return await parse_body(body, lambda data: model.model_validate(decode_json(data)))
    except ValidationError as exc:
        raise body_errors(exc) from None
    except RecursionError:
        raise invalid(("body",), "JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        pos = exc.pos if isinstance(exc, json.JSONDecodeError) else exc.start
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": str(exc)},
                }
            ]
        ) from None


Upload = tuple[str, bytes]  # (" ('name.png')" or "" for messages, encoded bytes)


def _check_complete(body: bytes, boundary: bytes) -> None:
    """400 for a multipart body without its closing delimiter: it was cut short. A cheap first
    look, before the parts are counted; `_file_parts` checks that the parser ended on it."""
    if b"--" + boundary + b"--" not in body:
        raise HTTPException(status_code=400, detail=_unterminated(body, boundary))


def _unterminated(body: bytes, boundary: bytes) -> str:
    return (
        f"the multipart body is truncated or malformed: its {len(body)} bytes do not end with "
        f"the closing delimiter CRLF '--{boundary.decode('latin-1')}--' after the last part"
    )


def _skip_preamble(body: bytes, boundary: bytes) -> bytes:
    """The body from its first delimiter: RFC 2046 (5.1.1) lets a preamble come before it, to be
    ignored, and python-multipart wants the body to start with the delimiter."""
    if body.startswith(b"--" + boundary):
        return body
    at = body.find(b"\r\n--" + boundary)
    if at < 0:
        raise HTTPException(
            status_code=400,
            detail=f"malformed multipart body: no line starts with the boundary "
            f"'--{boundary.decode('latin-1')}'",
        )
    return body[at + 2 :]


class _Parts:
    """python-multipart's callbacks collecting a body's parts in memory: (headers, data) each."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[bytes, bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field: list[bytes] = []
        self._value: list[bytes] = []
        self._data: list[bytes] = []

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._field.append(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.append(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": lambda data, start, end: self._data.append(data[start:end]),
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers, self._data = {}, []

    def _header_end(self) -> None:
        self._headers[b"".join(self._field).lower()] = b"".join(self._value)
        self._field, self._value = [], []

    def _end(self) -> None:
        self.parts.append((self._headers, b"".join(self._data)))


async def _multipart_uploads(request: Request, settings: Settings) -> list[Upload]:
    """The file parts of a multipart/form-data body, parsed in memory by python-multipart (the
    parser Starlette uses, without its per-file spooled temporary files)."""
    body, content_type = await request.body(), request.headers.get("content-type", "")
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise HTTPException(status_code=400, detail="the multipart Content-Type has no boundary")
    _check_complete(body, boundary)
    body = _skip_preamble(body, boundary)
    # the delimiters, less the closing one: at least the parts' count, found before parsing any
    parts = body.count(b"--" + boundary) - 1
    if parts > settings.max_rows:
        raise over_limit(("body", "images"), parts, settings.max_rows, "VAE_MAX_ROWS")
    return await parse_body(body, functools.partial(_file_parts, boundary=boundary, found=parts))


def _file_parts(body: bytes, boundary: bytes, found: int) -> list[Upload]:
    """The uploads of a complete multipart body whose boundary stands `found` times less the
    closing one; 400 when it is malformed, 422 for a part that is no file."""
    collected = _Parts()
    try:
        parser = MultipartParser(boundary, collected.callbacks())
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise HTTPException(status_code=400, detail=f"malformed multipart body: {exc}") from None
    if parser.state != MultipartState.END:
        # the closing delimiter was not where a delimiter can be (after a CRLF), so the parser
        # took it for the last part's data and never ended that part: it would be dropped
        raise HTTPException(status_code=400, detail=_unterminated(body, boundary))
    if found != len(collected.parts):
        # the boundary also stands where no delimiter can: a part would be lost in another's data
        # (a delimiter without the CRLF before it) or after the closing delimiter
        raise HTTPException(
            status_code=400,
            detail=f"malformed multipart body: the boundary '--{boundary.decode('latin-1')}' "
            f"opens {found} parts but {len(collected.parts)} are well formed; each delimiter "
            "must start a line (CRLF before it), and nothing may follow the closing one",
        )
    uploads: list[Upload] = []
    for i, (headers, data) in enumerate(collected.parts):
        options = parse_options_header(headers.get(b"content-disposition", b""))[1]
        name = options.get(b"name", b"").decode("utf-8", "replace") or str(i)
        if b"filename" not in options:
            raise invalid(
                ("body", name),
                f"form field {name!r} is not a file upload; send images as files (with a "
                "filename) and options as query parameters",
            )
        filename = options[b"filename"].decode("utf-8", "replace")
        uploads.append((f" ({filename!r})" if filename else "", data))
    return uploads


def _plan(uploads: list[Upload], settings: Settings) -> bool:
    """`plan_uploads`: 413 when the uploads declare too many pixels; whether they are small."""
    try:
        return plan_uploads(
            [(f"image {i}{what}", data) for i, (what, data) in enumerate(uploads)],
            settings.max_pixels,
        )
    except ImageError as exc:
        raise HTTPException(status_code=413, detail=str(exc)) from None


def _decode_uploads(
    uploads: list[Upload], shape: tuple[int, int, int], settings: Settings, background: float
) -> F32:
    _plan(uploads, settings)  # nothing is decoded before the pixels declared in all are checked
    images = []
    for i, (what, data) in enumerate(uploads):
        try:
            images.append(
                decode_image(
                    data,
                    shape,
                    max_pixels=settings.max_pixels,
                    strict=settings.strict_size,
                    background=background,
                )
            )
        except ImageError as exc:
            message = f"image {i}{what} {exc}"
            if exc.status == 413:
                raise HTTPException(status_code=413, detail=message) from None
            raise invalid(("body", "images", i), message) from None
    return np.stack(images)


def _prepare_arrays(arrays: list[F32], shape: tuple[int, int, int], settings: Settings) -> F32:
    images = []
    for i, array in enumerate(arrays):
        height, width = array.shape[1:]
        try:
            check_pixels(height * width, settings.max_pixels, f"is {width}x{height} =")
            images.append(fit_array(array, shape, strict=settings.strict_size))
        except ImageError as exc:
            if exc.status == 413:
                raise HTTPException(status_code=413, detail=f"pixels[{i}] {exc}") from None
            raise invalid(("body", "pixels", i), f"pixels[{i}] {exc}") from None
    return np.stack(images)


def _prepare_npy(data: bytes, shape: tuple[int, int, int], settings: Settings) -> F32:
    try:
        batch = read_npy(data, max_images=settings.max_rows, max_pixels=settings.max_pixels)
    except ImageError as exc:
        message = f"the application/x-npy body {exc}"
        if exc.status == 413:
            raise HTTPException(status_code=413, detail=message) from None
        raise invalid(("body",), message) from None
    if batch.shape[1:] == shape:
        return batch
    try:
        return np.stack([fit_array(image, shape, strict=settings.strict_size) for image in batch])
    except ImageError as exc:
        raise invalid(("body",), f"the application/x-npy body's images {exc}") from None


async def _read_batch(request: Request, settings: Settings, runtime: Runtime) -> F32:
    shape = runtime.manifest.input_shape
    kind = media_type(request)
    if kind == "multipart/form-data":
        uploads = await _multipart_uploads(request, settings)
    elif is_json(kind):
        body = await read_json(request, ImagesRequest)
        if body.pixels is not None:
            _check_count(len(body.pixels), settings, "pixels")
            return await off_loop(len(body.pixels), _prepare_arrays, body.pixels, shape, settings)
        assert body.images is not None  # the model validator guarantees one of the two
        uploads = [("", data) for data in body.images]
    elif kind.startswith("image/"):
        uploads = [(f" ({kind} body)", await request.body())]
    elif kind in NPY_MEDIA:
        data = await request.body()
        if len(data) <= NPY_INLINE_BYTES:
            return _prepare_npy(data, shape, settings)
        return await asyncio.to_thread(_prepare_npy, data, shape, settings)
    else:
        raise unsupported_media(kind, IMAGE_MEDIA)
    _check_count(len(uploads), settings, "images")
    # a few kilobytes: their headers are read here, and if they declare few pixels they are
    # decoded here too (cheaper than a thread hop); else both happen in a worker thread (a TIFF's
    # header alone can take milliseconds)
    small = sum(len(data) for _, data in uploads) <= SMALL_BYTES and _plan(uploads, settings)
    args = (uploads, shape, settings, runtime.manifest.image.background)
    if small and len(uploads) <= INLINE_ROWS:
        return _decode_uploads(*args)
    return await asyncio.to_thread(_decode_uploads, *args)


async def read_images(request: Request, served: Served) -> F32:
    """The request's images as one float32 batch `(B, C, H, W)` at the model's size.

    Accepts multipart file uploads, a JSON body (`images`: base64 files, or `pixels`: nested
    arrays), one raw image body (`Content-Type: image/...`) or a NumPy array
    (`Content-Type: application/x-npy`). A few small images decode on the event loop, the rest
    in a worker thread.
    """
    x = await _read_batch(request, served.settings, served.runtime)
    served.runtime.metrics.images.labels(request.scope["route"].path).observe(len(x))
    return x


def read_query(model: type[Q], request: Request) -> Q:
    """The query string as `model`; a 422 in FastAPI's format naming each bad parameter, an
    unknown one (a misspelt `K=5` must not quietly run with the default) and one given twice."""
    items = request.query_params.multi_items()
    names = _query_names(model)
    problems: list[dict[str, Any]] = []
    for name, count in Counter(key for key, _ in items).items():  # one pass: a head holds 8,000
        if name not in names:
            problems.append(
                {
                    "type": "unknown_parameter",
                    "loc": ("query", name),
                    "msg": "unknown query parameter; this endpoint takes "
                    + (", ".join(names) or "no query parameters"),
                }
            )
        elif count > 1:
            problems.append(
                {
                    "type": "repeated_parameter",
                    "loc": ("query", name),
                    "msg": f"given {count} times; give it once",
                }
            )
    if problems:
        raise RequestValidationError(problems)
    try:
        return model.model_validate(dict(items))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError(
            [{**error, "loc": ("query", *error["loc"])} for error in errors]
        ) from None


@functools.cache
def _query_names(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(field.alias or name for name, field in model.model_fields.items())


class NoQuery(BaseModel):
    """The query of an endpoint that takes none."""


def _check_count(count: int, settings: Settings, field: str) -> None:
    if count == 0:
        raise invalid(("body", field), "no images: send at least one image")
    if count > settings.max_rows:
        raise over_limit(("body", field), count, settings.max_rows, "VAE_MAX_ROWS")


IMAGES_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Images as multipart files, a JSON body, or one raw image body. Options "
        "go in the query string.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary", "minLength": 1},
                            "description": "one or more image files (PNG, JPEG, BMP, WebP, ...)",
                        }
                    },
                    "required": ["images"],
                    # files under any other field name are images too
                    "additionalProperties": {"type": "string", "format": "binary", "minLength": 1},
                }
            },
            "application/json": {
                "schema": ImagesRequest.model_json_schema(),
                "examples": {
                    "base64": {
                        "summary": "base64-encoded image files",
                        "value": {"images": [BLACK_28X28_PNG]},
                    },
                    "pixels": {
                        "summary": "pixel arrays (H, W) or (C, H, W) in [0, 1], resized to fit",
                        "value": {"pixels": [[[0.0, 0.5], [1.0, 0.25]]]},
                    },
                },
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def images_openapi(count: int) -> dict[str, Any]:
    """IMAGES_OPENAPI for an endpoint that takes exactly `count` images."""
    extra = copy.deepcopy(IMAGES_OPENAPI)
    content = extra["requestBody"]["content"]
    content["multipart/form-data"]["schema"]["properties"]["images"].update(
        minItems=count, maxItems=count
    )
    del content["image/*"]  # one raw image is never enough
    body = content["application/json"]
    for name in ("images", "pixels"):
        body["schema"]["properties"][name].update(minItems=count, maxItems=count)
    body["schema"]["examples"] = [
        {name: values * count}
        for example in body["schema"]["examples"]
        for name, values in example.items()
    ]
    for example in body["examples"].values():
        example["value"] = {name: values * count for name, values in example["value"].items()}
    return extra
