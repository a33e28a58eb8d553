"""service/objective.py (numpy) equals model/objective.py (torch) function by function: one table
of every function the two define, called with the same arguments in the same order."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from service import objective

torch = pytest.importorskip("torch")
model_objective = pytest.importorskip("model.objective")

RTOL = 1e-4


def _mixture(rng: np.random.Generator) -> objective.Mixture:
    """A 5-component mixture prior in D=7, its components spread over the draws' range."""
    return objective.Mixture(
        logits=rng.standard_normal(5, dtype=np.float32),
        means=rng.standard_normal((5, 7), dtype=np.float32),
        logvars=rng.standard_normal((5, 7), dtype=np.float32) * 0.5,
    )


def _inputs(likelihood: str, prior: str = "standard") -> dict[str, Any]:
    """One set of numpy inputs for every function: B=2 images of 3x5x4, D=7, S=6 draws; the prior
    N(0, I) (None) or a mixture."""
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 5, 4), dtype=np.float32)
    mu = rng.standard_normal((2, 7), dtype=np.float32)
    logvar = rng.standard_normal((2, 7), dtype=np.float32) * 0.5
    eps = rng.standard_normal((6, 2, 7), dtype=np.float32)
    weights = rng.standard_normal((7, 3 * 5 * 4), dtype=np.float32) * 0.3

    def decode(z: np.ndarray) -> np.ndarray:  # a linear decoder, (N, 7) -> (N, 3, 5, 4)
        return (z @ weights).reshape(-1, 3, 5, 4)

    return {
        "x": x,
        "mu": mu,
        "logvar": logvar,
        "eps": eps,
        "z": objective.reparameterize(mu, logvar, eps),
        "out": rng.standard_normal((6, 2, 3, 5, 4), dtype=np.float32) * 3,
        "mean": rng.random((2, 3, 5, 4), dtype=np.float32),
        "decode": decode,
        "likelihood": likelihood,
        "sigma": 0.3 if likelihood == "gaussian" else 1.0,
        "prior": _mixture(np.random.default_rng(1)) if prior == "mixture" else None,
    }


# Every function both objective modules define, with its arguments in the order both take them.
PAIRS = {
    "kl_divergence": ["mu", "logvar"],
    "reparameterize": ["mu", "logvar", "eps"],
    "log_normal": ["z", "mu", "logvar"],
    "log_prior": ["z", "prior"],
    "log_likelihood": ["x", "out", "likelihood", "sigma"],
    "elbo": ["decode", "x", "mu", "logvar", "eps", "likelihood", "sigma", "prior"],
    "iwae": ["decode", "x", "mu", "logvar", "eps", "likelihood", "sigma", "prior"],
    "squared_error": ["x", "mean"],
    "blur": ["x"],
    "blurred_error": ["x", "mean"],
    "blur_recon_rel": ["x", "mean"],
    "background": ["x"],
    "contrast": ["x"],
    "contrast_energy": ["x"],
    "blur_recon_contrast": ["x", "mean"],
    "anomaly_map": ["x", "mean"],
    "blur_recon_energy": ["x", "mean"],
}


def _to_torch(value: Any) -> Any:
    if isinstance(value, objective.Mixture):
        arrays = (value.logits, value.means, value.logvars)
        return model_objective.Mixture(*map(torch.from_numpy, arrays))
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if callable(value):
        return lambda z: torch.from_numpy(value(z.numpy()))
    return value


def test_the_table_holds_every_shared_function() -> None:
    def functions(module: Any) -> set[str]:
        return {
            name
            for name, value in vars(module).items()
            if inspect.isfunction(value)
            and value.__module__ == module.__name__
            and not name.startswith("_")
        }

    assert functions(objective) & functions(model_objective) == set(PAIRS)


# the functions that take a prior, with each kind of prior; the rest with none
CASES = [
    (name, prior)
    for name, args in PAIRS.items()
    for prior in (("standard", "mixture") if "prior" in args else ("standard",))
]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize(("name", "prior"), CASES)
def test_every_function_equals_its_torch_twin(name: str, prior: str, likelihood: str) -> None:
    inputs = _inputs(likelihood, prior)
    args = [inputs[arg] for arg in PAIRS[name]]
    got = getattr(objective, name)(*args)
    want = getattr(model_objective, name)(*map(_to_torch, args))
    if isinstance(want, tuple):  # ElboTerms: the same fields in the same order on both sides
        assert got._fields == want._fields
        pairs = list(zip(got, want, strict=True))
    else:
        pairs = [(got, want)]
    for a, b in pairs:
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=RTOL, atol=1e-5)


def test_iwae_with_one_sample_is_the_elbo_estimate() -> None:
    inputs = _inputs("bernoulli")
    args = [inputs[arg] for arg in PAIRS["iwae"]]
    args[4] = inputs["eps"][:1]
    decode, x, mu, logvar, eps = args[:5]
    z = objective.reparameterize(mu, logvar, eps)
    log_px = objective.log_likelihood(x, decode(z[0]), "bernoulli")
    # with k = 1: log p(x|z) + log p(z) - log q(z|x), whose expectation is the ELBO
    expected = log_px + objective.log_normal(z[0]) - objective.log_normal(z[0], mu, logvar)
    np.testing.assert_allclose(objective.iwae(*args), expected, rtol=1e-5)


def test_iwae_is_at_least_the_elbo_on_shared_draws() -> None:
    inputs = _inputs("gaussian")
    args = [inputs[arg] for arg in PAIRS["elbo"]]
    # Jensen: log mean w >= mean log w; with the KL in closed form the two differ only by noise
    # of the estimate, so compare with the Monte Carlo ELBO of the same draws
    decode, x, mu, logvar, eps = args[:5]
    z = objective.reparameterize(mu, logvar, eps)
    log_px = objective.log_likelihood(
        x, decode(z.reshape(-1, 7)).reshape(6, *x.shape), "gaussian", 0.3
    )
    log_w = log_px + objective.log_normal(z) - objective.log_normal(z, mu, logvar)
    assert (objective.iwae(*args) >= log_w.mean(axis=0) - 1e-6).all()


def _score_inputs(channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((4, channels, 12, 10), dtype=np.float32)
    x[0] = 0.0  # a blank image: no contrast
    x[1] = 1.0 - x[1]  # and an inverted one
    mean = rng.random(x.shape, dtype=np.float32)
    return x, mean


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "name",
    [
        "blur",
        "blurred_error",
        "background",
        "contrast",
        "contrast_energy",
        "anomaly_map",
        *(f.__name__ for f in objective.RECONSTRUCTION_SCORES.values()),
    ],
)
def test_numpy_and_torch_agree(name: str, channels: int) -> None:
    x, mean = _score_inputs(channels, seed=channels)
    args = (x, mean) if PAIRS[name] == ["x", "mean"] else (x,)
    expected = getattr(model_objective, name)(*map(torch.from_numpy, args)).numpy()
    np.testing.assert_allclose(getattr(objective, name)(*args), expected, rtol=RTOL, atol=1e-7)
