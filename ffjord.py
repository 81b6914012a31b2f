"""Continuous normalizing flows: Chen et al. 2018, "Neural Ordinary Differential Equations", arXiv:1806.07366;
Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models",
arXiv:1810.01367.

A neural ODE dz/dt = f(z, t) carries data x = z(0) to z(T) ~ N(0, I) (the direction of FFJORD's code; the
paper's Fig. 1 puts the base at t0), and sampling solves it backwards from T to 0. The log-density changes
along the path by d log p(z(t))/dt = -tr(df/dz) (Chen et al., Theorem 1), integrated jointly with z by an
adaptive solver; FFJORD estimates the trace with Hutchinson's estimator e^T (df/dz) e (one vector-Jacobian
product per evaluation).

    python ffjord.py --quick                             # about a minute on a CPU: 8gaussians, its 8 modes
    python ffjord.py --dataset 8gaussians                # 10,000 steps of the 64-64-64 concat-squash MLP
    python ffjord.py --dataset checkerboard --kinetic 0.01 --jacobian 0.01    # RNODE regularizers
    python ffjord.py --dataset mnist --hidden 32 32 --blocks 1 --batch-size 32 --rtol 1e-3 --atol 1e-3 \
        --steps 200 --eval-every 50 --eval-n 200   # CPU recipe: 30 minutes on 2 cores
    python ffjord.py --dataset mnist --blocks 2 --warmup 1000 --epochs 1000 --adjoint
                                                         # the paper's MNIST setup
    torchrun --nproc_per_node=4 ffjord.py --dataset mnist --blocks 2 --warmup 1000 --adjoint --batch-size 50

Toys and vectors: a stack of --blocks CNFs with concat-squash layers, reported in nats and KL(data || model) =
NLL - H(data), evaluated with the exact trace. 8-bit images: uniform dequantization (k + u) / 256, the logit
transform and FFJORD's multiscale architecture (concat conv layers; squeeze and factor out half the channels
at every scale), trained and evaluated with Hutchinson's estimator, reported in bits/dim. Options: the adjoint
method (--adjoint), Gaussian probes (--noise gaussian), the kinetic-energy and Jacobian-Frobenius regularizers
of Finlay et al. 2020 ("How to train your neural ODE", arXiv:2002.02798). Every log line has the number of
function evaluations of the forward solve and of the backward pass (nonzero with --adjoint only).

Deviations from the paper:
- The integration time T is fixed (--time-length 1.0); FFJORD learns it (train_T).
- Gradients backpropagate through the solver's steps by default (fewer function evaluations, memory growing
  with the steps); FFJORD always used the adjoint method, here --adjoint (same gradients up to
  solver tolerance).
- Toys are evaluated with the exact trace (D backward passes per evaluation), FFJORD's test loss used
  Hutchinson; both estimate the same log p(x), the exact one without variance.
- No tabular (POWER, GAS, ...) loaders here: the MLP takes vectors of any D (the tests use D = 2, 3, 4, 5).
- --amp is not offered: adaptive step-size control at tolerance 1e-5 needs at least float32.

Expected result: the paper reports 0.99 bits/dim on MNIST (days of GPU time). README.md's rows
ffjord-8gaussians, ffjord-two_moons and ffjord-mnist have the measured figures, wall times and pictures with
their commands.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

import common


@dataclass
class Args:
    dataset: str = "8gaussians"  # a 2D toy or an 8-bit image dataset (see README)
    hidden: tuple[int, ...] = (64, 64, 64)  # hidden widths of the network f(z, t) (FFJORD: 64 64 64); >= 1
    nonlinearity: Literal["softplus", "tanh"] = "softplus"  # activation of f (FFJORD: softplus)
    blocks: int = 1  # stacked CNFs (images: per scale, before and after each squeeze; FFJORD MNIST: 2); >= 1
    time_length: float = 1.0  # integrate t over [0, T] (FFJORD learns T); > 0
    solver: str = "dopri5"  # torchdiffeq method: dopri5, bosh3, rk4, euler, ...
    rtol: float = 1e-5  # solver relative tolerance (FFJORD: 1e-5); > 0
    atol: float = 1e-5  # solver absolute tolerance (FFJORD: 1e-5); > 0
    step_size: float = 0.0  # step of fixed-grid solvers such as rk4 (0: the solver's default); >= 0
    adjoint: bool = False  # gradients by the adjoint ODE (memory O(1) in the steps, more evaluations)
    noise: Literal["rademacher", "gaussian"] = "rademacher"  # Hutchinson probe distribution
                                                             # (FFJORD: rademacher)
    exact_trace: bool = False  # train with the exact trace (D backward passes per evaluation) instead
    kinetic: float = 0.0  # lambda_K of the kinetic energy int ||f||^2 dt (Finlay et al. 2020: 0.01;
                          # 0: off); >= 0
    jacobian: float = 0.0  # lambda_J of the Jacobian Frobenius norm int ||e^T df/dz||^2 dt (RNODE: 0.01;
                           # 0: off); >= 0
    alpha: float = 1e-6  # images: logit transform of alpha + (1 - 2 alpha) x (FFJORD: 1e-6); in [0, 0.5)
    epochs: int = 0  # passes over the training set (0: use --steps); >= 0
    steps: int = 10000  # optimizer steps when --epochs is 0 (FFJORD toys: 10,000); >= 0
    batch_size: int = 200  # minibatch per process (FFJORD: 200); >= 1
    lr: float = 1e-3  # Adam learning rate (FFJORD: 1e-3); > 0
    warmup: int = 0  # steps of linear learning-rate warm-up (FFJORD images: 1000; 0: off); >= 0
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test evaluations (0: only at the end); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/ffjord-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a 2D toy: its modes in about a minute; images: a smoke test that ends with
                         # the CPU recipe


QUICK = dict(steps=150, hidden=(32, 32), rtol=1e-3, atol=1e-3, lr=5e-3, eval_n=2000, eval_every=0,
             log_every=50, ckpt_every=150)
QUICK_TOY = dict(steps=1200, rtol=1e-3, atol=1e-3, lr=3e-3, eval_n=2000, eval_every=0, log_every=300,
                 ckpt_every=1200)
PRESETS = {"quick": common.toy_or_image(QUICK, QUICK_TOY, Args.dataset)}  # --quick: QUICK_TOY on a 2D toy
EXACT_TRACE_MAX_DIMS = 64  # evaluation uses the exact trace up to this many dimensions, Hutchinson's above
EVAL_BATCH = 2000  # test points per solve (toys); images use --batch-size
GRID_BINS, GRID_LIM = 200, 4.0  # density heatmaps: the 200 x 200 grid of common.histogram_2d over [-4, 4]^2


# ----------------------------------------------------------------------------------------------------------
# Time-conditioned networks f(z, t)
# ----------------------------------------------------------------------------------------------------------
class ConcatSquashLinear(nn.Module):
    # FFJORD's concat-squash layer (its toy and tabular models): h' = (W h + b) * sigmoid(W_g t + b_g) + W_b t
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.gate = nn.Linear(1, n_out)
        self.hyper_bias = nn.Linear(1, n_out, bias=False)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        t = t.reshape(1, 1).to(h)
        return self.linear(h) * torch.sigmoid(self.gate(t)) + self.hyper_bias(t)


class ConcatConv2d(nn.Module):
    # FFJORD's concat layer (its image models): a 3x3 convolution of [t, h], t a constant extra channel
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, 3, padding=1)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(h[:, :1]) * t.to(h)  # (B, 1, H, W)
        return self.conv(torch.cat([tt, h], dim=1))


class ODENet(nn.Module):
    """f(z, t): time-conditioned layers with a nonlinearity between them (none after the last)."""

    def __init__(self, layers: list[nn.Module], nonlinearity: str = "softplus"):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.act = {"softplus": F.softplus, "tanh": torch.tanh}[nonlinearity]

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


def mlp_field(dims: int, hidden: tuple[int, ...], nonlinearity: str = "softplus") -> ODENet:
    sizes = [dims, *hidden, dims]
    return ODENet([ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:])], nonlinearity)


def conv_field(channels: int, hidden: tuple[int, ...], nonlinearity: str = "softplus") -> ODENet:
    sizes = [channels, *hidden, channels]
    return ODENet([ConcatConv2d(a, b) for a, b in zip(sizes[:-1], sizes[1:])], nonlinearity)


# ----------------------------------------------------------------------------------------------------------
# The trace of df/dz: exactly, or by Hutchinson's estimator
# ----------------------------------------------------------------------------------------------------------
def divergence_exact(f: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    # tr(df/dx) = sum_i df_i/dx_i, one backward pass per dimension (Chen et al. 2018, Sec. 4): (B,)
    f_flat = f.flatten(1)
    div = torch.zeros_like(f_flat[:, 0])
    for i in range(f_flat.shape[1]):
        grad_i = torch.autograd.grad(f_flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
        div = div + grad_i.flatten(1)[:, i]
    return div


def divergence_hutchinson(f: torch.Tensor, x: torch.Tensor, e: torch.Tensor, create_graph: bool):
    """Grathwohl et al. 2019, Sec. 3.1: tr(df/dx) = E_e[e^T (df/dx) e] for E[e] = 0, Cov(e) = I
    (Hutchinson 1989).

    One vector-Jacobian product e^T (df/dx) per evaluation; returns the estimate (B,) and e^T df/dx (B, ...).
    """
    e_J = torch.autograd.grad(f, x, e, create_graph=create_graph, retain_graph=True)[0]
    return (e_J * e).flatten(1).sum(1), e_J


def sample_probe(like: torch.Tensor, noise: str) -> torch.Tensor:
    if noise == "rademacher":  # +-1 with probability 1/2 each
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    return torch.randn_like(like)


class ODEFunc(nn.Module):
    """The right-hand side handed to torchdiffeq. The state is (z,) for sampling, (z, delta_logp) for the
    density, and (z, delta_logp, kinetic, jacobian) with the regularizers, each integral per example (B,)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.exact, self.e, self.nfe = False, None, 0  # set by CNF.forward; e stays fixed within one solve

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.nfe += 1
        z = state[0]
        if len(state) == 1:  # sampling: only dz/dt = f(z, t)
            return (self.net(t, z),)
        create_graph = torch.is_grad_enabled()  # training, or the adjoint's backward pass
        with torch.enable_grad():
            # a constant (data, or a no-grad solve): differentiate f with respect to it
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            e_J = None
            if self.exact:
                div = divergence_exact(dz, z, create_graph)
            else:
                div, e_J = divergence_hutchinson(dz, z, self.e, create_graph)
            # Chen et al. 2018, Theorem 1: d log p(z(t)) / dt = -tr(df/dz)
            derivatives = [dz, -div]
            if len(state) == 4:  # Finlay et al. 2020, Sec. 3: d/dt K = ||f||^2, d/dt J = ||e^T df/dz||^2
                if e_J is None:
                    e_J = torch.autograd.grad(dz, z, self.e, create_graph=create_graph, retain_graph=True)[0]
                derivatives += [dz.pow(2).flatten(1).sum(1), e_J.pow(2).flatten(1).sum(1)]
        if not create_graph:
            derivatives = [d.detach() for d in derivatives]
        return tuple(derivatives)


class CNF(nn.Module):
    """One continuous normalizing flow on [0, T]: data at t = 0, the base side at t = T."""

    def __init__(self, net: nn.Module, time_length: float = 1.0, solver: str = "dopri5", rtol: float = 1e-5,
                 atol: float = 1e-5, step_size: float = 0.0, adjoint: bool = False,
                 noise: str = "rademacher"):
        super().__init__()
        self.func = ODEFunc(net)
        # a Python float, not a float32 buffer: .double() of a float32 1.7 would integrate to 1.7000000477
        self.time_length = time_length
        self.solver, self.rtol, self.atol, self.adjoint, self.noise = solver, rtol, atol, adjoint, noise
        self.options = {"step_size": step_size} if step_size > 0 else None

    def times(self, like: torch.Tensor) -> torch.Tensor:
        """[0, T] in the dtype and on the device of the state `like` (torchdiffeq casts t to the
        state's dtype)."""
        return torch.tensor([0.0, self.time_length], device=like.device, dtype=like.dtype)

    def _solve(self, state: tuple[torch.Tensor, ...], times: torch.Tensor, adjoint: bool):
        solve = odeint_adjoint if adjoint else odeint
        out = solve(self.func, state, times, rtol=self.rtol, atol=self.atol, method=self.solver,
                    options=self.options)
        return tuple(s[-1] for s in out)  # the state at the last time

    def forward(self, x: torch.Tensor, exact: bool = False, regularize: bool = False,
                probe: torch.Tensor | None = None):
        """x (B, ...) -> z(T), log |det dz(T)/dx| (B,), regularizers [int ||f||^2, int ||e^T J||^2] (B, 2)."""
        self.func.exact = exact
        self.func.e = probe if probe is not None else sample_probe(x, self.noise)
        zeros = torch.zeros_like(x.flatten(1)[:, 0])
        state = (x, zeros, zeros, zeros) if regularize else (x, zeros)
        out = self._solve(state, self.times(x), self.adjoint and torch.is_grad_enabled())
        z, delta_logp = out[0], out[1]
        reg = torch.stack(out[2:], dim=1) if regularize else torch.zeros_like(x.flatten(1)[:, :2])
        # log p(x) = log p(z(T)) - delta_logp, delta_logp = -int_0^T tr(df/dz) dt: so log |det| = -delta_logp
        return z, -delta_logp, reg

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z(T) -> x = z(0): the same ODE solved from T back to 0."""
        return self._solve((z,), self.times(z).flip(0), adjoint=False)[0]


# ----------------------------------------------------------------------------------------------------------
# The model: stacked CNFs on vectors, FFJORD's multiscale CNF on images
# ----------------------------------------------------------------------------------------------------------
def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    # log N(z; 0, I), summed over all but the batch dimension: (B,)
    return -0.5 * (math.log(2 * math.pi) + z.pow(2)).flatten(1).sum(1)


def logit_transform(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dinh et al. 2017, Sec. 4.1: y = logit(s), s = alpha + (1 - 2 alpha) x; log |dy/dx| summed: (B,)."""
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    # dy/dx = (1 - 2 alpha) / (s (1 - s))
    log_det = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).reshape(len(x), -1).sum(1)
    return y, log_det


def logit_inverse(y: torch.Tensor, alpha: float) -> torch.Tensor:
    return (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    # Dinh et al. 2017, Sec. 3.6: (B, C, H, W) -> (B, 4C, H/2, W/2)
    return rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b (c p q) h w -> b c (h p) (w q)", p=2, q=2)


def num_scales(h: int, w: int) -> int:
    # FFJORD's multiscale model: one scale per halving while both sides are at least 4 (MNIST: 28, 14, 7)
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return n


class FFJORD(nn.Module):
    """Vectors (D,): --blocks CNFs, then N(0, I). Images (C, H, W): logit transform, then per scale --blocks
    CNFs, a squeeze, --blocks CNFs on 4C channels and half of them factored out to N(0, I) (not after the last
    scale). `forward` returns the training loss (for DDP)."""

    def __init__(self, shape: tuple[int, ...], hidden: tuple[int, ...] = (64, 64, 64),
                 nonlinearity: str = "softplus", blocks: int = 1, alpha: float = 1e-6, **cnf_options):
        super().__init__()
        self.shape, self.alpha, self.num_dims = tuple(shape), alpha, math.prod(shape)
        self.image = len(self.shape) == 3
        if not self.image:
            self.stages = nn.ModuleList([nn.ModuleList([CNF(mlp_field(self.num_dims, hidden, nonlinearity),
                                                            **cnf_options) for _ in range(blocks)])])
            self.z_shapes = [self.shape]
            return
        c, h, w = self.shape
        scales = num_scales(h, w)
        if scales == 0 or any(s % 2 ** (scales - 1) for s in (h, w)):
            raise ValueError(f"images of shape {shape} cannot be squeezed {scales - 1} times")
        # stages alternate: CNFs at scale i, then (after a squeeze) CNFs at scale i on 4C channels
        self.stages, self.z_shapes = nn.ModuleList(), []
        for i in range(scales):
            self.stages.append(nn.ModuleList([CNF(conv_field(c, hidden, nonlinearity), **cnf_options)
                                              for _ in range(blocks)]))
            if i < scales - 1:
                c, h, w = 4 * c, h // 2, w // 2
                self.stages.append(nn.ModuleList([CNF(conv_field(c, hidden, nonlinearity), **cnf_options)
                                                  for _ in range(blocks)]))
                self.z_shapes.append((c // 2, h, w))  # factored out
                c = c - c // 2
        self.z_shapes.append((c, h, w))

    def cnfs(self) -> list[CNF]:
        return [cnf for stage in self.stages for cnf in stage]

    def nfe(self) -> int:
        """Function evaluations of all CNFs since they were created (the training loop takes differences)."""
        return sum(cnf.func.nfe for cnf in self.cnfs())

    def flow(self, x: torch.Tensor, exact: bool = False, regularize: bool = False):
        """x -> (list of z pieces, log |det dz/dx| (B,), regularizers (B, 2) summed over the CNFs)."""
        log_det = torch.zeros_like(x.flatten(1)[:, 0])
        reg = torch.zeros_like(x.flatten(1)[:, :2])
        h, zs = x, []
        if self.image:
            h, log_det = logit_transform(x, self.alpha)
        for k, stage in enumerate(self.stages):
            if self.image and k % 2 == 1:  # a squeeze opens every odd stage
                h = squeeze(h)
            for cnf in stage:
                h, ld, r = cnf(h, exact, regularize)
                log_det, reg = log_det + ld, reg + r
            if self.image and k % 2 == 1:  # and half the channels leave for the base distribution
                z_out, h = h[:, : self.z_shapes[len(zs)][0]], h[:, self.z_shapes[len(zs)][0] :]
                zs.append(z_out)
        zs.append(h)
        return zs, log_det, reg

    def log_prob(self, x: torch.Tensor, exact: bool = False, regularize: bool = False):
        """log p(x) (B,) and the regularizers (B, 2)."""
        zs, log_det, reg = self.flow(x, exact, regularize)
        # change of variables: log p(x) = log N(z; 0, I) + log |det dz/dx|
        return sum(standard_normal_log_prob(z) for z in zs) + log_det, reg

    def inverse(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """The pieces of z (shapes self.z_shapes) -> x, every CNF solved backwards in reverse order."""
        zs = list(zs)
        h = zs.pop()
        for k in reversed(range(len(self.stages))):
            if self.image and k % 2 == 1:
                h = torch.cat([zs.pop(), h], dim=1)
            for cnf in reversed(self.stages[k]):
                h = cnf.inverse(h)
            if self.image and k % 2 == 1:
                h = unsqueeze(h)
        return logit_inverse(h, self.alpha) if self.image else h

    def forward(self, x: torch.Tensor, kinetic: float = 0.0, jacobian: float = 0.0, exact: bool = False):
        regularize = kinetic > 0 or jacobian > 0
        log_px, reg = self.log_prob(x, exact, regularize)
        nll = -log_px.mean()
        # images train on bits/dim, up to the constant 8 of the bins (Grathwohl et al. 2019); toys on nats
        scale = 1 / (self.num_dims * math.log(2)) if self.image else 1.0
        # Finlay et al. 2020, Sec. 3: loss = NLL + lambda_K int ||f||^2 dt + lambda_J int ||e^T J||^2 dt
        loss = scale * nll + kinetic * reg[:, 0].mean() + jacobian * reg[:, 1].mean()
        metrics = {"loss": loss, "nll": nll}
        if regularize:
            metrics.update(kinetic=reg[:, 0].mean(), jacobian=reg[:, 1].mean())
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: FFJORD, x: torch.Tensor, batch_size: int, dequantize=None) -> dict[str, float]:
    """Mean test log p(x) in nats, the exact trace up to EXACT_TRACE_MAX_DIMS dimensions (Hutchinson's
    estimate above it, unbiased for log p(x)), and the function evaluations per solve."""
    exact = model.num_dims <= EXACT_TRACE_MAX_DIMS
    total, nfe, solves = 0.0, model.nfe(), 0
    what = f"test log p(x) by the ODE ({'exact' if exact else 'Hutchinson'} trace), {len(x):,} " + \
        ("images" if dequantize is not None else "points")
    for xb in common.progress(x.split(batch_size), what, len(x)):
        if dequantize is not None:
            xb = dequantize(xb)
        total += model.log_prob(xb, exact)[0].sum().item()
        solves += 1
    return {"log_px": total / len(x), "nfe": (model.nfe() - nfe) / solves, "exact_trace": float(exact)}


def grid_points(bins: int, lim: float, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Centres of a bins x bins grid over [-lim, lim]^2, row-major with rows from y = lim down (as
    common.histogram_2d): (bins * bins, 2), in dtype (None: torch's default dtype)."""
    steps = torch.arange(bins, device=device, dtype=dtype or torch.get_default_dtype())
    centres = (steps + 0.5) * (2 * lim / bins) - lim
    y, x = torch.meshgrid(centres.flip(0), centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


@torch.no_grad()
def density_on_grid(model: FFJORD, bins: int = GRID_BINS, lim: float = GRID_LIM, batch_size: int = 10_000):
    """p(x) of a 2D model at the grid centres, exact trace: (bins, bins)."""
    points = grid_points(bins, lim, next(model.parameters()).device).to(next(model.parameters()).dtype)
    log_p = torch.cat([model.log_prob(p, exact=True)[0] for p in points.split(batch_size)])
    return log_p.exp().view(bins, bins)


def report(metrics: dict[str, float], data: common.Data) -> dict[str, float]:
    """Nats and KL(data || model) for toys, bits/dim of the 8-bit data for images (bins 1/256 wide
    on [0, 1])."""
    nll = -metrics["log_px"]
    if data.kind == "8bit":
        out = {"nll_bpd": common.bits_per_dim(nll, data.num_dims, bin_width=1 / 256)}
    else:
        out = {"nll_nats": nll}
    if data.kind == "toy":
        out["kl_data_model"] = nll - data.entropy  # KL(data || model) = NLL - H(data)
    out["nfe"] = metrics["nfe"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling and pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: FFJORD, n: int) -> torch.Tensor:
    """z ~ N(0, I), then the ODE solved from T back to 0 (images clamped to [0, 1]). Returns (n, *shape)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = model.inverse([torch.randn(n, *s, device=device, dtype=dtype) for s in model.z_shapes])
    return x.clamp(0, 1) if model.image else x


@torch.no_grad()
def draw_pictures(model: FFJORD, data: common.Data, run: common.Run, n_samples: int) -> None:
    """Toys: samples.png (histogram of samples), density.png (p(x) on the grid), data.png. Images:
    samples.png."""
    if data.kind == "toy":
        common.save_heatmap(run.path("samples.png"), common.histogram_2d(sample(model, n_samples), GRID_BINS,
                                                                         GRID_LIM))
        common.save_heatmap(run.path("density.png"), density_on_grid(model))
        common.save_heatmap(run.path("data.png"), common.histogram_2d(data.test_x, GRID_BINS, GRID_LIM))
        return
    common.save_grid(run.path("samples.png"), sample(model, 64), nrow=8)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def evaluate_and_draw(run: common.Run, model: FFJORD, data: common.Data, args: Args, step: int) -> dict:
    """Evaluate on the test set (rank 0), log one line, draw the pictures."""
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    image = data.kind != "toy"
    with common.eval_mode(model, seed=args.seed):
        metrics = evaluate(model, x, args.batch_size if image else EVAL_BATCH,
                           common.uniform_dequantize if image else None)
        metrics = report(metrics, data)
        draw_pictures(model, data, run, n_samples=min(len(x) * 5, 100_000))
    trace = "exact trace" if model.num_dims <= EXACT_TRACE_MAX_DIMS else "hutchinson"
    run.log("test", step, metrics, note=f"{trace}, {args.solver} rtol={args.rtol:g} atol={args.atol:g}")
    return metrics


def train(args: Args) -> dict:
    if "binarized" in args.dataset:
        raise common.RunError(
            "ffjord.py models densities of continuous data: use mnist (8-bit, dequantized), "
            "not a binarized dataset")
    dist, device = common.setup(args)
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = FFJORD(data.shape, args.hidden, args.nonlinearity, args.blocks, args.alpha,
                   time_length=args.time_length, solver=args.solver, rtol=args.rtol, atol=args.atol,
                   step_size=args.step_size, adjoint=args.adjoint, noise=args.noise).to(device)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "ffjord", dist, model, optimizer)
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist)
    total = args.epochs * batches.steps_per_epoch if args.epochs else args.steps
    run.print(
        f"ffjord: {sum(p.numel() for p in model.parameters()):,} parameters, {len(model.cnfs())} CNFs, "
        f"{data.name} {data.shape}, {total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        if data.kind == "8bit":  # a density over [0, 1)^D: (k + u) / 256
            x = common.uniform_dequantize(x)
        for group in optimizer.param_groups:  # FFJORD's linear warm-up of the learning rate
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        nfe = model.nfe()
        loss, metrics = ddp(x, args.kinetic, args.jacobian, args.exact_trace)
        nfe_forward = model.nfe() - nfe
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nfe_backward = model.nfe() - nfe - nfe_forward  # the adjoint solve; 0 when backpropagating through it
        optimizer.step()
        if data.kind == "8bit":
            metrics["nll_bpd"] = common.bits_per_dim(metrics["nll"], data.num_dims, bin_width=1 / 256)
        metrics["nfe_forward"] = torch.tensor(float(nfe_forward))  # python ints: no host sync
        metrics["nfe_backward"] = torch.tensor(float(nfe_backward))
        run.log_train(step, metrics)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total and dist.is_main:
            evaluate_and_draw(run, model, data, args, step + 1)

    if dist.enabled:
        run.print(
            f"ddp: largest parameter difference between ranks {common.replicas_max_diff(model, dist):.3g}")
    if not dist.is_main:
        return {}
    return evaluate_and_draw(run, model, data, args, total)


if __name__ == "__main__":
    common.cli(train, Args, PRESETS)
