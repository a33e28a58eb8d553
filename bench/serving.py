"""Serving throughput and latency: a real uvicorn server and a separate load-generating process.

python -m bench.serving                      # the shipped bundle, 5 s per cell, about 5 minutes
python -m bench.serving --bundle DIR --seconds 3

Each server runs `uvicorn --factory` on loopback in its own process (bench/apps.py: the real app
plus `GET /noop`, or the same app with the networks in torch eager); each cell is a fresh load
process (httpx, asyncio) keeping `concurrency` requests in flight for `--seconds` after a short
warm-up. Both share the machine's cores, as a sidecar load balancer would. Also measured: the
in-process images/s of the ONNX networks, start-to-ready of `vae serve` and the server's
resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MNIST_DIR, REPO, machine, now
from service.settings import DEFAULT_BUNDLE

log = logging.getLogger("bench.serving")
WARM_UP_S = 0.5
CONCURRENCY = (1, 32)
PAIRS = 3  # back-to-back no-op and /encode cells for the /encode target


@dataclass(frozen=True)
class Case:
    """One kind of request."""

    name: str
    method: str
    path: str
    body: str  # "none", "png", "png64", "npy64", "z"
    params: dict[str, str]
    images: int  # images per request, for images/s


CASES = {
    "noop": Case("GET /noop", "GET", "/noop", "none", {}, 0),
    "encode": Case("POST /encode (1 PNG)", "POST", "/encode", "png", {}, 1),
    "elbo": Case("POST /elbo (1 PNG)", "POST", "/elbo", "png", {}, 1),
    "elbo_neg_elbo": Case(  # bench/anomaly.py: the cost of the default score against -ELBO
        "POST /elbo (1 PNG, score=neg_elbo)", "POST", "/elbo", "png", {"score": "neg_elbo"}, 1
    ),
    "elbo64": Case("POST /elbo (64 PNGs)", "POST", "/elbo", "png64", {}, 64),
    "elbo64npy": Case("POST /elbo (64 images, one .npy)", "POST", "/elbo", "npy64", {}, 64),
    "sample": Case("GET /sample (n=16, PNGs)", "GET", "/sample", "none", {"n": "16"}, 16),
    "decode": Case("POST /decode (1 z, PNG)", "POST", "/decode", "z", {}, 1),
}


# ---------------------------------------------------------------- the load process


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def build_request(url: str, case: Case, data: Path) -> Any:
    """The case's request, built once by httpx (multipart, JSON, query string)."""
    import httpx

    pngs = [p.read_bytes() for p in sorted(data.glob("*.png"))]
    if case.body == "png":
        kwargs: dict[str, Any] = {"content": pngs[0], "headers": {"Content-Type": "image/png"}}
    elif case.body == "png64":
        kwargs = {"files": [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]}
    elif case.body == "npy64":
        npy = (data / "64.npy").read_bytes()
        kwargs = {"content": npy, "headers": {"Content-Type": "application/x-npy"}}
    elif case.body == "z":
        kwargs = {"json": {"z": json.loads((data / "z.json").read_text())}}
    else:
        kwargs = {}
    request = httpx.Request(case.method, f"{url}{case.path}", params=case.params, **kwargs)
    request.read()
    return request


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    return status


async def generate(
    url: str, case: Case, concurrency: int, seconds: float, data: Path, client: str
) -> dict[str, Any]:
    """Keep `concurrency` requests in flight; latencies of those started after the warm-up.

    client "raw": one keep-alive asyncio connection per worker sending the request's bytes,
    prebuilt by httpx; "httpx": httpx.AsyncClient. httpx's own cost per request is larger than
    the server's for small requests and grows with concurrency (its async pool), so "raw" is the
    default: it measures the server, not the client.
    """
    import httpx

    request = build_request(url, case, data)
    target = request.url.raw_path.decode()
    head = f"{case.method} {target} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in request.headers.items()
    )
    wire = head.encode("latin-1") + b"\r\n" + request.content
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + WARM_UP_S, start + WARM_UP_S + seconds

    def record(t0: float, status: int) -> None:
        nonlocal errors
        if t0 >= measure_from:
            latencies.append(time.perf_counter() - t0)
            errors += status != 200

    async def raw_worker() -> None:
        reader, writer = await asyncio.open_connection(request.url.host, request.url.port)
        while (t0 := time.perf_counter()) < stop_at:
            writer.write(wire)
            record(t0, await _read_response(reader))
        writer.close()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as session:

        async def httpx_worker() -> None:
            while (t0 := time.perf_counter()) < stop_at:
                response = await session.send(request)
                record(t0, response.status_code)

        worker = raw_worker if client == "raw" else httpx_worker
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


# ---------------------------------------------------------------- the driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """Seconds until /readyz first answers 200, polling every 5 ms."""
    import httpx

    start = time.perf_counter()
    with httpx.Client(timeout=1.0) as client:
        while time.perf_counter() - start < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.005)
    raise RuntimeError(f"the server was not ready within {timeout} s")


def server_env(bundle: Path, tree: Path = REPO, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    env.update({"VAE_BUNDLE": str(bundle), "VAE_LOG_LEVEL": "warning", "PYTHONPATH": str(tree)})
    env.update({f"VAE_{k.upper()}": v for k, v in settings.items()})
    return env


@contextmanager
def serve(
    tree: Path, bundle: Path, env: dict[str, str], command: list[str]
) -> Iterator[tuple[str, int]]:
    """`command` (`{port}` and `{python}` filled in) run in `tree`; yields its URL and pid.

    `env` adds VAE_* variables to `server_env`'s.
    """
    port = free_port()
    argv = [part.format(port=port, python=sys.executable) for part in command]
    process = subprocess.Popen(argv, cwd=tree, env=server_env(bundle, tree) | env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def server(factory: str, bundle: Path, **settings: str) -> Iterator[tuple[str, int]]:
    """A uvicorn server for `bench.apps:<factory>`; yields its URL and pid."""
    command = ["{python}", "-m", "uvicorn", f"bench.apps:{factory}", "--factory"]
    command += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
    command += ["--no-access-log"]
    env = {f"VAE_{k.upper()}": v for k, v in settings.items()}
    with serve(REPO, bundle, env, command) as running:
        yield running


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(
    url: str, case: str, concurrency: int, seconds: float, data: Path, client: str = "raw"
) -> dict[str, Any]:
    """Run one cell in a separate load process; its JSON result."""
    command = [sys.executable, "-m", "bench.serving", "--load", url, "--case", case]
    command += ["--client", client]
    command += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--data", str(data)]
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    log.info("%s c=%d: %s", case, concurrency, result)
    return result


def start_to_ready(bundle: Path, runs: int = 3) -> float:
    """Median seconds from `vae serve` process start to the first 200 on /readyz."""
    times = []
    for _ in range(runs):
        port = free_port()
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=server_env(bundle))
        try:
            wait_ready(f"http://127.0.0.1:{port}", process)
            times.append(time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return statistics.median(times)


def in_process(bundle: Path, seconds: float = 1.0) -> dict[str, float]:
    """Images/s of the ONNX encoder and decoder (one thread, as the server sets) and /elbo math.

    The /elbo math is `Runtime.evaluate` as a default POST /elbo runs it: one ELBO draw and the
    bundle's default anomaly score with the calibration's draws.
    """
    from service.bundle import load_bundle
    from service.metrics import Metrics
    from service.runtime import Runtime
    from service.verdict import score_draws

    b = load_bundle(bundle, device="cpu", threads=1)
    b.warm_up()
    rng = np.random.default_rng(0)
    results: dict[str, float] = {}

    def rate(fn: Any, rows: int) -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            count += rows
        return count / (time.perf_counter() - start)

    for n in (1, 64, 256):
        x = rng.random((n, *b.manifest.input_shape), dtype=np.float32)
        z = rng.standard_normal((n, b.manifest.latent_dim), dtype=np.float32)
        results[f"encoder {n}"] = rate(lambda x=x: b.encode(x), n)
        results[f"decoder {n}"] = rate(lambda z=z: b.decode(z), n)
    runtime = Runtime(b, Metrics(), max_rows=8192)
    x = rng.random((64, *b.manifest.input_shape), dtype=np.float32)
    score = b.manifest.default_score
    draws = score_draws(runtime, score, 1, None)

    def evaluate() -> None:
        asyncio.run(runtime.evaluate(x, samples=1, k=None, score=score, score_draws=draws, seed=0))

    results["elbo 64"] = rate(evaluate, 64)
    return results


def write_inputs(data: Path, bundle: Path) -> None:
    """64 PNG digits (MNIST test images where present, else noise) and one z row."""
    from PIL import Image

    from service.bundle import read_manifest

    manifest = read_manifest(bundle)
    c, h, w = manifest.input_shape
    images_file = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    if images_file.is_file() and (c, h, w) == (1, 28, 28):
        import gzip

        with gzip.open(images_file) as f:
            raw = f.read()
        pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:64]
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (64, h, w), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(pixels))  # (64, H, W) uint8: the same 64 images
    (data / "64.npy").write_bytes(buffer.getvalue())
    for i, p in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, format="PNG")
        (data / f"{i:02d}.png").write_bytes(buffer.getvalue())
    z = np.random.default_rng(0).standard_normal((1, manifest.latent_dim)).round(4)
    (data / "z.json").write_text(json.dumps(z.tolist()))


def fmt_row(name: str, c: int, r: dict[str, Any], extra: str = "") -> str:
    errors = f" ({r['errors']} errors)" if r["errors"] else ""
    return (
        f"| {name} | {c} | {r['rps']:,.0f}{errors} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        f" {extra} |"
    )


def run(bundle: Path, seconds: float) -> None:
    from bench.apps import check_torch_matches_onnx
    from service.bundle import read_manifest

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_inputs(data, bundle)
        onnx: dict[tuple[str, int], dict[str, Any]] = {}
        with server("noop_app", bundle) as (url, pid):
            for case in CASES:
                for c in CONCURRENCY:
                    onnx[case, c] = load(url, case, c, seconds, data)
            # the /encode target's ratio from back-to-back pairs: cells minutes apart drift apart
            pairs = [
                (load(url, "noop", 32, seconds, data), load(url, "encode", 32, seconds, data))
                for _ in range(PAIRS)
            ]
            rss_onnx = rss_mib(pid)
        eager: dict[tuple[str, int], dict[str, Any]] = {}
        with server("torch_app", bundle) as (url, pid):
            for case in CASES:
                if case != "noop":
                    for c in CONCURRENCY:
                        eager[case, c] = load(url, case, c, seconds, data)
            rss_torch = rss_mib(pid)
        ready = start_to_ready(bundle)
        local = in_process(bundle)
        drift = check_torch_matches_onnx(bundle)

    print(f"# Serving benchmark, {now()}\n")
    print(f"- command: `python -m bench.serving --bundle {bundle} --seconds {seconds:g}`")
    print(f"- machine: {machine()}; server and load generator share these cores")
    print(f"- bundle: {bundle}; uvicorn, 1 worker, default settings")
    print(f"- {seconds:g} s per cell after {WARM_UP_S} s warm-up; p50/p99 are per-request latency")
    print(f"- whole run: {time.perf_counter() - started:.0f} s\n")
    print("## Requests over HTTP (ONNX, micro-batching on) beside torch eager in the same app\n")
    print("| request | concurrency | req/s | p50 ms | p99 ms | torch eager: req/s, p50, p99 |")
    print("|---|---|---|---|---|---|")
    for case_name, case in CASES.items():
        for c in CONCURRENCY:
            t = eager.get((case_name, c))
            extra = f"{t['rps']:,.0f}, {t['p50_ms']:.1f}, {t['p99_ms']:.1f}" if t else "-"
            print(fmt_row(case.name, c, onnx[case_name, c], extra))
    print("\n## In-process ONNX (one intra-op thread, no HTTP)\n")
    print("| network | batch 1 img/s | batch 64 img/s | batch 256 img/s |")
    print("|---|---|---|---|")
    for net in ("encoder", "decoder"):
        print(
            f"| {net} | " + " | ".join(f"{local[f'{net} {n}']:,.0f}" for n in (1, 64, 256)) + " |"
        )
    print(
        f"\nRuntime.evaluate (a default /elbo's math: 64 images, 1 ELBO draw, the default score "
        f"{read_manifest(bundle).default_score}): {local['elbo 64']:,.0f} img/s\n"
    )
    print("## Process\n")
    print(
        f"- start-to-ready of `vae serve` (process start to first 200 on /readyz, median of 3): "
        f"{ready:.2f} s"
    )
    print(
        f"- resident memory after the run: ONNX server {rss_onnx:.0f} MiB, torch eager server "
        f"{rss_torch:.0f} MiB"
    )
    print(f"- torch eager vs onnxruntime outputs, largest absolute difference: {drift:.1e}\n")
    print("## /encode beside the no-op, back to back at concurrency 32\n")
    print("| pair | no-op req/s | /encode req/s | ratio | /encode p99 ms |")
    print("|---|---|---|---|---|")
    ratios = []
    for i, (noop, encode) in enumerate(pairs, 1):
        ratios.append(encode["rps"] / noop["rps"])
        print(
            f"| {i} | {noop['rps']:,.0f} | {encode['rps']:,.0f} | {ratios[-1]:.0%} |"
            f" {encode['p99_ms']:.1f} |"
        )
    ratio = statistics.median(ratios)
    print()
    print("## Targets\n")
    elbo_batched = max(
        onnx["elbo", 32]["rps"], onnx["elbo64", 32]["rps"] * 64, onnx["elbo64npy", 32]["rps"] * 64
    )
    checks = [
        (
            f"/encode at concurrency 32 >= 80% of no-op req/s: median of {PAIRS} back-to-back "
            f"pairs {ratio:.0%}",
            ratio >= 0.8,
        ),
        (
            f"batched /elbo img/s >= 80% of in-process: best of 1-image, 64-PNG and 64-image .npy "
            f"requests at concurrency 32 {elbo_batched:,.0f} / {local['elbo 64']:,.0f} "
            f"= {elbo_batched / local['elbo 64']:.0%}",
            elbo_batched >= 0.8 * local["elbo 64"],
        ),
        (f"start-to-ready <= 1.5 s: {ready:.2f} s", ready <= 1.5),
    ]
    for text, ok in checks:
        print(f"- {'met' if ok else 'MISSED'}: {text}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle directory")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--log-level", default="WARNING", help="logging level")
    p.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # the load process
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.load:
        result = asyncio.run(
            generate(
                args.load, CASES[args.case], args.concurrency, args.seconds, args.data, args.client
            )
        )
        print(json.dumps(result))
        return
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"no bundle at {args.bundle}: pass --bundle DIR")
    run(args.bundle, args.seconds)


if __name__ == "__main__":
    main()
