"""ddpm.py: the forward process against the step-by-step chain, the posterior against Gaussian conditioning,
the bound's terms, the discretized decoder, the samplers and the bound against Gaussian data with the optimal
noise predictor, the Fréchet distance against closed forms; the U-Net's size; end-to-end runs and resume."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import common
import ddpm
from helpers import data_dir, needs_mnist, run_script


pytestmark = pytest.mark.usefixtures("float64_one_thread")


class Oracle(nn.Module):
    """Returns the true eps of x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps for a fixed batch x0 (knows
    the answer)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0, self.alphas_cumprod = x0, None

    def forward(self, x_t, t):
        a = self.alphas_cumprod[t].view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()


class ShiftedOracle(Oracle):
    def forward(self, x_t, t):
        return super().forward(x_t, t) + 0.1


class GaussianOptimalEps(nn.Module):
    """For data x0 ~ N(m, C): E[eps | x_t] = sqrt(1 - a_t) S_t^-1 (x_t - sqrt(a_t) m),
    S_t = a_t C + (1 - a_t) I. This is the minimizer of L_simple, so a perfectly trained network."""

    def __init__(self, m: torch.Tensor, C: torch.Tensor):
        super().__init__()
        self.m, self.C, self.alphas_cumprod, self.gain = m, C, None, None

    def forward(self, x_t, t):
        if self.gain is None:  # sqrt(1 - a_t) S_t^-1 for every t, (T + 1, D, D)
            a = self.alphas_cumprod[:, None, None]
            self.gain = (1 - a).sqrt() * torch.linalg.inv(a * self.C + (1 - a) * torch.eye(len(self.m)))
        a = self.alphas_cumprod[t][:, None]
        return torch.einsum("bij,bj->bi", self.gain[t], x_t - a.sqrt() * self.m)


def diffusion_with(net, kind="toy", T=1000, schedule="linear", variance="beta") -> ddpm.Diffusion:
    model = ddpm.Diffusion(net, kind, T, schedule, variance)
    net.alphas_cumprod = model.alphas_cumprod
    return model


GAUSS_M = torch.tensor([1.0, -0.5], dtype=torch.float64)
GAUSS_C = [[0.8, 0.3], [0.3, 0.4]]


# ----------------------------------------------------------------------------------------- schedules, forward
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_xt_given_x0_equals_t_steps_of_the_forward_chain(schedule):
    model = ddpm.Diffusion(nn.Identity(), "toy", 1000, schedule)
    # exact moments of x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) e_t, step by step: mean factor
    # and variance
    factor, var = 1.0, 0.0
    factors, variances = [1.0], [0.0]
    for beta in model.betas[1:].tolist():
        factor, var = factor * math.sqrt(1 - beta), (1 - beta) * var + beta
        factors.append(factor), variances.append(var)
    assert torch.allclose(model.alphas_cumprod.sqrt(), torch.tensor(factors), rtol=1e-10, atol=1e-14)
    assert torch.allclose(1 - model.alphas_cumprod, torch.tensor(variances), rtol=1e-10, atol=1e-14)
    # and by simulation of the chain against q_sample's law, at a few t
    torch.manual_seed(0)
    x0 = torch.full((20_000, 1), 1.5)
    x, checks = x0.clone(), {10: None, 300: None, 1000: None}
    for t in range(1, 1001):
        x = (1 - model.betas[t]).sqrt() * x + model.betas[t].sqrt() * torch.randn_like(x)
        if t in checks:
            direct = model.q_sample(x0, torch.full((len(x0),), t), torch.randn_like(x0))
            se = x.std() * math.sqrt(2 / len(x))
            assert abs(x.mean() - direct.mean()) < 5 * se
            assert abs(x.var() - direct.var()) < 5 * x.var() * math.sqrt(2 / len(x))


def test_schedules_match_their_definitions():
    linear = ddpm.linear_betas(1000)
    assert linear[0] == 0 and linear[1] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    assert torch.allclose(linear.diff()[1:], torch.full((999,), (0.02 - 1e-4) / 999))
    cosine = ddpm.cosine_betas(1000)
    f = torch.cos((torch.arange(1001) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    cumprod = torch.cumprod(1 - cosine, 0)
    unclipped = cosine < 0.999
    assert unclipped[:990].all() and cosine.max() <= 0.999
    assert torch.allclose(cumprod[unclipped], (f / f[0])[unclipped], rtol=1e-9)


def test_posterior_equals_gaussian_conditioning():
    model = ddpm.Diffusion(nn.Identity(), "toy")
    torch.manual_seed(0)
    t = torch.randint(1, 1001, (64,))
    x0, x_t = torch.randn(64, 3), torch.randn(64, 3)
    mean, var = model.q_posterior(x0, x_t, t)
    for i in range(64):  # joint of (x_{t-1}, x_t) given x0, conditioned on x_t by the 2x2 Gaussian formulas
        ti = int(t[i])
        a_prev = torch.prod(1 - model.betas[1:ti])  # product over s < t, computed afresh
        beta = model.betas[ti]
        m1, c11 = a_prev.sqrt() * x0[i], 1 - a_prev
        m2, c12, c22 = (1 - beta).sqrt() * m1, (1 - beta).sqrt() * c11, (1 - beta) * c11 + beta
        assert torch.allclose(mean[i], m1 + c12 / c22 * (x_t[i] - m2), atol=1e-10)
        assert torch.allclose(var[i], c11 - c12**2 / c22, atol=1e-12)


def test_mu_theta_of_the_true_noise_is_the_posterior_mean():
    model = ddpm.Diffusion(nn.Identity(), "toy", schedule="cosine")
    torch.manual_seed(0)
    t, x0, eps = torch.randint(1, 1001, (256,)), torch.randn(256, 4), torch.randn(256, 4)
    x_t = model.q_sample(x0, t, eps)
    assert torch.allclose(model.p_mean(x_t, t, eps), model.q_posterior(x0, x_t, t)[0], atol=1e-8)


def test_l_simple_is_the_mean_squared_noise_error():
    torch.manual_seed(0)
    net = ddpm.MLP(2, 16)
    model = ddpm.Diffusion(net, "toy")
    x0 = torch.randn(32, 2)
    torch.manual_seed(3)
    loss, _ = model(x0)
    torch.manual_seed(3)
    t = torch.randint(1, 1001, (32,))  # Algorithm 1: the same draws in the same order
    eps = torch.randn_like(x0)
    a = model.alphas_cumprod[t][:, None]
    expected = ((eps - net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------- bound terms
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_kl_terms_vanish_when_the_model_mean_is_the_posterior_mean(variance):
    torch.manual_seed(0)
    x0 = torch.randn(500, 3)
    model = diffusion_with(Oracle(x0), variance=variance)
    t = torch.randint(2, 1001, (500,))
    kl = ddpm.bound_terms(model, x0, t)
    if variance == "posterior":
        assert kl.abs().max() < 1e-9
    else:  # only the variance mismatch is left: D/2 (log beta/beta~ + beta~/beta - 1)
        ratio = model.posterior_var[t] / model.betas[t]
        assert torch.allclose(kl, 1.5 * (-ratio.log() + ratio - 1), rtol=1e-7, atol=1e-10)
    # and any other mean costs exactly ||mu~ - mu||^2 / (2 sigma^2) more
    shifted = diffusion_with(ShiftedOracle(x0), variance=variance)
    torch.manual_seed(1)
    base = ddpm.bound_terms(model, x0, t)
    torch.manual_seed(1)
    extra = ddpm.bound_terms(shifted, x0, t) - base
    # mu shift per eps shift
    coef = model.betas[t] / (1 - model.alphas_cumprod[t]).sqrt() / model.alphas[t].sqrt()
    assert torch.allclose(extra, 3 * (0.1 * coef) ** 2 / (2 * model.sigma2[t]), rtol=1e-6)


def test_discretized_gaussian_is_a_distribution_over_256_values():
    values = torch.arange(256) / 255 * 2 - 1  # the pixel grid on [-1, 1]
    for mean, var in [(0.3, 1e-4), (-1.0, 1e-5), (1.0, 0.01), (0.0, 1.0), (0.02, 1e-8), (3.0, 0.5)]:
        log_p = ddpm.discretized_gaussian_log_prob(values[:, None],
                                                   torch.full((256, 1), mean), torch.tensor(var))
        assert torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-9)
        normal = torch.distributions.Normal(mean, math.sqrt(var))  # an inner bin, from the CDF directly
        inner = normal.cdf(values[100] + 1 / 255) - normal.cdf(values[100] - 1 / 255)
        if inner > 1e-10:  # (a direct difference of CDFs cancels to 0 further out; the log form does not)
            assert log_p[100].exp().item() == pytest.approx(inner.item(), rel=1e-6)
    # float32, as trained: finite everywhere, mass 1
    log_p = ddpm.discretized_gaussian_log_prob(values[:, None].float(),
                                               torch.full((256, 1), 0.2), torch.tensor(1e-4))
    assert (torch.isfinite(log_p).all()
            and torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-4))


def test_gaussian_decoder_and_kl_match_torch_distributions():
    torch.manual_seed(0)
    x, mean, var = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5, 1) + 0.1
    expected = torch.distributions.Normal(mean, var.sqrt()).log_prob(x).sum(1)
    assert torch.allclose(ddpm.continuous_gaussian_log_prob(x, mean, var), expected)
    m2, v2 = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    p, q = (torch.distributions.Normal(mean, var.sqrt().expand(5, 3)),
            torch.distributions.Normal(m2, v2.sqrt()))
    assert torch.allclose(ddpm.normal_kl(mean, var.expand(5, 3), m2, v2),
                          torch.distributions.kl_divergence(p, q).sum(1))


def test_stratified_timesteps_are_an_unbiased_estimate_of_the_sum():
    T = 1000
    t, w = ddpm.stratified_timesteps(20_000, 50, T, "cpu")
    assert w[0].sum() == T - 1 and t.min() >= 2 and t.max() <= T
    assert (t.diff(dim=1) > 0).all()  # one t per stratum, strata in order
    L = 1 / torch.arange(T + 1).double() ** 0.8  # a term decreasing in t like the bound's
    estimates = (w * L[t]).sum(1)
    exact = L[2:].sum()
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < 5 * se + 1e-12


# ---------------------------------------------------------------------------------------------- Gaussian data
@pytest.mark.parametrize("sampler, variance, steps, eta", [
    ("ancestral", "beta", 0, 0.0), ("ancestral", "posterior", 0, 0.0), ("ddim", "beta", 1000, 0.0),
    ("ddim", "beta", 250, 1.0)])
def test_samplers_reproduce_gaussian_data_with_the_optimal_noise_predictor(sampler, variance, steps, eta):
    C = torch.tensor(GAUSS_C)
    model = diffusion_with(GaussianOptimalEps(GAUSS_M, C), variance=variance)
    torch.manual_seed(0)
    n = 10_000
    x, _ = ddpm.sample(model, n, (2,), sampler, steps, eta)
    mean_se = (C.diagonal() / n).sqrt()
    assert ((x.mean(0) - GAUSS_M).abs() < 4 * mean_se).all(), x.mean(0)
    cov = torch.cov(x.T)
    # sd of a sample covariance entry
    cov_se = ((C**2 + C.diagonal()[:, None] * C.diagonal()[None]) / n).sqrt()
    assert ((cov - C).abs() < 4 * cov_se + 0.01).all(), cov


def test_ddim_with_eta_1_on_every_step_is_ancestral_sampling_with_the_posterior_variance():
    torch.manual_seed(0)
    model = ddpm.Diffusion(ddpm.MLP(2, 32), "toy", T=100, variance="posterior")
    torch.manual_seed(1)
    ancestral, frames = ddpm.sample(model, 500, (2,), "ancestral", keep=5)
    torch.manual_seed(1)
    ddim, _ = ddpm.sample(model, 500, (2,), "ddim", steps=100, eta=1.0)
    assert torch.allclose(ancestral, ddim, atol=1e-8)
    assert len(frames) == 5 and torch.equal(frames[-1], ancestral)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_bound_is_above_and_close_to_the_exact_nll_of_gaussian_data(variance):
    C = torch.tensor(GAUSS_C)
    model = diffusion_with(GaussianOptimalEps(GAUSS_M, C), variance=variance)
    torch.manual_seed(0)
    x0 = torch.distributions.MultivariateNormal(GAUSS_M, C).sample((300,))
    nll = -torch.distributions.MultivariateNormal(GAUSS_M, C).log_prob(x0)
    parts = ddpm.nll_bound(model, x0, num_t=0, rows=50_000)  # exact over every t
    assert torch.allclose(parts["nll"], parts["prior"] + parts["diffusion"] + parts["decoder"])
    # per example, a one-sample estimate of KL(q(x_1:T | x_0) || p(x_1:T | x_0)) >= 0
    gap = parts["nll"] - nll
    se = gap.std() / math.sqrt(len(gap))
    assert gap.mean() > -3 * se, (gap.mean(), se)
    # sigma_t^2 = beta_t is close to the true reverse variance of smooth data: a tight bound; beta~_t is far
    # too small at small t (beta~_1 = 0), which costs about a nat here (Nichol & Dhariwal 2021, Sec. 3.1)
    assert gap.mean() < (0.03 if variance == "beta" else 2.0) + 3 * se, (gap.mean(), se)
    assert parts["prior"].max() < 1e-3  # L_T: q(x_T | x_0) is almost N(0, I)
    torch.manual_seed(1)  # the stratified estimate agrees with the exact sum within its error
    strat = ddpm.nll_bound(model, x0, num_t=30, rows=50_000)["nll"]
    se = ((strat - parts["nll"]).std() / math.sqrt(len(x0))).item()
    assert abs((strat - parts["nll"]).mean()) < 4 * se


# ---------------------------------------------------------------------------------------------- FID
def test_frechet_distance_matches_closed_forms():
    torch.manual_seed(0)
    mu1, mu2 = torch.randn(6), torch.randn(6)
    d1, d2 = torch.rand(6) + 0.1, torch.rand(6) + 0.1  # commuting (diagonal): sum (sqrt d1 - sqrt d2)^2
    expected = (mu1 - mu2).pow(2).sum() + (d1.sqrt() - d2.sqrt()).pow(2).sum()
    assert ddpm.frechet_distance(mu1, d1.diag(), mu2, d2.diag()) == pytest.approx(expected.item(), rel=1e-10)
    A, B = torch.randn(6, 6), torch.randn(6, 4)
    S1, S2 = A @ A.T + 0.1 * torch.eye(6), B @ B.T  # general, one of them singular
    # tr (S1 S2)^(1/2) via eigenvalues
    root_trace = torch.linalg.eigvals(S1 @ S2).real.clamp(min=0).sqrt().sum()
    expected = (mu1 - mu2).pow(2).sum() + S1.trace() + S2.trace() - 2 * root_trace
    assert ddpm.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expected.item(), rel=1e-6)
    assert ddpm.frechet_distance(mu2, S2, mu1, S1) == pytest.approx(expected.item(), rel=1e-6)
    assert ddpm.frechet_distance(mu1, S1, mu1, S1) == pytest.approx(0.0, abs=1e-9)
    x = torch.randn(200_000, 3) @ A[:3, :3].T + 1  # feature_stats: the sample mean and covariance
    mu, cov = ddpm.feature_stats(x)
    assert (torch.allclose(mu, torch.ones(3), atol=0.02)
            and torch.allclose(cov, A[:3, :3] @ A[:3, :3].T, rtol=0.02, atol=0.02))


# ---------------------------------------------------------------------------------------------- networks, EMA
def test_paper_unet_has_35_7_million_parameters_and_image_shaped_output():
    torch.set_default_dtype(torch.float32)
    net = ddpm.UNet((3, 32, 32))  # Ho et al., Appendix B: 35.7M parameters for CIFAR-10
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    assert sum(isinstance(m, ddpm.AttnBlock) for m in net.modules()) == 2 + 3 + 1  # down, up at 16x16; middle
    small = ddpm.UNet((1, 28, 28), 32, (1, 2), 1, (14,))
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 500, 1000])
    assert small(x, t).shape == x.shape
    assert ddpm.MLP(2, 64)(torch.randn(5, 2), t.repeat(2)[:5]).shape == (5, 2)


def test_unet_with_16_base_channels_builds_and_runs():
    # --channels 16: an up-path block takes 32 + 16 = 48 channels, which 32 groups do not divide;
    # gcd(32, 48) = 16
    net = ddpm.UNet((1, 8, 8), 16, (1, 2), 1, (4,))
    assert any(isinstance(m, nn.GroupNorm) and (m.num_channels, m.num_groups) == (48, 16)
               for m in net.modules())
    # 32 where they divide
    assert ddpm.group_norm(64).num_groups == 32 and ddpm.group_norm(16).num_groups == 16
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([1, 1000])).shape == x.shape


def test_timestep_embedding_is_sin_and_cos_of_t_in_the_network_dtype():
    t = torch.tensor([1, 7, 1000])
    # dim 16: 10000^(-i/(d/2-1))
    freqs = torch.exp(-math.log(10000) * torch.arange(8, dtype=torch.float64) / 7)
    angles = t.double()[:, None] * freqs[None]
    expected = torch.cat([angles.sin(), angles.cos()], 1)
    assert torch.equal(ddpm.timestep_embedding(t, 16, dtype=torch.float64), expected)
    assert ddpm.timestep_embedding(t, 16).dtype == torch.float32  # the default, as under bf16 autocast
    seen = []
    # the embedding reaches the network unscaled, in its dtype
    net = ddpm.UNet((1, 8, 8), 16, (1, 2), 1, (4,))
    net.time.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    net(torch.randn(3, 1, 8, 8), t)
    assert net.time_scale == 1.0 and torch.equal(seen[0], expected)


def test_ema_follows_the_weights_with_warm_up():
    model = nn.Linear(3, 2)
    ema = ddpm.EMA(model, decay=0.9)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # d = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.model.weight, 0.1 * start + 0.9 * model.weight)
    ema.update(model, step=1000)  # d = 0.9
    assert torch.allclose(ema.model.weight, 0.9 * (0.1 * start + 0.9 * model.weight) + 0.1 * model.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())


def small_unet_diffusion(T: int = 40, dropout: float = 0.1) -> ddpm.Diffusion:
    """An 8x8 U-Net whose zero-initialized layers are redrawn, so its output (and gradient) depends on
    its input."""
    torch.manual_seed(0)
    net = ddpm.UNet((1, 8, 8), 32, (1, 2), 1, (4,), dropout)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.05)
    return ddpm.Diffusion(net, "8bit", T)


def test_attention_block_is_single_head_softmax_attention():
    torch.manual_seed(0)
    block = ddpm.AttnBlock(32)
    nn.init.normal_(block.proj.weight, std=0.1)
    x = torch.randn(2, 32, 4, 4)
    qkv = block.qkv(block.norm(x)).flatten(2)  # (B, 3C, HW): q, k, v are the first, second, third C channels
    q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # (B, HW query, HW key)
    expected = x + block.proj((v @ weights.transpose(1, 2)).view(2, 32, 4, 4))
    assert torch.allclose(block(x), expected, atol=1e-12)


@pytest.mark.parametrize("num_t", [0, 10])
def test_bound_does_not_depend_on_how_many_pairs_the_network_sees_at_once(num_t):
    model = small_unet_diffusion().eval()
    x0 = ddpm.to_model(torch.rand(3, 1, 8, 8), "8bit")
    results = []
    for net_rows in (0, 1, 7, 32, None):  # the noise is drawn per block of `rows` pairs whatever net_rows is
        torch.manual_seed(1)
        results.append(ddpm.nll_bound(model, x0, num_t, rows=32, net_rows=net_rows))
    for other in results[1:]:
        for key, value in results[0].items():
            assert torch.allclose(other[key], value, rtol=1e-11, atol=1e-11), key
    assert ddpm.bound_net_rows(x0) == ddpm.VALUES_PER_CALL // 64


def test_a_float64_model_samples_and_bounds_in_float64_with_the_exact_schedule():
    torch.set_default_dtype(torch.float32)  # built in float32, then .double(), as a user would
    torch.manual_seed(0)
    model = ddpm.Diffusion(ddpm.MLP(2, 16), "toy", T=100, variance="posterior").double()
    assert model.alphas_cumprod.dtype == torch.float64
    # not float32 widened
    assert torch.equal(model.alphas_cumprod, torch.cumprod(1 - ddpm.linear_betas(100), 0))
    torch.set_default_dtype(torch.float64)
    # built in float64
    reference = ddpm.Diffusion(copy.deepcopy(model.net), "toy", T=100, variance="posterior")
    torch.set_default_dtype(torch.float32)
    for name in ("betas", "alphas", "alphas_cumprod", "posterior_var", "sigma2"):
        assert torch.equal(getattr(model, name), getattr(reference, name)), name
    for sampler, steps in (("ancestral", 0), ("ddim", 10)):
        torch.manual_seed(2)
        x, frames = ddpm.sample(model, 4, (2,), sampler, steps, keep=3)
        assert x.dtype == torch.float64 and all(f.dtype == torch.float64 for f in frames)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    torch.manual_seed(1)
    parts = ddpm.nll_bound(model, x0, num_t=0)
    torch.manual_seed(1)
    expected = ddpm.nll_bound(reference, x0, num_t=0)
    for key, value in parts.items():
        assert value.dtype == torch.float64 and torch.allclose(value, expected[key],
                                                               rtol=1e-12, atol=1e-12), key
    images = small_unet_diffusion(T=20)  # the U-Net too (built in float32 here), and back to float32
    x, _ = ddpm.sample(images.double(), 2, (1, 8, 8), "ddim", 3)
    assert x.dtype == torch.float64
    assert images.float().alphas_cumprod.dtype == torch.float32
    assert ddpm.sample(images, 2, (1, 8, 8), "ddim", 3)[0].dtype == torch.float32


def test_channels_last_gives_the_same_loss_and_gradients():
    model = small_unet_diffusion(T=100, dropout=0.0)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    weight = nhwc.net.down[0][0].conv1.weight  # (32, 32, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    x0 = ddpm.to_model(torch.rand(4, 1, 8, 8), "8bit")
    losses, grads = [], []
    for m in (model, nhwc):
        torch.manual_seed(1)
        loss, _ = m(x0)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in m.parameters()])
    assert torch.allclose(losses[0], losses[1], rtol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@needs_mnist
def test_channels_last_run_trains_with_nhwc_weights(tmp_path):
    torch.set_default_dtype(torch.float32)
    args = dataclasses.replace(ddpm.Args(), dataset="mnist", data_dir=data_dir(), channels=32,
                               channel_mult=(1, 2), num_res_blocks=1, steps=3, batch_size=8, warmup=1,
                               eval_n=4, eval_t=2, eval_every=100, sampler="ddim", sample_steps=2,
                               log_every=1, ckpt_every=100, device="cpu", channels_last=True,
                               out=str(tmp_path / "run"))
    assert "nll_bpd" in ddpm.train(args)
    ckpt = common.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    for part in ("model", "ema"):
        key = "net.down.0.0.conv1.weight" if part == "model" else "model.net.down.0.0.conv1.weight"
        assert ckpt[part][key].is_contiguous(memory_format=torch.channels_last), part
    assert ckpt["config"]["channels_last"] is True and ckpt["config"]["compile"] is False


# ---------------------------------------------------------------------------------------------- end to end
def run_ddpm(*flags, timeout=300):
    return run_script("ddpm.py", *flags, timeout=timeout)


def test_help_lists_options_with_defaults():
    result = run_ddpm("--help")
    assert result.returncode == 0
    for text in ("--schedule", "--variance", "--sampler", "--eval-t", "--ema-decay", "--fid",
                 "--quick", "0.9999"):
        assert text in result.stdout


def test_help_lists_the_gpu_options():
    result = run_ddpm("--help")
    assert result.returncode == 0
    for text in ("--amp", "--channels-last", "--no-channels-last", "--compile"):
        assert text in result.stdout


def test_quick_toy_writes_pictures_metrics_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    flags = ("--quick", "--dataset", "8gaussians", "--eval-n", "200", "--eval-t", "10",
             "--sample-steps", "10")
    result = run_ddpm(*flags, "--steps", "60", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert (last.startswith("eval test nll_nats=") and "kl_data_model=" in last
            and last.endswith("strata of t)"))
    for name in ("samples.png", "data.png", "reverse.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    ckpt = common.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 60 and "ema" in ckpt
    refused = run_ddpm(*flags, "--steps", "60", "--out", str(out))
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    resumed = run_ddpm(*flags, "--steps", "80", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 80


@needs_mnist
def test_quick_mnist_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_ddpm("--quick", "--dataset", "mnist", "--steps", "10", "--batch-size", "16",
                      "--eval-n", "20", "--eval-t", "5", "--sample-steps", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("eval test nll_bpd=")
    for name in ("samples.png", "reverse.png", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0


def test_resume_is_exact_including_the_ema(tmp_path):
    torch.set_default_dtype(torch.float32)
    base = dataclasses.replace(ddpm.Args(), dataset="two_moons", hidden=32, steps=20, warmup=5, eval_n=50,
                               eval_t=5, log_every=5, ckpt_every=100, eval_every=12, sampler="ddim",
                               sample_steps=5, device="cpu")
    ddpm.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    ddpm.train(dataclasses.replace(base, steps=10, out=str(tmp_path / "split")))
    ddpm.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 20
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_unsupported_requests_give_one_line_errors(tmp_path):
    result = run_ddpm("--dataset", "binarized_mnist", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "8-bit images and 2D toys" in result.stderr or "MNIST" in result.stderr
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        result = run_ddpm("--dataset", "8gaussians", "--fid", "--out", str(tmp_path / "b"))
        assert result.returncode == 2 and "pip install pytorch-fid" in result.stderr
        assert result.stderr.strip().count("\n") == 0


def test_samplers_pass_their_reverse_steps_to_progress():
    """`progress` wraps the loop over the reverse steps once: T steps for Algorithm 2, `steps` for DDIM."""
    model = ddpm.Diffusion(ddpm.MLP(2, 8), "toy", T=10)
    for sampler, steps, expected in (("ancestral", 0, 10), ("ddim", 4, 4)):
        seen = []
        x, _ = ddpm.sample(model, 3, (2,), sampler, steps, progress=lambda s: seen.append(len(s)) or s)
        assert seen == [expected] and x.shape == (3, 2) and torch.isfinite(x).all()


class ConstantNoise(torch.nn.Module):
    """A noise predictor that always says eps = c: its predicted x_0 leaves [-1, 1] for large c."""

    def __init__(self, c: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def forward(self, x, t):
        return torch.full_like(x, self.c.item())


def test_posterior_mean_around_the_predicted_x0_is_the_eps_mean():
    """Ho et al., Eq. 7 at x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) is Eq. 11: clipping changes nothing
    where it does not bite."""
    model = ddpm.Diffusion(ConstantNoise(0.0), "8bit", T=50)
    torch.manual_seed(0)
    x, eps = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    t = torch.tensor([1, 2, 7, 20, 49, 50])
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    assert torch.allclose(model.q_posterior(x0, x, t)[0], model.p_mean(x, t, eps), atol=1e-10)


@pytest.mark.parametrize("sampler, steps", [("ancestral", 0), ("ddim", 10)])
def test_clip_denoised_keeps_samples_in_the_image_range(sampler, steps):
    model = ddpm.Diffusion(ConstantNoise(-3.0), "8bit", T=50)
    torch.manual_seed(0)
    clipped, _ = ddpm.sample(model, 4, (1, 4, 4), sampler, steps, clip=True)
    torch.manual_seed(0)
    plain, _ = ddpm.sample(model, 4, (1, 4, 4), sampler, steps)
    assert clipped.abs().max() <= 1 + 1e-12 and plain.abs().max() > 2


def test_clip_denoised_is_on_by_default_and_can_be_turned_off():
    assert ddpm.Args().clip_denoised is True
    result = run_script("ddpm.py", "--help")
    assert result.returncode == 0 and "--clip-denoised, --no-clip-denoised" in result.stdout
