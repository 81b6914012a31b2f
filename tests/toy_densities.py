"""The exact log-densities of common.py's 2D toy sets, and the quadrature of their differential entropies.

They derive and verify the constants common.TOY_ENTROPY (and so every "KL to data" figure: test NLL minus
the entropy); the runtime module keeps only the samplers and the constants. tests/test_toy.py checks them
against histograms of the samplers, closed forms and each other."""

import math

import numpy as np
import torch

from common import (CIRCLES_RADII, CIRCLES_STD, GAUSS8_STD, MOONS_STD, PIN_CLASSES, PIN_RADIAL_STD, PIN_RATE,
                    PIN_SCALE, PIN_TANGENTIAL_STD, SWISS_STD, SWISS_T_RANGE, _check, _gauss8_centers,
                    _moon_centers, _swiss_centers)

MOONS_PANELS = 64  # composite 8-point Gauss-Legendre panels per moon over t in [0, pi]
SWISS_PANELS = 192  # composite 8-point Gauss-Legendre panels over t
# psi-cells per 2 pi for the root search; only a root pair inside one cell at a fold (next to a
# caustic, mass ~1e-8) can be missed; 1024 vs 16384 cells agree to 1e-12 in log p at samples and |x| <= 12
PIN_GRID = 1024
PIN_BISECT_STEPS = 40  # cell width 2 pi / 1024 -> root located to ~6e-15 rad
PIN_RHO_MAX = 6.5  # beyond |x| = 13 every preimage has p_F < exp(-168): returned as density 0 (log = -inf)
_CHUNK = 4096
_GL_NODES = 8
TOY_QUAD_HALF_WIDTH: dict[str, float] = {
    "8gaussians": 6.5, "checkerboard": 4.0, "two_moons": 5.0, "swissroll": 5.0, "pinwheel": 7.0,
    "circles": 5.5,
}


def _gauss_mixture_log_prob(x: torch.Tensor, centers: torch.Tensor, log_w: torch.Tensor, std: float
                            ) -> torch.Tensor:
    # log sum_j w_j N(x; c_j, std^2 I)
    out = []
    for xb in x.split(_CHUNK):
        d2 = (xb[:, None, :] - centers[None]).pow(2).sum(-1)
        out.append(torch.logsumexp(log_w - d2 / (2 * std**2), dim=1))
    return torch.cat(out) - math.log(2 * math.pi * std**2)


def _gauss_legendre(lo: float, hi: float, panels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite Gauss-Legendre nodes and log-weights for the uniform density on [lo, hi]."""
    z, w = np.polynomial.legendre.leggauss(_GL_NODES)
    edges = np.linspace(lo, hi, panels + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    t = (edges[:-1, None] + half * (z + 1)).ravel()
    return torch.from_numpy(t), torch.from_numpy(np.log((half * w).ravel() / (hi - lo)))


def _moons_log_prob(x: torch.Tensor, panels: int = MOONS_PANELS) -> torch.Tensor:
    # p(x) = 1/2 sum_moon (1/pi) int_0^pi N(x; c_moon(t), 0.2^2 I) dt, integral by Gauss-Legendre in t
    t, log_w = _gauss_legendre(0.0, math.pi, panels)
    moon = torch.arange(2).repeat_interleave(len(t))
    centers = _moon_centers(t.repeat(2), moon)
    return _gauss_mixture_log_prob(x, centers, log_w.repeat(2) - math.log(2), MOONS_STD)


def _swiss_log_prob(x: torch.Tensor, panels: int = SWISS_PANELS) -> torch.Tensor:
    # p(x) = (1 / 3 pi) int N(x; (t cos t, t sin t) / 5, 0.2^2 I) dt over [1.5 pi, 4.5 pi]
    t, log_w = _gauss_legendre(*SWISS_T_RANGE, panels)
    return _gauss_mixture_log_prob(x, _swiss_centers(t), log_w, SWISS_STD)


def _circles_log_prob(x: torch.Tensor) -> torch.Tensor:
    # ring density: angular average of N(x; R(cos a, sin a), s^2 I) = exp(-(r^2 + R^2) / 2 s^2) I0(r R / s^2)
    # / (2 pi s^2); stably log I0(a) - a = log i0e(a), so
    # log p = -(r - R)^2 / 2 s^2 + log i0e(r R / s^2) - ...
    r, s2 = x.norm(dim=1, keepdim=True), CIRCLES_STD**2
    radii = torch.tensor(CIRCLES_RADII, dtype=torch.float64)
    log_ring = -(r - radii).pow(2) / (2 * s2) + torch.log(torch.special.i0e(r * radii / s2))
    return torch.logsumexp(log_ring, dim=1) - math.log(2) - math.log(2 * math.pi * s2)


def _checkerboard_log_prob(x: torch.Tensor) -> torch.Tensor:
    # support: closed squares [2i, 2i+2] x [2j, 2j+2], i, j in {-2..1}, i + j even
    # (from FFJORD's construction)
    u = x / 2
    inside = torch.zeros(len(x), dtype=torch.bool)
    for i in (torch.floor(u[:, 0]), torch.ceil(u[:, 0]) - 1):
        for j in (torch.floor(u[:, 1]), torch.ceil(u[:, 1]) - 1):
            ok = (i >= -2) & (i <= 1) & (j >= -2) & (j <= 1) & (torch.remainder(i + j, 2) == 0)
            inside |= ok
    return torch.where(inside, x.new_tensor(-math.log(32.0)), x.new_tensor(-math.inf))


def _pinwheel_level(psi: torch.Tensor, rho: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # f = rho (cos psi, sin psi) maps to polar angle psi - phi(f); phi = 2 pi k/5 + 0.25 e^r, so a root for
    # some class k is a psi where (psi - 0.25 e^(rho cos psi) - theta) / (2 pi / 5) is an integer
    return (psi - PIN_RATE * torch.exp(rho * torch.cos(psi)) - theta) / (2 * math.pi / PIN_CLASSES)


def _pinwheel_log_prob_polar(rho: torch.Tensor, theta: torch.Tensor, grid: int) -> torch.Tensor:
    """log p_y at y = rho (cos theta, sin theta): sum over all preimages f (all classes, all branches) of
    p_F(f) / |det J| / 5, with det J = 1 + 0.25 e^r tau (= d theta / d psi at fixed rho, since |y| = |f|)."""
    psi = torch.linspace(-math.pi, math.pi, grid + 1, dtype=torch.float64)
    fq = torch.floor(_pinwheel_level(psi[None], rho[:, None], theta[:, None]))
    step = fq[:, 1:] - fq[:, :-1]  # integer levels crossed inside each psi-cell (signed)
    cnt = step.abs().long()
    i, j = cnt.nonzero(as_tuple=True)
    c = cnt[i, j]
    lo, sgn = torch.minimum(fq[:, 1:], fq[:, :-1])[i, j], torch.sign(step[i, j])
    i, j, lo, sgn = (v.repeat_interleave(c) for v in (i, j, lo, sgn))
    level = lo + 1 + torch.arange(len(i)) - (torch.cumsum(c, 0) - c).repeat_interleave(c)
    a, b, rr, tt = psi[j], psi[j + 1], rho[i], theta[i]
    for _ in range(PIN_BISECT_STEPS):  # bisection for level(psi) = level inside [a, b]
        m = (a + b) / 2
        past = (_pinwheel_level(m, rr, tt) - level) * sgn >= 0
        a, b = torch.where(past, a, m), torch.where(past, m, b)
    psi_root = (a + b) / 2
    r, tau = rr * torch.cos(psi_root), rr * torch.sin(psi_root)
    log_pf = -0.5 * (((r - 1) / PIN_RADIAL_STD) ** 2 + (tau / PIN_TANGENTIAL_STD) ** 2)
    log_pf = log_pf - math.log(2 * math.pi * PIN_RADIAL_STD * PIN_TANGENTIAL_STD * PIN_CLASSES)
    log_c = log_pf - torch.log(torch.abs(1 + PIN_RATE * torch.exp(r) * tau))
    top = torch.full_like(rho, -math.inf).scatter_reduce(0, i, log_c, "amax")
    total = torch.zeros_like(rho).index_add(0, i, torch.exp(log_c - top[i]))
    return top + torch.log(total)


def _pinwheel_log_prob(x: torch.Tensor, grid: int = PIN_GRID) -> torch.Tensor:
    y = x / PIN_SCALE
    rho, theta = y.norm(dim=1), torch.atan2(y[:, 1], y[:, 0])
    out = torch.full_like(rho, -math.inf)
    idx = (rho <= PIN_RHO_MAX).nonzero().squeeze(1)
    for ib in idx.split(_CHUNK):
        out[ib] = _pinwheel_log_prob_polar(rho[ib], theta[ib], grid)
    return out - 2 * math.log(PIN_SCALE)  # x = 2 y in 2D: p_x(x) = p_y(x / 2) / 4


_LOG_PROB = {
    "8gaussians": lambda x: _gauss_mixture_log_prob(
        x, _gauss8_centers(), torch.full((8,), -math.log(8), dtype=torch.float64), GAUSS8_STD),
    "checkerboard": _checkerboard_log_prob,
    "two_moons": _moons_log_prob,
    "swissroll": _swiss_log_prob,
    "pinwheel": _pinwheel_log_prob,
    "circles": _circles_log_prob,
}


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log-density (nats) at x (n, 2): float64 inside, no gradient, returned in x's dtype and device."""
    _check(name)
    lp = _LOG_PROB[name](x.detach().to("cpu", torch.float64).reshape(-1, 2))
    return lp.to(x.device, x.dtype)


def toy_entropy_by_quadrature(name: str, step: float = 0.02) -> float:
    """-int p log p by the midpoint rule on [-L, L]^2, L = TOY_QUAD_HALF_WIDTH[name] (the step is rounded to
    divide 2L; keep 2 / step an integer so cells align with the checkerboard squares). Smooth sets converge
    spectrally in the step; the default takes about a minute for pinwheel, seconds for the others."""
    _check(name)
    half = TOY_QUAD_HALF_WIDTH[name]
    m = round(2 * half / step)
    h = 2 * half / m
    axis = -half + h * (torch.arange(m, dtype=torch.float64) + 0.5)
    total = 0.0
    for rows in axis.split(max(1, 65536 // m)):
        pts = torch.cartesian_prod(rows, axis)
        lp = toy_log_prob(name, pts)
        total -= torch.where(lp > -math.inf, lp.exp() * lp, 0.0).sum().item()
    return total * h * h
