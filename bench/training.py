"""Training throughput (images/s) on MNIST with one process and with two under torchrun (gloo).

python -m bench.training --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, machine, now, require_mnist

ARCHS = {
    "mlp": ["--architecture", "mlp", "--hidden-dims", "512,256"],
    "conv": ["--architecture", "conv", "--conv-channels", "32,64", "--hidden-dims", "512"],
}


def run(arch: str, nproc: int, epochs: int, data: Path, out: Path) -> float:
    args = [
        "--data",
        str(data),
        *ARCHS[arch],
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--threads",
        "1",
        "--log-level",
        "WARNING",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "model.cli", "train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "model.cli",
            "train",
            *args,
        ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    history = json.loads((out / "history.json").read_text())
    # the median over epochs after the first, which pays for warm-up
    speeds = sorted(h["images_per_s"] for h in history[1:] or history)
    return speeds[len(speeds) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--archs", default="mlp,conv")
    args = p.parse_args()
    data = require_mnist()
    print(f"# training throughput, {now()}, {machine()}\n")
    print("| architecture | 1 process (img/s) | 2 processes, gloo (img/s) | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            one = run(arch, 1, args.epochs, data, Path(tmp) / f"{arch}1")
            two = run(arch, 2, args.epochs, data, Path(tmp) / f"{arch}2")
            print(f"| {arch} | {one:,.0f} | {two:,.0f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
