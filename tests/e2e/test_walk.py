"""A new user's walk, the way the README tells it, from a fresh venv and from directories that are
not the checkout:

1. `pip install .` (the serving install: no torch) into a fresh venv, and `vae serve` from an
   empty directory, on the MNIST bundle shipped inside the package;
2. `vae train` on a generated RGB folder and on `digits`, with no shape or split flags, in the
   README's training install (the environment running this suite);
3. `vae export` (quiet), `vae serve` of the new bundle from the fresh venv, and an image scored
   with the Python client run by the fresh venv's interpreter (so the client needs only the
   serving install).

Each step's wall time is printed (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import colour_folder
from tests.e2e.test_server import REPO
from tests.live import live_server

SOURCES = ("pyproject.toml", "README.md", "model", "service", "requirements")
SCORE = """
import json, sys
import numpy as np
from PIL import Image
from service.client import VAEClient

image = np.asarray(Image.open(sys.argv[2]))
with VAEClient(sys.argv[1]) as vae:
    scores = vae.elbo(image[None] if image.ndim == 2 else image, k=4)
print(json.dumps({"score": float(scores.anomaly_score[0]), "elbo": float(scores.elbo[0]),
                  "percentile": float(scores.percentile[0]), "raw": scores.raw["results"][0]}))
"""


def env_without_vae() -> dict[str, str]:
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("VAE_")}


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, env=env_without_vae(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@contextmanager
def serving(vae: Path, cwd: Path, *args: str) -> Iterator[str]:
    argv = [str(vae), "serve", "--port", "{port}", "--log-level", "warning", *args]
    with live_server(argv=argv, environ=env_without_vae(), cwd=cwd) as server:
        yield server.url


@pytest.mark.timeout(1200)
def test_a_new_users_walk(tmp_path: Path) -> None:
    seconds: dict[str, float] = {}
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        seconds[step] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    # 1. the serving install into a fresh venv, from a copy of the checkout (pip builds in tree)
    source, venv = tmp_path / "source", tmp_path / "venv"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    run([str(REPO / ".ci" / "install-serving.sh"), str(venv), str(source)], tmp_path)
    lap("pip install . (fresh venv, serving install)")
    fresh_vae, fresh_python = venv / "bin" / "vae", venv / "bin" / "python"

    elsewhere = tmp_path / "elsewhere"  # not the checkout: the default bundle is package data
    elsewhere.mkdir()
    seven = REPO / "examples" / "seven.png"
    with serving(fresh_vae, elsewhere) as url:
        lap("vae serve (shipped bundle) to ready")
        assert httpx.get(f"{url}/model").json()["name"] == "mnist-vae"
        docs = httpx.get(f"{url}/docs").text
        assert "/static-offline-docs/swagger-ui-bundle.js" in docs and "cdn" not in docs
        scored = json.loads(
            run([str(fresh_python), "-c", SCORE, url, str(seven)], elsewhere).stdout
        )
        assert scored["raw"]["is_anomaly"] is False
        lap("score examples/seven.png with the client")

    # 2. training, as typed: no shape, split or likelihood flags
    train_vae = Path(sys.prefix) / "bin" / "vae"
    work = tmp_path / "work"
    colour_folder(work / "photos", 24, seed=0, size=16)
    common = ["--epochs", "2", "--threads", "1"]
    run([str(train_vae), "train", "--data", "photos", *common, "--out", "runs/photos"], work)
    lap("vae train --data photos (24 RGB 16x16, 2 epochs)")
    run([str(train_vae), "train", "--data", "digits", *common, "--out", "runs/digits"], work)
    lap("vae train --data digits (1,797 8x8, 2 epochs)")

    # 3. export, serve the new bundle from the fresh venv, score an image with the client
    export = run(
        [str(train_vae), "export", "runs/photos/checkpoint_best.pt", "--out", "models/photos"],
        work,
    )
    lap("vae export")
    assert export.stdout == "models/photos\n"
    assert "torchvision" not in export.stderr and "Warning" not in export.stderr, export.stderr
    manifest = json.loads((work / "models" / "photos" / "manifest.json").read_text())
    assert manifest["image"] == {"channels": 3, "height": 16, "width": 16}
    assert manifest["likelihood"] == "gaussian"
    photo = work / "photos" / "000.png"
    with serving(fresh_vae, elsewhere, "--bundle", str(work / "models" / "photos")) as url:
        lap("vae serve (new bundle) to ready")
        scored = json.loads(
            run([str(fresh_python), "-c", SCORE, url, str(photo)], elsewhere).stdout
        )
        lap("score a photo with the client")
    assert np.isfinite(scored["elbo"]) and scored["raw"]["iwae"] is not None
    assert 0.0 <= scored["percentile"] <= 100.0
    with Image.open(photo) as image:
        assert image.mode == "RGB"
    print("walk, seconds per step:", json.dumps(seconds, indent=1))
