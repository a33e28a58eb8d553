"""Where one request's CPU time goes: the app driven in-process over ASGI (no HTTP, no sockets).

python -m bench.request_cost                  # the shipped bundle, about 30 seconds
python -m bench.request_cost --bundle DIR --requests 5000

One request at a time through `bench.apps:noop_app` (the real app plus `GET /noop`), timed with
the process's CPU clock over `--requests` requests (best of three rounds), for:

- `GET /noop`: the floor of the app (middlewares, routing, FastAPI, the response);
- `POST /encode` with one PNG body, as served;
- the same with the encoder network replaced by zeros: what the request costs besides the model;
- the same with the PNG decode replaced too: what is left is the app's own work for /encode;
- service.imaging.decode_image of the same PNG alone, in a tight loop (libspng for a plain PNG).

It explains bench/serving.py's /encode-versus-no-op ratio: over HTTP each request also pays
uvicorn's parsing and the socket, which the no-op pays too.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, now
from bench.serving import write_inputs
from service.settings import DEFAULT_BUNDLE

Scope = dict[str, Any]


def scope(method: str, path: str, body: bytes = b"", media: str = "") -> Scope:
    headers = [(b"content-length", str(len(body)).encode())]
    if media:
        headers.append((b"content-type", media.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def request(app: Any, where: Scope, body: bytes) -> int:
    """One request through the ASGI app; its status code."""
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(dict(where), receive, send)
    return status


async def cpu_us(app: Any, where: Scope, body: bytes, requests: int) -> float:
    """CPU microseconds per request, best of three rounds after a warm-up."""
    for _ in range(max(100, requests // 10)):
        status = await request(app, where, body)
        if status != 200:
            raise RuntimeError(f"{where['method']} {where['path']} answered {status}")
    rounds = []
    for _ in range(3):
        start = time.process_time()
        for _ in range(requests):
            await request(app, where, body)
        rounds.append((time.process_time() - start) / requests * 1e6)
    return min(rounds)


def tight_loop_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


async def measure(bundle: Path, png: bytes, requests: int) -> dict[str, float]:
    os.environ["VAE_BUNDLE"] = str(bundle)
    os.environ.setdefault("VAE_LOG_LEVEL", "warning")
    import service.parsing
    from bench.apps import noop_app
    from service.imaging import decode_image

    app = noop_app()
    results: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        model = app.state.runtime
        encode = scope("POST", "/encode", png, "image/png")
        results["GET /noop"] = await cpu_us(app, scope("GET", "/noop"), b"", requests)
        results["POST /encode (1 PNG)"] = await cpu_us(app, encode, png, requests)
        d = model.manifest.latent_dim
        zeros = (np.zeros((1, d), np.float32), np.zeros((1, d), np.float32))
        # the frozen Bundle's encode, replaced on this instance only (object.__setattr__)
        object.__setattr__(model.bundle, "encode", lambda x: zeros)
        results["POST /encode, encoder replaced by zeros"] = await cpu_us(
            app, encode, png, requests
        )
        decoded = np.zeros((1, *model.manifest.input_shape), np.float32)
        original = service.parsing._decode_uploads
        service.parsing._decode_uploads = lambda *args: decoded
        try:
            results["POST /encode, encoder and PNG decode replaced"] = await cpu_us(
                app, encode, png, requests
            )
        finally:
            service.parsing._decode_uploads = original
        shape = model.manifest.input_shape
        results["decode_image of the PNG alone (tight loop)"] = tight_loop_us(
            lambda: decode_image(png, shape, max_pixels=1 << 24, strict=False), requests * 4
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle")
    p.add_argument("--requests", type=int, default=3000, help="requests per round")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_inputs(Path(tmp), args.bundle)
        png = (Path(tmp) / "00.png").read_bytes()
    results = asyncio.run(measure(args.bundle.resolve(), png, args.requests))
    noop = results["GET /noop"]
    print(f"# Request cost in-process, {now()}\n")
    print(f"- command: `python -m bench.request_cost --requests {args.requests}`")
    print(f"- machine: {machine()}; bundle: {args.bundle}\n")
    print("| request | CPU µs per request | over the no-op |")
    print("|---|---|---|")
    for name, us in results.items():
        over = "-" if name.startswith(("GET /noop", "decode_image")) else f"+{us - noop:,.0f}"
        print(f"| {name} | {us:,.0f} | {over} |")
    if args.json:
        buffer = io.StringIO()
        json.dump({"date": now(), "machine": machine(), "us": results}, buffer, indent=2)
        args.json.write_text(buffer.getvalue() + "\n")


if __name__ == "__main__":
    main()
