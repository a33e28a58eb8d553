"""torchrun data-parallel training (gloo, CPU) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _run(out: Path, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    _run(tmp_path / "one", 1)
    _run(tmp_path / "two", 2)
    single = torch.load(tmp_path / "one" / "rank0.pt")
    r0 = torch.load(tmp_path / "two" / "rank0.pt")
    r1 = torch.load(tmp_path / "two" / "rank1.pt")
    for name in single:
        # both ranks hold bit-identical weights after the all-reduce
        assert torch.equal(r0[name], r1[name]), name
        # and they match one process with the same global batch and seed, up to the order of
        # floating-point sums in the gradient average (2 epochs of Adam: 1e-4 absolute)
        torch.testing.assert_close(r0[name], single[name], atol=1e-4, rtol=1e-3)
    assert (tmp_path / "two" / "checkpoint_best.pt").is_file()
    # the history is the whole global batch's: the training bound over both ranks' slices (as
    # one process measures it) and images/s counting each image once
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    for a, b in zip(one, two, strict=True):
        assert b["train_bound"] == pytest.approx(a["train_bound"], rel=1e-3)
        per_epoch = 1797 - 197  # digits minus the validation split
        assert b["images_per_s"] == pytest.approx(per_epoch / b["seconds"], rel=1e-6)
