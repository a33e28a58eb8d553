"""Anomaly detection through the real server, with each bundle's DEFAULT score (POST /elbo).

One-class MNIST (Ruff et al. 2018, Deep SVDD): for each digit c, a VAE trained on the training
images of c only (bench/oneclass_models.py, cached) is served by `vae serve`; all 10,000 test
images are scored, and the AUROC of c (normal) against the other nine digits (anomalous) is
reported, for MNIST as it is and for two variants made from it: inverted (255 - x) and
colourised (a random stroke and background colour per image, 3-channel models).

The OOD battery (bench/ood_battery.py): a bundle (default: the shipped one, service/bundles/mnist)
scores the MNIST test images (normal) and every set of the battery; AUROC per set.

The cost: /elbo (1 PNG) at concurrency 32 with the default score against score=neg_elbo, on the
same server, interleaved (bench/serving.py's load process).

    python -m bench.anomaly oneclass --variants plain,inverted,rgb --out bench/results/anomaly.json
    python -m bench.anomaly ood --out bench/results/ood.json
    python -m bench.anomaly cost
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench import serving
from bench.common import REPO, machine, now, require_mnist
from bench.oneclass_models import RECIPES, apply_variant, mnist_pixels, train_and_export
from bench.ood_battery import battery
from service.settings import DEFAULT_BUNDLE

PUBLISHED = [
    ("Deep SVDD (Ruff et al. 2018)", 94.8),
    ("OCGAN (Perera et al. 2019)", 97.5),
    ("GEOM (Golan and El-Yaniv 2018)", 98.0),
    ("ARNet (Fei et al. 2020)", 98.3),
    ("AGAD (2023)", 99.1),
]
TEST_SEED = 12345  # colours of the test images (training images use the digit as seed)


def png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    """The real server (`vae serve`) on a free loopback port."""

    def __init__(self, bundle: Path) -> None:
        self.port = serving.free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "VAE_MAX_ROWS": "500000",  # 500 images x up to 1000 draws per request
            "VAE_MAX_UPLOAD_BYTES": str(64 << 20),
            "VAE_LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*command, "--bundle", str(bundle)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            serving.wait_ready(self.url, self.proc)  # type: ignore[arg-type]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def score_all(url: str, images: list[str], batch: int = 500) -> dict[str, Any]:
    """The default score and -ELBO of every image (one /elbo call per batch), and the score's
    name and threshold."""
    default, neg_elbo = [], []
    body: dict[str, Any] = {}
    with httpx.Client(timeout=300) as client:
        for i in range(0, len(images), batch):
            r = client.post(f"{url}/elbo", json={"images": images[i : i + batch]})
            r.raise_for_status()
            body = r.json()
            default += [res["anomaly_score"] for res in body["results"]]
            neg_elbo += [-res["elbo"] for res in body["results"]]
    return {
        "default": np.asarray(default),
        "neg_elbo": np.asarray(neg_elbo),
        "score": body["score"],
        "threshold": body["threshold"],
    }


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    truth = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(truth, np.r_[normal, anomalous]))


def oneclass(args: argparse.Namespace) -> dict[str, Any]:
    data = require_mnist()
    pixels, labels = mnist_pixels(data, "test")
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for variant in args.variants.split(","):
        images = [png_b64(img) for img in apply_variant(pixels, variant, TEST_SEED)]
        rows: dict[int, dict[str, Any]] = {}
        for digit in (int(d) for d in args.digits.split(",")):
            bundle = train_and_export(
                digit, variant, data, args.cache, args.epochs, args.latent_dim
            )
            server = Server(bundle)
            try:
                scores = score_all(server.url, images)
            finally:
                server.close()
            normal = labels == digit
            rows[digit] = {
                "default_score": scores["score"],
                "default": 100 * auroc(scores["default"][normal], scores["default"][~normal]),
                "neg_elbo": 100 * auroc(scores["neg_elbo"][normal], scores["neg_elbo"][~normal]),
                "test_fpr": float(np.mean(scores["default"][normal] > scores["threshold"])),
            }
            print(f"{variant} digit {digit}: {rows[digit]}", file=sys.stderr, flush=True)
        results[variant] = rows
    print(f"# one-class MNIST AUROC (%), {now()}, {machine()}")
    print(
        f"# VAE {args.latent_dim} latent, (network, epochs) per variant "
        f"{args.epochs or RECIPES}; "
        f"POST /elbo, each bundle's default score; {time.perf_counter() - t0:.0f} s\n"
    )
    for variant, rows in results.items():
        digits = list(rows)
        chosen = sorted({r["default_score"] for r in rows.values()})
        print(f"\n{variant}: default score(s) {', '.join(chosen)}")
        print("| score | " + " | ".join(str(d) for d in digits) + " | mean | worst |")
        print("|---|" + "---|" * (len(digits) + 2))
        for key, label in (("default", "default score"), ("neg_elbo", "-ELBO")):
            vals = [rows[d][key] for d in digits]
            print(
                f"| {label} | "
                + " | ".join(f"{v:.1f}" for v in vals)
                + f" | **{np.mean(vals):.1f}** | {min(vals):.1f} |"
            )
        fprs = [rows[d]["test_fpr"] for d in digits]
        print(
            "| FPR of the default threshold on the test images of c (%) | "
            + " | ".join(f"{100 * f:.1f}" for f in fprs)
            + f" | {100 * np.mean(fprs):.1f} | |"
        )
    print("\n| published (plain MNIST) | mean |\n|---|---|")
    for name, mean in PUBLISHED:
        print(f"| {name} | {mean:.1f} |")
    return results


def ood(args: argparse.Namespace) -> dict[str, Any]:
    data = require_mnist()
    pixels, labels = mnist_pixels(data, "test")
    sets = battery(pixels, labels, args.n, seed=args.seed)
    server = Server(args.bundle)
    try:
        normal = score_all(server.url, [png_b64(img) for img in pixels])
        rows = {}
        for name, images in sets.items():
            s = score_all(server.url, [png_b64(img) for img in images])
            rows[name] = {
                "default": auroc(normal["default"], s["default"]),
                "neg_elbo": auroc(normal["neg_elbo"], s["neg_elbo"]),
                "flagged": float(np.mean(s["default"] > normal["threshold"])),
            }
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    finally:
        server.close()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    print(f"# OOD battery AUROC, {now()}, {machine()}")
    print(
        f"# {manifest['name']} {manifest['version']}, default score {normal['score']}; normal: "
        f"the 10,000 MNIST test images; {args.n} images per set, seed {args.seed}\n"
    )
    print("| set | default score | -ELBO | flagged by the default threshold |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['default']:.3f} | {r['neg_elbo']:.3f} | {100 * r['flagged']:.1f} % |")
    worst = min(rows, key=lambda n: rows[n]["default"])
    print(
        f"\nworst set: {worst} ({rows[worst]['default']:.3f}); MNIST test images flagged: "
        f"{100 * float(np.mean(normal['default'] > normal['threshold'])):.1f} %"
    )
    return {"bundle": str(args.bundle), "score": normal["score"], "sets": rows}


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved cells of /elbo (1 PNG) at concurrency 32: default score, then score=neg_elbo."""
    inputs = REPO / "runs" / "bench-anomaly" / "cost-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    serving.write_inputs(inputs, args.bundle)  # the PNGs the serving bench sends
    rates: dict[str, list[float]] = {"elbo": [], "elbo_neg_elbo": []}
    with serving.server("noop_app", args.bundle) as (url, _):
        for _ in range(args.pairs):
            for case in rates:
                rates[case].append(serving.load(url, case, 32, args.seconds, inputs)["rps"])
    default, baseline = statistics.median(rates["elbo"]), statistics.median(rates["elbo_neg_elbo"])
    print(
        f"# /elbo (1 PNG) at concurrency 32, {now()}, {machine()}, {args.pairs} interleaved "
        f"pairs of {args.seconds:.0f} s cells, medians"
    )
    print(
        f"default score: {default:.0f} req/s {rates['elbo']}; score=neg_elbo: {baseline:.0f} "
        f"req/s {rates['elbo_neg_elbo']}; ratio {default / baseline:.2f}"
    )
    return {"rps": rates, "ratio": default / baseline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    one = sub.add_parser("oneclass", help="the one-class MNIST protocol and its variants")
    one.add_argument("--variants", default="plain,inverted,rgb")
    one.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    one.add_argument("--epochs", type=int, help="default: per variant, " + str(RECIPES))
    one.add_argument("--latent-dim", type=int, default=16)
    one.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-anomaly")
    battery_parser = sub.add_parser("ood", help="the OOD battery against one bundle")
    battery_parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    battery_parser.add_argument("--n", type=int, default=1000, help="images per set")
    battery_parser.add_argument("--seed", type=int, default=0)
    cost_parser = sub.add_parser("cost", help="/elbo req/s, default score against -ELBO")
    cost_parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    cost_parser.add_argument("--pairs", type=int, default=3)
    cost_parser.add_argument("--seconds", type=float, default=5.0)
    for parser in (one, battery_parser, cost_parser):
        parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = p.parse_args()
    result = {"oneclass": oneclass, "ood": ood, "cost": cost}[args.command](args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
