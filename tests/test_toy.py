import functools
import math

import pytest
import torch

import common
import toy_densities

NAMES = common.TOY_DATASETS
HALF_WIDTH = {"8gaussians": 6.5, "checkerboard": 4.0, "two_moons": 5.0, "swissroll": 5.0, "pinwheel": 7.0,
              "circles": 5.5}
# grid step for the test quadratures; multiple of the 0.5 histogram bins, aligned with checkerboard
STEP = 0.1
BIN = 0.5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=None)
def _grid_log_prob(name: str) -> torch.Tensor:
    """log p at the midpoints of a STEP-grid on [-L, L]^2, shape (m, m), indexed [ix, iy]."""
    half = HALF_WIDTH[name]
    m = round(2 * half / STEP)
    axis = -half + STEP * (torch.arange(m, dtype=torch.float64) + 0.5)
    return toy_densities.toy_log_prob(name, torch.cartesian_prod(axis, axis)).reshape(m, m)


def test_names_and_entropy_table():
    assert NAMES == ("8gaussians", "checkerboard", "two_moons", "swissroll", "pinwheel", "circles")
    assert set(common.TOY_ENTROPY) == set(NAMES)
    assert common.TOY_ENTROPY["checkerboard"] == pytest.approx(math.log(32.0), abs=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_sample_shape_dtype_and_seeding(name):
    x = common.toy_sample(name, 1000, _gen(0))
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    assert torch.equal(x, common.toy_sample(name, 1000, _gen(0)))
    assert not torch.equal(x, common.toy_sample(name, 1000, _gen(1)))
    lp = toy_densities.toy_log_prob(name, x)
    assert lp.shape == (1000,) and lp.dtype == torch.float32
    assert toy_densities.toy_log_prob(name, x.double()).dtype == torch.float64


def test_unknown_name_raises():
    for fn, args in [(common.toy_sample, (5,)), (toy_densities.toy_log_prob, (torch.zeros(3, 2),)),
                     (toy_densities.toy_entropy_by_quadrature, ())]:
        with pytest.raises(ValueError, match="pinwheel"):
            fn("moons", *args)


@pytest.mark.parametrize("name", NAMES)
def test_density_integrates_to_one(name):
    mass = _grid_log_prob(name).exp().sum().item() * STEP**2
    assert mass == pytest.approx(1.0, abs=1e-5)  # pinwheel at STEP = 0.1: 4e-6; the others < 1e-7


@pytest.mark.parametrize("name", NAMES)
def test_entropy_constant_matches_quadrature(name):
    lp = _grid_log_prob(name)
    grid_entropy = -torch.where(lp > -math.inf, lp.exp() * lp, 0.0).sum().item() * STEP**2
    assert grid_entropy == pytest.approx(common.TOY_ENTROPY[name], abs=1e-4)
    assert toy_densities.toy_entropy_by_quadrature(name, step=STEP) == pytest.approx(grid_entropy, abs=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_entropy_constant_matches_monte_carlo(name):
    lp = toy_densities.toy_log_prob(name, common.toy_sample(name, 20000, _gen(123))).double()
    assert torch.isfinite(lp).all()
    stderr = lp.std().item() / math.sqrt(len(lp))
    assert abs(-lp.mean().item() - common.TOY_ENTROPY[name]) <= 4 * stderr + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_histogram_matches_integrated_density(name):
    """Pearson chi-square of 2D sample counts against per-bin integrals of the density."""
    half, n = HALF_WIDTH[name], 100_000
    k = round(BIN / STEP)
    prob = _grid_log_prob(name).exp() * STEP**2
    m = prob.shape[0] // k
    expected = n * prob.reshape(m, k, m, k).sum(dim=(1, 3)).flatten()
    x = common.toy_sample(name, n, _gen(7)).double()
    idx = torch.floor((x + half) / BIN).long().clamp(0, m - 1)
    observed = torch.bincount(idx[:, 0] * m + idx[:, 1], minlength=m * m).double()
    big = expected >= 10
    assert big.sum() >= 20
    obs, exp = observed[big], expected[big]
    if expected[~big].sum() > 1e-9:  # pool the sparse bins into one (checkerboard has none)
        obs, exp = torch.cat([obs, observed[~big].sum()[None]]), torch.cat([exp, expected[~big].sum()[None]])
    else:
        assert observed[~big].sum() == 0
    chi2, dof = ((obs - exp) ** 2 / exp).sum().item(), len(obs) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def _ffjord_pinwheel_map(feat: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """FFJORD lib/toy_data.py pinwheel before the final x2, written as there (rotations reshaped
    (-1, 2, 2))."""
    angles = 2 * math.pi * k / 5 + 0.25 * torch.exp(feat[:, 0])
    rotations = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)])
    return torch.einsum("ti,tij->tj", feat, rotations.T.reshape(-1, 2, 2))


def test_pinwheel_jacobian_determinant_matches_autograd():
    g = _gen(3)
    for _ in range(20):
        f = torch.randn(2, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0])
        k = torch.randint(0, 5, (1,), generator=g).double()
        jac = torch.autograd.functional.jacobian(lambda v: _ffjord_pinwheel_map(v[None], k)[0], f)
        det_formula = 1 + 0.25 * math.exp(f[0].item()) * f[1].item()
        assert torch.linalg.det(jac).item() == pytest.approx(det_formula, rel=1e-12, abs=1e-12)


def test_pinwheel_density_is_change_of_variables_at_mapped_points():
    """p(2 F_k(f)) >= p_F(f) / (5 * 4 |det J|), the term of the preimage f; other preimages (other classes
    near the origin, other branches) only add, and are negligible (< 1e-8 relative) once r >= 1."""
    g = _gen(4)
    f = torch.randn(500, 2, generator=g, dtype=torch.float64) * torch.tensor([0.3, 0.1])
    f[:, 0] += 1.0
    k = torch.randint(0, 5, (500,), generator=g).double()
    x = 2 * _ffjord_pinwheel_map(f, k)
    log_pf = -0.5 * (((f[:, 0] - 1) / 0.3) ** 2 + (f[:, 1] / 0.1) ** 2) - math.log(2 * math.pi * 0.03)
    expected = log_pf - math.log(20) - torch.log(torch.abs(1 + 0.25 * torch.exp(f[:, 0]) * f[:, 1]))
    log_p = toy_densities.toy_log_prob("pinwheel", x)
    assert (log_p - expected).min() > -1e-10
    far = f[:, 0] >= 1.0
    assert far.sum() > 200 and torch.allclose(log_p[far], expected[far], atol=1e-8, rtol=0)


def test_circles_bessel_form_matches_angular_average():
    x = torch.randn(200, 2, generator=_gen(5), dtype=torch.float64) * 2.5
    # periodic trapezoid: spectral accuracy
    a = torch.arange(4096, dtype=torch.float64) * (2 * math.pi / 4096)
    s2 = 0.24**2
    dens = torch.zeros(200, dtype=torch.float64)
    for radius in (3.0, 1.5):
        centers = radius * torch.stack([torch.cos(a), torch.sin(a)], 1)
        d2 = (x[:, None, :] - centers[None]).pow(2).sum(-1)
        dens += 0.5 * torch.exp(-d2 / (2 * s2)).mean(1) / (2 * math.pi * s2)
    assert torch.allclose(toy_densities.toy_log_prob("circles", x), torch.log(dens), atol=1e-10, rtol=0)


def _simpson_curve_density(x: torch.Tensor, curves, lo: float, hi: float, std: float) -> torch.Tensor:
    """Equal mixture over `curves` of int_lo^hi N(x; c(t), std^2 I) dt / (hi - lo), by composite Simpson."""
    n = 20000
    t = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
    w = torch.ones(n + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w = w / w.sum()
    dens = torch.zeros(len(x), dtype=torch.float64)
    for curve in curves:
        d2 = (x[:, None, :] - curve(t)[None]).pow(2).sum(-1)
        dens += (torch.exp(-d2 / (2 * std**2)) * w).sum(1) / (2 * math.pi * std**2) / len(curves)
    return dens


def test_two_moons_and_swissroll_match_dense_simpson_quadrature():
    def outer(t):
        return torch.stack([2 * torch.cos(t) - 1, 2 * torch.sin(t) - 0.2], 1)

    def inner(t):
        return torch.stack([2 * (1 - torch.cos(t)) - 1, 2 * (0.5 - torch.sin(t)) - 0.2], 1)

    def roll(t):
        return torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5

    x = common.toy_sample("two_moons", 100, _gen(8)).double()
    ref = _simpson_curve_density(x, [outer, inner], 0.0, math.pi, 0.2)
    assert torch.allclose(toy_densities.toy_log_prob("two_moons", x), torch.log(ref), atol=1e-6, rtol=0)
    x = common.toy_sample("swissroll", 100, _gen(9)).double()
    ref = _simpson_curve_density(x, [roll], 1.5 * math.pi, 4.5 * math.pi, 0.2)
    assert torch.allclose(toy_densities.toy_log_prob("swissroll", x), torch.log(ref), atol=1e-6, rtol=0)


def test_checkerboard_support():
    # squares [2i, 2i+2] x [2j, 2j+2] with i + j even; boundaries belong to the (closed) support
    inside = [[1.0, 1.0], [3.9, -0.1], [-1.0, 3.0], [4.0, 4.0], [0.0, 0.0], [-4.0, 1.0]]
    outside = [[-3.0, 3.0], [-1.0, 1.0], [1.0, 3.0], [4.1, 1.0], [0.5, -4.5]]
    lp = toy_densities.toy_log_prob("checkerboard", torch.tensor(inside + outside, dtype=torch.float64))
    assert lp.tolist() == [-math.log(32.0)] * len(inside) + [-math.inf] * len(outside)
