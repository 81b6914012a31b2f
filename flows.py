"""Normalizing flows: the four designs of tractable Jacobians in one file, with one interface.

Determinant identities: planar and radial flows (Rezende & Mohamed 2015, "Variational Inference with
Normalizing Flows", arXiv:1505.05770) and Sylvester flows (van den Berg, Hasenclever, Tomczak & Welling 2018,
arXiv:1803.05649). Coupling: NICE (Dinh, Krueger & Bengio 2014, arXiv:1410.8516), RealNVP (Dinh,
Sohl-Dickstein & Bengio 2017, arXiv:1605.08803), Glow (Kingma & Dhariwal 2018, arXiv:1807.03039).
Autoregressive: MADE (Germain et al. 2015, arXiv:1502.03509), MAF (Papamakarios, Pavlakou & Murray 2017,
arXiv:1705.07057), IAF (Kingma et al. 2016, arXiv:1606.04934), NAF (Huang, Krueger, Lacoste & Courville 2018,
arXiv:1804.00779). Free-form: invertible residual networks (Behrmann et al. 2019, arXiv:1811.00995) and
residual flows (Chen, Behrmann, Duvenaud & Jacobsen 2019, arXiv:1906.02735).

One convention everywhere: `forward(x) -> (z, log_det)` is the normalizing direction (data -> base) with
log_det = log|det dz/dx|, and `inverse(z) -> (x, log_det)` the generative one with log_det = log|det dx/dz|,
so the two log-dets of a round trip sum to zero. A `Flow` is a list of layers over a standard normal base:
log p(x) = log N(z; 0, I) + sum of the layers' log_det (change of variables), and `sample(n)` runs the
inverses. Planar, radial and Sylvester maps are defined by their papers in the generative direction, so their
closed-form map is `inverse`; their `forward` solves it numerically (planar), in closed form (radial), or does
not exist (Sylvester). IAF is MAF with the two directions swapped: sampling is one parallel pass.

    python flows.py --quick                                         # 15 s on a CPU: RealNVP on 8gaussians,
                                                                    # its 8 modes
    python flows.py --task density --flow maf --dataset two_moons   # 2D density estimation (also nice,
                                                                    # realnvp, glow, iaf, naf, residual)
    python flows.py --task energy --flow planar --target u1 --flow-length 32   # Rezende & Mohamed, Fig. 3
    python flows.py --task images --flow glow --dataset mnist       # dequantized MNIST in bits/dim
    python flows.py --task images --flow glow --dataset mnist --depth 4 --width 32 --steps 20000 \
        --eval-every 4000   # CPU recipe: 30 minutes on 2 cores
    python flows.py --task images --flow realnvp --dataset mnist --depth 4 --width 32 --steps 6000 \
        --eval-every 1000   # CPU recipe: 30 minutes on 2 cores
    python flows.py --task images --flow glow --dataset cifar10 --levels 3 --depth 32 --width 512 \
        --steps 200000
    python flows.py --task vae --flow sylvester --dataset binarized_mnist   # flow posteriors in a VAE
    python flows.py --task vae --flow planar --prior realnvp      # and a flow prior p(z) (also --prior maf)

Tasks: `density` fits a flow to a 2D toy set by maximum likelihood and reports the exact test NLL in nats
and KL(data || model) = NLL - H(data); `energy` fits planar or radial flows to one of the four unnormalized
densities exp(-U(z)) of Rezende & Mohamed (Table 1) by the reverse KL; `images` fits the multi-scale
RealNVP or Glow to uniformly dequantized 8-bit images and reports bits/dim (bin width 1/256, the logit
transform's log-det included); `vae` trains a VAE whose posterior q(z|x) is a Gaussian pushed through planar,
radial, Sylvester or IAF layers, optionally under a RealNVP or MAF prior p(z) (--prior), and reports the
importance-sampled NLL in nats.

Deviations from the papers:
- Adam everywhere (R&M used RMSprop at lr 1e-5 for 500k steps; RealNVP and Glow Adam with Polyak averaging).
- RealNVP and Glow couplings use a small 3-layer conv net (3x3, 1x1, 3x3; the last zero-initialized as in
  Glow), not RealNVP's deep ResNets with batch normalization or Glow's 512-channel nets, so they fit a CPU.
- MNIST (28 x 28) is not padded to 32 x 32: two levels (28 -> 14 -> 7) instead of Glow's three.
- Glow's top prior is a standard normal (the paper also learns it); the split priors are learned.
- MAF without its batch-norm layers; NAF uses the deep sigmoidal transformer (DSF) with a MADE conditioner,
  not the dense variant (DDSF); its inverse is bisection, one dimension at a time.
- Residual flows: LipSwish MLP blocks on 2D data only (no image model); the exact log-det (D backward passes)
  is used at evaluation when D <= 8, the Russian-roulette estimator when training.
- VAE posteriors: an MLP encoder/decoder on dynamically binarized MNIST (R&M and van den Berg used static
  binarization and, for Sylvester, gated conv nets); planar, radial and Sylvester parameters (R, R~, b) are
  amortized from the encoder as in both papers, but Sylvester's Q is one learned matrix per layer (the paper
  amortizes it too); IAF conditions on an encoder context h.
- MAF's log-scale and IAF's gate pre-activation are soft-clamped (tanh) so that far from the data the composed
  scales cannot overflow; ActNorm precedes each IAF layer on the toys (its sigma < 1 only contracts).
- Energy matching: U2-U4 of Table 1 are not normalizable along z1; a steep wall outside |z1| <= 4 (the plotted
  square) makes them proper, so KL(q || p) is reported for all four. Defaults K = 32 and 20000 steps with beta
  annealed over 10000 (the paper: 500000 steps).

Expected results: README.md's rows realnvp-* and maf-* (KL(data || model) on 8gaussians and two_moons),
realnvp-mnist and glow-mnist (the CPU recipes above, against the papers' 1.06 and 1.05 bits/dim after days on
GPUs) and vae-planar-bmnist have the measured figures with their commands (`python -m results.table list`).
"""

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import common


@dataclass
class Args:
    task: Literal["density", "energy", "images", "vae"] = "density"  # what to fit (see the docstring)
    flow: str = "realnvp"  # density: nice, realnvp, glow, maf, iaf, naf, residual; energy: planar, radial,
                           # sylvester; images: realnvp, glow; vae: none, planar, radial, sylvester, iaf
    dataset: str = ""  # default by task: 8gaussians, -, mnist, binarized_mnist
    target: Literal["u1", "u2", "u3", "u4"] = "u1"  # energy task: Rezende & Mohamed's Table 1 energy
    flow_length: int = 0  # layers K (0: by task: 8 for toys, 32 for energy, 8 for the VAE posterior); >= 0
    hidden: int = 0  # hidden units of the MLP nets (0: by task: 64 for toys, 400 for the VAE); >= 0
    levels: int = 2  # images: scales of the multi-scale architecture; >= 1
    depth: int = 8  # images: Glow steps (RealNVP: coupling layers) per level (Glow paper: 32); >= 1
    width: int = 64  # images: channels of the coupling nets (Glow paper: 512); >= 1
    sylvester: Literal["orthogonal", "householder", "triangular"] = "orthogonal"  # van den Berg et al.
                                                                                  # variant
    latent: int = 40  # vae: latent dimensions (Rezende & Mohamed: 40); >= 1
    prior: Literal["normal", "realnvp", "maf"] = "normal"  # vae: p(z), N(0, I) or a flow over it (the
                                                           # lecture's expressive prior)
    prior_length: int = 4  # vae with a flow prior: its coupling or MADE layers; >= 1
    steps: int = 0  # optimizer steps (0: by task: 10000 toys, 20000 energy, 10 epochs images and vae); >= 0
    batch_size: int = 0  # minibatch per process (0: by task: 512 toys, 100 energy, 64 images, 128 vae); >= 0
    lr: float = 1e-3  # Adam learning rate; > 0
    anneal: int = 10000  # energy task: steps over which beta rises from 0.01 to 1 (Rezende & Mohamed); >= 0
    eval_k: int = 1000  # vae: importance samples for the test NLL; >= 1
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test evaluations (0: only at the end); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/flows-<task>-<flow>-<dataset or target>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # density task: its modes in 15 s; other tasks: a smoke test of seconds
                         # (images: the CPU recipe last)


QUICK = dict(steps=200, eval_n=1000, eval_k=20, log_every=50, ckpt_every=200, hidden=32, flow_length=4,
             depth=2, width=16, levels=2)
QUICK_TOY = dict(steps=3000, eval_n=5000, log_every=500, ckpt_every=3000)
PRESETS = {"quick": lambda given: QUICK_TOY if given.get("task", Args.task) == "density" else QUICK}
DEFAULTS = {  # task -> (dataset, flow_length, hidden, steps (0: 10 epochs), batch_size)
    "density": ("8gaussians", 8, 64, 10000, 512),
    "energy": ("", 32, 0, 20000, 100),
    "images": ("mnist", 0, 0, 0, 64),
    "vae": ("binarized_mnist", 8, 400, 0, 128),
}
LOGIT_ALPHA = 1e-6  # logit transform of MAF (Papamakarios et al. 2017) for MNIST; RealNVP used 0.05


# ----------------------------------------------------------------------------------------------------------
# Base distribution and the Flow: a list of layers,
# each forward(x) -> (z, log_det), inverse(z) -> (x, log_det)
# ----------------------------------------------------------------------------------------------------------
def log_normal(z: torch.Tensor) -> torch.Tensor:
    # log N(z; 0, I), summed over all but the batch dimension: (B,)
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


class Flow(nn.Module):
    """x <-> z through layers; base N(0, I) over z of shape `base_shape`."""

    def __init__(self, layers: list[nn.Module], base_shape: tuple[int, ...]):
        super().__init__()
        self.layers, self.base_shape = nn.ModuleList(layers), tuple(base_shape)

    def forward(self, x: torch.Tensor):
        log_det = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: torch.Tensor):
        log_det = torch.zeros(len(z), device=z.device, dtype=z.dtype)
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z)
            log_det = log_det + ld
        return z, log_det

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        # change of variables: log p(x) = log N(f(x); 0, I) + log|det df/dx|
        z, log_det = self(x)
        return log_normal(z) + log_det

    def sample_with_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # x = f^-1(z), z ~ N(0, I): log q(x) = log N(z) - log|det dx/dz| (Rezende & Mohamed 2015, Eq. 6)
        p = next(self.parameters())  # z in the model's dtype and on its device
        z = torch.randn(n, *self.base_shape, device=p.device, dtype=p.dtype)
        x, log_det = self.inverse(z)
        return x, log_normal(z) - log_det


# ----------------------------------------------------------------------------------------------------------
# Determinant identities: planar, radial (Rezende & Mohamed 2015), Sylvester (van den Berg et al. 2018).
# The maps are written as functions of their parameters so a VAE can amortize them (one set per example);
# parameters broadcast against z (B, d). Each returns (f(z), log|det df/dz|).
# ----------------------------------------------------------------------------------------------------------
def planar_constrained_u(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Rezende & Mohamed 2015, Appendix A.1: u_hat = u + (m(w^T u) - w^T u) w / ||w||^2,
    # m(a) = -1 + softplus(a), so w^T u_hat >= -1 and f is invertible for tanh
    wu = (w * u).sum(-1, keepdim=True)
    return u + (-1 + F.softplus(wu) - wu) * w / w.pow(2).sum(-1, keepdim=True)


def planar_map(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    # Rezende & Mohamed 2015, Eq. 10: f(z) = z + u h(w^T z + b), h = tanh
    u = planar_constrained_u(u, w)
    a = (w * z).sum(-1, keepdim=True) + b  # (B, 1)
    # Eq. 11-12: psi(z) = h'(w^T z + b) w, |det df/dz| = |1 + u^T psi(z)|
    log_det = torch.log((1 + (1 - torch.tanh(a).pow(2)) * (w * u).sum(-1, keepdim=True)).abs() + 1e-12)
    return z + u * torch.tanh(a), log_det.squeeze(-1)


def radial_map(z: torch.Tensor, z0: torch.Tensor, log_alpha: torch.Tensor, beta: torch.Tensor):
    # Rezende & Mohamed 2015, Eq. 14: f(z) = z + beta h(alpha, r) (z - z0), h = 1 / (alpha + r), r = |z - z0|;
    # Appendix A.2: beta >= -alpha for invertibility, here beta = -alpha + softplus(beta_raw)
    alpha = log_alpha.exp()
    beta = -alpha + F.softplus(beta)
    diff = z - z0
    r = diff.norm(dim=-1, keepdim=True)
    h = 1 / (alpha + r)
    # det df/dz = [1 + beta h]^(d-1) [1 + beta h + beta h'(r) r], h'(r) = -1 / (alpha + r)^2
    d = z.shape[-1]
    log_det = (d - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * h.pow(2) * r)
    return z + beta * h * diff, log_det.squeeze(-1)


def bjorck_orthogonalize(q: torch.Tensor, steps: int = 30) -> torch.Tensor:
    # van den Berg et al. 2018, Sec. 3.1 (Bjorck & Bowie 1971): Q <- Q (I + 1/2 (I - Q^T Q)) converges to the
    # nearest matrix with orthonormal columns when ||Q^T Q - I||_2 < 1, which scaling by ||Q||_F ensures
    q = q / q.flatten(-2).norm(dim=-1)[..., None, None]
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    for _ in range(steps):
        q = q @ (eye + 0.5 * (eye - q.transpose(-1, -2) @ q))
    return q


def householder_product(v: torch.Tensor) -> torch.Tensor:
    # van den Berg et al. 2018, Sec. 3.2: Q = H_1 ... H_H, H = I - 2 v v^T / ||v||^2;
    # v (..., H, d) -> (..., d, d)
    d = v.shape[-1]
    q = torch.eye(d, device=v.device, dtype=v.dtype).expand(*v.shape[:-2], d, d)
    for i in range(v.shape[-2]):
        vi = v[..., i, :, None]  # (..., d, 1)
        q = q - 2 * (q @ vi) @ vi.transpose(-1, -2) / vi.pow(2).sum(-2, keepdim=True)
    return q


def _diag_embed_add(m: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    return m + torch.diag_embed(diag)


def sylvester_apply(z, q, r_upper, r_tilde_upper, r_diag, r_tilde_diag, b):
    """van den Berg et al. 2018, Eq. 13: f(z) = z + Q R h(R~ Q^T z + b), h = tanh.

    z (B, d); Q (B or 1, d, M) with orthonormal columns; r_upper, r_tilde_upper (.., M, M) whose strictly
    upper parts are used; r_diag, r_tilde_diag (.., M) raw diagonals, squashed by tanh so r_ii r~_ii > -1
    (Sec. 3.3: with h = tanh, h' in (0, 1], every factor 1 + h' r_ii r~_ii of the determinant stays
    positive); b (.., M).
    """
    r = _diag_embed_add(torch.triu(r_upper, diagonal=1), torch.tanh(r_diag))
    r_tilde = _diag_embed_add(torch.triu(r_tilde_upper, diagonal=1), torch.tanh(r_tilde_diag))
    a = (r_tilde @ (q.transpose(-1, -2) @ z[..., None])).squeeze(-1) + b  # (B, M): R~ Q^T z + b
    f = z + (q @ (r @ torch.tanh(a)[..., None])).squeeze(-1)
    # Theorem 2 (Sylvester's determinant identity): det(I_d + Q R diag(h') R~ Q^T) = det(I_M + diag(h') R~ R)
    # and R~ R is upper triangular, so log|det| = sum_i log|1 + h'(a_i) r~_ii r_ii|
    h_prime = 1 - torch.tanh(a).pow(2)
    log_det = torch.log((1 + h_prime * torch.tanh(r_diag) * torch.tanh(r_tilde_diag)).abs()).sum(-1)
    return f, log_det


class Planar(nn.Module):
    """One planar layer with its own parameters; `inverse` is the paper's f (generative direction)."""

    def __init__(self, dim: int):
        super().__init__()
        self.u, self.w = nn.Parameter(torch.randn(dim) * 0.1), nn.Parameter(torch.randn(dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(1))

    def inverse(self, z: torch.Tensor):
        return planar_map(z, self.u, self.w, self.b)

    def forward(self, x: torch.Tensor, iters: int = 100):
        # solve x = z + u_hat tanh(w^T z + b) for z: with a = w^T z + b, w^T x + b = a + w^T u_hat tanh(a), a
        # scalar equation that is strictly increasing in a (w^T u_hat >= -1), solved by bisection
        u = planar_constrained_u(self.u, self.w)
        c, wu = (self.w * x).sum(-1) + self.b, (self.w * u).sum()
        lo, hi = c - wu.abs() - 1, c + wu.abs() + 1  # a + wu tanh(a) - c changes sign in [lo, hi]
        for _ in range(iters):
            mid = (lo + hi) / 2
            below = mid + wu * torch.tanh(mid) < c
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        a = ((lo + hi) / 2)[:, None]
        z = x - u * torch.tanh(a)
        return z, -planar_map(z, self.u, self.w, self.b)[1]


class Radial(nn.Module):
    """One radial layer; `inverse` is the paper's f, `forward` its closed-form inverse."""

    def __init__(self, dim: int):
        super().__init__()
        self.z0 = nn.Parameter(torch.randn(dim) * 0.5)
        self.log_alpha, self.beta = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def inverse(self, z: torch.Tensor):
        return radial_map(z, self.z0, self.log_alpha, self.beta)

    def forward(self, x: torch.Tensor):
        # f maps the ray z0 + r e to z0 + r (1 + beta / (alpha + r)) e: given r' = |x - z0|, r solves
        # r^2 + (alpha + beta - r') r - alpha r' = 0 (the positive root)
        alpha = self.log_alpha.exp()
        beta = -alpha + F.softplus(self.beta)
        diff = x - self.z0
        r_out = diff.norm(dim=-1, keepdim=True)
        p = alpha + beta - r_out
        r = (-p + torch.sqrt(p.pow(2) + 4 * alpha * r_out)) / 2
        z = self.z0 + diff * r / r_out.clamp(min=1e-30)
        return z, -radial_map(z, self.z0, self.log_alpha, self.beta)[1]


class SylvesterQ(nn.Module):
    """The Q of a Sylvester layer, (d, M) with orthonormal columns. orthogonal: Bjorck iterations on a free
    (d, M) matrix; householder: the product of `reflections` Householder matrices (M = d); triangular: the
    identity or the reversal permutation (M = d), alternating between layers as in the paper."""

    def __init__(self, dim: int, kind: str = "orthogonal", m: int | None = None, reflections: int = 4,
                 reverse: bool = False):
        super().__init__()
        self.kind, self.m = kind, (m or dim) if kind == "orthogonal" else dim
        if kind == "orthogonal":
            self.q = nn.Parameter(torch.randn(dim, self.m))
        elif kind == "householder":
            self.v = nn.Parameter(torch.randn(reflections, dim))
        elif kind == "triangular":
            perm = torch.arange(dim - 1, -1, -1) if reverse else torch.arange(dim)
            self.register_buffer("perm", torch.eye(dim)[:, perm])
        else:
            raise ValueError(f"unknown Sylvester variant {kind!r}")

    def forward(self) -> torch.Tensor:
        if self.kind == "orthogonal":
            return bjorck_orthogonalize(self.q)
        if self.kind == "householder":
            return householder_product(self.v)
        return self.perm


class Sylvester(nn.Module):
    """One Sylvester layer with its own parameters, generative direction only (`inverse` is the paper's f)."""

    def __init__(self, dim: int, kind: str = "orthogonal", m: int | None = None, reflections: int = 4,
                 reverse: bool = False):
        super().__init__()
        self.q = SylvesterQ(dim, kind, m, reflections, reverse)
        m = self.q.m
        self.r, self.r_tilde = nn.Parameter(torch.randn(m, m) * 0.1), nn.Parameter(torch.randn(m, m) * 0.1)
        self.r_diag, self.r_tilde_diag = nn.Parameter(torch.randn(m)), nn.Parameter(torch.randn(m))
        self.b = nn.Parameter(torch.zeros(m))

    def inverse(self, z: torch.Tensor):
        return sylvester_apply(z, self.q(), self.r, self.r_tilde, self.r_diag, self.r_tilde_diag, self.b)

    def forward(self, x: torch.Tensor):
        raise NotImplementedError("Sylvester flows have no closed-form inverse; use them in the generative "
                                  "direction (energy matching, VAE posteriors)")


# ----------------------------------------------------------------------------------------------------------
# Coupling: NICE (additive coupling, scaling), RealNVP (affine coupling, masks, squeeze, multi-scale), Glow
# (actnorm, invertible 1x1 convolution, affine coupling, split with a learned prior). Layers take vectors
# (B, D) or images (B, C, H, W); dimension 1 is the channel.
# ----------------------------------------------------------------------------------------------------------
def mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def conv_net(c_in: int, width: int, c_out: int) -> nn.Sequential:
    """The coupling network for images: 3x3, 1x1, 3x3 convolutions; the last starts at zero (Glow, Sec. 3.3)
    so every coupling starts as the identity."""
    return zero_last(nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 1), nn.ReLU(),
                                   nn.Conv2d(width, c_out, 3, padding=1)))


def zero_last(net: nn.Sequential) -> nn.Sequential:
    nn.init.zeros_(net[-1].weight), nn.init.zeros_(net[-1].bias)
    return net


def alternating_mask(dim: int, parity: int) -> torch.Tensor:
    # vectors: keep every other coordinate (for D = 2: one keeps x_1, the next x_2)
    return (torch.arange(dim) % 2 == parity).float()


def checkerboard_mask(shape: tuple[int, int, int], parity: int) -> torch.Tensor:
    # Dinh et al. 2017, Fig. 3 (left): b_ij = 1 where i + j is even (parity 0)
    c, h, w = shape
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((i + j) % 2 == parity).float().expand(c, h, w).clone()


def channel_mask(shape: tuple[int, int, int], parity: int) -> torch.Tensor:
    # Dinh et al. 2017, Fig. 3 (right): the first half of the channels (parity 0) or the second
    c, h, w = shape
    mask = torch.zeros(c, h, w)
    mask[: c // 2] = 1
    return mask if parity == 0 else 1 - mask


class Coupling(nn.Module):
    """Masked coupling, x_a = b * x is kept and conditions the rest.

    additive (NICE, Dinh et al. 2014, Eq. 5): z = x_a + (1 - b) * (x + m(x_a)), log_det = 0.
    affine (RealNVP, Dinh et al. 2017, Eq. 9): z = x_a + (1 - b) * (x * exp(s(x_a)) + t(x_a)),
    log_det = sum (1 - b) * s(x_a); s = scale * tanh(.), a bounded log-scale as in the authors' code.
    """

    def __init__(self, mask: torch.Tensor, net: nn.Module, affine: bool = True):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net, self.affine = net, affine
        self.scale = nn.Parameter(torch.ones(1)) if affine else None

    def _s_t(self, x_a: torch.Tensor):
        h = self.net(x_a)
        if not self.affine:
            return torch.zeros_like(h), h
        s, t = h.chunk(2, dim=1)
        return self.scale * torch.tanh(s) * (1 - self.mask), t * (1 - self.mask)

    def forward(self, x: torch.Tensor):
        x_a = x * self.mask
        s, t = self._s_t(x_a)
        return x_a + (1 - self.mask) * (x * s.exp() + t), sum_except_batch(s)

    def inverse(self, z: torch.Tensor):
        z_a = z * self.mask
        s, t = self._s_t(z_a)
        return z_a + (1 - self.mask) * (z - t) * torch.exp(-s), -sum_except_batch(s)


class Scaling(nn.Module):
    # Dinh et al. 2014, Sec. 3.3: a final diagonal scaling z = exp(s) * x, log_det = sum s
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor):
        return x * self.s.exp(), self.s.sum().expand(len(x))

    def inverse(self, z: torch.Tensor):
        return z * torch.exp(-self.s), -self.s.sum().expand(len(z))


class Squeeze(nn.Module):
    # Dinh et al. 2017, Sec. 3.6: (C, H, W) -> (4C, H/2, W/2), each 2x2 block into channels; log_det = 0
    def forward(self, x: torch.Tensor):
        zero = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        return rearrange(x, "b c (h i) (w j) -> b (c i j) h w", i=2, j=2), zero

    def inverse(self, z: torch.Tensor):
        zero = torch.zeros(len(z), device=z.device, dtype=z.dtype)
        return rearrange(z, "b (c i j) h w -> b c (h i) (w j)", i=2, j=2), zero


class Reverse(nn.Module):
    # reverse the order of the channels (or of the coordinates of a vector): a permutation, log_det = 0
    def forward(self, x: torch.Tensor):
        return x.flip(1), torch.zeros(len(x), device=x.device, dtype=x.dtype)

    def inverse(self, z: torch.Tensor):
        return z.flip(1), torch.zeros(len(z), device=z.device, dtype=z.dtype)


class Logit(nn.Module):
    # Dinh et al. 2017, Sec. 4.1: y = logit(alpha + (1 - 2 alpha) x) maps dequantized x in [0, 1] to R;
    # log_det = sum log(1 - 2 alpha) - log p - log(1 - p), p = alpha + (1 - 2 alpha) x
    def __init__(self, alpha: float = LOGIT_ALPHA):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor):
        p = self.alpha + (1 - 2 * self.alpha) * x
        log_det = math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)
        return torch.log(p) - torch.log1p(-p), sum_except_batch(log_det)

    def inverse(self, z: torch.Tensor):
        p = torch.sigmoid(z)
        log_det = F.logsigmoid(z) + F.logsigmoid(-z) - math.log(1 - 2 * self.alpha)
        return (p - self.alpha) / (1 - 2 * self.alpha), sum_except_batch(log_det)


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))  # (C,) -> (1, C) or (1, C, 1, 1)


class ActNorm(nn.Module):
    """Kingma & Dhariwal 2018, Sec. 3.1: z = (x + bias) * exp(logs) per channel, log_det = H W sum logs.

    Data-dependent initialization: the first training batch sets bias = -mean, logs = -log std per channel, so
    the first outputs have zero mean and unit variance. `initialized` is a buffer, so a resumed run keeps it.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias, self.logs = nn.Parameter(torch.zeros(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x_c = x.transpose(0, 1).flatten(1)  # (C, B * H * W)
        self.bias.copy_(-x_c.mean(1))
        self.logs.copy_(-torch.log(x_c.std(1) + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor):
        # the buffer is read (a host sync on a GPU) only until the first training step has seen it set
        if self.training and not getattr(self, "_seen_initialized", False):
            if not self.initialized:
                self.initialize(x)
            self._seen_initialized = True
        pixels = x[0, 0].numel()  # H * W, or 1 for vectors
        z = (x + _channel_view(self.bias, x)) * _channel_view(self.logs.exp(), x)
        return z, (pixels * self.logs.sum()).expand(len(x))

    def inverse(self, z: torch.Tensor):
        pixels = z[0, 0].numel()
        x = z * _channel_view(torch.exp(-self.logs), z) - _channel_view(self.bias, z)
        return x, (-pixels * self.logs.sum()).expand(len(z))


class InvConv1x1(nn.Module):
    """Kingma & Dhariwal 2018, Sec. 3.2: z = W x over channels at every pixel, log_det = H W log|det W|.

    lu=True (Eq. 10): W = P L (U + diag(sign(s) exp(log|s|))), P a fixed permutation, L unit lower triangular,
    U strictly upper triangular, so log|det W| = sum log|s| costs O(C). W starts as a random rotation.
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        self.lu = lu
        if lu:
            p, l, u = torch.linalg.lu(w)
            s = torch.diagonal(u)
            self.register_buffer("p", p)
            self.register_buffer("sign_s", torch.sign(s))
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
            self.l, self.u = nn.Parameter(l), nn.Parameter(torch.triu(u, 1))
            self.log_s = nn.Parameter(s.abs().log())
        else:
            self.weight = nn.Parameter(w)

    def weight_and_logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        eye = torch.eye(len(self.log_s), device=self.log_s.device, dtype=self.log_s.dtype)
        lower = self.l * self.lower_mask + eye
        upper = self.u * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.p @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor):
        w, log_abs_det = self.weight_and_logdet()
        return torch.einsum("ij,bj...->bi...", w, x), (x[0, 0].numel() * log_abs_det).expand(len(x))

    def inverse(self, z: torch.Tensor):
        w, log_abs_det = self.weight_and_logdet()
        return (torch.einsum("ij,bj...->bi...", torch.linalg.inv(w), z),
                (-z[0, 0].numel() * log_abs_det).expand(len(z)))


def split_half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the first floor(C/2) channels (or coordinates) and the other ceil(C/2): the split the nets are built for
    # (x.chunk(2, 1) would give the first half ceil(C/2) when C is odd)
    c = x.shape[1]
    return x[:, : c // 2], x[:, c // 2 :]


class GlowCoupling(nn.Module):
    """Kingma & Dhariwal 2018, Table 1: x_a, x_b = split(x); (log s, t) = NN(x_a); s = sigmoid(log s + 2);
    z_b = (x_b + t) * s; z = concat(x_a, z_b); log_det = sum log s. The +2 and the sigmoid follow the code.
    x_a has floor(C/2) channels and x_b ceil(C/2), so NN maps C // 2 channels to 2 (C - C // 2)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def _log_s_t(self, x_a: torch.Tensor):
        h = self.net(x_a)
        return F.logsigmoid(h[:, 0::2] + 2.0), h[:, 1::2]

    def forward(self, x: torch.Tensor):
        x_a, x_b = split_half(x)  # (B, C // 2, ...), (B, C - C // 2, ...)
        log_s, t = self._log_s_t(x_a)
        return torch.cat([x_a, (x_b + t) * log_s.exp()], 1), sum_except_batch(log_s)

    def inverse(self, z: torch.Tensor):
        z_a, z_b = split_half(z)
        log_s, t = self._log_s_t(z_a)
        return torch.cat([z_a, z_b * torch.exp(-log_s) - t], 1), -sum_except_batch(log_s)


class MultiScale(nn.Module):
    """Dinh et al. 2017, Sec. 3.6: run `layers`, then factor out half of the channels and hand the other half
    to the next scale (`inner`). Returns z flattened, (B, D): the inner scale's z, then the factored-out part.

    prior (Glow's split, Kingma & Dhariwal 2018): a zero-initialized conv of the kept half h_1 gives mean and
    log-std of the factored half h_2, p(h_2 | h_1) = N(mean, exp(log_std)^2). Written as the bijection
    eps = (h_2 - mean) * exp(-log_std) with log_det = -sum log_std, it is one more layer over a N(0, I) base.
    RealNVP factors out with a standard normal prior (prior=None).
    """

    def __init__(self, layers: list[nn.Module], out_shape: tuple[int, int, int], inner: "MultiScale | None",
                 prior: nn.Module | None = None):
        super().__init__()
        self.layers, self.out_shape = nn.ModuleList(layers), tuple(out_shape)
        self.inner, self.prior = inner, prior

    def forward(self, x: torch.Tensor):
        log_det = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x, ld = layer(x)
            log_det = log_det + ld
        if self.inner is None:
            return x.flatten(1), log_det
        h_1, h_2 = split_half(x)  # the inner scale takes C // 2 channels
        z_1, ld = self.inner(h_1)
        if self.prior is not None:
            mean, log_std = self.prior(h_1).chunk(2, dim=1)
            h_2 = (h_2 - mean) * torch.exp(-log_std)
            ld = ld - sum_except_batch(log_std)
        return torch.cat([z_1, h_2.flatten(1)], 1), log_det + ld

    def inverse(self, z: torch.Tensor):
        if self.inner is None:
            x, log_det = z.view(len(z), *self.out_shape), torch.zeros(len(z), device=z.device, dtype=z.dtype)
        else:
            c, h, w = self.out_shape
            n_2 = (c - c // 2) * h * w
            h_1, log_det = self.inner.inverse(z[:, :-n_2])
            h_2 = z[:, -n_2:].view(len(z), c - c // 2, h, w)
            if self.prior is not None:
                mean, log_std = self.prior(h_1).chunk(2, dim=1)
                h_2 = mean + log_std.exp() * h_2
                log_det = log_det + sum_except_batch(log_std)
            x = torch.cat([h_1, h_2], 1)
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            log_det = log_det + ld
        return x, log_det


def realnvp_images(shape: tuple[int, int, int], levels: int, depth: int, width: int) -> MultiScale:
    """Dinh et al. 2017, Sec. 4.1: per scale, 3 checkerboard couplings, squeeze, 3 channel couplings, factor
    out half; the last scale 4 checkerboard couplings. `depth` replaces the 3 (and 4 = depth + 1)."""
    c, h, w = shape
    if levels == 1:
        layers = [Coupling(checkerboard_mask(shape, i % 2), conv_net(c, width, 2 * c))
                  for i in range(depth + 1)]
        return MultiScale(layers, shape, None)
    layers = [Coupling(checkerboard_mask(shape, i % 2), conv_net(c, width, 2 * c)) for i in range(depth)]
    squeezed = (4 * c, h // 2, w // 2)
    layers += [Squeeze()]
    layers += [Coupling(channel_mask(squeezed, i % 2), conv_net(4 * c, width, 8 * c)) for i in range(depth)]
    inner = realnvp_images((2 * c, h // 2, w // 2), levels - 1, depth, width)
    return MultiScale(layers, squeezed, inner)


def glow_images(shape: tuple[int, int, int], levels: int, depth: int, width: int,
                lu: bool = True) -> MultiScale:
    """Kingma & Dhariwal 2018, Fig. 2: per level, squeeze, `depth` steps of flow (actnorm, invertible 1x1
    conv, affine coupling), then split with a learned prior (all levels but the last)."""
    c, h, w = shape
    c = 4 * c
    layers = [Squeeze()]
    for _ in range(depth):
        layers += [ActNorm(c), InvConv1x1(c, lu), GlowCoupling(conv_net(c // 2, width, 2 * (c - c // 2)))]
    if levels == 1:
        return MultiScale(layers, (c, h // 2, w // 2), None)
    # the split prior: one zero-initialized 3x3 conv of h_1 (Glow's Conv2dZeros), starting at N(0, I)
    prior = zero_last(nn.Sequential(nn.Conv2d(c // 2, 2 * (c - c // 2), 3, padding=1)))
    inner = glow_images((c // 2, h // 2, w // 2), levels - 1, depth, width, lu)
    return MultiScale(layers, (c, h // 2, w // 2), inner, prior)


# ----------------------------------------------------------------------------------------------------------
# Autoregressive: MADE masks, MAF, IAF, NAF (deep sigmoidal transformer). Vectors (B, D) only; a `Reverse`
# between layers alternates the order, as in MAF and IAF.
# ----------------------------------------------------------------------------------------------------------
class MaskedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Germain et al. 2015: an MLP whose output d depends only on inputs 1..d-1, by masking its weights.

    Degrees (Sec. 4): inputs m(d) = d; hidden units m(k) in 1..D-1 (here cycled, k mod (D-1) + 1, so the
    masks are deterministic); Eq. 12: hidden mask M[k, j] = 1[m_l(k) >= m_{l-1}(j)]; Eq. 13: output mask
    M[d, k] = 1[d > m_L(k)]. Returns (B, P, D): P numbers per dimension. An optional context (IAF's h) enters
    the first hidden layer unmasked, so every output may depend on it.
    """

    def __init__(self, dim: int, hidden: int, params_per_dim: int, layers: int = 2, context: int = 0):
        super().__init__()
        self.dim, self.params_per_dim = dim, params_per_dim
        m_in = torch.arange(1, dim + 1)
        m_hidden = torch.arange(hidden) % max(dim - 1, 1) + 1
        sizes, masks, m_prev = [dim] + [hidden] * layers, [], m_in
        for _ in range(layers):
            masks.append((m_hidden[:, None] >= m_prev[None, :]).float())
            m_prev = m_hidden
        out_mask = (m_in[:, None] > m_prev[None, :]).float().repeat(params_per_dim, 1)  # (P * D, hidden)
        self.hidden = nn.ModuleList(MaskedLinear(a, b, m) for a, b, m in zip(sizes[:-1], sizes[1:], masks))
        self.out = MaskedLinear(hidden, params_per_dim * dim, out_mask)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)  # every layer starts as the identity
        self.context = nn.Linear(context, hidden) if context else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden[0](x)
        if self.context is not None:
            h = h + self.context(context)
        for layer in self.hidden[1:]:
            h = layer(F.relu(h))
        return self.out(F.relu(h)).view(len(x), self.params_per_dim, self.dim)


class MAF(nn.Module):
    """Papamakarios et al. 2017, Sec. 3.1: x_i = u_i exp(alpha_i) + mu_i with (mu_i, alpha_i) = f(x_{1:i-1}).

    forward (density, one pass): u = (x - mu(x)) * exp(-alpha(x)), log_det = -sum alpha (Eq. 5);
    inverse (sampling): D passes, the i-th fixing x_i.
    """

    def __init__(self, dim: int, hidden: int, context: int = 0, max_log_scale: float = 3.0):
        super().__init__()
        self.made, self.max_log_scale = MADE(dim, hidden, 2, context=context), max_log_scale

    def _mu_alpha(self, x, context):
        # alpha soft-clamped to (-3, 3): unbounded, exp(-alpha) compounds over layers and overflows far from
        # the data (not in the paper, whose batch norm plays a similar role)
        mu, alpha = self.made(x, context).unbind(1)
        return mu, self.max_log_scale * torch.tanh(alpha / self.max_log_scale)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        mu, alpha = self._mu_alpha(x, context)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(1)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        x = torch.zeros_like(z)
        for _ in range(z.shape[1]):  # after pass i, x_1..x_i are exact
            mu, alpha = self._mu_alpha(x, context)
            x = z * alpha.exp() + mu
        return x, alpha.sum(1)


class IAF(nn.Module):
    """Kingma et al. 2016, Eq. 10-14: MAF with the directions swapped, so sampling is one parallel pass.

    inverse (sampling, parallel): (m, s) = MADE(z, h), sigma = sigmoid(s), x = sigma * z + (1 - sigma) * m,
    log_det = sum log sigma (Eq. 14); forward (density): D sequential passes.
    """

    def __init__(self, dim: int, hidden: int, context: int = 0, forget_bias: float = 1.0, max_s: float = 5.0):
        super().__init__()
        self.made, self.forget_bias, self.max_s = MADE(dim, hidden, 2, context=context), forget_bias, max_s

    def _m_log_sigma(self, z, context):
        m, s = self.made(z, context).unbind(1)
        # soft-clamped so 1 / sigma cannot overflow (not in the paper)
        s = self.max_s * torch.tanh(s / self.max_s)
        return m, F.logsigmoid(s + self.forget_bias)  # the bias starts sigma near 1 (Sec. 4 of the paper)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        m, log_sigma = self._m_log_sigma(z, context)
        sigma = log_sigma.exp()
        return sigma * z + (1 - sigma) * m, log_sigma.sum(1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        z = torch.zeros_like(x)
        for _ in range(x.shape[1]):
            m, log_sigma = self._m_log_sigma(z, context)
            z = (x - (1 - log_sigma.exp()) * m) * torch.exp(-log_sigma)
        return z, -log_sigma.sum(1)


def dsf_transform(x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Huang et al. 2018, Eq. 8 (deep sigmoidal flow): y = sigmoid^-1(w^T sigmoid(a x + b)), a > 0, w on the
    simplex, so y is strictly increasing in x. x (B, D); params (B, 3K, D) -> y (B, D), log dy/dx (B, D).

    All in log space: log s = logsumexp(log w + log sigmoid(u)),
    log(1 - s) = logsumexp(log w + log sigmoid(-u)), u = a x + b; y = log s - log(1 - s);
    dy/dx = sum_j w_j a_j sigmoid'(u_j) / (s (1 - s)).
    """
    a_raw, b, w_raw = params.chunk(3, dim=1)  # (B, K, D) each
    log_a = torch.log(F.softplus(a_raw) + 1e-3)
    log_w = torch.log_softmax(w_raw, dim=1)
    u = log_a.exp() * x[:, None] + b
    log_s = torch.logsumexp(log_w + F.logsigmoid(u), 1)
    log_1ms = torch.logsumexp(log_w + F.logsigmoid(-u), 1)
    log_dy = torch.logsumexp(log_w + log_a + F.logsigmoid(u) + F.logsigmoid(-u), 1) - log_s - log_1ms
    return log_s - log_1ms, log_dy


class NAF(nn.Module):
    """Huang et al. 2018: an autoregressive flow whose transformer is the DSF network above, its parameters
    (K sigmoid units per dimension) given by a MADE conditioner. forward is one pass; inverse bisects one
    dimension at a time (the transformer is monotone)."""

    def __init__(self, dim: int, hidden: int, units: int = 16):
        super().__init__()
        self.made = MADE(dim, hidden, 3 * units)
        nn.init.normal_(self.made.out.bias, std=0.1)  # break the symmetry between the K sigmoid units

    def forward(self, x: torch.Tensor):
        z, log_dz = dsf_transform(x, self.made(x))
        return z, log_dz.sum(1)

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, iters: int = 60, bound: float = 1e3):
        x = torch.zeros_like(z)
        for i in range(z.shape[1]):
            params = self.made(x)[..., i : i + 1]  # depends on x_1..x_{i-1} only
            lo, hi = torch.full_like(z[:, i : i + 1], -bound), torch.full_like(z[:, i : i + 1], bound)
            for _ in range(iters):
                mid = (lo + hi) / 2
                below = dsf_transform(mid, params)[0] < z[:, i : i + 1]
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            x[:, i] = ((lo + hi) / 2)[:, 0]
        return x, -self(x)[1]


# ----------------------------------------------------------------------------------------------------------
# Free-form: invertible residual flows z = x + g(x), Lip(g) < 1 (Behrmann et al. 2019; Chen et al. 2019)
# ----------------------------------------------------------------------------------------------------------
class SpectralLinear(nn.Linear):
    """Behrmann et al. 2019, Sec. 3 (Eq. 4 and Algorithm 1 of their appendix): W~ = W / max(1, sigma / c),
    sigma the largest singular value of W estimated by power iteration (one step per training forward, the
    vectors kept as buffers), so Lip(x -> W~ x) <= c."""

    def __init__(self, n_in: int, n_out: int, coeff: float = 0.97, init_iters: int = 50):
        super().__init__(n_in, n_out)
        self.coeff = coeff
        self.register_buffer("u", F.normalize(torch.randn(n_out), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(n_in), dim=0))
        self.power_iteration(init_iters)

    @torch.no_grad()
    def power_iteration(self, iters: int) -> None:
        for _ in range(iters):
            self.v.copy_(F.normalize(self.weight.T @ self.u, dim=0))
            self.u.copy_(F.normalize(self.weight @ self.v, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.power_iteration(1)
        sigma = self.u @ self.weight @ self.v
        return F.linear(x, self.weight / torch.clamp(sigma / self.coeff, min=1.0), self.bias)


class LipSwish(nn.Module):
    # Chen et al. 2019, Sec. 5: LipSwish(x) = x sigmoid(beta x) / 1.1, 1-Lipschitz for beta > 0
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(0.5413))  # softplus^-1(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(F.softplus(self.beta) * x) / 1.1


def batch_jacobian(y: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """dy/dx for y = g(x) computed row by row, each row of example b depending only on x_b: (B, D, D)."""
    rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
            for i in range(y.shape[1])]
    return torch.stack(rows, 1)


class ResidualBlock(nn.Module):
    """z = x + g(x), g an MLP of spectral-normalized linear layers and LipSwish, so Lip(g) <= c^3 < 1.

    log_det = log det(I + J_g) = sum_k (-1)^(k+1) / k tr(J_g^k) (Behrmann et al. 2019, Eq. 6). Training uses
    the Russian-roulette estimator (Chen et al. 2019, Eq. 6): with N = n_exact + Geometric(p) terms and
    v ~ N(0, I), sum_{k=1}^N (-1)^(k+1) / k v^T J^k v / P(N >= k) is unbiased; its gradient is the Neumann
    series (Eq. 8): grad log det = E[(sum_{k=0}^N (-1)^k / P(N >= k) v^T J^k) (grad J) v], obtained by
    differentiating w^T J v with w held fixed, so the power series itself is never backpropagated.
    exact=True (or evaluation with D <= 8) computes log det(I + J_g) from the full Jacobian (D passes).
    """

    def __init__(self, dim: int, hidden: int, coeff: float = 0.97, n_exact: int = 2, p: float = 0.5):
        super().__init__()
        self.g = nn.Sequential(SpectralLinear(dim, hidden, coeff), LipSwish(),
                               SpectralLinear(hidden, hidden, coeff), LipSwish(),
                               SpectralLinear(hidden, dim, coeff))
        self.n_exact, self.p, self.exact = n_exact, p, False

    def prob_at_least(self, k: int) -> float:
        # P(N >= k) for N = n_exact + K, K ~ Geometric(p) counting failures: (1 - p)^max(0, k - n_exact)
        return (1 - self.p) ** max(0, k - self.n_exact)

    def log_det_estimate(self, x: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
        n = self.n_exact + int(torch.distributions.Geometric(probs=torch.tensor(self.p)).sample())
        v = torch.randn_like(x)
        w, estimate, neumann = v, 0.0, v  # w = v^T J^k; the k = 0 Neumann term is v^T J^0 = v
        for k in range(1, n + 1):
            w = torch.autograd.grad(gx, x, w, retain_graph=True)[0]  # v^T J^k (a vector-Jacobian product)
            estimate = estimate + (-1) ** (k + 1) / k * (w * v).sum(1) / self.prob_at_least(k)
            neumann = neumann + (-1) ** k / self.prob_at_least(k) * w
        if not torch.is_grad_enabled() or not (x.requires_grad and gx.requires_grad):
            return estimate.detach()
        w_j = torch.autograd.grad(gx, x, neumann.detach(), create_graph=True)[0]  # neumann^T J, in the graph
        surrogate = (w_j * v).sum(1)
        return estimate.detach() + surrogate - surrogate.detach()

    def log_det_exact(self, x: torch.Tensor, gx: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
        jac = batch_jacobian(gx, x, create_graph=create_graph)
        return torch.linalg.slogdet(torch.eye(x.shape[1], device=x.device, dtype=x.dtype) + jac)[1]

    def forward(self, x: torch.Tensor):
        grad_wanted = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_()
            gx = self.g(x)
            exact = self.exact or (not self.training and x.shape[1] <= 8)
            log_det = self.log_det_exact(x, gx, grad_wanted) if exact else self.log_det_estimate(x, gx)
        z = x + gx
        return (z, log_det) if grad_wanted else (z.detach(), log_det.detach())

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, iters: int = 500, tol: float = 1e-10):
        # Behrmann et al. 2019, Algorithm 1: the fixed point x = z - g(x), a contraction since Lip(g) < 1
        x = z.clone()
        for i in range(iters):
            x_next = z - self.g(x)
            if i % 10 == 9 and (x_next - x).abs().max() < tol:
                x = x_next
                break
            x = x_next
        return x, -self(x)[1]


# ----------------------------------------------------------------------------------------------------------
# Models of the four tasks
# ----------------------------------------------------------------------------------------------------------
TOY_FLOWS = ("nice", "realnvp", "glow", "maf", "iaf", "naf", "residual")
ENERGY_FLOWS = ("planar", "radial", "sylvester")
IMAGE_FLOWS = ("realnvp", "glow")
VAE_FLOWS = ("none", "planar", "radial", "sylvester", "iaf")


def toy_flow(kind: str, dim: int, length: int, hidden: int) -> Flow:
    """`length` layers of one family over R^dim, for density estimation."""
    layers = []
    for i in range(length):
        if kind == "nice":
            layers.append(Coupling(alternating_mask(dim, i % 2),
                                   zero_last(mlp([dim, hidden, hidden, dim])), False))
        elif kind == "realnvp":
            layers.append(Coupling(alternating_mask(dim, i % 2),
                                   zero_last(mlp([dim, hidden, hidden, 2 * dim]))))
        elif kind == "glow":
            half = dim // 2
            layers += [ActNorm(dim), InvConv1x1(dim),
                       GlowCoupling(zero_last(mlp([half, hidden, hidden, 2 * (dim - half)])))]
        elif kind in ("maf", "naf"):
            layers += [{"maf": MAF, "naf": NAF}[kind](dim, hidden), Reverse()]
        elif kind == "iaf":  # IAF's sigma in (0, 1) only contracts when sampling: actnorm supplies the scale
            layers += [ActNorm(dim), IAF(dim, hidden), Reverse()]
        elif kind == "residual":
            layers += [ActNorm(dim), ResidualBlock(dim, hidden)]
        else:
            raise ValueError(f"{kind} is not a density-estimation flow; choose from {', '.join(TOY_FLOWS)}")
    if kind == "nice":
        layers.append(Scaling((dim,)))  # Dinh et al. 2014, Sec. 3.3: the diagonal scaling comes last
    return Flow(layers, (dim,))


def energy_flow(kind: str, length: int, sylvester: str = "orthogonal") -> Flow:
    """Rezende & Mohamed 2015, Sec. 6.1: K planar or radial layers over N(0, I) in 2D (or Sylvester ones)."""
    layer = {"planar": lambda i: Planar(2), "radial": lambda i: Radial(2),
             "sylvester": lambda i: Sylvester(2, sylvester, reverse=bool(i % 2))}[kind]
    return Flow([layer(i) for i in range(length)], (2,))


def image_flow(kind: str, shape: tuple[int, int, int], levels: int, depth: int, width: int) -> Flow:
    """The logit transform, then the multi-scale RealNVP or Glow; z is the flattened concatenation."""
    c, h, w = shape
    if h % 2 ** levels or w % 2 ** levels:
        raise ValueError(f"images of {h} x {w} cannot be squeezed {levels} times: use fewer levels")
    build = realnvp_images if kind == "realnvp" else glow_images
    return Flow([Logit(), build(shape, levels, depth, width)], (math.prod(shape),))


# Rezende & Mohamed 2015, Table 1: the four unnormalized 2D densities p(z) ~ exp(-U(z))
def _w1(z):
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """U(z) of Table 1. U2-U4 do not decay along z1 (exp(-U) has infinite mass, and U3 and U4 are lowest for
    large |z1|, where their two bands merge), so here they get a steep wall outside the plotted square
    |z1| <= 4, 0.5 ((|z1| - 4)_+ / 0.1)^2: all four are then proper densities with a log Z by quadrature
    (not in the paper)."""
    z1, z2 = z[:, 0], z[:, 1]
    if name == "u1":
        ring = 0.5 * ((z.norm(dim=1) - 2) / 0.4) ** 2
        return ring - torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
    wall = 0.5 * (F.relu(z1.abs() - 4) / 0.1) ** 2
    if name == "u2":
        return 0.5 * ((z2 - _w1(z)) / 0.4) ** 2 + wall
    if name == "u3":
        w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
        return -torch.logaddexp(-0.5 * ((z2 - _w1(z)) / 0.35) ** 2,
                                -0.5 * ((z2 - _w1(z) + w2) / 0.35) ** 2) + wall
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    return -torch.logaddexp(-0.5 * ((z2 - _w1(z)) / 0.4) ** 2, -0.5 * ((z2 - _w1(z) + w3) / 0.35) ** 2) + wall


class FlowVAE(nn.Module):
    """Rezende & Mohamed 2015, Sec. 4.2: q(z|x) = a Gaussian N(mu(x), sigma(x)^2) pushed through K flow
    layers, log q_K(z_K|x) = log q_0(z_0|x) - sum_k log|det dz_k/dz_{k-1}| (Eq. 13). The encoder also outputs
    every flow parameter (planar u, w, b; radial z0, alpha, beta; Sylvester R, R~, b) for each x; Sylvester's
    Q is one learned matrix per layer; IAF layers (Kingma et al. 2016) condition on an encoder context h.
    The prior p(z) is N(0, I), or with prior="realnvp" / "maf" a flow of `prior_length` layers over it,
    log p(z) = log N(f(z); 0, I) + log|det df/dz|, learned with the rest (the KL term, always a one-sample
    Monte Carlo estimate here, is logged as kl_mc). `forward` returns the training loss, the negative ELBO,
    so DDP sees one call."""

    def __init__(self, num_dims: int, latent: int, hidden: int, kind: str, length: int,
                 sylvester: str = "orthogonal", prior: str = "normal", prior_length: int = 4):
        super().__init__()
        # the flow prior: toy_flow's layers over R^latent, each starting as the identity (p(z) = N(0, I))
        self.prior = None if prior == "normal" else toy_flow(prior, latent, prior_length, hidden)
        self.kind, self.latent, self.length = kind, latent, length if kind != "none" else 0
        d, self.per_layer = latent, 0
        self.encoder = nn.Sequential(mlp([num_dims, hidden, hidden]), nn.ReLU())
        self.gaussian = nn.Linear(hidden, 2 * d)
        self.decoder = mlp([d, hidden, hidden, num_dims])
        if kind == "planar":
            self.per_layer = 2 * d + 1
        elif kind == "radial":
            self.per_layer = d + 2
        elif kind == "sylvester":
            self.qs = nn.ModuleList(SylvesterQ(d, sylvester, reverse=bool(i % 2)) for i in range(length))
            m = self.qs[0].m
            self.register_buffer("triu", torch.triu_indices(m, m, 1), persistent=False)
            self.per_layer = 2 * self.triu.shape[1] + 3 * m
        elif kind == "iaf":
            self.iafs = nn.ModuleList(IAF(d, hidden, context=hidden) for _ in range(length))
        if kind in ("planar", "radial", "sylvester"):
            self.flow_params = nn.Linear(hidden, length * self.per_layer)
            nn.init.normal_(self.flow_params.weight, std=1e-3), nn.init.zeros_(self.flow_params.bias)

    def posterior(self, x: torch.Tensor, k: int = 1, eps: torch.Tensor | None = None):
        """k samples z_K ~ q(z|x) and log q(z_K|x): (k, B, d) and (k, B); eps (k * B, d) may be given."""
        h = self.encoder(x.flatten(1))
        mu, logvar = self.gaussian(h).chunk(2, dim=1)
        rep = lambda t: t.repeat(k, 1)  # (k * B, ...): sample i of example b at row i * B + b
        h, mu, logvar = rep(h), rep(mu), rep(logvar)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + torch.exp(0.5 * logvar) * eps  # z_0, reparameterized
        log_q = -0.5 * (math.log(2 * math.pi) + logvar + eps.pow(2)).sum(1)  # log N(z_0; mu, sigma^2)
        params = self.flow_params(h).view(len(h), self.length, -1) if self.per_layer else None
        d = self.latent
        for i in range(self.length):
            if self.kind == "planar":
                p = params[:, i]
                z, log_det = planar_map(z, p[:, :d], p[:, d : 2 * d], p[:, 2 * d :])
            elif self.kind == "radial":
                p = params[:, i]
                z, log_det = radial_map(z, p[:, :d], p[:, d : d + 1], p[:, d + 1 :])
            elif self.kind == "sylvester":
                z, log_det = self._sylvester(z, params[:, i], self.qs[i])
            else:  # iaf, with the order reversed between layers
                z, log_det = self.iafs[i].inverse(z if i % 2 == 0 else z.flip(1), h)
                z = z if i % 2 == 0 else z.flip(1)
            log_q = log_q - log_det
        return z.view(k, -1, d), log_q.view(k, -1)

    def _sylvester(self, z: torch.Tensor, p: torch.Tensor, q_layer: SylvesterQ):
        m, t = q_layer.m, self.triu.shape[1]
        r = torch.zeros(len(z), m, m, device=z.device, dtype=z.dtype)
        r_tilde = torch.zeros_like(r)
        r[:, self.triu[0], self.triu[1]] = p[:, :t]
        r_tilde[:, self.triu[0], self.triu[1]] = p[:, t : 2 * t]
        r_diag, r_tilde_diag, b = p[:, 2 * t :].chunk(3, dim=1)
        # r_ii r~_ii starts near tanh(1)^2 rather than 0, as an identity-like start would leave h' unused
        return sylvester_apply(z, q_layer()[None], r, r_tilde, r_diag + 1, r_tilde_diag + 1, b)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z (..., d): (...)."""
        if self.prior is None:
            return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)  # log N(z; 0, I)
        # change of variables through the prior flow (forward: z -> its base)
        return self.prior.log_prob(z.reshape(-1, self.latent)).view(z.shape[:-1])

    def sample_prior(self, n: int) -> torch.Tensor:
        """z ~ p(z): (n, d)."""
        p = next(self.parameters())
        if self.prior is None:
            return torch.randn(n, self.latent, device=p.device, dtype=p.dtype)
        return self.prior.sample_with_log_prob(n)[0]

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z) (Bernoulli) and log p(z) for z (k, B, d): each (k, B)."""
        logits = self.decoder(z)
        log_px_z = (x.flatten(1) * logits - F.softplus(logits)).sum(-1)
        return log_px_z, self.prior_log_prob(z)

    def forward(self, x: torch.Tensor):
        z, log_q = self.posterior(x)
        log_px_z, log_pz = self.log_joint(x, z)
        # Rezende & Mohamed 2015, Eq. 15: -ELBO = E_q0[log q_K(z_K) - log p(x, z_K)]
        nelbo = (log_q - log_pz - log_px_z).mean()
        # the KL term log q_K(z_K|x) - log p(z_K) at the one sample: a Monte Carlo estimate
        return nelbo, {"loss": nelbo, "rec": -log_px_z.mean(), "kl_mc": (log_q - log_pz).mean()}


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation
# ----------------------------------------------------------------------------------------------------------
def grid_points(bins: int, lim: float, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Centres of a bins x bins grid over [-lim, lim]^2, row-major with rows from y = lim down (as
    common.histogram_2d): (bins * bins, 2), in dtype (None: torch's default dtype)."""
    steps = torch.arange(bins, device=device, dtype=dtype or torch.get_default_dtype())
    centres = (steps + 0.5) * (2 * lim / bins) - lim
    y, x = torch.meshgrid(centres.flip(0), centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


@torch.no_grad()
def log_prob_in_chunks(model: Flow, x: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    return torch.cat([model.log_prob(xb) for xb in x.split(chunk)])


@torch.no_grad()
def grid_mass(model: Flow, lim: float = 6.0, n: int = 300) -> float:
    # midpoint rule: integral of p over [-lim, lim]^2 ~ sum p(grid centre) * cell area; about 1 for a density
    p = next(model.parameters())
    points = grid_points(n, lim, p.device, p.dtype)
    return (log_prob_in_chunks(model, points).exp().sum() * (2 * lim / n) ** 2).item()


@torch.no_grad()
def importance_sampled_log_px(model: FlowVAE, x: torch.Tensor, k: int, rows: int = 8192):
    """log p(x) ~ log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al. 2016, Eq. 8), and the
    ELBO (the mean of the log-weights); the k samples in chunks of at most `rows` decoder rows."""
    log_w = []
    for start in range(0, k, max(1, rows // len(x))):
        z, log_q = model.posterior(x, min(max(1, rows // len(x)), k - start))
        log_px_z, log_pz = model.log_joint(x, z)
        log_w.append(log_px_z + log_pz - log_q)  # (S, B)
    log_w = torch.cat(log_w)
    return torch.logsumexp(log_w, 0) - math.log(k), log_w.mean(0)


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: Flow, n: int, temperature: float = 1.0) -> torch.Tensor:
    """x = f^-1(T z), z ~ N(0, I): (n, *data shape); T < 1 is Glow's reduced temperature (Sec. 5.3)."""
    p = next(model.parameters())  # z in the model's dtype and on its device
    z = temperature * torch.randn(n, *model.base_shape, device=p.device, dtype=p.dtype)
    return model.inverse(z)[0]


@torch.no_grad()
def sample_vae(model: FlowVAE, n: int) -> torch.Tensor:
    """The decoder's Bernoulli means at z ~ p(z): (n, num_dims)."""
    return torch.sigmoid(model.decoder(model.sample_prior(n)))


# ----------------------------------------------------------------------------------------------------------
# Evaluation and pictures, per task
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_density(model: Flow, data: common.Data, args: Args, run: common.Run) -> tuple[dict, str]:
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    nll = -log_prob_in_chunks(model, x).mean().item()
    metrics = {"nll_nats": nll, "kl_data_model": nll - data.entropy,
               "mass": grid_mass(model, n=150 if args.quick else 300)}
    # density.png: the model density on [-4, 4]^2; samples.png and data.png: histograms of samples
    common.save_heatmap(run.path("density.png"),
                        log_prob_in_chunks(model, grid_points(200, 4.0, x.device, x.dtype))
                        .exp().view(200, 200))
    common.save_heatmap(run.path("samples.png"),
                        common.histogram_2d(sample(model, 5000 if args.quick else 50_000)))
    common.save_heatmap(run.path("data.png"), common.histogram_2d(data.test_x))
    return metrics, f"exact, {len(x)} test points"


@torch.no_grad()
def evaluate_energy(model: Flow, args: Args, run: common.Run) -> tuple[dict, str]:
    n = args.eval_n or 10_000
    z, log_q = model.sample_with_log_prob(n)
    # the variational free energy E_q[log q(z) + U(z)] = KL(q || p) - log Z (nats); lower is better
    metrics = {"free_energy_nats": (log_q + energy(args.target, z)).mean().item()}
    # KL(q || p) = F + log Z, log Z by the midpoint rule on [-6, 6]^2 (steps of 0.02)
    points = grid_points(600, 6.0, z.device)
    log_z = torch.logsumexp(-energy(args.target, points), 0).item() + 2 * math.log(12 / 600)
    metrics["kl_model_target"] = metrics["free_energy_nats"] + log_z
    common.save_heatmap(run.path("target.png"),
                        torch.exp(-energy(args.target, grid_points(200, 4.0, z.device)))
                        .view(200, 200))
    n_draw = 5000 if args.quick else 50_000
    common.save_heatmap(run.path("samples.png"), common.histogram_2d(model.sample_with_log_prob(n_draw)[0]))
    return metrics, f"{n} samples"


@torch.no_grad()
def evaluate_images(model: Flow, data: common.Data, args: Args, run: common.Run) -> tuple[dict, str]:
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    # dequantized once with the evaluation seed: an upper bound on the discrete NLL (README, Units)
    batches = common.progress(x.split(500), f"test NLL, {len(x):,} dequantized images", len(x))
    nll = -torch.cat([model.log_prob(common.uniform_dequantize(xb)) for xb in batches]).mean().item()
    common.save_grid(run.path("samples.png"), sample(model, 64).clamp(0, 1), nrow=8)
    common.save_grid(run.path("samples_t0.7.png"), sample(model, 64, 0.7).clamp(0, 1), nrow=8)
    return {"nll_bpd": common.bits_per_dim(nll, data.num_dims, bin_width=1 / 256)}, \
        f"dequantized, bin width 1/256, {len(x)} test images"


@torch.no_grad()
def evaluate_vae(model: FlowVAE, data: common.Data, args: Args, run: common.Run) -> tuple[dict, str]:
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    batches = common.progress(x.split(100), f"test log p(x), {len(x):,} images x k = {args.eval_k}", len(x))
    log_px, elbo = zip(*(importance_sampled_log_px(model, xb, args.eval_k) for xb in batches))
    common.save_grid(run.path("samples.png"), sample_vae(model, 64).view(64, *data.shape), nrow=8)
    return {"nll_nats": -torch.cat(log_px).mean().item(), "nelbo_nats": -torch.cat(elbo).mean().item()}, \
        f"iwae k={args.eval_k}"


def evaluate_and_draw(run: common.Run, model: nn.Module, data: common.Data | None,
                      args: Args, step: int) -> dict:
    """Evaluate (rank 0) with a fixed seed, log one line, draw the pictures."""
    with common.eval_mode(model, seed=args.seed):
        if args.task == "density":
            metrics, note = evaluate_density(model, data, args, run)
        elif args.task == "energy":
            metrics, note = evaluate_energy(model, args, run)
        elif args.task == "images":
            metrics, note = evaluate_images(model, data, args, run)
        else:
            metrics, note = evaluate_vae(model, data, args, run)
    run.log("test", step, metrics, note=note)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# The objective of each task (the VAE task's is FlowVAE.forward)
# ----------------------------------------------------------------------------------------------------------
def density_loss(model: Flow, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Maximum likelihood by the change of variables: log p(x) = log N(f(x); 0, I) + log |det df/dx|,
    in nats."""
    z, log_det = model(x)
    nll = -(log_normal(z) + log_det).mean()
    return nll, {"loss": nll}


def image_loss(model: Flow, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """8-bit images: the density of the uniformly dequantized data, in bits/dim of the discrete data
    (bin width 1/256), the quantity reported (Dinh et al. 2017, Sec. 4.1; Kingma & Dhariwal 2018, Sec. 5)."""
    z, log_det = model(common.uniform_dequantize(x))
    nll = -(log_normal(z) + log_det).mean()
    loss = common.bits_per_dim(nll, x[0].numel(), 1 / 256)
    return loss, {"loss": loss}


def energy_loss(model: Flow, target: str, n: int, beta: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Rezende & Mohamed 2015, Eq. 20 with the annealed beta of Sec. 6.1:
    F(z) = E_q[log q_K(z_K) + beta U(z_K)], over n samples of the flow; `free_energy` is F at beta = 1
    (KL(q || p) up to log Z)."""
    z, log_q = model.sample_with_log_prob(n)
    u = energy(target, z)
    loss = (log_q + beta * u).mean()
    return loss, {"loss": loss, "free_energy": (log_q + u).mean()}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def resolve(args: Args) -> Args:
    """Fill the task-dependent defaults (the fields left at 0 or empty), so config.json holds the
    values used."""
    dataset, length, hidden, steps, batch_size = DEFAULTS[args.task]
    args = replace(args, dataset=args.dataset or dataset or args.target,
                   flow_length=args.flow_length or length, hidden=args.hidden or hidden or 400,
                   batch_size=args.batch_size or batch_size, steps=args.steps or steps)
    return replace(args, out=args.out or f"runs/flows-{args.task}-{args.flow}-{args.dataset}")


def check_task(args: Args) -> None:
    """Refuse a flow or a dataset that the task does not take, from the names alone (before any data
    is read)."""
    flows_of_task = {"density": TOY_FLOWS, "energy": ENERGY_FLOWS, "images": IMAGE_FLOWS, "vae": VAE_FLOWS}
    if args.flow not in flows_of_task[args.task]:
        raise common.RunError(
            f"--task {args.task} takes --flow {', '.join(flows_of_task[args.task])}, not {args.flow}")
    kind = None if args.task == "energy" else common.dataset_kind(args.dataset)
    if args.task == "density" and kind != "toy":
        raise common.RunError(f"--task density fits the 2D toys, not {args.dataset}; images: --task images")
    if args.task == "images" and kind != "8bit":
        raise common.RunError(
            f"--task images needs 8-bit images (mnist, fashion_mnist, cifar10), not {args.dataset}")
    if args.task == "vae" and kind != "binary":
        raise common.RunError(f"--task vae needs binarized images, not {args.dataset}")
    if args.task != "vae" and args.prior != "normal":
        raise common.RunError(f"--prior {args.prior} is the VAE's p(z): use it with --task vae")


def build(args: Args, data: common.Data | None) -> nn.Module:
    check_task(args)
    if args.task == "images" and any(n % 2**args.levels for n in data.shape[1:]):
        raise common.RunError(
            f"images of shape {data.shape} cannot be squeezed {args.levels} times: use fewer --levels")
    if args.task == "density":
        return toy_flow(args.flow, 2, args.flow_length, args.hidden)
    if args.task == "energy":
        return energy_flow(args.flow, args.flow_length, args.sylvester)
    if args.task == "images":
        return image_flow(args.flow, data.shape, args.levels, args.depth, args.width)
    return FlowVAE(data.num_dims, args.latent, args.hidden, args.flow, args.flow_length, args.sylvester,
                   args.prior, args.prior_length)


def train(args: Args) -> dict:
    args = resolve(args)
    dist, device = common.setup(args)
    if args.task == "energy" and dist.enabled:
        raise common.RunError("--task energy has no data to split between processes: run it without torchrun")
    check_task(args)
    data = None if args.task == "energy" else common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = build(args, data).to(device)
    batches = None
    if data is not None:
        batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist,
                                 binarize=data.dynamic_binarization)
        if args.task in ("density", "images"):  # actnorm's data-dependent initialization, on one batch
            x0 = batches(0)[0]
            with torch.no_grad():
                model(common.uniform_dequantize(x0) if args.task == "images" else x0)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "flows", dist, model, optimizer)
    start = run.restore()
    ddp = common.wrap_ddp(model, dist) if args.task != "energy" else model
    total = args.steps or 10 * batches.steps_per_epoch
    run.print(
        f"flows: {args.task} with {args.flow}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{args.dataset}, {total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        with common.autocast(device, args.amp):
            if args.task == "energy":
                beta = min(1.0, 0.01 + step / args.anneal) if args.anneal else 1.0  # Sec. 6.1's annealing
                loss, metrics = energy_loss(model, args.target, args.batch_size, beta)
            elif args.task == "vae":
                loss, metrics = ddp(batches(step)[0])  # FlowVAE.forward: the negative ELBO
            elif args.task == "images":
                loss, metrics = image_loss(ddp, batches(step)[0])
            else:
                loss, metrics = density_loss(ddp, batches(step)[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
