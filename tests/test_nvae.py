"""nvae.py: the residual-normal KL, power iteration, the importance-weighted bound against the ELBO, the
dependence structure of the prior and posterior towers, temperature sampling, the likelihoods (normalized
over all 8-bit values), KL balancing, BN readjustment, pinned shapes."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import nvae

pytestmark = pytest.mark.usefixtures("float64_one_thread")


def tiny_model(shape=(1, 8, 8), likelihood="bernoulli", seed=0, **kw) -> nvae.NVAE:
    """Two scales of two groups (4x4 and 2x2 latents after one pre-processing halving), a few
    thousand weights."""
    torch.manual_seed(seed)
    config = dict(channels=4, pre_blocks=1, scales=2, groups=2, z_channels=2, cells=1,
                  expansion=2, mixtures=3)
    model = nvae.NVAE(shape, likelihood, **{**config, **kw})
    # move the BN statistics and affine parameters off their identity initialization so the test sees them
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
        model(binary_images(32, shape))
    return model.eval()


def binary_images(n, shape=(1, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=g) < 0.4).double()


def grad_or_zero(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """d sum(output) / d inputs, zero when output does not depend on inputs at all."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    grad = torch.autograd.grad(output.sum(), inputs, retain_graph=True, allow_unused=True)[0]
    return torch.zeros_like(inputs) if grad is None else grad


# ------------------------------------------------------------------------------------------- residual normal
def test_residual_normal_kl_matches_kl_divergence_of_the_two_gaussians():
    torch.manual_seed(0)
    mu_p, log_sigma_p = torch.randn(5, 7), torch.randn(5, 7)
    delta_mu, delta_log_sigma = torch.randn(5, 7), 0.5 * torch.randn(5, 7)
    q = Normal(mu_p + delta_mu, torch.exp(log_sigma_p) * torch.exp(delta_log_sigma))
    p = Normal(mu_p, torch.exp(log_sigma_p))
    kl = nvae.residual_normal_kl(delta_mu, delta_log_sigma, log_sigma_p)
    assert torch.allclose(kl, kl_divergence(q, p), atol=1e-12, rtol=1e-10)
    assert torch.all(nvae.residual_normal_kl(torch.zeros(3), torch.zeros(3), torch.randn(3)) == 0)  # q = p


def test_model_posterior_is_the_residual_normal_and_its_kl_is_closed_form():
    model, x = tiny_model(), binary_images(6)
    _, groups = model.top_down(model.encode(x))
    for g in groups:
        sigma_p, delta_sigma = torch.exp(g["log_sigma_p"]), torch.exp(g["delta_log_sigma"])
        assert torch.allclose(g["mu"], g["mu_p"] + g["delta_mu"])
        assert torch.allclose(g["log_sigma"].exp(), sigma_p * delta_sigma)
        q, p = Normal(g["mu"], torch.exp(g["log_sigma"])), Normal(g["mu_p"], sigma_p)
        kl = nvae.residual_normal_kl(g["delta_mu"], g["delta_log_sigma"], g["log_sigma_p"])
        assert torch.allclose(kl, kl_divergence(q, p), atol=1e-10)
    # the first prior is N(0, I)
    assert torch.all(groups[0]["mu_p"] == 0) and torch.all(groups[0]["log_sigma_p"] == 0)


def test_log_normal_log_sigma_matches_torch_distributions():
    torch.manual_seed(0)
    z, mu, log_sigma = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    expected = Normal(mu, log_sigma.exp()).log_prob(z).flatten(1).sum(1)
    assert torch.allclose(nvae.log_normal_log_sigma(z, mu, log_sigma), expected, atol=1e-12)


# ------------------------------------------------------------------------------------ spectral regularization
@pytest.mark.parametrize("c_in, c_out, kernel, groups", [(6, 10, 3, 1), (12, 12, 5, 12), (16, 4, 1, 1)])
def test_power_iteration_converges_to_the_largest_singular_value(c_in, c_out, kernel, groups):
    torch.manual_seed(0)
    conv = nvae.Conv2d(c_in, c_out, kernel, groups=groups)
    exact = torch.linalg.matrix_norm(conv.weight.detach().reshape(c_out, -1), ord=2)
    first = conv.spectral_norm(iters=1).item()
    for _ in range(300):  # one iteration per call: the vectors persist in the buffers between calls
        estimate = conv.spectral_norm(iters=1)
    assert first <= exact.item() + 1e-12  # u^T W v with unit u, v never exceeds the largest singular value
    assert torch.allclose(estimate, exact, rtol=1e-8)
    # d s / d W = u_1 v_1^T, the outer product of the top singular vectors
    grad = torch.autograd.grad(conv.spectral_norm(iters=1), conv.weight)[0].reshape(c_out, -1)
    u, s, vh = torch.linalg.svd(conv.weight.detach().reshape(c_out, -1))
    assert torch.allclose(grad.abs(), torch.outer(u[:, 0], vh[0]).abs(), atol=1e-6)


def test_spectral_loss_sums_every_convolution():
    model = tiny_model()
    for _ in range(300):
        loss = nvae.spectral_loss(model, iters=1)
    convs = [m for m in model.modules() if isinstance(m, nvae.Conv2d)]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 20
    exact = sum(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2) for m in convs)
    assert torch.allclose(loss, exact, rtol=1e-6)


# ------------------------------------------------------------------------------------ bounds and estimators
def test_single_sample_log_weight_averages_to_the_closed_form_elbo():
    """E_q[log w] with log w = log p(x|z) + sum_l log p(z_l|z_<l) - log q(z_l|x,z_<l) is the ELBO of Eq. 1,
    whose KL terms are in closed form: the two must agree within Monte Carlo error."""
    model, x = tiny_model(), binary_images(3)
    torch.manual_seed(2)
    s = 1500
    features = [f.repeat(s, 1, 1, 1) for f in model.encode(x)]
    with torch.no_grad():
        log_w = nvae.log_weights(model, x.repeat(s, 1, 1, 1), features).view(s, 3)
        elbo = torch.stack([torch.tensor(nvae.evaluate(model, x[i : i + 1])["elbo"]) for i in range(3)])
        # closed-form KL, Monte Carlo reconstruction: average the estimator over many draws as well
        params, groups = model.top_down(features)
        kl = sum(
            nvae.residual_normal_kl(g["delta_mu"], g["delta_log_sigma"], g["log_sigma_p"]).flatten(1).sum(1)
            for g in groups)
        elbo_cf = (model.log_px_given_z(x.repeat(s, 1, 1, 1), params) - kl).view(s, 3)
    se = torch.sqrt(log_w.var(0) / s + elbo_cf.var(0) / s)
    assert torch.all((log_w.mean(0) - elbo_cf.mean(0)).abs() < 4 * se)
    assert torch.all((elbo - elbo_cf.mean(0)).abs() < 6 * elbo_cf.std(0))  # evaluate() draws one sample


def test_importance_weighted_estimate_is_not_below_the_elbo_on_average():
    model, x = tiny_model(), binary_images(8)
    torch.manual_seed(3)
    with torch.no_grad():
        elbo = torch.stack([nvae.importance_weighted_log_px(model, x, k=1) for _ in range(50)]).mean(0)
        iwae_10 = torch.stack([nvae.importance_weighted_log_px(model, x, k=10, chunk=3)
                               for _ in range(10)]).mean(0)
        iwae_200 = nvae.importance_weighted_log_px(model, x, k=200, chunk=64)
    # Burda et al. 2016, Theorem 1: L_1 <= L_k <= L_m <= log p(x) for k <= m, in expectation
    assert elbo.mean() < iwae_10.mean() < iwae_200.mean()
    assert (iwae_200 > elbo).float().mean() >= 0.75


def test_evaluate_reports_consistent_terms():
    model, x = tiny_model(), binary_images(10)
    torch.manual_seed(4)
    m = nvae.evaluate(model, x, k=50, batch_size=4)
    assert (len(m["kl_groups"]) == model.num_groups
            and math.isclose(sum(m["kl_groups"]), m["kl"], rel_tol=1e-3))
    assert m["kl"] > 0 and m["log_px"] > m["elbo"]


# ---------------------------------------------------------------------------- dependence of the two towers
def test_posterior_of_group_l_depends_on_earlier_groups_and_not_on_later_ones():
    model, x = tiny_model(), binary_images(4)
    features = model.encode(x)
    _, groups = model.top_down(features)
    zs = [g["z"].detach().clone().requires_grad_(True) for g in groups]
    _, groups = model.top_down(features, zs=zs)
    for l in range(1, model.num_groups):
        for key in ("delta_mu", "delta_log_sigma", "mu_p", "log_sigma_p"):
            for j in range(model.num_groups):
                dependence = grad_or_zero(groups[l][key], zs[j]).abs().max()
                if j < l:  # q(z_l | x, z_<l) and p(z_l | z_<l) read every earlier group
                    assert dependence > 1e-8, (l, key, j)
                else:  # and no later one
                    assert dependence == 0, (l, key, j)


def test_prior_does_not_depend_on_x_and_posterior_does():
    model, x = tiny_model(), binary_images(4).requires_grad_(True)
    features = model.encode(x)
    _, groups = model.top_down(features)
    # group 1: p(z_1) = N(0, I) has no path from x; q(z_1 | x) has one
    assert grad_or_zero(groups[0]["mu_p"], x).abs().max() == 0
    assert grad_or_zero(groups[0]["log_sigma_p"], x).abs().max() == 0
    assert grad_or_zero(groups[0]["delta_mu"], x).abs().max() > 1e-8
    # with every z held fixed, no prior depends on x (the prior is the generative model), every posterior does
    zs = [g["z"].detach() for g in groups]
    _, groups = model.top_down(features, zs=zs)
    for g in groups:
        assert (grad_or_zero(g["mu_p"], x).abs().max() == 0
                and grad_or_zero(g["log_sigma_p"], x).abs().max() == 0)
        assert grad_or_zero(g["delta_mu"], x).abs().max() > 1e-8


def test_prior_in_the_posterior_pass_equals_the_prior_of_the_sampling_pass():
    """The top-down tower is shared: with the same z_<l, the sampling pass computes the same p(z_l | z_<l)."""
    model, x = tiny_model(), binary_images(5)
    params_q, posterior = model.top_down(model.encode(x))
    zs = [g["z"] for g in posterior]
    params_p, prior = model.top_down(n=5, zs=zs)
    for a, b in zip(posterior, prior):
        assert torch.allclose(a["mu_p"], b["mu_p"]) and torch.allclose(a["log_sigma_p"], b["log_sigma_p"])
    assert torch.allclose(params_q, params_p)


# ------------------------------------------------------------------------------------------------- sampling
def test_temperature_zero_gives_the_prior_means():
    model = tiny_model()
    torch.manual_seed(5)
    x_a, groups = nvae.sample(model, 6, t=0.0)
    for g in groups:
        assert torch.equal(g["z"], g["mu_p"])
    assert torch.all(groups[0]["z"] == 0)
    x_b, _ = nvae.sample(model, 6, t=0.0)
    assert torch.equal(x_a, x_b) and torch.allclose(x_a, x_a[:1].expand_as(x_a))  # deterministic, one image
    _, groups = nvae.sample(model, 2000, t=0.5)  # the spread shrinks with t
    z = groups[0]["z"]
    assert abs(z.std().item() - 0.5) < 0.02


def test_bn_readjustment_works_on_a_copy():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(6)
    adjusted = nvae.readjust_batch_norm(model, batches=3, t=0.7, n=20)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not adjusted.training
    # the generative path's statistics are re-estimated, on 3 batches
    for name, m in adjusted.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            generative = name.startswith(("dec_", "post"))
            tracked = 3 if generative else before[name + ".num_batches_tracked"].item()
            assert m.num_batches_tracked.item() == tracked, name
            assert generative != torch.equal(m.running_mean, before[name + ".running_mean"]), name


# ---------------------------------------------------------------------------------------------- likelihoods
def test_bernoulli_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    x, logits = binary_images(3, (1, 4, 4)), torch.randn(3, 1, 4, 4)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(nvae.bernoulli_log_prob(x.flatten(1), logits.flatten(1)), expected, atol=1e-12)


def test_logistic_mixture_sums_to_one_over_the_256_gray_levels():
    torch.manual_seed(0)
    params = 2 * torch.randn(1, nvae.mixture_params_per_pixel(1, 4), 1, 3)  # 3 pixels, 4 components
    levels = torch.arange(256.0) / 255
    x = levels[:, None, None, None].expand(256, 1, 1, 3)
    log_p = torch.stack([nvae.discretized_mixture_log_prob(x[:, :, :, j : j + 1], params[:, :, :, j : j + 1]
                                                           .expand(256, -1, -1, -1), 4) for j in range(3)])
    assert torch.allclose(log_p.exp().sum(1), torch.ones(3), atol=1e-10)


def reference_rgb_mixture(x, params, m):
    """An independent, naive evaluation of the RGB mixture at one pixel: x (N, 3) levels k/255, params (P,).
    Returns the probability of each colour and the marginal probability of each (r, g)."""
    logits, means = params[:m], params[m : 4 * m].view(m, 3)
    scales, coeffs = (params[4 * m : 7 * m].view(m, 3).clamp(min=-7).exp(),
                      torch.tanh(params[7 * m :].view(m, 3)))
    y = 2 * x - 1  # (N, 3) in [-1, 1]

    def mass(v, mu, s):  # the logistic's mass on the bin of v: CDF differences, open edge bins
        upper = torch.where(v > 1 - 1e-6, torch.ones_like(v), torch.sigmoid((v + 1 / 255 - mu) / s))
        lower = torch.where(v < -1 + 1e-6, torch.zeros_like(v), torch.sigmoid((v - 1 / 255 - mu) / s))
        return upper - lower

    pi = torch.softmax(logits, 0)
    p, p_rg = 0, 0
    for j in range(m):
        mu_r, mu_g = means[j, 0], means[j, 1] + coeffs[j, 0] * y[:, 0]
        mu_b = means[j, 2] + coeffs[j, 1] * y[:, 0] + coeffs[j, 2] * y[:, 1]
        rg = mass(y[:, 0], mu_r, scales[j, 0]) * mass(y[:, 1], mu_g, scales[j, 1])
        p = p + pi[j] * rg * mass(y[:, 2], mu_b, scales[j, 2])
        p_rg = p_rg + pi[j] * rg
    return p, p_rg


def pixel(params, n):  # (P,) -> (n, P, 1, 1): one pixel's parameters for n images
    return params.view(1, -1, 1, 1).expand(n, -1, -1, -1)


def test_rgb_logistic_mixture_matches_a_naive_reference_and_normalizes_over_blue():
    torch.manual_seed(1)
    m = 3
    params = torch.randn(nvae.mixture_params_per_pixel(3, m))
    params[m : 4 * m] *= 0.5
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (500, 3), generator=g).double()
    levels[:8] = torch.tensor([[0, 0, 0], [255, 255, 255], [0, 255, 0], [255, 0, 255], [0, 0, 255],
                               [128, 0, 255], [255, 128, 0], [1, 254, 127]])
    x = levels / 255
    log_p = nvae.discretized_mixture_log_prob(x.view(-1, 3, 1, 1), pixel(params, len(x)), m)
    expected, _ = reference_rgb_mixture(x, params, m)
    assert torch.allclose(log_p.exp(), expected, rtol=1e-8, atol=1e-300)
    # for 16 (r, g) pairs the 256 blue values sum to the (r, g) marginal; all 65,536 marginals sum to 1
    rg = torch.randint(0, 256, (16, 2), generator=g).double()
    x = torch.cat([rg.repeat_interleave(256, 0), torch.arange(256.0).repeat(16)[:, None]], 1) / 255
    p = nvae.discretized_mixture_log_prob(x.view(-1, 3, 1, 1), pixel(params, len(x)), m)
    _, p_rg = reference_rgb_mixture(x[::256], params, m)
    assert torch.allclose(p.exp().view(16, 256).sum(1), p_rg, rtol=1e-8)
    r, gg = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    all_rg = torch.stack([r.flatten(), gg.flatten(), torch.zeros(65536)], 1) / 255
    assert abs(reference_rgb_mixture(all_rg, params, m)[1].sum().item() - 1) < 1e-10


def test_mixture_sampler_matches_its_probabilities():
    torch.manual_seed(2)
    params = torch.randn(1, nvae.mixture_params_per_pixel(1, 3), 1, 1)
    params[:, 3:6] *= 0.5
    levels = torch.arange(256.0) / 255
    p = nvae.discretized_mixture_log_prob(levels.view(256, 1, 1, 1), params.expand(256, -1, -1, -1), 3).exp()
    draws = nvae.sample_discretized_mixture(params.expand(40_000, -1, -1, -1), 1, 3).flatten()
    assert torch.all(torch.isin(draws, levels))
    mean, var = (p * levels).sum(), (p * levels**2).sum() - (p * levels).sum() ** 2
    assert abs(draws.mean() - mean) < 4 * math.sqrt(var / len(draws))
    # the four quarters of the range: empirical frequencies within 4 standard errors
    quarters = torch.stack([p[i * 64 : (i + 1) * 64].sum() for i in range(4)])
    freq = torch.stack([((draws >= i * 64 / 255 - 1e-9) & (draws < (i + 1) * 64 / 255 - 1e-9)).double().mean()
                        for i in range(4)])
    assert torch.all((freq - quarters).abs() < 4 * torch.sqrt(quarters * (1 - quarters) / len(draws)) + 1e-4)


# ------------------------------------------------------------------------------------- the training objective
def test_kl_balancing_coefficients():
    kl = torch.tensor([[4.0, 1.0, 0.0], [2.0, 3.0, 0.0]])  # (B, L)
    sizes = torch.tensor([2.0, 4.0, 8.0])
    gamma = nvae.kl_balance_coefficients(kl, sizes)
    raw = (torch.tensor([3.0, 2.0, 0.0]) + 0.01) / sizes  # mean KL per group (+0.01) over its size
    assert torch.allclose(gamma, 3 * raw / raw.sum()) and math.isclose(gamma.sum().item(), 3)
    # equal KL per dimension in every group: every coefficient is 1
    assert torch.allclose(nvae.kl_balance_coefficients(sizes[None] * 0.7 - 0.01, sizes), torch.ones(3))


def test_loss_is_the_negative_elbo_after_warm_up_and_balanced_during_it():
    model, x = tiny_model(), binary_images(8)
    model.train()
    torch.manual_seed(7)
    loss, metrics = model(x, kl_weight=1.0, kl_balance=True)  # after warm-up: no balancing
    assert torch.allclose(loss, metrics["nelbo"])
    torch.manual_seed(7)
    loss_w, metrics_w = model(x, kl_weight=0.5, kl_balance=False)
    assert torch.allclose(loss_w, metrics_w["rec"] + 0.5 * metrics_w["kl"])
    torch.manual_seed(7)
    loss_b, metrics_b = model(x, kl_weight=0.5, kl_balance=True, sr_weight=0.1)
    assert torch.allclose(metrics_b["nelbo"], metrics_w["nelbo"])  # same draws, same bound
    assert not torch.allclose(loss_b, loss_w) and torch.isfinite(loss_b) and metrics_b["sr"] > 0


def test_gradients_reach_every_parameter():
    model, x = (tiny_model(likelihood="discretized_logistic_mixture", shape=(3, 8, 8)),
                torch.randint(0, 256, (4, 3, 8, 8)).double() / 255)
    model.train()
    loss, _ = model(x, kl_weight=1.0, sr_weight=1e-2)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing


# -------------------------------------------------------------------------------------------- pinned shapes
def test_default_configuration_shapes_and_size():
    args = nvae.Args()
    torch.manual_seed(0)
    model = nvae.NVAE((1, 28, 28), "bernoulli", args.channels, args.pre_blocks, args.scales, args.groups,
                      args.z_channels, args.cells, args.expansion, args.mixtures).eval()
    assert model.padded == (32, 32) and model.pad == (2, 2, 2, 2)
    x = binary_images(3, (1, 28, 28))
    features = model.encode(x)
    assert [tuple(f.shape) for f in features] == [(3, 64, 4, 4), (3, 64, 4, 4), (3, 32, 8, 8), (3, 32, 8, 8)]
    params, groups = model.top_down(features)
    assert params.shape == (3, 1, 28, 28)
    assert [tuple(g["z"].shape) for g in groups] == [(3, 8, 4, 4)] * 2 + [(3, 8, 8, 8)] * 2
    assert model.group_sizes.tolist() == [128, 128, 512, 512]
    assert sum(p.numel() for p in model.parameters()) == 389_085
    samples, _ = nvae.sample(model, 2, t=0.8)
    assert samples.shape == (2, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1


def test_rgb_mixture_shapes():
    # 12 pads to 12 (a multiple of 4)
    model = tiny_model(shape=(3, 12, 12), likelihood="discretized_logistic_mixture", mixtures=5)
    x = torch.randint(0, 256, (2, 3, 12, 12)).double() / 255
    params, groups = model.top_down(model.encode(x))
    assert params.shape == (2, nvae.mixture_params_per_pixel(3, 5), 12, 12) == (2, 50, 12, 12)
    assert [tuple(g["z"].shape) for g in groups] == [(2, 2, 3, 3)] * 2 + [(2, 2, 6, 6)] * 2
    samples, _ = nvae.sample(model, 2)
    assert samples.shape == (2, 3, 12, 12) and torch.all(torch.isin(samples, torch.arange(256.0) / 255))
