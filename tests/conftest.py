"""Shared fixtures: tiny real bundles (trained a few steps, exported to real ONNX) and MNIST."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

from service.settings import DEFAULT_BUNDLE
from tests import live

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
LiveServerFactory = Callable[..., AbstractContextManager[live.LiveServer]]
# The integration lane: real processes (servers, torchrun, the container recipe's venv, the
# deploy validators), a real browser. Everything else is the unit lane, in-process and fast.
INTEGRATION = (
    "tests/e2e/",
    "tests/stress/",
    "tests/test_container_recipe.py",
    "tests/test_deploy.py",
    "tests/model/test_distributed.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test `unit` or `integration` by where it lives (`pytest -m unit` runs one lane;
    the README's `pytest` runs both)."""
    for item in items:
        path = item.path.relative_to(REPO).as_posix()
        lane = pytest.mark.integration if path.startswith(INTEGRATION) else pytest.mark.unit
        item.add_marker(lane)


def _tiny_bundle(out: Path, likelihood: str, prior_components: int = 0) -> Path:
    import torch

    from model.config import VAEConfig
    from model.export import export_bundle
    from model.networks import VAE
    from model.objective import elbo

    torch.manual_seed(0)
    cfg = VAEConfig(
        latent_dim=8,
        conv_channels=(8, 16),
        hidden_dims=(64,),
        likelihood=likelihood,  # type: ignore[arg-type]
        sigma=0.2,
        prior_components=prior_components,
    )
    model = VAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # strokes on a dark background, like digits: a few steps give real, non-random weights
    x = torch.zeros(64, 1, 28, 28)
    for i in range(64):
        r = 6 + i % 16
        x[i, 0, 4:24, r : r + 3] = 1.0
    for _ in range(10):
        mu, logvar = model.encode(x)
        eps = torch.randn(1, *mu.shape)
        loss = -elbo(
            model.decode, x, mu, logvar, eps, likelihood, model.log_sigma.exp(), model.prior
        ).elbo.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export_bundle(
        model,
        out,
        x,
        name=f"tiny-{likelihood}",
        version="0.0.1",
        data={"source": "synthetic strokes", "classes": None},
        calibration_description="64 synthetic stroke images",
        calibration_k=8,
        default_score="neg_elbo",  # what the service tests assume; selection: test_calibrate.py
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1x28x28, latent-8, Bernoulli conv bundle."""
    return _tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny", "bernoulli")


@pytest.fixture(scope="session")
def tiny_gaussian_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1x28x28, latent-8, Gaussian (sigma 0.2) conv bundle."""
    return _tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-gauss", "gaussian")


@pytest.fixture(scope="session")
def tiny_mixture_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Bernoulli bundle's network with a 3-component mixture prior (schema 2)."""
    return _tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-mixture", "bernoulli", 3)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST beside the checkout (../shared/data/mnist); skip where it is absent."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (the shared data folder beside the repo)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest) -> Path:
    """What the end-to-end tests serve: the shipped default bundle, else the tiny one."""
    if (DEFAULT_BUNDLE / "manifest.json").is_file():
        return DEFAULT_BUNDLE
    tiny: Path = request.getfixturevalue("tiny_bundle")
    return tiny


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    """The shipped default bundle, service/bundles/mnist (package data)."""
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        pytest.fail(f"the shipped default bundle is missing: {DEFAULT_BUNDLE}")
    return DEFAULT_BUNDLE


def colour_folder(path: Path, count: int, seed: int, size: int = 8) -> Path:
    """`count` smooth colour PNGs: four random corner colours blended across a `size` square."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    s = np.linspace(0.0, 1.0, size)[None, :, None]
    for i in range(count):
        a, b, c, d = rng.uniform(0, 255, (4, 1, 1, 3))
        image = (1 - t) * ((1 - s) * a + s * b) + t * ((1 - s) * c + s * d)
        Image.fromarray(image.astype(np.uint8)).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="session")
def live_server() -> LiveServerFactory:
    """`with live_server(bundle, *args, env={...}) as server:` a real `vae serve` process on a
    loopback port, ready (/readyz 200), stopped with SIGTERM after; `argv=` runs another command
    line (`{port}` filled in). The one way tests start a server (tests/live.py)."""
    return live.live_server
