"""vae.py: the ELBO, the KL, the reparameterization gradient and the importance-sampled estimate against a
linear-Gaussian model whose log p(x) and posterior are closed form; the likelihoods; end-to-end runs."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import vae

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def double_precision():
    """Closed-form comparisons at 1e-4 need double precision; restored after each test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class LinearGaussian:
    """z ~ N(0, I_d), x | z ~ N(W z + b, s2 I_D), W with orthogonal columns so the posterior is diagonal."""

    def __init__(self, D: int = 5, d: int = 3, s2: float = 0.3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
        self.W = q[:, :d] * torch.tensor([2.0, 1.0, 0.5][:d])
        self.b = torch.randn(D, generator=g)
        self.s2, self.D, self.d = s2, D, d

    def log_px(self, x):  # p(x) = N(b, W W^T + s2 I)
        cov = self.W @ self.W.T + self.s2 * torch.eye(self.D)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x):  # Sigma = (I + W^T W / s2)^-1 (diagonal here), mu = Sigma W^T (x - b) / s2
        var = 1 / (1 + (self.W**2).sum(0) / self.s2)
        mu = (x - self.b) @ self.W / self.s2 * var
        return mu, var.log().expand_as(mu)

    def log_px_given_z(self, x):
        def f(z):  # z (S, B, d) -> (S, B)
            mean = z @ self.W.T + self.b
            params = torch.stack([mean, torch.full_like(mean, math.log(self.s2))], dim=-2)
            return vae.gaussian_log_prob(x, params)

        return f

    def sample(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=g)
        return z @ self.W.T + self.b + math.sqrt(self.s2) * torch.randn(n, self.D, generator=g)


def mc_elbo(model: LinearGaussian, x, mu, logvar, samples):
    """vae.py's training estimator: E_q[log p(x|z)] by reparameterized samples, minus the closed-form KL."""
    z = vae.reparameterize(mu, logvar, samples=samples)
    rec = model.log_px_given_z(x)(z)  # (S, B)
    return rec.mean(0) - vae.gaussian_kl(mu, logvar).sum(1), rec.std(0) / math.sqrt(samples)


# ------------------------------------------------------------------------------------------- KL and gradients
def test_kl_matches_torch_distributions_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    kl = vae.gaussian_kl(mu, logvar)
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p), atol=1e-12)
    z = q.sample((200_000,))
    log_ratio = (q.log_prob(z) - p.log_prob(z)).sum(-1)  # (S, 4)
    se = log_ratio.std(0) / math.sqrt(len(z))
    assert ((log_ratio.mean(0) - kl.sum(1)).abs() < 5 * se).all()


def test_reparameterized_gradient_matches_analytic_gradient():
    # f(z) = sum_j a_j z_j^2 + c_j z_j: E_q[f] = sum a (mu^2 + sigma^2) + c mu
    torch.manual_seed(0)
    a, c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 1.0, -1.0])
    mu = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    logvar = torch.tensor([0.0, -1.0, 0.5], requires_grad=True)
    z = vae.reparameterize(mu, logvar, samples=400_000)
    (a * z**2 + c * z).sum(-1).mean().backward()
    assert torch.allclose(mu.grad, 2 * a * mu.detach() + c, rtol=0.02, atol=0.01)
    assert torch.allclose(logvar.grad, a * logvar.detach().exp(), rtol=0.02, atol=0.01)  # d sigma^2/d logvar


# ---------------------------------------------------------------------------------------------- bounds
def test_elbo_is_below_log_px_and_tight_at_the_true_posterior():
    torch.manual_seed(0)
    model = LinearGaussian()
    x = model.sample(6)
    log_px = model.log_px(x)
    mu, logvar = model.posterior(x)
    # at the true posterior every importance weight p(x, z) / q(z|x) equals p(x): the bound is exact
    one_sample = vae.importance_weighted_log_px(x, mu, logvar, model.log_px_given_z(x), k=1)
    assert torch.allclose(one_sample, log_px, atol=1e-4)
    elbo, se = mc_elbo(model, x, mu, logvar, 100_000)
    assert ((elbo - log_px).abs() < 5 * se + 1e-4).all()
    for seed in range(5):  # arbitrary encoders: strictly below, by more than the Monte Carlo error
        g = torch.Generator().manual_seed(seed)
        mu_q = mu + torch.randn(mu.shape, generator=g)
        logvar_q = logvar + torch.randn(mu.shape, generator=g)
        elbo, se = mc_elbo(model, x, mu_q, logvar_q, 20_000)
        assert (elbo + 5 * se < log_px).all()


def test_importance_sampling_tightens_with_k_towards_log_px():
    torch.manual_seed(0)
    model = LinearGaussian()
    x = model.sample(4)
    log_px = model.log_px(x)
    mu, logvar = model.posterior(x)
    mu_q, logvar_q = mu + 0.5, logvar + 0.7  # a poor encoder
    bounds = []
    for k in (1, 10, 100, 2000):
        estimates = torch.stack([vae.importance_weighted_log_px(x, mu_q, logvar_q, model.log_px_given_z(x), k,
                                                                chunk=300) for _ in range(50)])
        bounds.append(estimates.mean(0))
    for lower, higher in zip(bounds, bounds[1:]):
        assert (lower < higher).all()  # on average above the ELBO (k = 1), and rising with k
    assert (bounds[-1] < log_px + 1e-3).all()
    assert ((log_px - bounds[-1]) < 0.05 * (log_px - bounds[0])).all()


def test_model_evaluation_is_exact_for_a_vae_holding_the_true_posterior():
    """The chunked evaluate() path through VAE.encode/decode: exact when q is the true posterior."""
    lg = LinearGaussian()
    model = vae.VAE((lg.D,), "gaussian", hidden=8, latent=lg.d)
    A = lg.W / lg.s2 * (1 / (1 + (lg.W**2).sum(0) / lg.s2))  # mu = (x - b) @ A
    _, logvar = lg.posterior(lg.b[None])
    model.encoder = nn.Sequential(nn.Linear(lg.D, 2 * lg.d))
    model.decoder = nn.Sequential(nn.Linear(lg.d, 2 * lg.D))
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.cat([A.T, torch.zeros(lg.d, lg.D)]))
        model.encoder[0].bias.copy_(torch.cat([-lg.b @ A, logvar[0]]))
        model.decoder[0].weight.copy_(torch.cat([lg.W, torch.zeros(lg.D, lg.d)]))
        model.decoder[0].bias.copy_(torch.cat([lg.b, torch.full((lg.D,), math.log(lg.s2))]))
    x = lg.sample(50)
    old, vae.ROWS_PER_CHUNK = vae.ROWS_PER_CHUNK, 64  # force several chunks of images and of samples
    try:
        metrics = vae.evaluate(model, x, k=100, batch_size=20)
    finally:
        vae.ROWS_PER_CHUNK = old
    assert metrics["log_px"] == pytest.approx(lg.log_px(x).mean().item(), abs=1e-6)
    assert metrics["active_units"] == lg.d


# ---------------------------------------------------------------------------------------------- likelihoods
def test_discretized_logistic_is_a_distribution_over_256_values():
    values = torch.arange(256) / 255  # (256,)
    for mean, log_scale in [(0.3, -4.0), (0.0, -6.0), (1.0, -2.0), (0.5, 1.0), (-0.2, -8.0), (0.7, -9.5)]:
        params = torch.tensor([[mean], [log_scale]]).expand(256, 2, 1)
        log_p = vae.discretized_logistic_log_prob(values[:, None], params)
        assert torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-9)
    # and in float32, as trained: finite everywhere, mass still 1
    params = torch.tensor([[0.2], [-7.0]], dtype=torch.float32).expand(256, 2, 1)
    log_p = vae.discretized_logistic_log_prob(values[:, None].float(), params)
    assert (torch.isfinite(log_p).all()
            and torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-4))


def test_bernoulli_and_gaussian_match_torch_distributions():
    torch.manual_seed(0)
    x, logits = torch.bernoulli(torch.full((4, 10), 0.5)), torch.randn(4, 1, 10) * 5
    expected = torch.distributions.Bernoulli(logits=logits[:, 0]).log_prob(x).sum(-1)
    assert torch.allclose(vae.bernoulli_log_prob(x, logits[:, 0]), expected)
    # the decoder's params (B, 1, D)
    assert torch.allclose(vae.LIKELIHOODS["bernoulli"][0](x, logits), expected)
    y, params = torch.randn(4, 3), torch.randn(4, 2, 3)
    expected = torch.distributions.Normal(params[:, 0], (0.5 * params[:, 1]).exp()).log_prob(y).sum(-1)
    assert torch.allclose(vae.gaussian_log_prob(y, params), expected)


# ------------------------------------------------------------------------------------------ collapse remedies
def test_min_rate_commits_every_dimension_to_a_kl_floor():
    for rate in (0.1, 0.5, 2.0):
        model = vae.VAE((1, 28, 28), "bernoulli", latent=8, min_rate=rate)
        x = torch.rand(64, 1, 28, 28)
        for p in model.encoder.parameters():
            nn.init.normal_(p, std=3.0)  # wild encoders too
        mu, logvar = model.encode(x)
        assert (vae.gaussian_kl(mu, logvar) >= rate - 1e-9).all()
        mu0 = torch.zeros(1)  # the floor is attained: mu = 0, sigma^2 = sigma_max^2
        kl_floor = vae.gaussian_kl(mu0, torch.tensor([model.max_logvar]))
        assert kl_floor.item() == pytest.approx(rate, rel=1e-9)


def test_free_bits_replace_small_kl_terms_by_the_floor():
    torch.manual_seed(0)
    model = vae.VAE((1, 28, 28), "bernoulli", latent=8)
    x = torch.bernoulli(torch.rand(32, 1, 28, 28))
    torch.manual_seed(1)
    loss_plain, metrics = model(x)
    torch.manual_seed(1)
    loss_free, _ = model(x, free_bits=0.5)
    mu, logvar = model.encode(x)
    kl_j = vae.gaussian_kl(mu, logvar).mean(0)
    expected = (kl_j.clamp(min=0.5) - kl_j).sum()
    assert (loss_free - loss_plain).item() == pytest.approx(expected.item(), rel=1e-9)
    assert loss_plain.item() == pytest.approx(metrics["nelbo"].item())


def test_mutual_information_is_zero_when_the_encoder_ignores_x():
    mu, logvar = torch.full((500, 4), 0.3), torch.full((500, 4), -1.0)
    assert abs(vae.mutual_information(mu, logvar).item()) < 1e-9
    spread = vae.mutual_information(torch.randn(500, 4) * 10, torch.full((500, 4), -6.0)).item()
    assert math.log(500) - 0.1 < spread <= math.log(500) + 1e-9  # perfectly separated: I = log N


def test_active_units_count_the_dimensions_the_encoder_uses():
    mu = torch.cat([torch.randn(1000, 3), 0.01 * torch.randn(1000, 2)], dim=1)
    assert vae.active_units(mu) == 3


# ------------------------------------------------------------------------------------------ mixture priors
def test_mixture_log_density_integrates_to_one_in_2d():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 2), torch.randn(3, 2) * 0.5 - 0.5
    n, lim = 600, 9.0
    edges = torch.linspace(-lim, lim, n + 1)
    centres = (edges[1:] + edges[:-1]) / 2
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    mass = vae.log_mixture(grid, mu, logvar).exp().sum() * (2 * lim / n) ** 2  # midpoint rule
    assert mass.item() == pytest.approx(1.0, abs=1e-6)
    one = vae.log_mixture(grid[:5], mu[:1], logvar[:1])  # one component: the Gaussian itself
    assert torch.allclose(one, vae.log_normal_logvar(grid[:5], mu[0], logvar[0]))


def test_monte_carlo_kl_is_unbiased_against_the_closed_form():
    torch.manual_seed(0)
    mu_q, logvar_q = torch.randn(4, 3), torch.randn(4, 3) * 0.3
    mu_p, logvar_p = torch.randn(1, 3), torch.randn(1, 3) * 0.3  # a one-component "mixture": closed form
    z = vae.reparameterize(mu_q, logvar_q, samples=200_000)  # (S, 4, 3)
    estimate = vae.kl_monte_carlo(z, mu_q, logvar_q, vae.log_mixture(z, mu_p, logvar_p))  # (S, 4)
    var_q, var_p = logvar_q.exp(), logvar_p.exp()
    exact = 0.5 * (logvar_p - logvar_q + (var_q + (mu_q - mu_p) ** 2) / var_p - 1).sum(-1)
    stderr = estimate.std(0) / math.sqrt(len(estimate))
    assert ((estimate.mean(0) - exact).abs() < 4 * stderr).all()
    assert (stderr < 0.01).all()  # the check has teeth: an error of a few hundredths would fail it


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_mixture_prior_is_the_mean_of_its_components_and_samples_from_it(prior):
    torch.manual_seed(0)
    model = vae.VAE((1, 2, 2), "bernoulli", hidden=8, latent=2, prior=prior, components=3)
    mu, logvar = model.prior_components()  # VampPrior: the encoder's posteriors at the pseudo-inputs
    if prior == "vamp":
        expected_mu, expected_logvar = model.encode(torch.nn.functional.hardtanh(model.pseudo_inputs, 0, 1))
        assert torch.allclose(mu, expected_mu) and torch.allclose(logvar, expected_logvar)
    z = torch.randn(7, 2)
    brute = torch.stack([vae.log_normal_logvar(z, mu[k], logvar[k]).exp() for k in range(3)]).mean(0).log()
    assert torch.allclose(model.log_prior(z), brute)
    draws = model.sample_prior(200_000).detach()
    assert torch.allclose(draws.mean(0), mu.mean(0).detach(), atol=0.02)  # the mixture's mean


def test_mixture_prior_elbo_uses_the_monte_carlo_kl_and_iwae_bounds_it():
    torch.manual_seed(0)
    model = vae.VAE((1, 4, 4), "bernoulli", hidden=16, latent=3, prior="mog", components=4)
    x = torch.bernoulli(torch.full((64, 1, 4, 4), 0.3))
    torch.manual_seed(1)
    loss, metrics = model(x)
    torch.manual_seed(1)
    mu, logvar = model.encode(x)
    z = vae.reparameterize(mu, logvar)
    rec = model.log_px_given_z(x.flatten(1), model.decode(z))
    kl = vae.kl_monte_carlo(z, mu, logvar, model.log_prior(z))
    assert loss.item() == pytest.approx((kl - rec).mean().item(), rel=1e-12)
    assert metrics["kl_mc"].item() == pytest.approx(kl.mean().item(), rel=1e-12)  # named as an estimate
    torch.manual_seed(2)
    result = vae.evaluate(model, x, k=2000)
    assert result["log_px"] >= result["elbo"] - 0.05  # L_k rises with k towards log p(x)


# ---------------------------------------------------------------------------------------------- WAE
def brute_force_mmd(a, b, scales):
    n, d, total = len(a), a.shape[1], 0.0
    for s in scales:
        c = 2 * d * s
        k = lambda u, v: c / (c + ((u - v) ** 2).sum().item())  # noqa: E731
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        total += sum(k(a[i], a[j]) + k(b[i], b[j]) for i, j in pairs) / (n * (n - 1))
        total -= 2 * sum(k(a[i], b[j]) for i in range(n) for j in range(n)) / n**2
    return total


def test_mmd_matches_the_double_sum_and_separates_distributions():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3), torch.randn(6, 3) + 0.5
    assert vae.mmd_unbiased(a, b).item() == pytest.approx(brute_force_mmd(a, b, vae.MMD_SCALES), rel=1e-10)
    assert vae.mmd_unbiased(a, b, (1.0,)).item() == pytest.approx(brute_force_mmd(a, b, (1.0,)), rel=1e-10)
    # one distribution: unbiased, so the average over many small batches is 0 (the V-statistic with the
    # diagonal kept would be biased upwards by about 2 / n per scale)
    same = torch.stack([vae.mmd_unbiased(torch.randn(8, 2), torch.randn(8, 2)) for _ in range(3000)])
    assert abs(same.mean().item()) < 4 * same.std().item() / math.sqrt(len(same))
    shifted = vae.mmd_unbiased(torch.randn(500, 2), torch.randn(500, 2) + 1.0).item()
    null = vae.mmd_unbiased(torch.randn(500, 2), torch.randn(500, 2)).item()
    assert shifted > 0.1 and abs(null) < 0.02


def test_wae_loss_is_reconstruction_plus_lambda_mmd():
    torch.manual_seed(0)
    model = vae.VAE((1, 4, 4), "bernoulli", hidden=16, latent=3)
    x = torch.bernoulli(torch.full((32, 1, 4, 4), 0.3))
    torch.manual_seed(1)
    loss, metrics = model(x, wae_lambda=10.0)
    torch.manual_seed(1)
    mu, logvar = model.encode(x)
    z = vae.reparameterize(mu, logvar)
    rec = model.log_px_given_z(x.flatten(1), model.decode(z))
    mmd = vae.mmd_unbiased(z, model.sample_prior(len(z)))
    assert loss.item() == pytest.approx((-rec.mean() + 10.0 * mmd).item(), rel=1e-12)
    assert metrics["mmd"].item() == pytest.approx(mmd.item(), rel=1e-12)
