"""Model quality: test ELBO and IWAE NLL (nats) on dynamically binarised MNIST, beside the papers.

    python -m bench.quality runs/mnist-mlp/checkpoint_best.pt [more checkpoints] --k 1000
    python -m bench.quality service/bundles/mnist --k 1000     # a bundle: its ONNX files' weights

Each checkpoint is evaluated on the MNIST test set, each image binarised once with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import machine, now, require_mnist
from model.data import load_idx_dir
from model.evaluate import evaluate
from model.train import model_from_checkpoint

LITERATURE = [
    ("VAE, 1 stochastic layer (Burda et al. 2015, k=5000)", 86.76),
    ("IWAE, 2 stochastic layers, k=50 (Burda et al. 2015, k=5000)", 82.90),
    ("NVAE (Vahdat & Kautz 2020)", 78.01),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--k", type=int, default=1000, help="IWAE samples per image")
    p.add_argument("--images", type=int, default=0, help="first N test images; 0 = all 10,000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = load_idx_dir(require_mnist(), "test").images
    x = x[: args.images] if args.images else x
    rows = []
    for ckpt_path in args.checkpoints:
        model, ckpt = model_from_checkpoint(ckpt_path)
        t0 = time.perf_counter()
        res = evaluate(model, x, k=args.k, seed=args.seed, chunk=250)
        cfg = ckpt["config"]
        rows.append(
            {
                "checkpoint": str(ckpt_path),
                "architecture": cfg["architecture"],
                "latent_dim": cfg["latent_dim"],
                "epochs": ckpt["epoch"],
                "objective": ckpt["train"]["objective"],
                "parameters": sum(p.numel() for p in model.parameters()),
                "seconds": time.perf_counter() - t0,
                **res,
            }
        )
    print(f"# model quality, {now()}, {machine()}")
    print(f"# {len(x)} MNIST test images, dynamically binarised (seed {args.seed}), k={args.k}\n")
    print("| model | epochs | params | test ELBO | test NLL (IWAE) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['architecture']} latent {r['latent_dim']} ({r['objective']}) "
            f"`{r['checkpoint']}` "
            f"| {r['epochs']} | {r['parameters']:,} | {-r['test_elbo']:.2f} | "
            f"{r['test_nll_iwae']:.2f} |"
        )
    for name, nll in LITERATURE:
        print(f"| {name} | | | | {nll:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
