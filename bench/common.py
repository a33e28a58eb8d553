"""Helpers shared by the benchmarks: where the data is, what machine this is."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("VAE_BENCH_MNIST", REPO.parent / "shared" / "data" / "mnist"))


def require_mnist() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        sys.exit(f"MNIST not found at {MNIST_DIR}: set VAE_BENCH_MNIST to a directory of IDX files")
    return MNIST_DIR


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
