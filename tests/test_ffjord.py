"""ffjord.py: the instantaneous change of variables against a linear field whose flow and log-determinant are
closed form, Hutchinson's estimator against exact traces (all Rademacher probes enumerated), round trips, the
multiscale log-determinant against autograd, the regularizers against quadrature, adjoint against direct
gradients, the integration time and the samples in the model's dtype, a trained 2D density integrating to 1,
and end-to-end runs."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import common
import ffjord
from helpers import needs_mnist, run_script


pytestmark = pytest.mark.usefixtures("float64_one_thread")


class LinearField(nn.Module):
    """dz/dt = A z: z(t) = expm(A t) z(0) and log |det dz(T)/dz(0)| = T tr(A)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t, z):
        return z @ self.A.T


def random_matrix(d: int, seed: int = 0, scale: float = 0.6) -> torch.Tensor:
    return scale * torch.randn(d, d, generator=torch.Generator().manual_seed(seed))


def rademacher_probes(d: int) -> torch.Tensor:
    """All 2^d sign vectors: averages over them are exact expectations."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)))


def linear_cnf(A: torch.Tensor, T: float, tol: float = 1e-10) -> ffjord.CNF:
    return ffjord.CNF(LinearField(A), time_length=T, rtol=tol, atol=tol).double()


# ------------------------------------------------------------------------------------ the change of variables
def test_linear_field_flow_and_log_density_match_closed_form():
    A, T = random_matrix(3), 0.7
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    cnf = linear_cnf(A, T)
    z, log_det, _ = cnf(x, exact=True)
    expected_z = x @ torch.linalg.matrix_exp(A * T).T
    assert torch.allclose(z, expected_z, atol=1e-8)
    assert torch.allclose(log_det, torch.full((5,), T * torch.trace(A).item()), atol=1e-8)
    # the same through the model: log p(x) = log N(expm(AT) x) + T tr(A)
    model = ffjord.FFJORD((3,), hidden=(4,)).double()
    model.stages[0][0] = cnf
    log_px, _ = model.log_prob(x, exact=True)
    closed_form = torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3)).log_prob(expected_z)
    assert torch.allclose(log_px, closed_form + T * torch.trace(A), atol=1e-8)


class TimeField(nn.Module):
    """dz/dt = t c: z(T) = z(0) + T^2 / 2 c, which a Runge-Kutta method of order >= 2 (and dopri5's
    interpolant) integrates exactly up to rounding. The 0 z keeps z in the graph (tr(df/dz) = 0)."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = nn.Parameter(c)

    def forward(self, t, z):
        return t * self.c + 0 * z


def test_a_float64_cnf_integrates_to_exactly_its_time_length():
    """Built in float32 (the default dtype) and converted with .double(), a CNF with T = 1.7 must integrate to
    1.7 in float64, not to float32's 1.7000000477 (which moves z(T) here by 1.6e-7)."""
    torch.set_default_dtype(torch.float32)
    cnf = ffjord.CNF(TimeField(torch.tensor([1.0, -2.0, 0.5])), time_length=1.7).double()
    torch.set_default_dtype(torch.float64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    expected = x + 1.7**2 / 2 * cnf.func.net.c.detach()
    for exact in (True, False):
        z, log_det, _ = cnf(x, exact=exact)
        assert z.dtype == torch.float64
        assert torch.allclose(z, expected, rtol=0, atol=1e-12), (z - expected).abs().max()
        assert torch.equal(log_det, torch.zeros(4))
    assert torch.allclose(cnf.inverse(expected), x, rtol=0, atol=1e-12)


def test_sampler_follows_the_model_dtype():
    torch.set_default_dtype(torch.float32)
    model = ffjord.FFJORD((2,), hidden=(4,)).double()
    images = ffjord.FFJORD((1, 4, 4), hidden=(4,), solver="rk4", step_size=0.5).double()
    torch.set_default_dtype(torch.float64)
    assert ffjord.sample(model, 3).dtype == torch.float64
    assert ffjord.sample(images, 2).shape == (2, 1, 4, 4) and ffjord.sample(images, 2).dtype == torch.float64


def test_hutchinson_log_det_through_the_solver_is_unbiased_over_all_probes():
    A, T = random_matrix(4, seed=2), 0.5
    probes = rademacher_probes(4)  # (16, 4)
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(3)).expand(len(probes), 4).contiguous()
    _, log_det, _ = linear_cnf(A, T)(x, exact=False, probe=probes)
    # for a linear field e^T (df/dz) e = e^T A e at every t
    assert torch.allclose(log_det, T * torch.einsum("bi,ij,bj->b", probes, A, probes), atol=1e-8)
    assert abs(log_det.mean().item() - T * torch.trace(A).item()) < 1e-8
    assert log_det.std() > 0.1  # the single-probe estimates do vary


def nonlinear_field_and_jacobian(d: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    net = ffjord.mlp_field(d, (16, 16), "tanh")
    t, z0 = torch.tensor(0.3), torch.randn(1, d)
    J = torch.autograd.functional.jacobian(lambda z: net(t, z), z0).reshape(d, d)
    return net, t, z0, J


def test_hutchinson_is_unbiased_for_the_exact_trace_of_a_network():
    net, t, z0, J = nonlinear_field_and_jacobian()
    probes = rademacher_probes(4)
    z = z0.expand(len(probes), 4).clone().requires_grad_(True)
    estimate, e_J = ffjord.divergence_hutchinson(net(t, z), z, probes, create_graph=False)
    assert torch.allclose(estimate, torch.einsum("bi,ij,bj->b", probes, J, probes), atol=1e-12)
    assert torch.allclose(e_J, probes @ J, atol=1e-12)  # the vector-Jacobian product e^T J
    assert abs(estimate.mean().item() - torch.trace(J).item()) < 1e-12  # exact expectation over all probes
    # Gaussian probes: the Monte Carlo mean within 5 standard errors of the trace
    probes = torch.randn(100_000, 4, generator=torch.Generator().manual_seed(4))
    z = z0.expand(len(probes), 4).clone().requires_grad_(True)
    estimate, _ = ffjord.divergence_hutchinson(net(t, z), z, probes, create_graph=False)
    se = estimate.std() / math.sqrt(len(probes))
    assert abs(estimate.mean() - torch.trace(J)) < 5 * se


def test_exact_divergence_equals_the_trace_of_the_autograd_jacobian():
    net, t, _, _ = nonlinear_field_and_jacobian(d=5, seed=1)
    z = torch.randn(6, 5).requires_grad_(True)
    div = ffjord.divergence_exact(net(t, z), z, create_graph=False)
    for i in range(6):
        J = torch.autograd.functional.jacobian(lambda v: net(t, v), z[i : i + 1].detach()).reshape(5, 5)
        assert abs(div[i].item() - torch.trace(J).item()) < 1e-12


# -------------------------------------------------------------------------------------- round trips, log-dets
def test_forward_then_inverse_returns_the_input():
    torch.manual_seed(0)
    model = ffjord.FFJORD((2,), hidden=(32, 32), nonlinearity="tanh", blocks=2, rtol=1e-9, atol=1e-9).double()
    for p in model.parameters():  # a field strong enough to move points far
        p.data *= 3
    x = torch.randn(50, 2)
    with torch.no_grad():
        zs, _, _ = model.flow(x)
        x_back = model.inverse(zs)
    assert (zs[0] - x).abs().max() > 0.5
    assert (x_back - x).abs().max() < 1e-6


def test_multiscale_log_det_matches_autograd_jacobian_and_round_trips():
    torch.manual_seed(0)
    model = ffjord.FFJORD((1, 8, 8), hidden=(8,), blocks=1, rtol=1e-8, atol=1e-8).double()
    assert model.z_shapes == [(2, 4, 4), (2, 4, 4)] and len(model.cnfs()) == 3
    x = 0.05 + 0.9 * torch.rand(1, 1, 8, 8)

    def to_z(v):  # (64,) -> all pieces of z, flattened: (64,); the trace is not needed here
        zs, _, _ = model.flow(v.reshape(1, 1, 8, 8), exact=False)
        return torch.cat([z.flatten() for z in zs])

    J = torch.autograd.functional.jacobian(to_z, x.flatten())
    sign, logabsdet = torch.linalg.slogdet(J)
    zs, log_det, _ = model.flow(x, exact=True)
    assert abs(log_det.item() - logabsdet.item()) < 1e-5, (log_det.item(), logabsdet.item())
    log_px, _ = model.log_prob(x, exact=True)
    z_all = torch.cat([z.flatten() for z in zs])
    assert abs(log_px.item() - (ffjord.standard_normal_log_prob(z_all[None]) + logabsdet).item()) < 1e-5
    with torch.no_grad():
        x_back = model.inverse([z.detach() for z in zs])
    assert (x_back - x).abs().max() < 1e-6


def test_logit_transform_log_det_and_inverse():
    x = torch.rand(3, 6)
    y, log_det = ffjord.logit_transform(x, 1e-6)
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: ffjord.logit_transform(v, 1e-6)[0],
                                               x[i : i + 1])[0, :, 0]
        assert abs(log_det[i].item() - torch.linalg.slogdet(J)[1].item()) < 1e-9
    assert torch.allclose(ffjord.logit_inverse(y, 1e-6), x, atol=1e-12)


def test_squeeze_moves_each_2x2_block_into_channels():
    x = torch.arange(2 * 3 * 4 * 6.0).reshape(2, 3, 4, 6)
    s = ffjord.squeeze(x)
    assert s.shape == (2, 12, 2, 3)
    for c, i, j in [(0, 0, 0), (1, 3, 5), (2, 2, 1)]:
        assert s[1, 4 * c + 2 * (i % 2) + j % 2, i // 2, j // 2] == x[1, c, i, j]
    assert torch.equal(ffjord.unsqueeze(s), x)


# ------------------------------------------------------------------------------------ regularizers, gradients
def test_regularizers_match_quadrature_and_the_frobenius_norm():
    A, T = random_matrix(3, seed=5), 0.6
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    e = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    _, _, reg = linear_cnf(A, T)(x, exact=True, regularize=True, probe=e)
    # kinetic energy int_0^T ||A expm(A t) x||^2 dt by 40-node Gauss-Legendre quadrature
    nodes, weights = np.polynomial.legendre.leggauss(40)
    kinetic = torch.zeros(4)
    for s, w in zip(nodes, weights):
        t = T * (s + 1) / 2
        f = x @ (A @ torch.linalg.matrix_exp(A * t)).T
        kinetic += w * T / 2 * f.pow(2).sum(1)
    assert torch.allclose(reg[:, 0], kinetic, rtol=1e-7)
    # Jacobian term with a fixed probe: int_0^T ||e^T A||^2 dt = T ||e^T A||^2
    assert torch.allclose(reg[:, 1], T * (e @ A).pow(2).sum(1), rtol=1e-7)
    # and its expectation over the probes is the Frobenius norm (all Rademacher probes)
    probes = rademacher_probes(3)
    assert abs((probes @ A).pow(2).sum(1).mean().item() - A.pow(2).sum().item()) < 1e-12


def test_adjoint_gradients_equal_backpropagation_through_the_solver():
    torch.manual_seed(0)
    options = dict(hidden=(8, 8), nonlinearity="tanh", rtol=1e-10, atol=1e-10)
    direct = ffjord.FFJORD((2,), **options).double()
    adjoint = ffjord.FFJORD((2,), adjoint=True, **options).double()
    adjoint.load_state_dict(direct.state_dict())
    x = torch.randn(20, 2)
    grads, nfe_backward = [], []
    for model in (direct, adjoint):
        torch.manual_seed(1)  # the same Hutchinson probes in both
        loss, _ = model(x, kinetic=0.1, jacobian=0.1)
        before = model.nfe()
        loss.backward()
        nfe_backward.append(model.nfe() - before)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert nfe_backward[0] == 0 and nfe_backward[1] > 0


def test_function_evaluations_are_counted():
    cnf = ffjord.CNF(ffjord.mlp_field(2, (8,)), solver="rk4", step_size=0.25).double()
    cnf(torch.randn(3, 2))
    assert cnf.func.nfe == 16  # 4 steps of the 4-stage Runge-Kutta method


def test_parameter_counts_and_multiscale_shapes():
    # concat-squash layer a -> b: a b + b weights and bias, b + b gate, b hyper-bias
    sizes = [2, 64, 64, 64, 2]
    assert sum(p.numel() for p in ffjord.FFJORD((2,)).parameters()) == sum(a * b + 4 * b for a, b in
                                                                           zip(sizes[:-1], sizes[1:]))
    mnist = ffjord.FFJORD((1, 28, 28), hidden=(64, 64, 64), blocks=2)
    assert mnist.z_shapes == [(2, 14, 14), (4, 7, 7), (4, 7, 7)] and len(mnist.cnfs()) == 10
    channels = [1, 1, 4, 4, 2, 2, 8, 8, 4, 4]  # CNFs at 28x28, after the squeeze, 14x14, after it, 7x7

    def conv_params(c):  # concat conv a -> b: (a + 1) b 9 + b
        s = [c, 64, 64, 64, c]
        return sum((a + 1) * b * 9 + b for a, b in zip(s[:-1], s[1:]))

    assert sum(p.numel() for p in mnist.parameters()) == sum(conv_params(c) for c in channels)


# ---------------------------------------------------------------------------------------- end to end
def run_ffjord(*flags, timeout=300):
    return run_script("ffjord.py", *flags, timeout=timeout)


# --quick on a toy, at the image preset's small sizes (the toy preset trains 1200 steps of a 64-64-64 network)
SMALL = ("--quick", "--steps", "150", "--hidden", "32", "32", "--lr", "5e-3", "--log-every", "50",
         "--ckpt-every", "150")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ffjord") / "run"
    result = run_ffjord(*SMALL, "--out", str(out))
    return out, result


def test_quick_writes_samples_metrics_checkpoint_and_resumes(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and "kl_data_model=" in last and "exact trace" in last
    for name in ("samples.png", "density.png", "data.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    train_lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:-1]
    assert all(r["nfe_forward"] > 0 and r["nfe_backward"] == 0 for r in train_lines)
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 150
    refused = run_ffjord(*SMALL, "--out", str(out))
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    resumed = run_ffjord(*SMALL, "--steps", "160", "--eval-n", "200", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 160


@pytest.mark.slow
def test_trained_density_integrates_to_one_and_beats_the_base(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stderr
    ckpt = common.load_checkpoint(out / "checkpoint.pt")
    config = ckpt["config"]
    model = ffjord.FFJORD((2,), tuple(config["hidden"]), config["nonlinearity"], config["blocks"],
                          rtol=1e-6, atol=1e-6).double()
    model.load_state_dict(ckpt["model"])
    # the midpoint rule on a 300 x 300 grid over [-6, 6]^2
    bins, lim = 300, 6.0
    density = ffjord.density_on_grid(model, bins, lim)
    assert abs(density.sum().item() * (2 * lim / bins) ** 2 - 1) < 0.01
    # and it learned: its test NLL is well below that of the base N(0, I) alone
    test_x = common.load_dataset("8gaussians").test_x[:2000].double()
    base_nll = -ffjord.standard_normal_log_prob(test_x).mean().item()
    with torch.no_grad():
        model_nll = -model.log_prob(test_x, exact=True)[0].mean().item()
    assert model_nll < base_nll - 1.0, (model_nll, base_nll)


@pytest.mark.slow
def test_samples_follow_the_model_density(quick_run):
    """The sampler (the ODE solved backwards) against the density (solved forwards): chi-square
    on 16 x 16 bins."""
    out, result = quick_run
    assert result.returncode == 0, result.stderr
    ckpt = common.load_checkpoint(out / "checkpoint.pt")
    model = ffjord.FFJORD((2,), tuple(ckpt["config"]["hidden"]), rtol=1e-6, atol=1e-6).double()
    model.load_state_dict(ckpt["model"])
    torch.manual_seed(0)
    n, bins, lim, fine = 20_000, 16, 4.0, 10
    counts = common.histogram_2d(ffjord.sample(model, n), bins, lim).double()
    # bin probabilities by the midpoint rule on a 10 x 10 sub-grid of every bin
    density = ffjord.density_on_grid(model, bins * fine, lim)
    probs = density.view(bins, fine, bins, fine).sum((1, 3)) * (2 * lim / (bins * fine)) ** 2
    expected = n * probs
    keep = expected > 5
    chi2 = ((counts - expected)[keep] ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)  # 5 standard deviations of a chi-square(dof)


def test_density_grid_lines_up_with_the_sample_histogram():
    # every grid centre falls in its own bin of common.histogram_2d, in the same row-major order
    points = ffjord.grid_points(50, 3.0)
    counts = common.histogram_2d(points, 50, 3.0)
    assert torch.equal(counts, torch.ones(50, 50))
    assert torch.equal(
        common.histogram_2d(points[:1], 50, 3.0).flatten().nonzero().flatten(), torch.tensor([0]))


def test_resume_is_exact(tmp_path):
    base = ffjord.Args(steps=6, hidden=(8,), rtol=1e-3, atol=1e-3, batch_size=50, eval_n=100, log_every=3,
                       ckpt_every=100, device="cpu")
    torch.set_default_dtype(torch.float32)
    ffjord.train(ffjord.Args(**{**vars(base), "out": str(tmp_path / "straight")}))
    ffjord.train(ffjord.Args(**{**vars(base), "steps": 3, "out": str(tmp_path / "split")}))
    ffjord.train(ffjord.Args(**{**vars(base), "out": str(tmp_path / "split"), "resume": True}))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("flags", [
    ["--adjoint", "--kinetic", "0.01", "--jacobian", "0.01", "--noise", "gaussian",
     "--dataset", "checkerboard"],
    ["--solver", "rk4", "--step-size", "0.5", "--exact-trace", "--blocks", "2", "--dataset", "two_moons"],
])
def test_options_run_end_to_end(tmp_path, flags):
    out = tmp_path / "run"
    result = run_ffjord(*SMALL, "--steps", "20", "--eval-n", "200", "--log-every", "10", "--out", str(out),
                        *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("eval test nll_nats=")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if "--adjoint" in flags:
        assert records[0]["nfe_backward"] > 0 and records[0]["kinetic"] > 0 and records[0]["jacobian"] > 0
    else:
        assert records[0]["nfe_forward"] == 2 * 2 * 4  # two CNFs, two rk4 steps of 4 evaluations


@needs_mnist
def test_multiscale_mnist_runs_end_to_end_in_bits_per_dim(tmp_path):
    out = tmp_path / "run"
    result = run_ffjord("--dataset", "mnist", "--hidden", "8", "--steps", "2",
                        "--batch-size", "8", "--eval-n", "8", "--rtol", "1e-2", "--atol", "1e-2",
                        "--log-every", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_bpd=") and "hutchinson" in last
    assert (out / "samples.png").stat().st_size > 0


def test_help_and_bad_input():
    result = run_ffjord("--help")
    assert result.returncode == 0 and "--adjoint" in result.stdout and "(default: dopri5)" in result.stdout
    result = run_ffjord("--dataset", "binarized_mnist", "--out", "/nonexistent/run")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "8-bit" in result.stderr
