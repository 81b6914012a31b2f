"""flows.py: every layer's log-det against slogdet of the autograd Jacobian, round trips, the invertibility
constraints, MADE's triangular Jacobian, Glow's 1x1 conv log-det, couplings of odd dimension, the
Russian-roulette estimator and its Neumann gradient against the exact values, amortized VAE posteriors,
samplers in the model's dtype, and a trained 2D density's mass."""

import dataclasses
import math

import pytest
import torch
from torch.autograd.functional import jacobian

import common
import flows


@pytest.fixture(autouse=True)
def double_precision():
    """Exact comparisons at 1e-8 need double precision; restored after each test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def randomize(layer: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (zero-initialized nets would make couplings the identity), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in layer.modules():
        if isinstance(m, flows.SpectralLinear):
            m.power_iteration(200)  # converge to the perturbed weights' largest singular value
        if isinstance(m, flows.ActNorm):
            m.initialized.fill_(True)
    return layer.eval()


def per_example_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn(x_b) / d x_b| for each example, from the full autograd Jacobian of one example
    at a time."""
    out = []
    for xb in x:
        jac = jacobian(lambda v: fn(v[None])[0].flatten(), xb)  # (D_out, *x shape)
        out.append(torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1])
    return torch.stack(out)


VECTOR_DIM = 4
IMAGE = (2, 4, 4)


def vector_layers():
    d, h = VECTOR_DIM, 16
    return {
        "nice_additive": flows.Coupling(flows.alternating_mask(d, 0), flows.mlp([d, h, d]), affine=False),
        "realnvp_affine": flows.Coupling(flows.alternating_mask(d, 1), flows.mlp([d, h, 2 * d])),
        "scaling": flows.Scaling((d,)),
        "reverse": flows.Reverse(),
        "logit": flows.Logit(alpha=0.05),
        "actnorm": flows.ActNorm(d),
        "invconv_lu": flows.InvConv1x1(d, lu=True),
        "invconv_plain": flows.InvConv1x1(d, lu=False),
        "glow_coupling": flows.GlowCoupling(flows.mlp([d // 2, h, d])),
        "maf": flows.MAF(d, h),
        "iaf": flows.IAF(d, h),
        "naf": flows.NAF(d, h, units=4),
        "planar": flows.Planar(d),
        "radial": flows.Radial(d),
        "residual": flows.ResidualBlock(d, h),
        "flow_of_maf_and_realnvp": flows.Flow([flows.MAF(d, h), flows.Reverse(),
                                               flows.Coupling(flows.alternating_mask(d, 0),
                                                              flows.mlp([d, h, 2 * d]))],
                                              (d,)),
    }


def image_layers():
    c = IMAGE[0]
    return {
        "checkerboard_affine": flows.Coupling(flows.checkerboard_mask(IMAGE, 0), flows.conv_net(c, 8, 2 * c)),
        "channel_affine": flows.Coupling(flows.channel_mask(IMAGE, 1), flows.conv_net(c, 8, 2 * c)),
        "squeeze": flows.Squeeze(),
        "actnorm_image": flows.ActNorm(c),
        "invconv_lu_image": flows.InvConv1x1(c, lu=True),
        "glow_coupling_image": flows.GlowCoupling(flows.conv_net(c // 2, 8, c)),
        "realnvp_multiscale": flows.realnvp_images(IMAGE, levels=2, depth=1, width=8),
        "glow_multiscale": flows.glow_images(IMAGE, levels=2, depth=1, width=8),
    }


def make_input(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "logit":
        return torch.rand(3, *shape, generator=g)  # the logit transform maps [0, 1] to R
    return torch.randn(3, *shape, generator=g)


NUMERIC_FORWARD = {"planar"}  # forward solves the paper's map by bisection: no autograd Jacobian through it
NUMERIC_INVERSE = {"naf", "residual"}  # inverse by bisection / fixed-point iteration
ALL = [(n, "vector") for n in vector_layers()] + [(n, "image") for n in image_layers()]


@pytest.mark.parametrize("name, kind", ALL, ids=[n for n, _ in ALL])
def test_log_det_equals_slogdet_of_jacobian_and_round_trip(name, kind):
    layer = randomize((vector_layers() if kind == "vector" else image_layers())[name])
    x = make_input(name, (VECTOR_DIM,) if kind == "vector" else IMAGE)
    z, log_det = layer(x)
    assert log_det.shape == (3,)
    # forward: log|det dz/dx| from the Jacobian
    if name not in NUMERIC_FORWARD:
        assert torch.allclose(log_det, per_example_logdet(lambda v: layer(v)[0], x), atol=1e-7), name
    # inverse(forward(x)) = x, and the two log-dets sum to zero
    x_back, log_det_inv = layer.inverse(z)
    assert torch.allclose(x_back, x, atol=1e-7), name
    assert torch.allclose(log_det + log_det_inv, torch.zeros(3), atol=1e-7), name
    # inverse: log|det dx/dz| from its own Jacobian (the closed-form map of planar, radial and IAF); with a
    # numerical inverse the sum-to-zero check above ties it to the forward log-det
    if name not in NUMERIC_INVERSE:
        assert torch.allclose(log_det_inv,
                              per_example_logdet(lambda v: layer.inverse(v)[0], z), atol=1e-6), name


@pytest.mark.parametrize("dim", [3, 5])
@pytest.mark.parametrize("kind", ["nice", "realnvp", "glow"])
def test_couplings_of_odd_dimension_are_bijections_with_the_jacobian_log_det(kind, dim):
    """Odd D: Glow's coupling conditions on the first floor(D/2) coordinates and transforms the other
    ceil(D/2) (x.chunk(2) used to hand its net ceil(D/2) inputs); NICE and RealNVP alternate their masks."""
    flow = randomize(flows.toy_flow(kind, dim, 3, 16))
    x = make_input(kind, (dim,))
    z, log_det = flow(x)
    assert z.shape == x.shape and log_det.shape == (3,)
    assert torch.allclose(log_det, per_example_logdet(lambda v: flow(v)[0], x), rtol=0, atol=1e-10), kind
    x_back, log_det_inv = flow.inverse(z)
    assert torch.allclose(x_back, x, rtol=0, atol=1e-12), kind  # exact up to rounding
    assert torch.allclose(log_det + log_det_inv, torch.zeros(3), rtol=0, atol=1e-12), kind
    assert torch.allclose(log_det_inv,
                          per_example_logdet(lambda v: flow.inverse(v)[0], z), rtol=0, atol=1e-10)
    if kind == "glow":  # every coupling of the flow transformed ceil(D/2) coordinates, and left floor(D/2)
        coupling = flow.layers[2]
        moved = coupling(x)[0] != x
        assert not moved[:, : dim // 2].any() and moved[:, dim // 2 :].all()
    assert flows.sample(flow, 4).shape == (4, dim)


def test_samplers_follow_the_model_dtype():
    """A model built in float32 (the default dtype) and converted with .double() samples in float64."""
    torch.set_default_dtype(torch.float32)
    toy = flows.toy_flow("glow", 2, 2, 8).double()
    images = flows.image_flow("glow", (1, 4, 4), levels=2, depth=1, width=4).double()
    energy = flows.energy_flow("planar", 2).double()
    vae = flows.FlowVAE(6, 3, 8, "planar", 2).double()
    assert flows.sample(toy, 5).dtype == torch.float64
    assert flows.sample(images, 2, temperature=0.7).dtype == torch.float64
    for model in (toy, energy):
        x, log_q = model.sample_with_log_prob(5)
        assert x.dtype == log_q.dtype == torch.float64
    assert flows.sample_vae(vae, 5).dtype == torch.float64
    assert flows.grid_points(3, 2.0, "cpu", torch.float64).dtype == torch.float64
    assert 0 < flows.grid_mass(toy, n=30) < 1.5  # the grid in the model's dtype
    z, log_q = vae.posterior(torch.bernoulli(torch.full((2, 6), 0.5, dtype=torch.float64)), 3)
    assert z.dtype == log_q.dtype == torch.float64


@pytest.mark.parametrize("kind", ["orthogonal", "householder", "triangular"])
def test_sylvester_log_det_and_orthonormal_q(kind):
    d = 5
    layer = randomize(flows.Sylvester(d, kind, m=3 if kind == "orthogonal" else None, reverse=True))
    q = layer.q()
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-10)
    z = make_input(kind, (d,))
    x, log_det = layer.inverse(z)
    assert torch.allclose(log_det, per_example_logdet(lambda v: layer.inverse(v)[0], z), atol=1e-8)
    with pytest.raises(NotImplementedError):
        layer(x)


def test_planar_constraint_keeps_every_layer_invertible():
    g = torch.Generator().manual_seed(0)
    d = 3
    z = 4 * torch.randn(2000, d, generator=g)
    for trial in range(20):
        w = torch.randn(d, generator=g)
        # w^T u <= -3: f would not be invertible
        u = -(3 + 5 * torch.rand(1, generator=g)) * w / w.norm() ** 2
        u_hat = flows.planar_constrained_u(u, w)
        assert (w @ u) < -1 and (w @ u_hat) >= -1 - 1e-12
        f, log_det = flows.planar_map(z, u, w, torch.randn(1, generator=g))
        assert torch.isfinite(log_det).all()
        # det df/dz = 1 + h'(a) w^T u_hat > 0 everywhere, so f is strictly increasing along w: injective
        a = z @ w
        order = torch.argsort(a)
        assert (torch.diff((f @ w)[order]) >= -1e-9).all()
    # and the unconstrained map does fold: det < 0 somewhere
    a = torch.linspace(-0.5, 0.5, 11)
    assert (1 + (1 - torch.tanh(a) ** 2) * (-3.0) < 0).any()


def test_radial_constraint_beta_at_least_minus_alpha():
    layer = randomize(flows.Radial(2), scale=3.0)
    with torch.no_grad():
        layer.beta.fill_(-50.0)  # softplus -> 0: beta -> -alpha, the invertibility limit
    z = torch.randn(500, 2)
    x, log_det = layer.inverse(z)
    assert torch.isfinite(log_det).all()
    assert torch.allclose(layer(x)[0], z, atol=1e-6)


def test_made_masks_make_the_jacobian_triangular():
    d = 5
    made = randomize(flows.MADE(d, 12, params_per_dim=3, layers=3))
    x = torch.randn(d)
    jac = jacobian(lambda v: made(v[None])[0], x)  # (P, D_out, D_in)
    upper = torch.triu(torch.ones(d, d), diagonal=0).bool()  # output i may depend only on inputs j < i
    assert (jac[:, upper] == 0).all()
    # and the masks allow every such dependence: the product of the masks (paths from input j to output i)
    paths = made.out.mask
    for layer in reversed(made.hidden):
        paths = paths @ layer.mask
    paths = paths.view(3, d, d)
    assert ((paths > 0) == ~upper).all()
    maf = randomize(flows.MAF(d, 12))
    jac = jacobian(lambda v: maf(v[None])[0][0], x)
    assert torch.equal(jac, torch.tril(jac))  # u_i depends on x_1..x_i: lower triangular


@pytest.mark.parametrize("lu", [True, False])
def test_invconv_log_det_is_hw_log_abs_det_w(lu):
    c, h, w = 3, 5, 4
    layer = randomize(flows.InvConv1x1(c, lu))
    weight, log_abs_det = layer.weight_and_logdet()
    assert torch.allclose(log_abs_det, torch.linalg.slogdet(weight)[1], atol=1e-10)
    x = torch.randn(2, c, h, w)
    z, log_det = layer(x)
    assert torch.allclose(log_det, h * w * torch.linalg.slogdet(weight)[1].expand(2), atol=1e-10)
    assert torch.allclose(z[:, :, 2, 3], x[:, :, 2, 3] @ weight.T)  # the same W at every pixel
    assert torch.allclose(log_det, per_example_logdet(lambda v: layer(v)[0], x), atol=1e-8)


def test_actnorm_data_dependent_initialization():
    x = 3 + 2 * torch.randn(256, 4, 6, 6)
    layer = flows.ActNorm(4).double()
    z, _ = layer(x)  # first training batch initializes
    assert bool(layer.initialized)
    per_channel = z.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(4), atol=1e-10)
    assert torch.allclose(per_channel.std(1), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        layer.bias.add_(1.0)
    z2, _ = layer(x)  # no second initialization
    assert torch.allclose(z2, z + layer.logs.exp()[None, :, None, None], atol=1e-10)


def test_russian_roulette_estimator_is_unbiased_and_neumann_gradient_matches():
    """With a linear g(x) = A x, eigenvalues down to -0.7, the power series converges slowly (log 0.3 = -1.20,
    the first two terms give -0.95), so a truncated or wrongly weighted estimator is visibly biased; the exact
    log det(I + A) and its gradient (I + A)^-T are closed form."""
    torch.manual_seed(0)
    d = 3
    block = flows.ResidualBlock(d, 8).double()
    q, _ = torch.linalg.qr(torch.randn(d, d))
    block.g = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        block.g.weight.copy_(q @ torch.diag(torch.tensor([-0.7, 0.4, 0.2])) @ q.T)
    a = block.g.weight
    eye = torch.eye(d)
    exact = torch.linalg.slogdet(eye + a)[1]
    exact_grad = torch.linalg.inv(eye + a).T
    x = torch.randn(1, d).expand(50, d)  # 50 independent probes v per call, one roulette draw N per call
    draws, grads = [], []
    for _ in range(400):
        xr = x.detach().requires_grad_()
        estimate = block.log_det_estimate(xr, block.g(xr)).mean()
        draws.append(estimate.detach())
        grads.append(torch.autograd.grad(estimate, a)[0])
    draws, grads = torch.stack(draws), torch.stack(grads)
    se = draws.std() / math.sqrt(len(draws))
    assert (draws.mean() - exact).abs() < 4 * se, (draws.mean(), exact, se)
    assert se < 0.03  # small against the 0.25 a two-term truncation would miss
    grad_se = grads.std(0) / math.sqrt(len(grads))
    assert ((grads.mean(0) - exact_grad).abs() < 4.5 * grad_se + 1e-9).all(), (grads.mean(0), exact_grad)


def test_residual_exact_log_det_on_the_mlp_block():
    block = randomize(flows.ResidualBlock(3, 8, coeff=0.9), scale=1.0)
    x = torch.randn(4, 3)
    _, log_det = block(x)  # evaluation with D <= 8: the exact log-det
    assert torch.allclose(log_det, per_example_logdet(lambda v: v + block.g(v), x), atol=1e-10)


def test_residual_fixed_point_inverse_and_lipschitz_bound():
    block = randomize(flows.ResidualBlock(2, 32, coeff=0.9), scale=2.0)
    for m in block.modules():
        if isinstance(m, flows.SpectralLinear):
            assert torch.linalg.matrix_norm(m.weight / torch.clamp(m.u @ m.weight @ m.v / m.coeff, min=1),
                                            ord=2) <= 0.9 + 1e-6
    x = torch.randn(100, 2)
    z, _ = block(x)
    assert torch.allclose(block.inverse(z)[0], x, atol=1e-8)


def test_flow_log_prob_is_base_density_plus_log_det_and_sample_with_log_prob_agrees():
    flow = randomize(flows.toy_flow("realnvp", 2, 4, 16))
    x = torch.randn(5, 2)
    z, log_det = flow(x)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) + log_det
    assert torch.allclose(flow.log_prob(x), expected)
    torch.manual_seed(0)
    samples, log_q = flow.sample_with_log_prob(7)
    assert torch.allclose(flow.log_prob(samples), log_q, atol=1e-8)
    energy = randomize(flows.energy_flow("planar", 4))
    samples, log_q = energy.sample_with_log_prob(7)
    assert torch.allclose(energy.log_prob(samples), log_q, atol=1e-6)  # through the planar bisection


def test_logit_log_det_enters_the_image_likelihood():
    flow = randomize(flows.image_flow("glow", (1, 4, 4), levels=2, depth=1, width=4))
    x = torch.rand(3, 1, 4, 4)
    y, logit_ld = flow.layers[0](x)
    z, rest_ld = flow.layers[1](y)
    assert torch.allclose(flow.log_prob(x), flows.log_normal(z) + logit_ld + rest_ld)
    assert torch.allclose(flow.log_prob(x), per_example_logdet(lambda v: flow(v)[0], x) + flows.log_normal(z))


@pytest.mark.parametrize("kind", ["planar", "radial", "sylvester", "iaf", "none"])
def test_vae_posterior_log_q_matches_the_jacobian_of_the_sampling_map(kind):
    torch.manual_seed(0)
    model = randomize(flows.FlowVAE(6, 3, 8, kind, 3), scale=0.5)
    x = torch.bernoulli(torch.full((2, 6), 0.5))
    eps = torch.randn(2, 3)
    z, log_q = model.posterior(x, 1, eps)
    for b in range(2):
        def zk(e, b=b):
            e_all = eps.clone()
            e_all[b] = e
            return model.posterior(x, 1, e_all)[0][0, b]

        jac = jacobian(zk, eps[b])
        # z_K = T(eps), eps ~ N(0, I): log q(z_K) = log N(eps) - log|det dT/d eps|
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(eps[b]).sum() - torch.linalg.slogdet(jac)[1]
        assert torch.allclose(log_q[0, b], expected, atol=1e-8), kind


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_importance_sampled_log_px_matches_quadrature_in_one_latent_dimension(kind):
    torch.manual_seed(0)
    model = randomize(flows.FlowVAE(4, 1, 8, kind, 2), scale=0.5)
    with torch.no_grad():  # q_0 = N(0, 2^2), wider than the prior, so the importance weights behave
        model.gaussian.weight.zero_()
        model.gaussian.bias.copy_(torch.tensor([0.0, math.log(4.0)]))
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    log_px, elbo = flows.importance_sampled_log_px(model, x, k=20_000)
    # log p(x) = log int p(x|z) N(z; 0, 1) dz by the midpoint rule on [-10, 10]
    z = torch.linspace(-10, 10, 20_001)[:, None, None].expand(-1, 2, 1)
    log_px_z, log_pz = model.log_joint(x, z)
    exact = torch.logsumexp(log_px_z + log_pz, 0) + math.log(20 / 20_000)
    assert (elbo < log_px).all() and ((log_px - exact).abs() < (elbo - exact).abs()).all()
    assert torch.allclose(log_px, exact, atol=0.02), (log_px, exact)  # k = 20000 leaves a small negative bias


def test_energies_match_table_1_at_known_points():
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    # U1 at (2, 0): ring term 0, -log(exp(0) + exp(-1/2 (4 / 0.6)^2))
    assert torch.allclose(flows.energy("u1", z)[0],
                          -torch.log(1 + torch.exp(torch.tensor(-0.5 * (4 / 0.6) ** 2))))
    assert torch.allclose(flows.energy("u2", z)[2], torch.tensor(0.0), atol=1e-12)  # z2 = sin(pi/2) = 1
    w2 = 3.0
    expected = -torch.logaddexp(torch.tensor(0.0), torch.tensor(-0.5 * (w2 / 0.35) ** 2))
    assert torch.allclose(flows.energy("u3", z)[2], expected)
    w3 = 3 * torch.sigmoid(torch.tensor(0.0))
    expected = -torch.logaddexp(torch.tensor(0.0), -0.5 * (w3 / 0.35) ** 2)
    assert torch.allclose(flows.energy("u4", z)[2], expected)


def test_energies_are_normalizable_with_the_wall():
    # log Z on [-6, 6]^2 at two resolutions agree, and almost no mass lies beyond |z1| = 4.5
    for name in ("u1", "u2", "u3", "u4"):
        log_z = [torch.logsumexp(-flows.energy(name, flows.grid_points(n, 6.0, "cpu")), 0)
                 + 2 * math.log(12 / n)
                 for n in (300, 600)]
        assert abs(log_z[0] - log_z[1]) < 1e-3, name
        inside = flows.grid_points(600, 6.0, "cpu")
        outside = inside[:, 0].abs() > 4.5
        mass = torch.exp(-flows.energy(name, inside) - log_z[1]) * (12 / 600) ** 2
        assert mass[outside].sum() < 1e-6, name


def test_grid_points_follow_histogram_orientation():
    points = flows.grid_points(200, 4.0, "cpu")
    counts = common.histogram_2d(points, bins=200, lim=4.0)
    assert torch.equal(counts, torch.ones(200, 200))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["realnvp", "maf"])
def test_trained_2d_density_integrates_to_one(kind):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    x = common.toy_sample("8gaussians", 20_000, torch.Generator().manual_seed(1))
    flow = flows.toy_flow(kind, 2, 4, 32)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for step in range(150):
        loss = -flow.log_prob(x[torch.randint(len(x), (256,))]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow.eval()
    assert loss.item() < 4.0  # it learned something: N(0, I) would give about 5.4 nats here
    flow.double()
    torch.set_default_dtype(torch.float64)
    # midpoint rule on [-8, 8]^2 at step 0.04
    assert abs(flows.grid_mass(flow, lim=8.0, n=400) - 1) < 5e-3


# ------------------------------------------------------------------------------------------ objectives
def test_each_task_loss_is_its_negative_log_likelihood_or_free_energy():
    """density_loss is -mean log p(x); image_loss is bits/dim of the 8-bit data under the density of the
    dequantized images (the same draw of u); energy_loss at beta = 1 is its free energy, and beta weighs U."""
    torch.manual_seed(0)
    toy = flows.toy_flow("realnvp", 2, 4, 16).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    loss, metrics = flows.density_loss(toy, x)
    assert torch.allclose(loss, -toy.log_prob(x).mean()) and metrics["loss"] is loss

    images = flows.image_flow("glow", (1, 4, 4), levels=2, depth=1, width=4).double()
    x8 = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.float64) / 255
    torch.manual_seed(1)
    loss, _ = flows.image_loss(images, x8)
    torch.manual_seed(1)
    # + log2(256) bits
    expected = -images.log_prob(common.uniform_dequantize(x8)).mean() / 16 / math.log(2) + 8
    assert torch.allclose(loss, expected)

    planar = flows.energy_flow("planar", 4).double()
    torch.manual_seed(2)
    loss, metrics = flows.energy_loss(planar, "u1", 256, beta=1.0)
    assert torch.allclose(loss, metrics["free_energy"])
    torch.manual_seed(2)
    half, metrics_half = flows.energy_loss(planar, "u1", 256, beta=0.5)
    torch.manual_seed(2)
    z, log_q = planar.sample_with_log_prob(256)
    assert torch.allclose(half, (log_q + 0.5 * flows.energy("u1", z)).mean())
    assert torch.allclose(metrics_half["free_energy"], metrics["free_energy"])


@pytest.mark.parametrize("prior", ["realnvp", "maf"])
def test_vae_flow_prior_is_its_change_of_variables_integrates_to_one_and_samples_from_itself(prior):
    torch.manual_seed(0)
    model = randomize(flows.FlowVAE(6, 2, 8, "planar", 2, prior=prior, prior_length=3))
    torch.manual_seed(1)
    z = torch.randn(4, 3, 2)
    # log p(z) = log N(f(z); 0, I) + log|det df/dz|, the Jacobian by autograd
    f = lambda v: model.prior(v[None])[0][0]  # noqa: E731
    expected = torch.stack([torch.distributions.Normal(0.0, 1.0).log_prob(f(v)).sum()
                            + torch.linalg.slogdet(jacobian(f, v))[1] for v in z.reshape(-1, 2)])
    assert torch.allclose(model.prior_log_prob(z), expected.view(4, 3), atol=1e-8)
    assert not torch.allclose(model.prior_log_prob(z), flows.log_normal(z.reshape(-1, 2)).view(4, 3))
    # it enters log p(x, z)
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    assert torch.allclose(model.log_joint(x, z)[1], expected.view(4, 3), atol=1e-8)
    # a density: the midpoint rule over [-12, 12]^2
    n, lim = 800, 12.0
    grid = flows.grid_points(n, lim, dtype=torch.float64)
    p = model.prior_log_prob(grid).exp().detach()
    cell = (2 * lim / n) ** 2
    assert abs(p.sum().item() * cell - 1) < 1e-3, p.sum().item() * cell
    # sample_prior draws from it: the mass of each quadrant against the quadrature's
    torch.manual_seed(2)
    with torch.no_grad():
        s = model.sample_prior(40_000)
    for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        mass = (p * ((sx * grid[:, 0] > 0) & (sy * grid[:, 1] > 0))).sum().item() * cell
        freq = ((sx * s[:, 0] > 0) & (sy * s[:, 1] > 0)).double().mean().item()
        assert abs(freq - mass) < 0.01, (sx, sy, freq, mass)  # 4 standard errors at most 0.01


def test_vae_with_a_flow_prior_trains_and_reports_the_kl_as_monte_carlo():
    model = flows.FlowVAE(6, 2, 8, "none", 0, prior="realnvp", prior_length=2)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    loss, metrics = model(x)
    assert set(metrics) == {"loss", "rec", "kl_mc"} and torch.isfinite(loss)
    loss.backward()
    # the prior is learned with the rest (its zero-initialized last layers get a gradient first)
    assert sum(p.grad.abs().sum() for p in model.prior.parameters() if p.grad is not None) > 0
    with pytest.raises(common.RunError, match="--task vae"):
        flows.check_task(dataclasses.replace(flows.Args(), dataset="8gaussians", prior="maf"))
