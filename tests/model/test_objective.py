"""The objective's terms against independent computations (torch.distributions, Monte Carlo)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import distributions as D

from model.objective import (
    Mixture,
    elbo,
    iwae,
    iwae_dreg,
    kl_divergence,
    log_likelihood,
    log_normal,
    log_prior,
    reparameterize,
)


@pytest.fixture(autouse=True)
def _float64_and_seed() -> Iterator[None]:
    """float64 so that agreement is checked at torch's tight default tolerances."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        yield
    torch.set_default_dtype(old)


def _q(mu: torch.Tensor, logvar: torch.Tensor) -> D.Distribution:
    return D.Independent(D.Normal(mu, (0.5 * logvar).exp()), 1)


def test_kl_matches_torch_distributions() -> None:
    mu, logvar = torch.randn(7, 5), torch.randn(7, 5)
    prior = D.Independent(D.Normal(torch.zeros(5), torch.ones(5)), 1)
    expected = D.kl_divergence(_q(mu, logvar), prior)
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)


def test_kl_matches_monte_carlo() -> None:
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.3, -0.7, 0.1]])
    z = reparameterize(mu, logvar, torch.randn(200_000, 1, 3))
    zeros = torch.zeros_like(mu)
    mc = (log_normal(z, mu, logvar) - log_normal(z, zeros, zeros)).mean(0)
    assert abs(float(mc) - float(kl_divergence(mu, logvar))) < 0.02


def test_kl_is_zero_at_the_prior() -> None:
    assert float(kl_divergence(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0


def test_reparameterize_has_the_posterior_moments() -> None:
    mu, logvar = torch.tensor([1.0, -2.0]), torch.tensor([0.0, math.log(4.0)])
    z = reparameterize(mu, logvar, torch.randn(100_000, 2))
    torch.testing.assert_close(z.mean(0), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0]), atol=0.03, rtol=0)


def test_log_normal_matches_torch() -> None:
    z, mu, logvar = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(log_normal(z, mu, logvar), _q(mu, logvar).log_prob(z))


def test_bernoulli_log_likelihood_matches_torch() -> None:
    x = torch.randint(0, 2, (4, 1, 5, 5)).double()
    logits = torch.randn(4, 1, 5, 5) * 3
    expected = D.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(log_likelihood(x, logits, "bernoulli"), expected)


def test_bernoulli_with_grey_values_is_the_cross_entropy() -> None:
    x = torch.rand(2, 3, 4, 4)
    logits = torch.randn(2, 3, 4, 4)
    p = torch.sigmoid(logits)
    expected = (x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3))
    torch.testing.assert_close(log_likelihood(x, logits, "bernoulli"), expected)


def test_gaussian_log_likelihood_matches_torch() -> None:
    x, mean = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    expected = D.Normal(mean, 0.3).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(log_likelihood(x, mean, "gaussian", 0.3), expected)


def test_unknown_likelihood_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        log_likelihood(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "poisson")


def _linear_decoder() -> tuple[torch.nn.Module, torch.Tensor]:
    dec = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Unflatten(1, (1, 4, 4)))
    x = torch.randint(0, 2, (5, 1, 4, 4)).double()
    return dec, x


def test_elbo_terms_by_hand() -> None:
    dec, x = _linear_decoder()
    mu, logvar, eps = torch.randn(5, 3), torch.randn(5, 3), torch.randn(4, 5, 3)
    t = elbo(dec, x, mu, logvar, eps, "bernoulli")
    z = mu + (0.5 * logvar).exp() * eps
    rec = torch.stack([D.Bernoulli(logits=dec(z[s])).log_prob(x).sum((1, 2, 3)) for s in range(4)])
    torch.testing.assert_close(t.reconstruction, rec.mean(0))
    torch.testing.assert_close(t.kl, kl_divergence(mu, logvar))
    torch.testing.assert_close(t.elbo, rec.mean(0) - kl_divergence(mu, logvar))


def test_iwae_with_one_sample_is_the_elbo_for_the_same_eps() -> None:
    dec, x = _linear_decoder()
    mu, logvar, eps = torch.randn(5, 3), torch.randn(5, 3), torch.randn(1, 5, 3)
    z = reparameterize(mu, logvar, eps[0])
    zeros = torch.zeros_like(mu)
    # the single-sample ELBO with the sampled (not closed-form) KL term
    expected = (
        log_likelihood(x, dec(z), "bernoulli")
        + log_normal(z, zeros, zeros)
        - log_normal(z, mu, logvar)
    )
    torch.testing.assert_close(iwae(dec, x, mu, logvar, eps, "bernoulli"), expected)


def test_iwae_one_sample_averages_to_the_closed_form_elbo() -> None:
    dec, x = _linear_decoder()
    mu, logvar, eps = torch.randn(5, 3), torch.randn(5, 3), torch.randn(20_000, 5, 3)
    draws = torch.stack([iwae(dec, x, mu, logvar, e[None], "bernoulli") for e in eps[:4000]])
    closed_form = elbo(dec, x, mu, logvar, eps, "bernoulli").elbo
    torch.testing.assert_close(draws.mean(0), closed_form, atol=0.5, rtol=0)


def test_iwae_grows_with_k_on_average() -> None:
    dec, x = _linear_decoder()
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3) + 1.0  # a poor posterior leaves room

    def mean_bound(k: int) -> float:
        draws = [iwae(dec, x, mu, logvar, torch.randn(k, 5, 3), "bernoulli") for _ in range(200)]
        return float(torch.stack(draws).mean())

    b1, b5, b50 = mean_bound(1), mean_bound(5), mean_bound(50)
    assert b1 < b5 < b50


def test_iwae_chunking_does_not_change_the_value() -> None:
    dec, x = _linear_decoder()
    mu, logvar, eps = torch.randn(5, 3), torch.randn(5, 3), torch.randn(37, 5, 3)
    torch.testing.assert_close(
        iwae(dec, x, mu, logvar, eps, "bernoulli"),
        iwae(dec, x, mu, logvar, eps, "bernoulli", chunk=8),
    )


def _encoder_and_decoder() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    dec, x = _linear_decoder()
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6))  # -> mu, logvar (3 each)
    return enc, dec, x


def _posterior(enc: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = enc(x).chunk(2, dim=-1)
    return mu, logvar


def test_iwae_dreg_value_and_decoder_gradient_are_the_iwae_ones() -> None:
    enc, dec, x = _encoder_and_decoder()
    eps = torch.randn(10, 5, 3)
    with torch.enable_grad():
        surrogate, bound = iwae_dreg(dec, x, *_posterior(enc, x), eps, "bernoulli")
        got = torch.autograd.grad(surrogate.sum(), list(dec.parameters()))
        standard = iwae(dec, x, *_posterior(enc, x), eps, "bernoulli")
        expected = torch.autograd.grad(standard.sum(), list(dec.parameters()))
    torch.testing.assert_close(bound, standard)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_iwae_dreg_encoder_gradient_by_its_definition() -> None:
    """Tucker et al. 2018, eq. 5: sum_i w_i^2 (d log w_i / d z_i)(d z_i / d phi), with log q's
    parameters held constant; here written out without the surrogate's hook."""
    enc, dec, x = _encoder_and_decoder()
    eps = torch.randn(10, 5, 3)
    with torch.enable_grad():
        surrogate, _ = iwae_dreg(dec, x, *_posterior(enc, x), eps, "bernoulli")
        got = torch.autograd.grad(surrogate.sum(), list(enc.parameters()))
        mu, logvar = _posterior(enc, x)
        z = mu + (0.5 * logvar).exp() * eps  # (10, 5, 3)
        prior = D.Independent(D.Normal(torch.zeros(3), torch.ones(3)), 1)
        log_w = (
            D.Independent(
                D.Bernoulli(logits=dec(z.reshape(50, 3)).view(10, 5, 1, 4, 4)), 3
            ).log_prob(x)
            + prior.log_prob(z)
            - _q(mu.detach(), logvar.detach()).log_prob(z)
        )
        w = torch.softmax(log_w.detach(), dim=0)
        expected = torch.autograd.grad((w**2 * log_w).sum(), list(enc.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_iwae_dreg_encoder_gradient_averages_to_the_iwae_one() -> None:
    """Both estimators are unbiased for the IWAE bound's gradient: their means over many draws
    of eps agree (each draw is one more copy of the batch, so one backward pass sums them)."""
    enc, dec, x = _encoder_and_decoder()
    draws = 20_000
    xs = x.repeat(draws, 1, 1, 1)
    eps = torch.randn(5, len(xs), 3)
    with torch.enable_grad():
        surrogate, _ = iwae_dreg(dec, xs, *_posterior(enc, xs), eps, "bernoulli")
        dreg = torch.autograd.grad(surrogate.sum() / draws, list(enc.parameters()))
        standard = iwae(dec, xs, *_posterior(enc, xs), eps, "bernoulli")
        plain = torch.autograd.grad(standard.sum() / draws, list(enc.parameters()))
    for g, e in zip(dreg, plain, strict=True):
        torch.testing.assert_close(g, e, atol=0.05 * float(e.abs().max()), rtol=0)


def _mixture(components: int = 4, dim: int = 3) -> Mixture:
    return Mixture(
        logits=torch.randn(components),
        means=torch.randn(components, dim) * 2,
        logvars=torch.randn(components, dim) * 0.5,
    )


def _torch_mixture(prior: Mixture) -> D.Distribution:
    components = D.Independent(D.Normal(prior.means, (0.5 * prior.logvars).exp()), 1)
    return D.MixtureSameFamily(D.Categorical(logits=prior.logits), components)


def test_log_prior_is_the_standard_normal_without_a_mixture() -> None:
    z = torch.randn(6, 5, 3)
    standard = D.Independent(D.Normal(torch.zeros(3), torch.ones(3)), 1)
    torch.testing.assert_close(log_prior(z, None), standard.log_prob(z))


def test_log_prior_of_a_mixture_matches_torch_distributions() -> None:
    prior = _mixture()
    z = torch.randn(6, 5, 3) * 3  # (S, B, D), some far from every component
    torch.testing.assert_close(log_prior(z, prior), _torch_mixture(prior).log_prob(z))


def test_a_one_component_mixture_at_the_origin_is_the_standard_normal() -> None:
    prior = Mixture(torch.zeros(1), torch.zeros(1, 3), torch.zeros(1, 3))
    z = torch.randn(4, 3)
    torch.testing.assert_close(log_prior(z, prior), log_prior(z, None))


def test_elbo_with_a_mixture_prior_samples_the_kl() -> None:
    dec, x = _linear_decoder()
    prior = _mixture()
    mu, logvar, eps = torch.randn(5, 3), torch.randn(5, 3), torch.randn(4, 5, 3)
    t = elbo(dec, x, mu, logvar, eps, "bernoulli", prior=prior)
    z = mu + (0.5 * logvar).exp() * eps
    kl = (_q(mu, logvar).log_prob(z) - _torch_mixture(prior).log_prob(z)).mean(0)
    torch.testing.assert_close(t.kl, kl)
    torch.testing.assert_close(t.elbo, t.reconstruction - kl)


def test_the_sampled_kl_averages_to_the_true_kl() -> None:
    """Against the closed form where there is one (a one-component mixture, any mean and
    variance: KL between two Gaussians), over many draws."""
    dec, x = _linear_decoder()
    prior = Mixture(torch.zeros(1), torch.tensor([[0.5, -1.0, 0.2]]), torch.tensor([[0.3] * 3]))
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3) * 0.3
    kl = elbo(dec, x, mu, logvar, torch.randn(100_000, 5, 3), "bernoulli", prior=prior).kl
    p = D.Independent(D.Normal(prior.means[0], (0.5 * prior.logvars[0]).exp()), 1)
    torch.testing.assert_close(kl, D.kl_divergence(_q(mu, logvar), p), atol=0.02, rtol=0)


def test_iwae_with_a_mixture_prior_by_hand() -> None:
    dec, x = _linear_decoder()
    prior = _mixture()
    mu, logvar, eps = torch.randn(5, 3), torch.randn(5, 3), torch.randn(7, 5, 3)
    z = mu + (0.5 * logvar).exp() * eps
    log_w = (
        D.Independent(D.Bernoulli(logits=dec(z.reshape(35, 3)).view(7, 5, 1, 4, 4)), 3).log_prob(x)
        + _torch_mixture(prior).log_prob(z)
        - _q(mu, logvar).log_prob(z)
    )
    expected = torch.logsumexp(log_w, 0) - math.log(7)
    torch.testing.assert_close(iwae(dec, x, mu, logvar, eps, "bernoulli", prior=prior), expected)
    _, bound = iwae_dreg(dec, x, mu, logvar, eps, "bernoulli", prior=prior)
    torch.testing.assert_close(bound, expected)
