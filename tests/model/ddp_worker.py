"""Run by torchrun in test_distributed.py: train, then save this rank's final weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from model.config import VAEConfig
from model.train import TrainConfig, train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    cfg = VAEConfig(height=8, width=8, latent_dim=4, conv_channels=(8, 16), hidden_dims=(32,))
    tc = TrainConfig(
        data="digits", out=str(out), val_size=197, epochs=2, batch_size=64, seed=7, threads=1
    )
    result = train(cfg, tc)
    torch.save(result.model.state_dict(), out / f"rank{os.environ.get('RANK', '0')}.pt")
