"""`vae score` throughput on 28x28 PNGs from a directory, against the same math without Ray.

    python -m bench.batch [--images 20000] [--rounds 3] [--bundle DIR]

Four ways to score the same MNIST PNG files (decode, ELBO, score, percentile, verdict), each image
as POST /elbo scores it alone with seed 0, interleaved round by round (medians reported):
- `in-process`: the compute limit, no Ray: one process per core (ProcessPoolExecutor), each
  decoding its share of the files with service.batch.load_image and scoring batches of 64 with
  the server's Runtime, as a Scorer does; timed from the files' bytes in memory to the rows.
  Ray runs its workers at niceness 15; here they run at 0 (RAY_worker_niceness=0), as every
  other process here does, so that on a shared machine each way gets the same share of the
  cores.
- `vae score, N actors`: the command itself (`--actors N`); `job` is the Ray Data job (read from
  disk, score, write Parquet), `wall` adds Ray's start and the bundle check.
- `2 actors parquet`: the same PNG bytes as one Parquet file (an image column), which Ray reads
  in a few tasks instead of one small read per file.
- `POST /elbo x64`: a plain loop of 64-image multipart requests to a real `vae serve`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from bench.common import REPO, machine, now, require_mnist
from bench.serving import free_port, wait_ready
from service.batch import ROWS, Scorer, build_parser, resolve_options
from service.bundle import load_bundle
from service.runtime import available_cpus
from service.settings import Settings

_scorer: Scorer | None = None
DEFAULT_BUNDLE = Settings.model_fields["bundle"].default  # the server's default bundle


def write_pngs(directory: Path, n: int) -> list[Path]:
    """The first `n` MNIST training digits as 28x28 grey PNGs, 1,000 to a folder."""
    raw = gzip.decompress((require_mnist() / "train-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    files = []
    for i, image in enumerate(images):
        path = directory / f"{i // 1000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        files.append(path)
    return files


def _start(bundle: str) -> None:
    global _scorer
    args = build_parser().parse_args([".", "--bundle", bundle, "--out", "."])
    loaded = load_bundle(args.bundle, device="cpu", threads=1)
    _scorer = Scorer(resolve_options(args, loaded, Settings(bundle=args.bundle)))


def _score(blobs: list[bytes]) -> int:
    """What the actors do, without Ray: a Scorer on batches of the files' bytes, as large."""
    assert _scorer is not None
    rows, size = 0, _scorer.options.batch_size
    for i in range(0, len(blobs), size):
        chunk = blobs[i : i + size]
        keys = [str(j) for j in range(i, i + len(chunk))]
        rows += _scorer(pa.table([keys, chunk, [None] * len(chunk)], schema=ROWS)).num_rows
    return rows


def in_process(pool: ProcessPoolExecutor, blobs: list[bytes], workers: int) -> float:
    share = -(-len(blobs) // workers)
    start = time.perf_counter()
    done = sum(pool.map(_score, [blobs[i : i + share] for i in range(0, len(blobs), share)]))
    assert done == len(blobs)
    return len(blobs) / (time.perf_counter() - start)


def write_parquet(path: Path, files: list[Path]) -> Path:
    import pyarrow.parquet as pq

    table = pa.table({"key": [str(f) for f in files], "image": [f.read_bytes() for f in files]})
    pq.write_table(table, path)
    return path


def vae_score(source: Path, bundle: Path, actors: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "service.cli", "score", str(source)]
        command += ["--bundle", str(bundle), "--out", f"{out}/run", "--actors", str(actors)]
        command += ["--log-level", "warning"]
        command += ["--key-column", "key"] if source.suffix == ".parquet" else []
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAE_", "RAY_ADDRESS"))}
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        env["RAY_worker_niceness"] = "0"
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
        report: dict[str, Any] = json.loads(Path(f"{out}/run/run.json").read_text())
    return report


def http_loop(url: str, files: list[Path]) -> float:
    import httpx

    blobs = [(f.name, f.read_bytes()) for f in files]
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for i in range(0, len(blobs), 64):
            parts = [("images", blob) for blob in blobs[i : i + 64]]
            response = client.post("/elbo", params={"seed": 0}, files=parts)
            response.raise_for_status()
    return len(blobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="default: the shipped one"
    )
    args = parser.parse_args()
    cores = available_cpus()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "pngs"
        files = write_pngs(source, args.images)
        table = write_parquet(Path(tmp) / "pngs.parquet", files)
        blobs = [f.read_bytes() for f in files]
        port = free_port()
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        command += ["--bundle", str(args.bundle), "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
        server = subprocess.Popen(command, cwd=REPO, env=env)
        pool = ProcessPoolExecutor(cores, initializer=_start, initargs=(str(args.bundle),))
        try:
            wait_ready(f"http://127.0.0.1:{port}", server)
            in_process(pool, blobs[: 64 * cores], cores)  # warm the workers
            for r in range(args.rounds):
                ways = ["in-process", "1 actor", "2 actors", "2 actors parquet", "http"]
                for name in ways[r % 5 :] + ways[: r % 5]:
                    if name == "in-process":
                        results.setdefault(name, []).append(in_process(pool, blobs, cores))
                    elif name == "http":
                        rate = http_loop(f"http://127.0.0.1:{port}", files)
                        results.setdefault(name, []).append(rate)
                    else:
                        where = table if name.endswith("parquet") else source
                        report = vae_score(where, args.bundle, int(name[0]))
                        assert report["rows_out"] == args.images and report["failures"] == 0
                        results.setdefault(f"{name} job", []).append(
                            report["rows_out"] / report["job_s"]
                        )
                        results.setdefault(f"{name} wall", []).append(report["images_per_s"])
                    print(f"round {r}: {name} done", file=sys.stderr)
        finally:
            pool.shutdown()
            server.terminate()
            server.wait(timeout=30)
    limit = statistics.median(results["in-process"])
    print(f"## vae score: {args.images} 28x28 PNGs, {now()}, {machine()}, {args.rounds} rounds")
    print("| way | images/s (median) | runs | of in-process |")
    print("|---|---:|---|---:|")
    for name, rates in results.items():
        median = statistics.median(rates)
        runs = ", ".join(f"{rate:.0f}" for rate in rates)
        print(f"| {name} | {median:.0f} | {runs} | {median / limit:.0%} |")


if __name__ == "__main__":
    main()
