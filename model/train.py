"""Fit the VAE by maximising the ELBO (or the IWAE bound) with Adam; single process or torchrun."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model import data as data_mod
from model.config import VAEConfig
from model.evaluate import bounds
from model.export import bundle_checkpoint
from model.networks import VAE
from model.objective import elbo, iwae, iwae_dreg

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything about one training run except the network's shape (that is VAEConfig)."""

    data: str = "mnist"
    out: str = "runs/vae"
    force: bool = False  # replace a run already in `out`
    classes: list[int] | None = None
    image_size: tuple[int, int] | None = None
    val_size: float = 0.1  # a fraction (< 1) or a count (>= 1) of the training images
    binarize: str = "dynamic"  # dynamic | none
    epochs: int = 50
    batch_size: int = 128  # global: split across processes under torchrun
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    kl_warmup_epochs: int = 0
    objective: str = "elbo"  # elbo | iwae
    iwae_k: int = 5
    iwae_gradient: str = "standard"  # standard | dreg (Tucker et al. 2018)
    patience: int = 0  # early stopping after this many epochs without a better val ELBO; 0 = off
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    resume: str | None = None
    init_from: str | None = None  # start from these weights with a fresh optimizer (fine-tuning)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.objective not in ("elbo", "iwae"):
            raise ValueError(f"--objective must be elbo or iwae, got {self.objective!r}")
        if self.iwae_gradient not in ("standard", "dreg"):
            raise ValueError(
                f"--iwae-gradient must be standard or dreg, got {self.iwae_gradient!r}"
            )
        if self.iwae_k <= 0:
            raise ValueError(f"--iwae-k must be positive, got {self.iwae_k}")
        if self.binarize not in ("dynamic", "none"):
            raise ValueError(f"--binarize must be dynamic or none, got {self.binarize!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"--lr-schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.val_size <= 0:
            raise ValueError(f"--val-size must be positive, got {self.val_size}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not one of auto, cpu, cuda or cuda:N") from None


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `train`, or a bundle folder's weights (bundle_checkpoint),
    with a clear error when it is neither."""
    path = Path(path)
    if path.is_dir():
        return bundle_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by `vae train`")
    return ckpt


def model_from_checkpoint(path: Path) -> tuple[VAE, dict[str, Any]]:
    ckpt = load_checkpoint(path)
    model = VAE(VAEConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def _plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["train_bound"] for h in history], label="train bound (objective)")
    ax.plot(ep, [h["val_bound"] for h in history], label="validation bound (objective)")
    ax.plot(ep, [h["val_elbo"] for h in history], label="validation ELBO", linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# curves.png is redrawn at most this often (and at the end): a matplotlib figure takes about a
# second, which on small data would cost more than the epoch it plots
PLOT_EVERY_S = 30.0


def _write_history(history: list[dict[str, float]], out: Path, plot: bool) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=1))
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    if plot:
        _plot(history, out / "curves.png")


@dataclass
class TrainResult:
    model: VAE  # the weights after the last epoch run (identical on every rank)
    summary: dict[str, Any]


RUN_FILES = (
    "checkpoint_last.pt",
    "checkpoint_best.pt",
    "history.json",
    "history.csv",
    "curves.png",
)


def previous_run(out: str, resume: str | None, force: bool) -> list[Path]:
    """The files of a run already in `out` that this one will replace; FileExistsError unless
    resuming it or forced."""
    folder = Path(out)
    previous = [folder / name for name in RUN_FILES if (folder / name).exists()]
    if not previous or resume:
        return []
    if not force:
        raise FileExistsError(
            f"--out {out} already holds a run ({previous[0].name}); pass --resume "
            f"{folder / 'checkpoint_last.pt'} to continue it, --force to replace it, or another "
            "--out"
        )
    return previous


def train(cfg: VAEConfig, tc: TrainConfig, full: data_mod.Dataset | None = None) -> TrainResult:
    """Train on `full` (default: load tc.data), saving checkpoint_{last,best}.pt in tc.out."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    device = pick_device(tc.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if tc.batch_size % world:
        raise ValueError(f"--batch-size {tc.batch_size} is not divisible by {world} processes")
    torch.manual_seed(tc.seed)
    out = Path(tc.out)
    replaced = previous_run(tc.out, tc.resume, tc.force)

    if full is None:
        full = data_mod.load(tc.data, "train", cfg.channels, (cfg.height, cfg.width))
    if tuple(full.images.shape[1:]) != cfg.image_shape:
        raise ValueError(
            f"--data {tc.data} has images {tuple(full.images.shape[1:])} (C, H, W) but the model "
            f"expects {cfg.image_shape}: set --channels and --image-size to match"
        )
    if tc.classes:
        full = data_mod.filter_classes(full, tc.classes)
    train_ds, val_ds = data_mod.split_validation(full, tc.val_size, tc.seed)

    model = VAE(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(train_ds) / tc.batch_size)
    total = tc.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if tc.lr_schedule == "constant":
            return 1.0
        return (
            tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * step / total))
        ) / tc.lr

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start_epoch, best, history, since_best = 1, -math.inf, [], 0

    def matching_checkpoint(path: str, flag: str) -> dict[str, Any]:
        ckpt = load_checkpoint(Path(path))
        asked = cfg.to_dict()
        if ckpt["config"] != asked:
            differ = {k: (v, asked.get(k)) for k, v in ckpt["config"].items() if asked.get(k) != v}
            flag_of = {"height": "image-size", "width": "image-size"}
            flags = ", ".join(
                f"--{flag_of.get(k, k.replace('_', '-'))} (checkpoint {v!r}, asked {a!r})"
                for k, (v, a) in differ.items()
            )
            raise ValueError(f"{flag} {path}: the checkpoint's model differs; set {flags}")
        model.load_state_dict(ckpt["model"])
        return ckpt

    if tc.resume:
        if Path(tc.resume).is_dir():
            raise ValueError(
                f"--resume {tc.resume} is a bundle: it holds weights, not a run's optimizer "
                "and schedule; --init-from starts from its weights"
            )
        ckpt = matching_checkpoint(tc.resume, "--resume")
        if "optimizer" not in ckpt:
            raise ValueError(
                f"--resume {tc.resume} holds weights but no optimizer or schedule (vae fit-prior "
                "writes such checkpoints); --init-from starts from its weights"
            )
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best_val_bound"]
        history, since_best = ckpt["history"], ckpt.get("since_best", 0)
        log.info("resumed from %s at epoch %d", tc.resume, start_epoch)
    elif tc.init_from:
        matching_checkpoint(tc.init_from, "--init-from")
        log.info("starting from the weights of %s", tc.init_from)

    if rank == 0:  # only now that data, config and checkpoint are known to be good
        out.mkdir(parents=True, exist_ok=True)
        for path in replaced:
            path.unlink(missing_ok=True)
        if replaced:
            log.warning("--force: replaced the run in %s", out)
    net: nn.Module = model
    if distributed:
        # DDP wraps forward(); route it to the encoder. The decoder's parameters get their
        # gradients in the same backward pass, so DDP's hooks average those too.
        model.forward = model.encode
        net = nn.parallel.DistributedDataParallel(model)

    def objective(
        xb: torch.Tensor, eps: torch.Tensor, beta: float, global_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of this rank's slice, scaled so DDP's average is the global batch's mean."""
        mu, logvar = net(xb) if distributed else model.encode(xb)
        sigma = model.log_sigma.exp()
        if tc.objective == "iwae" and tc.iwae_gradient == "dreg":
            surrogate, bound = iwae_dreg(
                model.decode, xb, mu, logvar, eps, cfg.likelihood, sigma, model.prior
            )
            objective_sum = surrogate.sum()
        elif tc.objective == "iwae":
            bound = iwae(model.decode, xb, mu, logvar, eps, cfg.likelihood, sigma, model.prior)
            objective_sum = bound.sum()
        else:
            t = elbo(model.decode, xb, mu, logvar, eps, cfg.likelihood, sigma, model.prior)
            objective_sum, bound = (t.reconstruction - beta * t.kl).sum(), t.elbo
        return -objective_sum * world / global_batch, bound.detach()

    t_start = last_plot = time.time()
    for epoch in range(start_epoch, tc.epochs + 1):
        model.train()
        beta = min(1.0, epoch / tc.kl_warmup_epochs) if tc.kl_warmup_epochs > 0 else 1.0
        # every rank draws the same permutation, binarisation and eps, then takes its slice of each
        # global batch, so N processes see exactly what one process with the same batch sees.
        g = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        perm = torch.randperm(len(train_ds), generator=g)
        t0, n_seen, n_mine, elbo_sum = time.time(), 0, 0, 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{tc.epochs}",
            disable=rank != 0,
            leave=False,
            mininterval=1.0,
        )
        for step in bar:
            idx = perm[step * tc.batch_size : (step + 1) * tc.batch_size]
            xb = train_ds.images[idx]
            if tc.binarize == "dynamic":
                xb = data_mod.binarize(xb, g)
            samples = tc.iwae_k if tc.objective == "iwae" else 1
            eps = torch.randn((samples, len(xb), cfg.latent_dim), generator=g)
            per = math.ceil(len(xb) / world)
            mine = slice(rank * per, (rank + 1) * per)
            loss, bound = objective(xb[mine].to(device), eps[:, mine].to(device), beta, len(xb))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            n_seen += len(xb)  # the global batch: every rank steps through all of it
            n_mine += len(bound)
            elbo_sum += float(bound.sum())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.2f}")
        seconds = time.time() - t0
        if distributed:  # the training bound over every rank's slice, not this rank's alone
            sums = torch.tensor([elbo_sum, float(n_mine)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            elbo_sum, n_mine = float(sums[0]), int(sums[1])
        model.eval()
        k = tc.iwae_k if tc.objective == "iwae" else 0
        val = bounds(model, val_ds.images, k, tc.seed, tc.binarize == "dynamic", batch_size=1000)
        # the bound being maximised (ELBO or IWAE-k) picks the best checkpoint
        val_bound = val["iwae"] if k else val["elbo"]
        row = {
            "epoch": epoch,
            "train_bound": elbo_sum / max(n_mine, 1),
            "val_bound": val_bound,
            "val_elbo": val["elbo"],
            "val_reconstruction": val["reconstruction"],
            "val_kl": val["kl"],
            "lr": opt.param_groups[0]["lr"],
            "beta": beta,
            "seconds": seconds,
            "images_per_s": n_seen / seconds,  # all ranks together: each saw 1/world of them
        }
        history.append(row)
        improved = val_bound > best
        if improved:
            best, since_best = val_bound, 0
        else:
            since_best += 1
        if rank == 0:
            ckpt = {
                "config": cfg.to_dict(),
                "train": asdict(tc),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "best_val_bound": best,
                "since_best": since_best,
                "history": history,
                "data": {
                    "source": full.source,
                    "classes": tc.classes,
                    "train_images": len(train_ds),
                    "val_images": len(val_ds),
                    "binarize": tc.binarize,
                },
                "world_size": world,
            }
            save_atomic(ckpt, out / "checkpoint_last.pt")
            if improved:
                save_atomic(ckpt, out / "checkpoint_best.pt")
            last = epoch == tc.epochs or bool(tc.patience and since_best >= tc.patience)
            plot = last or time.time() - last_plot >= PLOT_EVERY_S
            _write_history(history, out, plot)
            if plot:
                last_plot = time.time()
            bound_name = tc.objective.upper()
            val_iwae = f"val {bound_name} {val_bound:.2f}  " if k else ""  # the ELBO comes next
            log.info(
                "epoch %d  train %s %.2f  %sval ELBO %.2f (rec %.2f, KL %.2f)%s  %.0f img/s%s",
                epoch,
                bound_name,
                row["train_bound"],
                val_iwae,
                val["elbo"],
                val["reconstruction"],
                val["kl"],
                f"  sigma {model.sigma:.3f}" if cfg.likelihood == "gaussian" else "",
                row["images_per_s"],
                "  *best*" if improved else "",
            )
        if tc.patience and since_best >= tc.patience:
            log.info("early stopping: no better validation bound for %d epochs", tc.patience)
            break
    summary = {
        "best_val_bound": best,
        "epochs_run": len(history),
        "seconds": time.time() - t_start,
        "out": str(out),
    }
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(model, summary)
