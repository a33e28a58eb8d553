"""Anomaly detection, the one-class MNIST protocol (Ruff et al. 2018, Deep SVDD), via the server.

For each digit c: train a VAE on the training images of c only (cached under --cache), export it,
start the real server on it, score all 10,000 test images through POST /elbo, and report the AUROC
of c (normal) against the other nine digits (anomalous), for each score the server offers.

    python -m bench.anomaly --epochs 40
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench.common import REPO, machine, now, require_mnist
from model.data import load_idx_dir

PUBLISHED = [
    ("OC-SVM", 91.3),
    ("KDE", 86.9),
    ("Isolation Forest", 92.3),
    ("DCAE", 89.7),
    ("AnoGAN", 91.3),
    ("Deep SVDD (Ruff et al. 2018)", 94.8),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_and_export(digit: int, data: Path, cache: Path, epochs: int, latent: int) -> Path:
    """Train (unless the checkpoint is cached) and export (unless the bundle is current)."""
    run, bundle = cache / f"digit{digit}", cache / f"digit{digit}" / "bundle"
    manifest = bundle / "manifest.json"
    if (
        manifest.is_file()
        and "blur_recon_rel" in json.loads(manifest.read_text())["calibration"]["scores"]
    ):
        return bundle
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    vae = [sys.executable, "-m", "model.cli"]
    if not (run / "checkpoint_best.pt").is_file():
        subprocess.run(
            [
                *vae,
                "train",
                "--data",
                str(data),
                "--classes",
                str(digit),
                "--architecture",
                "mlp",
                "--hidden-dims",
                "512,256",
                "--latent-dim",
                str(latent),
                "--epochs",
                str(epochs),
                "--val-size",
                "0.1",
                "--kl-warmup-epochs",
                "5",
                "--threads",
                "1",
                "--out",
                str(run),
                "--force",  # a run interrupted before its first best checkpoint starts over
                "--log-level",
                "WARNING",
            ],
            env=env,
            check=True,
            stderr=subprocess.DEVNULL,
        )
    subprocess.run(
        [
            *vae,
            "export",
            str(run / "checkpoint_best.pt"),
            "--out",
            str(bundle),
            "--name",
            f"mnist-digit{digit}",
            "--calibration-k",
            "64",
            "--default-score",
            "blur_recon_rel",
            "--log-level",
            "WARNING",
            "--overwrite",
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return bundle


def png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    """The real server (`vae serve`) on a free loopback port."""

    def __init__(self, bundle: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "VAE_MAX_IMAGES": "500",
            "VAE_MAX_UPLOAD_BYTES": str(64 << 20),
            "VAE_LOG_LEVEL": "WARNING",
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(self.port),
                "--bundle",
                str(bundle),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"server on {bundle} not ready within 60 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


SCORES = {
    "neg_elbo": "-ELBO",
    "neg_iwae": "-IWAE",
    "recon_error": "recon_error",
    "blur_recon_rel": "blur_recon_rel",
}


def score_all(url: str, images: list[str], k: int, batch: int = 500) -> dict[str, np.ndarray]:
    """Every score for every image: one /elbo call with k (ELBO, IWAE and recon_error in one
    response) and one for blur_recon_rel, per batch; k=0 skips the IWAE (NaN)."""
    out: dict[str, list[float]] = {name: [] for name in SCORES}
    with httpx.Client(timeout=300) as client:

        def post(params: dict[str, Any], chunk: list[str]) -> list[dict[str, Any]]:
            r = client.post(f"{url}/elbo", params=params, json={"images": chunk})
            r.raise_for_status()
            results: list[dict[str, Any]] = r.json()["results"]
            return results

        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            params: dict[str, Any] = {"score": "recon_error", **({"k": k} if k else {})}
            for res in post(params, chunk):
                out["neg_elbo"].append(-res["elbo"])
                out["neg_iwae"].append(-res["iwae"] if k else float("nan"))
                out["recon_error"].append(res["anomaly_score"])
            for res in post({"score": "blur_recon_rel"}, chunk):
                out["blur_recon_rel"].append(res["anomaly_score"])
    return {key: np.asarray(v) for key, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--k", type=int, default=64, help="importance samples for the -IWAE score")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-anomaly")
    p.add_argument("--out", type=Path, help="write per-class AUROCs as JSON")
    p.add_argument(
        "--unseen",
        type=int,
        default=5000,
        help="also score this many training images of the other digits (never seen by the model; "
        "seed 0) as the anomalies, against the test images of c: a check on a score chosen by "
        "test AUROC; 0 = skip",
    )
    args = p.parse_args()
    data = require_mnist()
    test = load_idx_dir(data, "test")
    assert test.labels is not None
    labels = test.labels.numpy()
    pixels = (test.images[:, 0].numpy() * 255).round().astype(np.uint8)
    images = [png_b64(img) for img in pixels]
    train = load_idx_dir(data, "train")
    assert train.labels is not None
    train_labels = train.labels.numpy()
    train_pixels = (train.images[:, 0].numpy() * 255).round().astype(np.uint8)
    rows: dict[int, dict[str, float]] = {}
    unseen_rows: dict[int, dict[str, float]] = {}
    t0 = time.perf_counter()
    for digit in (int(d) for d in args.digits.split(",")):
        bundle = train_and_export(digit, data, args.cache, args.epochs, args.latent_dim)
        server = Server(bundle)
        others = np.random.default_rng(0).choice(
            np.flatnonzero(train_labels != digit), args.unseen, replace=False
        )
        try:
            scores = score_all(server.url, images, args.k)
            unseen = score_all(server.url, [png_b64(train_pixels[i]) for i in others], 0)
        finally:
            server.close()
        anomalous = labels != digit
        rows[digit] = {name: 100 * roc_auc_score(anomalous, s) for name, s in scores.items()}
        if args.unseen:
            normal = ~anomalous
            truth = np.r_[np.zeros(normal.sum()), np.ones(args.unseen)]
            unseen_rows[digit] = {
                name: 100 * roc_auc_score(truth, np.r_[scores[name][normal], unseen[name]])
                for name in ("recon_error", "blur_recon_rel")
            }
        print(
            f"digit {digit}: " + ", ".join(f"{n} {v:.1f}" for n, v in rows[digit].items()),
            file=sys.stderr,
        )
    print(f"# one-class MNIST AUROC (%), {now()}, {machine()}")
    print(
        f"# MLP VAE 512-256, latent {args.latent_dim}, {args.epochs} epochs per class; scores "
        f"from POST /elbo (k={args.k}); {time.perf_counter() - t0:.0f} s\n"
    )
    print("| score | " + " | ".join(str(d) for d in rows) + " | mean |")
    print("|---|" + "---|" * (len(rows) + 1))
    for n, label in SCORES.items():
        vals = [rows[d][n] for d in rows]
        print(
            f"| {label} (this server) | "
            + " | ".join(f"{v:.1f}" for v in vals)
            + f" | **{np.mean(vals):.1f}** |"
        )
    for name, mean in PUBLISHED:
        print(f"| {name} |" + " |" * len(rows) + f" {mean:.1f} |")
    if unseen_rows:
        print(
            f"\nCheck with unseen anomalies: normal = the test images of c, anomalous = "
            f"{args.unseen:,} training images of the other digits (seed 0)\n"
        )
        print("| score | " + " | ".join(str(d) for d in unseen_rows) + " | mean |")
        print("|---|" + "---|" * (len(unseen_rows) + 1))
        for n in ("recon_error", "blur_recon_rel"):
            vals = [unseen_rows[d][n] for d in unseen_rows]
            print(
                f"| {n} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | **{np.mean(vals):.1f}** |"
            )
    if args.out:
        result = {"test": rows, "unseen_train_anomalies": unseen_rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
