"""Bundles with a mixture prior (schema 2): loading, /elbo's bounds and /sample's draws against
independent computations (scipy's densities, the networks run by onnxruntime), and every way
prior.npz can be broken refused at start-up with a message naming it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy.special import log_softmax, logsumexp
from scipy.stats import multivariate_normal, norm

from service import objective
from service.bundle import BundleError, load_bundle
from service.main import create_app
from service.settings import Settings
from tests.service.helpers import encode, files, stroke


@pytest.fixture(scope="module")
def mixture_client(tiny_mixture_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundle=tiny_mixture_bundle))) as client:
        yield client


def _log_prior(z: np.ndarray, prior: Any) -> np.ndarray:
    """log p(z) by scipy: each component's multivariate normal density, weighted, summed."""
    per_component = [
        multivariate_normal(mean, np.diag(np.exp(logvar))).logpdf(z)
        for mean, logvar in zip(prior.means, prior.logvars, strict=True)
    ]  # K of (S,)
    weights = log_softmax(prior.logits.astype(np.float64))
    return logsumexp(np.stack(per_component, -1) + weights, axis=-1)


def test_the_manifest_and_arrays_of_a_mixture_bundle(tiny_mixture_bundle: Path) -> None:
    manifest = json.loads((tiny_mixture_bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["prior"] == {"kind": "mixture", "components": 3, "file": "prior.npz"}
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx", "prior.npz"}
    prior = load_bundle(tiny_mixture_bundle).prior
    assert prior is not None
    with np.load(tiny_mixture_bundle / "prior.npz") as npz:
        for name in ("logits", "means", "logvars"):
            np.testing.assert_array_equal(getattr(prior, name), npz[name])
    assert prior.means.shape == prior.logvars.shape == (3, 8)


def test_bundles_without_a_prior_file_have_the_standard_normal(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.prior is None and bundle.manifest.schema_version == 1


def test_elbo_and_iwae_use_the_mixture(mixture_client: TestClient, tiny_mixture_bundle) -> None:
    x = stroke()
    response = mixture_client.post(
        "/elbo", params={"samples": 4, "k": 6, "seed": 3}, files=files(encode(x))
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    # the same draws by hand: eps (6, 1, 8) from the seed, the networks through onnxruntime
    bundle = load_bundle(tiny_mixture_bundle)
    prior = bundle.prior
    mu, logvar = bundle.encode(x[None, None])
    eps = np.random.default_rng(3).standard_normal((6, 1, 8), dtype=np.float32)
    z = (mu + np.exp(0.5 * logvar) * eps)[:, 0]  # (6, 8)
    logits = bundle.decode(z).astype(np.float64)
    log_px = (x * logits - np.logaddexp(0, logits)).sum(axis=(1, 2, 3))  # Bernoulli, (6,)
    log_q = norm(mu[0], np.exp(0.5 * logvar[0])).logpdf(z).sum(-1)
    log_p = _log_prior(z, prior)
    assert result["reconstruction"] == pytest.approx(log_px[:4].mean(), rel=1e-4)
    assert result["kl"] == pytest.approx((log_q - log_p)[:4].mean(), rel=1e-4)  # sampled KL
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"], rel=1e-6)
    log_w = log_px + log_p - log_q
    assert result["iwae"] == pytest.approx(logsumexp(log_w) - np.log(6), rel=1e-4)
    # the standard normal would give another value: the mixture is really in use
    standard = norm().logpdf(z).sum(-1)
    assert abs(logsumexp(log_px + standard - log_q) - logsumexp(log_w)) > 1e-3


def test_sample_draws_from_the_mixture(tiny_mixture_bundle: Path, tmp_path: Path) -> None:
    # a mixture of narrow components far apart: every draw lies by one, as often as its weight
    means = np.array([[-6.0] * 8, [0.0] * 8, [6.0] * 8], dtype=np.float32)
    weights = np.array([0.2, 0.5, 0.3])
    bundle = _with_prior(
        tiny_mixture_bundle,
        tmp_path / "narrow",
        logits=np.log(weights).astype(np.float32),
        means=means,
        logvars=np.full((3, 8), -8.0, dtype=np.float32),
    )
    with TestClient(create_app(Settings(bundle=bundle))) as client:
        response = client.get("/sample", params={"n": 2000, "seed": 1, "format": "arrays"})
        hotter = client.get("/sample", params={"n": 50, "seed": 1, "temperature": 10})
    assert response.status_code == 200, response.text
    z = np.asarray(response.json()["z"])
    nearest = np.linalg.norm(z[:, None] - means, axis=-1).argmin(axis=1)
    spread = np.abs(z - means[nearest])
    assert spread.max() < 0.1  # std exp(-4) = 0.018
    counts = np.bincount(nearest, minlength=3) / len(z)
    np.testing.assert_allclose(counts, weights, atol=0.04)  # 4.5 standard errors at n = 2000
    # temperature scales a component's spread, not its place
    z_hot = np.asarray(hotter.json()["z"])
    near_hot = np.linalg.norm(z_hot[:, None] - means, axis=-1).argmin(axis=1)
    assert 0.1 < np.abs(z_hot - means[near_hot]).std() < 0.4


def _with_prior(bundle: Path, out: Path, **arrays: np.ndarray) -> Path:
    """A copy of a mixture bundle with these prior arrays written and the manifest's hash kept
    true (a bundle as an exporter would write it)."""
    shutil.copytree(bundle, out)
    np.savez(out / "prior.npz", **arrays)
    _rehash(out)
    return out


def _rehash(bundle: Path, **changes: Any) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / "prior.npz").read_bytes() if (bundle / "prior.npz").exists() else b"x"
    manifest["files"]["prior.npz"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    manifest.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del manifest[key]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


GOOD = {
    "logits": np.zeros(3, np.float32),
    "means": np.zeros((3, 8), np.float32),
    "logvars": np.zeros((3, 8), np.float32),
}


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({**GOOD, "means": np.zeros((3, 7), np.float32)}, r"means is float32 \(3, 7\), expected"),
        ({**GOOD, "logits": np.zeros(4, np.float32)}, r"logits is float32 \(4,\), expected"),
        ({**GOOD, "logvars": np.zeros((3, 8))}, r"logvars is float64 \(3, 8\), expected float32"),
        (
            {**GOOD, "means": np.full((3, 8), np.nan, np.float32)},
            "means is not finite everywhere",
        ),
        ({"logits": GOOD["logits"], "means": GOOD["means"]}, r"holds \['logits', 'means'\]"),
    ],
)
def test_a_broken_prior_file_is_refused(
    tiny_mixture_bundle: Path, tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    bundle = _with_prior(tiny_mixture_bundle, tmp_path / "b", **arrays)
    with pytest.raises(BundleError, match=r"prior\.npz.*" + message):
        load_bundle(bundle)


def test_a_prior_file_that_is_not_an_npz_is_refused(
    tiny_mixture_bundle: Path, tmp_path: Path
) -> None:
    for name, data in (("pickle", b"\x80\x04K\x01."), ("npy", None)):
        out = shutil.copytree(tiny_mixture_bundle, tmp_path / name)
        if data is None:
            np.save(out / "prior.npy", GOOD["means"])
            (out / "prior.npy").rename(out / "prior.npz")
        else:
            (out / "prior.npz").write_bytes(data)
        _rehash(out)
        with pytest.raises(BundleError, match=r"prior\.npz is not a readable \.npz of arrays"):
            load_bundle(out)


def test_schema_and_prior_must_agree(tiny_mixture_bundle: Path, tmp_path: Path) -> None:
    no_prior = shutil.copytree(tiny_mixture_bundle, tmp_path / "no-prior")
    _rehash(no_prior, prior=None)
    old_schema = shutil.copytree(tiny_mixture_bundle, tmp_path / "old-schema")
    _rehash(old_schema, schema_version=1)
    for bundle in (no_prior, old_schema):
        with pytest.raises(BundleError, match="a mixture prior comes with schema_version 2"):
            load_bundle(bundle)
    missing = shutil.copytree(tiny_mixture_bundle, tmp_path / "missing")
    (missing / "prior.npz").unlink()
    with pytest.raises(BundleError, match=r"prior\.npz is missing"):
        load_bundle(missing)
    unlisted = shutil.copytree(tiny_mixture_bundle, tmp_path / "unlisted")
    manifest = json.loads((unlisted / "manifest.json").read_text())
    del manifest["files"]["prior.npz"]
    (unlisted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"files has no entry for prior\.npz"):
        load_bundle(unlisted)


def test_model_shows_the_prior(mixture_client: TestClient, client: TestClient) -> None:
    body = mixture_client.get("/model").json()
    assert body["schema_version"] == 2
    assert body["prior"] == {"kind": "mixture", "components": 3, "file": "prior.npz"}
    assert client.get("/model").json()["prior"] is None  # N(0, I)


def test_a_rows_log_prior_does_not_depend_on_the_rows_beside_it(
    tiny_mixture_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batching never changes a result: each row alone, in any batch and across the chunks the
    computation is split into, gives the very same float64 value."""
    prior = load_bundle(tiny_mixture_bundle).prior
    z = np.random.default_rng(4).standard_normal((3, 50, 8), dtype=np.float32)
    together = objective.log_prior(z, prior)
    alone = np.array([[objective.log_prior(row[None], prior)[0] for row in rows] for rows in z])
    np.testing.assert_array_equal(together, alone)
    monkeypatch.setattr(objective, "PRIOR_ROWS", 7)
    np.testing.assert_array_equal(objective.log_prior(z, prior), together)
    np.testing.assert_allclose(together.ravel(), _log_prior(z.reshape(-1, 8), prior), rtol=1e-6)
