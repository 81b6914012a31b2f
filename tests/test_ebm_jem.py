"""ebm_jem.py: the EBM and JEM identities in float64 (grad log Z, SGLD's stationary law, logit shifts, the
replay buffer, AUROC, ECE, the grid normalizer, composition), networks and shapes."""

import math

import pytest
import torch

import ebm_jem

pytestmark = pytest.mark.usefixtures("float64_one_thread")


# -- the lecture's identity: grad_theta log Z = -E_p[grad_theta E] -------------------------------------------
def quartic_energy(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A small parametric energy with an integrable, bimodal exp(-E) on the real line."""
    a, b, c = theta
    return a * x**2 + b * x**4 + c * x + 0.5 * torch.sin(3 * x)


def gauss_legendre(lo: float, hi: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = (torch.from_numpy(a) for a in __import__("numpy").polynomial.legendre.leggauss(n))
    return lo + (hi - lo) * (nodes + 1) / 2, weights * (hi - lo) / 2


THETA = (-1.0, 0.25, 0.3)


def test_grad_log_z_equals_minus_expected_energy_gradient_by_quadrature():
    x, w = gauss_legendre(-6.0, 6.0, 400)  # exp(-E) < 1e-30 outside
    theta = torch.tensor(THETA, requires_grad=True)
    log_z = torch.logsumexp(-quartic_energy(x, theta) + w.log(), 0)
    (grad_log_z,) = torch.autograd.grad(log_z, theta)
    # -E_p[grad_theta E] with p = exp(-E) / Z, by the same quadrature; grad_theta E = (x^2, x^4, x)
    # in closed form
    p = torch.exp(-quartic_energy(x, torch.tensor(THETA)) - log_z.detach()) * w
    expected = -torch.stack([(p * x**2).sum(), (p * x**4).sum(), (p * x).sum()])
    assert abs(p.sum().item() - 1) < 1e-12
    torch.testing.assert_close(grad_log_z, expected, rtol=1e-10, atol=1e-12)
    # and against central finite differences of log Z
    for i in range(3):
        h = torch.zeros(3)
        h[i] = 1e-5

        def lz(t):
            return torch.logsumexp(-quartic_energy(x, t) + w.log(), 0)

        fd = (lz(torch.tensor(THETA) + h) - lz(torch.tensor(THETA) - h)) / 2e-5
        assert abs(fd.item() - grad_log_z[i].item()) < 1e-7


def test_contrastive_loss_gradient_with_exact_model_samples_is_the_nll_gradient():
    """mean E(x+) - mean E(x-) with x- ~ p_theta (exact draws by inverse CDF) has gradient E_data[grad E] +
    grad log Z = grad NLL, within Monte Carlo error."""
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-6, 6, 200_001)
    theta0 = torch.tensor(THETA)
    # exact-in-the-limit draws from p_theta: a fine discretization of the CDF plus uniform jitter in the cell
    dx = grid[1] - grid[0]
    p = torch.softmax(-quartic_energy(grid, theta0), 0)
    n = 400_000
    x_minus = (grid[torch.multinomial(p, n, replacement=True, generator=g)]
               + (torch.rand(n, generator=g) - 0.5) * dx)
    x_plus = torch.randn(5000, generator=g) * 0.7 + 0.5  # any "data"
    theta = theta0.clone().requires_grad_(True)
    loss, _ = ebm_jem.contrastive_loss(quartic_energy(x_plus, theta), quartic_energy(x_minus, theta), 0.0)
    (grad_cd,) = torch.autograd.grad(loss, theta)
    x, w = gauss_legendre(-6.0, 6.0, 400)
    theta = theta0.clone().requires_grad_(True)
    nll = quartic_energy(x_plus, theta).mean() + torch.logsumexp(-quartic_energy(x, theta) + w.log(), 0)
    (grad_nll,) = torch.autograd.grad(nll, theta)
    # standard error of the Monte Carlo term: std of grad_theta E = (x^2, x^4, x) under p, over sqrt(n)
    se = torch.stack([x_minus**2, x_minus**4, x_minus]).std(1) / math.sqrt(n)
    assert ((grad_cd - grad_nll).abs() < 4 * se + 1e-6).all(), (grad_cd, grad_nll, se)


def test_energy_penalty_is_alpha_times_mean_squares():
    e_data, e_sample = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5, 0.5])
    loss, metrics = ebm_jem.contrastive_loss(e_data, e_sample, 0.1)
    cd = -0.5 - 4 / 3
    assert math.isclose(metrics["cd"].item(), cd, abs_tol=1e-12)
    assert math.isclose(loss.item(), cd + 0.1 * (2.5 + 9.5 / 3), abs_tol=1e-12)
    assert metrics["max_abs_e"].item() == 3.0
    _, metrics = ebm_jem.contrastive_loss(torch.tensor([1.0, math.nan]), e_sample, 0.0)
    assert metrics["max_abs_e"].item() == math.inf  # the divergence guard sees NaN as exploded


# -- SGLD ----------------------------------------------------------------------------------------------------
def test_sgld_on_a_gaussian_energy_reaches_its_mean_and_covariance():
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    precision = torch.linalg.inv(cov)

    def energy(x):
        d = x - mean
        return 0.5 * ((d @ precision) * d).sum(1)

    # slowest relaxation: precision eigenvalue 0.72, so the variance error decays as exp(-0.72 h n) = 2e-4
    x = ebm_jem.sgld(energy, torch.randn(10_000, 2), steps=600, step_size=0.02, noise=math.sqrt(0.02))
    torch.testing.assert_close(x.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.03, rtol=0.03)


def test_sgld_step_convention_matches_the_unadjusted_langevin_variance():
    """x <- x - (h/2) p x + sqrt(h) eps on E = p x^2 / 2 has stationary variance 1 / (p (1 - h p / 4)):
    checks the (step/2) and the noise convention, at a step where the bias is large."""
    torch.manual_seed(1)
    p, h = 2.0, 0.6
    x = ebm_jem.sgld(lambda x: 0.5 * p * x[:, 0] ** 2, torch.zeros(40_000, 1), steps=60, step_size=h,
                     noise=math.sqrt(h))
    exact = 1 / (p * (1 - h * p / 4))  # 0.714..., against 0.5 for the continuous-time limit
    assert abs(x.var().item() - exact) < 0.02
    assert abs(x.mean().item()) < 0.02


def test_sgld_clamps_and_leaves_parameters_without_gradients():
    model = ebm_jem.EnergyModel((2,), "ebm", "mlp", hidden=16)
    x = ebm_jem.sgld(model.energy, torch.randn(50, 2) * 10, steps=3, step_size=1.0, noise=1.0, lo=-2, hi=2)
    assert x.abs().max() <= 2 and not x.requires_grad
    assert all(p.grad is None for p in model.parameters())


# -- JEM: logits as energies ---------------------------------------------------------------------------------
def test_shifting_logits_leaves_p_y_given_x_and_shifts_log_px_by_the_constant():
    torch.manual_seed(0)
    model = ebm_jem.EnergyModel((1, 8, 8), "jem", "conv", hidden=32)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    logits = model.logits(x)
    log_px, p_y = -model.energy(x), logits.softmax(1)
    c = 3.7
    with torch.no_grad():
        model.net[-1].bias += c  # every logit f(x)[y] + c
    torch.testing.assert_close(model.logits(x), logits + c)
    torch.testing.assert_close(model.logits(x).softmax(1), p_y)  # p(y|x) unchanged
    torch.testing.assert_close(-model.energy(x), log_px + c)  # log p(x) + log Z = logsumexp f changes by c
    # and the class energies E(x, y) = -f(x)[y] sum, through exp, to the marginal energy
    y = torch.arange(10).repeat(5)
    e_xy = model.class_energy(x.repeat_interleave(10, 0), y).view(5, 10)
    torch.testing.assert_close(-torch.logsumexp(-e_xy, 1), model.energy(x))


def test_jem_loss_is_cross_entropy_plus_the_contrastive_term():
    torch.manual_seed(0)
    model = ebm_jem.EnergyModel((4,), "jem", "mlp", hidden=8)
    x, x_s, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(10, (6,))
    loss, metrics = model(x, y, x_s, 0.5)
    e_d, e_s = model.energy(x), model.energy(x_s)
    ce = -(model.logits(x).log_softmax(1).gather(1, y[:, None])).mean()
    expected = ce + e_d.mean() - e_s.mean() + 0.5 * (e_d.pow(2).mean() + e_s.pow(2).mean())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["ce"], ce)


# -- the replay buffer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, reinit", [(64, 0.05), (100, 0.2), (10, 0.0), (8, 1.0)])
def test_buffer_reinitializes_the_stated_fraction(n, reinit):
    torch.manual_seed(0)
    buffer = ebm_jem.ReplayBuffer(1000, (3,), -1.0, 1.0)
    buffer.x.fill_(5.0)  # mark every stored chain: noise draws are in [-1, 1]
    x, index = buffer.sample(n, reinit)
    fresh = (x != 5.0).all(1)
    assert fresh.sum().item() == round(reinit * n)
    assert not fresh.any() or x[fresh].abs().max() <= 1
    assert (x[~fresh] == 5.0).all() and index.shape == (n,) and (0 <= index).all() and (index < 1000).all()
    buffer.push(torch.zeros(n, 3), index)
    assert (buffer.x[index] == 0).all() and (buffer.x == 5.0).sum().item() == 3 * (1000 - len(index.unique()))


def test_buffer_is_checkpointed_state():
    buffer = ebm_jem.ReplayBuffer(7, (1, 2, 2), -1.0, 1.0)
    assert buffer.state_dict()["x"].shape == (7, 1, 2, 2)
    assert buffer.x.min() >= -1 and buffer.x.max() <= 1


# -- evaluation ----------------------------------------------------------------------------------------------
def brute_force_auroc(pos, neg):
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos.tolist() for b in neg.tolist())
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_by_ranks_equals_the_pair_count(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 12, (37,), generator=g).double() + 1.0  # many ties, within and across the sets
    neg = torch.randint(0, 10, (23,), generator=g).double()
    assert math.isclose(ebm_jem.auroc(pos, neg), brute_force_auroc(pos, neg), abs_tol=1e-12)
    cont_pos, cont_neg = torch.randn(50, generator=g) + 1, torch.randn(41, generator=g)
    assert math.isclose(ebm_jem.auroc(cont_pos, cont_neg),
                        brute_force_auroc(cont_pos, cont_neg), abs_tol=1e-12)


def test_auroc_is_exact_for_large_sets_under_float32_defaults():
    torch.set_default_dtype(torch.float32)  # as in a training run; the fixture restores float64
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(10_000, generator=g) + 1, torch.rand(10_000, generator=g)
    assert ebm_jem.auroc(pos, neg) == 1.0 and ebm_jem.auroc(neg, pos) == 0.0
    both = torch.rand(10_000, generator=g)
    expected = ((both[:, None] > both[None, :5000]).double().sum()
                + 0.5 * (both[:, None] == both[None, :5000]).double().sum()) / (10_000 * 5000)
    assert abs(ebm_jem.auroc(both, both[:5000]) - expected.item()) < 1e-12


def test_auroc_extremes():
    assert ebm_jem.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert ebm_jem.auroc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert ebm_jem.auroc(torch.ones(3), torch.ones(4)) == 0.5


def test_ece_on_a_hand_computed_case():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.35 (wrong) over 3 classes, 15 bins:
    # bin (13/15, 14/15]: acc 1/2, conf 0.9 -> |0.5 - 0.9| * 2/4 = 0.2
    # bin (8/15, 9/15]: acc 1, conf 0.6 -> 0.4 * 1/4 = 0.1; bin (5/15, 6/15]: acc 0, conf 0.35 -> 0.0875
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.35, 0.33, 0.32]])
    y = torch.tensor([0, 1, 1, 2])
    assert math.isclose(ebm_jem.expected_calibration_error(probs, y), 0.2 + 0.1 + 0.0875, abs_tol=1e-12)
    # perfectly calibrated: confidence 1 and always right
    assert ebm_jem.expected_calibration_error(torch.eye(3), torch.arange(3)) == 0.0


def test_grid_log_z_of_a_gaussian_energy_and_the_toy_nll():
    """exp(-|x - m|^2 / (2 s^2)) integrates to 2 pi s^2 (the box holds all but 1e-20 of it), and the grid
    NLL of Gaussian test points is the Gaussian's NLL; points outside the box get an infinite NLL."""
    m, s = torch.tensor([0.5, -0.3]), 0.7

    def energy(x):
        return ((x - m) ** 2).sum(1) / (2 * s**2)

    log_z, e = ebm_jem.grid_log_z(energy, 6.0, 300, "cpu")
    assert abs(log_z.item() - math.log(2 * math.pi * s**2)) < 1e-8 and e.shape == (300 * 300,)
    x = m + s * torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    nll, _, _ = ebm_jem.toy_nll(energy, x, 6.0, 300)
    exact = (energy(x) + math.log(2 * math.pi * s**2)).mean().item()
    assert abs(nll - exact) < 1e-8
    assert ebm_jem.toy_nll(energy, torch.tensor([[7.0, 0.0]]), 6.0, 300)[0] == math.inf


def test_grid_points_match_histogram_orientation():
    import common

    points = ebm_jem.grid_points(4, 2.0, "cpu")
    counts = common.histogram_2d(points, bins=4, lim=2.0)
    assert (counts == 1).all()  # every centre in its own cell
    assert points[0].tolist() == [-1.5, 1.5] and points[-1].tolist() == [1.5, -1.5]  # top-left, bottom-right


# -- composition ---------------------------------------------------------------------------------------------
def test_sum_of_two_gaussian_energies_samples_their_product():
    """exp(-E1 - E2) for N(m1, s1^2) and N(m2, s2^2) experts is N(m, s^2) with 1/s^2 = 1/s1^2 + 1/s2^2 and
    m = s^2 (m1/s1^2 + m2/s2^2): SGLD on the composed energy finds it."""
    torch.manual_seed(0)
    e1 = lambda x: (x[:, 0] - 1.0) ** 2 / (2 * 1.0)  # noqa: E731
    e2 = lambda x: (x[:, 0] + 2.0) ** 2 / (2 * 0.5)  # noqa: E731
    energy = ebm_jem.composed_energy([e1, e2])
    var = 1 / (1 / 1.0 + 1 / 0.5)
    mean = var * (1.0 / 1.0 - 2.0 / 0.5)
    x = ebm_jem.sgld(energy, torch.randn(10_000, 1) * 3, steps=300, step_size=0.01, noise=0.1)
    assert abs(x.mean().item() - mean) < 0.02 and abs(x.var().item() - var) < 0.02


def test_constraint_energy_is_zero_on_the_upper_half_plane():
    x = torch.tensor([[0.3, 1.0], [-2.0, 0.0], [1.0, -0.5]])
    torch.testing.assert_close(ebm_jem.constraint_energy(x, 10.0), torch.tensor([0.0, 0.0, 2.5]))


# -- networks ------------------------------------------------------------------------------------------------
# conv, 16-32-64-64 channels: 160 + 8,224 + 32,832 + 36,928, then 1024 x out + out (10,250 or 1,025)
# mlp: in x 128 + 128, two 128 x 128 + 128 (33,024), then 128 x out + out
@pytest.mark.parametrize("model, arch, shape, count", [
    ("jem", "conv", (1, 28, 28), 88_394), ("ebm", "conv", (1, 28, 28), 79_169), ("ebm", "mlp", (2,), 33_537),
    ("jem", "mlp", (1, 28, 28), 134_794)])
def test_shapes_and_parameter_counts(model, arch, shape, count):
    net = ebm_jem.EnergyModel(shape, model, arch, hidden=128)
    assert sum(p.numel() for p in net.parameters()) == count
    x = torch.rand(3, *shape)
    assert net.energy(x).shape == (3,)
    assert net.logits(x).shape == (3, 10 if model == "jem" else 1)


def test_spectral_norm_bounds_each_layers_largest_singular_value():
    torch.manual_seed(0)
    net = ebm_jem.EnergyModel((2,), "ebm", "mlp", hidden=16, sn=True)
    for _ in range(50):  # power iterations run in training-mode forwards
        net.energy(torch.randn(4, 2))
    for layer in net.net:
        if isinstance(layer, torch.nn.Linear):
            assert abs(torch.linalg.matrix_norm(layer.weight, 2).item() - 1) < 1e-3


# -- adversarial robustness: PGD stays in its ball and box and finds the worst case of a linear model -------
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_its_ball_and_box_and_raises_the_loss(norm):
    torch.manual_seed(0)
    model = ebm_jem.EnergyModel((1, 8, 8), "jem", "mlp", hidden=16)
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    y = model.logits(x).argmax(1)  # the points it classifies right, so the loss has room to rise
    eps = 0.3
    x_adv = ebm_jem.pgd_attack(model.logits, x, y, eps, norm, steps=10)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-12).all() and x_adv.min() >= -1 and x_adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(model.logits(x_adv), y, reduction="none").gt(loss(model.logits(x), y, reduction="none")).all()


def test_pgd_reaches_the_closed_form_worst_case_of_a_linear_classifier():
    """Two classes with logits W x: the loss of class 0 rises as the margin (w_0 - w_1) . x falls, so the
    worst perturbation in the L-inf ball is -eps sign(w), in the L2 ball -eps w / ||w||, w = w_0 - w_1.
    L-inf PGD reaches its corner exactly; L2 PGD from a random start gets within 2% of the optimal drop."""
    torch.manual_seed(0)
    W = torch.randn(2, 10)
    def logits(v):
        return v @ W.T
    x, y, eps = torch.randn(32, 10) * 0.1, torch.zeros(32, dtype=torch.long), 0.2
    w = W[0] - W[1]
    box = dict(lo=-10.0, hi=10.0)  # wide: only the ball binds
    linf = ebm_jem.pgd_attack(logits, x, y, eps, "linf", steps=20, **box)
    torch.testing.assert_close(linf, x - eps * w.sign(), rtol=0, atol=1e-12)
    l2 = ebm_jem.pgd_attack(logits, x, y, eps, "l2", steps=50, **box)
    margin_drop = ((x - l2) @ w) / (eps * w.norm())  # 1 at the optimum, never above it
    assert (margin_drop <= 1 + 1e-9).all() and (margin_drop > 0.98).all()


def test_robust_accuracy_at_a_tiny_radius_is_the_clean_accuracy():
    torch.manual_seed(0)
    model = ebm_jem.EnergyModel((1, 8, 8), "jem", "mlp", hidden=16)
    x, y = torch.rand(40, 1, 8, 8) * 2 - 1, torch.randint(10, (40,))
    clean = (model.logits(x).argmax(1) == y).double().mean().item()
    assert ebm_jem.robust_accuracy(model, x, y, 1e-9, "linf", 2, chunk=16) == pytest.approx(clean)
    assert ebm_jem.robust_accuracy(model, x, y, 1.0, "linf", 10, chunk=16) < clean
