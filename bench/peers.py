"""This server beside TorchServe and Triton (PyTriton) on the same encoder, in one interleaved run.

python -m bench.peers --torchserve VENV --pytriton VENV [--rounds 3] [--seconds 8]

Every system does the work of this project's POST /encode for one image: a PNG in, decoded by
Pillow, the served bundle's encoder.onnx on onnxruntime (1 thread, CPU), mu and logvar out
(bench/peer_servers/ holds the peers' code and how to install them). Before measuring, each peer's
mu for the same PNG is checked against this server's. Load comes from `wrk` (one thread, a fresh
process per cell, after a warm-up and a second's pause); each round runs every cell once, so all
systems share the same minutes of the machine; medians over rounds, and each server's CPU cores
used during its cells.

Optional peers: a peer whose virtual environment is not given or lacks its server is skipped,
with the reason printed; without `wrk` nothing is measured (a Python load generator would be the
bottleneck at these rates).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MNIST_DIR, REPO, machine, now
from bench.serving import free_port, server_env, wait_ready
from service.bundle import read_manifest
from service.settings import DEFAULT_BUNDLE

PEERS = REPO / "bench" / "peer_servers"
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Body:
    """A request body on disk and its headers, as wrk sends it (bench/peer_servers/post.lua)."""

    path: Path
    content_type: str
    header: tuple[str, str] | None = None

    def env(self) -> dict[str, str]:
        env = {"BODY": str(self.path), "CT": self.content_type}
        if self.header:
            env |= {"HNAME": self.header[0], "HVALUE": self.header[1]}
        return env


@dataclass(frozen=True)
class System:
    """One measured configuration: which server, which URL, which body, images per request."""

    label: str
    server: str
    path: str
    body: str
    images: int = 1


SYSTEMS = {
    "vae": System("this server, 1 worker, multipart", "vae", "/encode", "multipart"),
    "vae-raw": System("this server, 1 worker, raw image/png body", "vae", "/encode", "png"),
    "vae-2w": System("this server, --workers 2, multipart", "vae-2w", "/encode", "multipart"),
    "vae-2w-raw": System("this server, --workers 2, raw image/png", "vae-2w", "/encode", "png"),
    "ts-b1": System("TorchServe, 2 workers, batch 1", "ts", "/predictions/encoder", "png"),
    "ts-b16": System(
        "TorchServe, 2 workers, batch 16 / 5 ms", "ts", "/predictions/encoder_b16", "png"
    ),
    "triton-1i": System(
        "Triton (PyTriton), 1 instance, dynamic batcher",
        "triton",
        "/v2/models/encoder/infer",
        "triton",
    ),
    "triton-2i": System(
        "Triton (PyTriton), 2 instances, dynamic batcher",
        "triton",
        "/v2/models/encoder_2i/infer",
        "triton",
    ),
    "vae-npy64": System("this server, 1 worker, 64 images as .npy", "vae", "/encode", "npy", 64),
    "vae-2w-npy64": System("this server, --workers 2, 64 as .npy", "vae-2w", "/encode", "npy", 64),
    "ts-npy64": System(
        "TorchServe, 2 workers, 64 images as .npy", "ts", "/predictions/encoder_npy", "npy", 64
    ),
    "triton-u8-64": System(
        "Triton (PyTriton), 64 images as one UINT8 tensor",
        "triton",
        "/v2/models/encoder_u8/infer",
        "triton_u8",
        64,
    ),
}
CELLS = [
    *[(s, 1) for s in ("vae", "vae-raw", "vae-2w", "ts-b1", "ts-b16", "triton-1i")],
    *[(s, 32) for s in ("vae", "vae-raw", "vae-2w", "vae-2w-raw", "ts-b1", "ts-b16")],
    *[(s, 32) for s in ("triton-1i", "triton-2i")],
    *[(s, c) for c in (1, 8) for s in ("vae-npy64", "vae-2w-npy64", "ts-npy64", "triton-u8-64")],
]


def write_bodies(folder: Path, bundle: Path) -> dict[str, Body]:
    """One MNIST test digit as PNG (noise where MNIST is absent), 64 as .npy, and their bodies."""
    from PIL import Image

    manifest = read_manifest(bundle)
    c, h, w = manifest.input_shape
    if c != 1:
        sys.exit(f"bench.peers needs a grey (1-channel) bundle; {bundle} has {c} channels")
    images_file = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    if images_file.is_file() and (h, w) == (28, 28):
        import gzip

        with gzip.open(images_file) as f:
            pixels = np.frombuffer(f.read(), np.uint8, offset=16)[: 64 * 784].reshape(64, 28, 28)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (64, h, w), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    npy = io.BytesIO()
    np.save(npy, pixels)
    files = {"digit.png": png.getvalue(), "64.npy": npy.getvalue()}
    boundary = "vaebenchboundary7f3a"
    files["multipart.bin"] = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="images"; filename="digit.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def v2(name: str, shape: list[int], datatype: str, data: bytes) -> tuple[bytes, str]:
        """KServe v2 with the binary-data extension: a JSON header, then the raw tensor."""
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "shape": shape,
                        "datatype": datatype,
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
                "outputs": [
                    {"name": n, "parameters": {"binary_data": False}} for n in ("mu", "logvar")
                ],
            },
            separators=(",", ":"),
        ).encode()
        return head + data, str(len(head))

    element = struct.pack("<I", len(png.getvalue())) + png.getvalue()  # one BYTES element
    files["triton.bin"], triton_head = v2("image", [1, 1], "BYTES", element)
    files["triton_u8.bin"], u8_head = v2("x", [64, h, w], "UINT8", pixels.tobytes())
    for name, data in files.items():
        (folder / name).write_bytes(data)
    length = "Inference-Header-Content-Length"
    return {
        "png": Body(folder / "digit.png", "image/png"),
        "npy": Body(folder / "64.npy", "application/x-npy"),
        "multipart": Body(folder / "multipart.bin", f"multipart/form-data; boundary={boundary}"),
        "triton": Body(folder / "triton.bin", "application/octet-stream", (length, triton_head)),
        "triton_u8": Body(folder / "triton_u8.bin", "application/octet-stream", (length, u8_head)),
    }


@dataclass
class Running:
    url: str
    process: subprocess.Popen[bytes]


def start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """A server in its own process group (stopped whole), its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def poll(url: str, timeout: float, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until `url` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{process.args} exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    sys.exit(f"{url} did not answer within {timeout:g} s; see {log}")


def post(url: str, data: bytes, headers: dict[str, str], method: str = "POST") -> Any:
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read() or b"null")


def start_vae(bundle: Path, workers: int, work: Path, stack: contextlib.ExitStack) -> Running:
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning"]
    process = start(command, server_env(bundle), REPO, work / f"vae-{workers}w.log")
    stack.callback(stop, process)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    return Running(url, process)


def start_torchserve(venv: Path, bundle: Path, work: Path, stack: contextlib.ExitStack) -> Running:
    """TorchServe with three models: batch 1, batch 16 / 5 ms, and the .npy handler; 2 workers."""
    store, tmp = work / "ts-store", work / "ts-tmp"
    store.mkdir()
    tmp.mkdir()
    env = peer_env(venv, bundle) | {"TMPDIR": str(tmp)}
    for name, handler in (("encoder", "ts_handler.py"), ("encoder_npy", "ts_handler_npy.py")):
        command = [str(venv / "bin" / "torch-model-archiver"), "--model-name", name]
        command += ["--version", "1.0", "--handler", str(PEERS / handler)]
        command += ["--extra-files", str(PEERS / "common.py"), "--export-path", str(store)]
        subprocess.run(command, check=True, env=env)
    ports = [free_port() for _ in range(3)]
    config = work / "ts-config.properties"
    config.write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\n"
        f"management_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\n"
        "disable_token_authorization=true\nenable_model_api=true\n"
        "default_workers_per_model=2\n"
    )
    command = [str(venv / "bin" / "torchserve"), "--start", "--foreground", "--ncs"]
    command += ["--model-store", str(store), "--ts-config", str(config), "--disable-token-auth"]
    process = start(command, env, work, work / "torchserve.log")
    stack.callback(stop, process)
    manage = f"http://127.0.0.1:{ports[1]}"
    poll(f"{manage}/models", START_TIMEOUT_S, process, work / "torchserve.log")
    for query in (
        "url=encoder.mar&model_name=encoder",
        "url=encoder.mar&model_name=encoder_b16&batch_size=16&max_batch_delay=5",
        "url=encoder_npy.mar&model_name=encoder_npy",
    ):
        post(f"{manage}/models?{query}&initial_workers=2&synchronous=true", b"", {})
    return Running(f"http://127.0.0.1:{ports[0]}", process)


def start_pytriton(venv: Path, bundle: Path, work: Path, stack: contextlib.ExitStack) -> Running:
    port = free_port()
    python = str(venv / "bin" / "python")
    # PyTriton's Python backend stub loads libpython from LD_LIBRARY_PATH: the venv's own
    libdir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    env = peer_env(venv, bundle) | {"LD_LIBRARY_PATH": libdir}
    command = [python, str(PEERS / "pytriton_server.py"), str(port)]
    process = start(command, env, work, work / "pytriton.log")
    stack.callback(stop, process)
    url = f"http://127.0.0.1:{port}"
    for model in ("encoder", "encoder_2i", "encoder_u8"):
        poll(f"{url}/v2/models/{model}/ready", START_TIMEOUT_S, process, work / "pytriton.log")
    return Running(url, process)


def peer_env(venv: Path, bundle: Path) -> dict[str, str]:
    manifest = read_manifest(bundle)
    _, h, w = manifest.input_shape
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAE_", "PYTHON"))}
    return env | {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "PEER_ENCODER": str((bundle / "encoder.onnx").resolve()),
        "PEER_WIDTH": str(w),
        "PEER_HEIGHT": str(h),
    }


def why_not(name: str, venv: Path | None, executable: str) -> str | None:
    """Why the peer cannot run, or None."""
    if venv is None:
        return f"{name}: not measured, no virtual environment given (see bench/peer_servers)"
    if not (venv / "bin" / executable).exists():
        return f"{name}: not measured, {venv / 'bin' / executable} not found"
    if name == "TorchServe" and shutil.which("java") is None:
        return "TorchServe: not measured, it needs Java 17 (java not on PATH)"
    return None


def mu_of(system: str, url: str, bodies: dict[str, Body]) -> np.ndarray:
    """The first image's mu as `system` answers it."""
    spec = SYSTEMS[system]
    body = bodies[spec.body]
    headers = {"Content-Type": body.content_type}
    if body.header:
        headers[body.header[0]] = body.header[1]
    answer = post(url + spec.path, body.path.read_bytes(), headers)
    if spec.server.startswith("vae"):
        return np.asarray(answer["results"][0]["mu"])
    if spec.server == "ts":
        return np.asarray(answer["mu"] if spec.images == 1 else answer["mu"][0])
    outputs = {o["name"]: o for o in answer["outputs"]}
    return np.asarray(outputs["mu"]["data"][: outputs["mu"]["shape"][-1]])


def wrk(url: str, body: Body, concurrency: int, seconds: float) -> dict[str, float]:
    """One wrk run; its req/s, p50 and p99 in ms and failures."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    command += ["-s", str(PEERS / "post.lua"), url]
    out = subprocess.run(
        command, env=os.environ | body.env(), capture_output=True, text=True, timeout=seconds + 60
    ).stdout
    result = {"failures": 0.0}
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(words[1])
        elif re.match(r"\s+(50|99)%", line):
            value = re.fullmatch(r"([\d.]+)(us|ms|s|m)", words[1])
            assert value, line
            result[f"p{words[0][:-1]}_ms"] = float(value[1]) * scale[value[2]]
        elif "Non-2xx" in line or "Socket errors" in line:
            result["failures"] += sum(int(n) for n in re.findall(r"\d+", line.split(":", 1)[1]))
    if "rps" not in result:
        raise RuntimeError(f"wrk printed no rate for {url}:\n{out}")
    return result


def cpu_seconds(pid: int) -> float:
    """CPU seconds of the process group led by `pid` (every worker and child)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) == pid:  # the process group
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--torchserve", type=Path, help="TorchServe's virtual environment")
    parser.add_argument("--pytriton", type=Path, help="PyTriton's virtual environment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell")
    parser.add_argument("--only", default="", help="comma-separated systems (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "peers.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.peers needs wrk as its load generator (Debian: apt-get install wrk)")
    skipped = [
        reason
        for reason in (
            why_not("TorchServe", args.torchserve, "torchserve"),
            why_not("Triton", args.pytriton, "python"),
        )
        if reason
    ]
    for reason in skipped:
        print(reason, flush=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        bodies = write_bodies(work, args.bundle)
        servers = {
            "vae": start_vae(args.bundle, 1, work, stack),
            "vae-2w": start_vae(args.bundle, 2, work, stack),
        }
        if args.torchserve and not why_not("TorchServe", args.torchserve, "torchserve"):
            servers["ts"] = start_torchserve(args.torchserve, args.bundle, work, stack)
        if args.pytriton and not why_not("Triton", args.pytriton, "python"):
            servers["triton"] = start_pytriton(args.pytriton, args.bundle, work, stack)
        wanted = set(args.only.split(",")) if args.only else set(SYSTEMS)
        cells = [(s, c) for s, c in CELLS if SYSTEMS[s].server in servers and s in wanted]
        reference = mu_of("vae", servers["vae"].url, bodies)
        for system in {s for s, _ in cells}:
            mu = mu_of(system, servers[SYSTEMS[system].server].url, bodies)
            if not np.allclose(mu, reference, atol=1e-5):
                sys.exit(f"{system} answers mu {mu[:4]}... not this server's {reference[:4]}...")
        print(f"every system returns this server's mu; {len(cells)} cells", flush=True)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for system, c in cells:
                spec = SYSTEMS[system]
                running = servers[spec.server]
                url, body = running.url + spec.path, bodies[spec.body]
                wrk(url, body, c, 1.0)  # warm-up, discarded
                time.sleep(1.0)  # a pause, so that every worker takes part in the new connections
                before, start_time = cpu_seconds(running.process.pid), time.monotonic()
                cell = wrk(url, body, c, args.seconds)
                cell["cores"] = (cpu_seconds(running.process.pid) - before) / (
                    time.monotonic() - start_time
                )
                results.setdefault((system, c), []).append(cell)
                print(f"round {r + 1} {system} c={c}: {cell}", flush=True)
    report(results, args, skipped)


def report(
    results: dict[tuple[str, int], list[dict[str, float]]],
    args: argparse.Namespace,
    skipped: list[str],
) -> None:
    def median(cells: list[dict[str, float]], key: str) -> float:
        return statistics.median(cell.get(key, float("nan")) for cell in cells)

    print(f"\n# Side by side, {now()}\n")
    print(f"- machine: {machine()}; wrk -t1 on the same cores; {args.rounds} rounds x")
    print(f"  {args.seconds:g} s a cell, interleaved; medians")
    for reason in skipped:
        print(f"- {reason}")
    print("\n| system | c | images/s (rounds) | median | p50 ms | p99 ms | server cores | failed |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for (system, c), cells in results.items():
        spec = SYSTEMS[system]
        rounds = " / ".join(f"{cell['rps'] * spec.images:,.0f}" for cell in cells)
        rate = median(cells, "rps") * spec.images
        failed = sum(cell["failures"] for cell in cells)
        print(
            f"| {spec.label} | {c} | {rounds} | {rate:,.0f} | {median(cells, 'p50_ms'):.2f} | "
            f"{median(cells, 'p99_ms'):.2f} | {median(cells, 'cores'):.2f} | {failed:.0f} |"
        )
        rows.append(
            {
                "system": system,
                "label": spec.label,
                "c": c,
                "images_per_s": rate,
                "rounds": [cell["rps"] * spec.images for cell in cells],
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"date": now(), "machine": machine(), "skipped": skipped, "cells": rows}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
