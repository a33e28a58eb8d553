"""`vae score` throughput on 28x28 PNGs from a directory, against the same math without Ray.

    python -m bench.batch [--images 20000] [--rounds 3] [--bundle DIR] [--ways in-process,...]

Ways to score the same MNIST PNG files (decode, ELBO, score, percentile, verdict), each image
as POST /elbo scores it alone with seed 0, interleaved round by round (medians reported):
- `in-process`: the compute limit, no Ray: one process per core (ProcessPoolExecutor), each
  reading its share of the files and running a `service.batch.Scorer` (what a vae score actor
  runs) on them, batch by batch; timed from the file names to the result tables, with the files
  in the page cache as for the other ways. `in-process, 1 process`: the same in one process.
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
WAYS = ["in-process", "in-process, 1 process", "1 actor", "2 actors", "2 actors parquet", "http"]


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


def _score(paths: list[str]) -> int:
    """What the actors do, without Ray: a Scorer on the files' bytes, batch by batch."""
    assert _scorer is not None
    rows, size = 0, _scorer.options.batch_size
    for i in range(0, len(paths), size):
        chunk = [Path(path).read_bytes() for path in paths[i : i + size]]
        keys = [str(j) for j in range(i, i + len(chunk))]
        rows += _scorer(pa.table([keys, chunk, [None] * len(chunk)], schema=ROWS)).num_rows
    return rows


def in_process(pool: ProcessPoolExecutor, files: list[Path], workers: int) -> float:
    paths = [str(f) for f in files]
    share = -(-len(paths) // workers)
    start = time.perf_counter()
    done = sum(pool.map(_score, [paths[i : i + share] for i in range(0, len(paths), share)]))
    assert done == len(paths)
    return len(paths) / (time.perf_counter() - start)


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
    parser.add_argument(
        "--ways",
        type=lambda text: text.split(","),
        default=WAYS,
        help=f"comma-separated, of: {','.join(WAYS)}",
    )
    args = parser.parse_args()
    if not set(args.ways) <= set(WAYS) or "in-process" not in args.ways:
        parser.error(f"--ways takes in-process and any of {', '.join(WAYS[1:])}")
    cores = available_cpus()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "pngs"
        files = write_pngs(source, args.images)
        table = write_parquet(Path(tmp) / "pngs.parquet", files)
        port = free_port()
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        command += ["--bundle", str(args.bundle), "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
        server = subprocess.Popen(command, cwd=REPO, env=env)
        pool = ProcessPoolExecutor(cores, initializer=_start, initargs=(str(args.bundle),))
        try:
            wait_ready(f"http://127.0.0.1:{port}", server)
            in_process(pool, files[: 256 * cores], cores)  # warm the workers
            ways = args.ways
            for r in range(args.rounds):
                for name in ways[r % len(ways) :] + ways[: r % len(ways)]:
                    if name == "in-process":
                        results.setdefault(name, []).append(in_process(pool, files, cores))
                    elif name == "in-process, 1 process":
                        results.setdefault(name, []).append(in_process(pool, files, 1))
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
