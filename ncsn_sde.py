"""Score matching, NCSN and score-based SDEs: Song & Ermon 2019, "Generative Modeling by Estimating Gradients
of the Data Distribution", arXiv:1907.05600; Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole 2021,
"Score-Based Generative Modeling through Stochastic Differential Equations", arXiv:2011.13456.

A network s_theta(x, t) learns the score grad_x log p_t(x) of the data perturbed by noise of every level:
implicit (Hyvarinen 2005), sliced (Song et al. 2019) or denoising (Vincent 2011) score matching. NCSN samples
with annealed Langevin dynamics over a geometric ladder of sigmas; the SDE view turns the ladder into a
diffusion dx = f dt + g dw, samples by reversing it (predictor-corrector) or by its probability-flow ODE, and
gets exact likelihoods from that ODE.

    python ncsn_sde.py --quick                                        # 40 s on a CPU: VP SDE on 8gaussians,
                                                                      # its 8 modes
    python ncsn_sde.py --dataset 8gaussians --batch-size 256 --lr 1e-3 --warmup 100 --steps 6000 \
        --eval-every 3000 --eval-n 5000                              # the README's toy rows (also two_moons)
    python ncsn_sde.py --method ncsn --dataset 8gaussians --sampler ald   # NCSN, annealed Langevin dynamics
    python ncsn_sde.py --sde ve --objective ssm --dataset two_moons      # sliced score matching, VE SDE
    python ncsn_sde.py --quick --dataset mnist                          # a smoke test of minutes on a CPU:
                                                                        # a small U-Net
    python ncsn_sde.py --dataset mnist --channels 32 --channel-mult 1 2 --num-res-blocks 1 --attn-res 0 \
        --dropout 0 --batch-size 32 --lr 1e-3 --warmup 100 --steps 3000 --eval-every 1500 --eval-n 100 \
        --sample-steps 200 --rtol 1e-3 --atol 1e-3   # CPU recipe: 30 minutes on 2 cores
    python ncsn_sde.py --dataset cifar10 --sde vp --sampler ode         # the paper's setting needs GPUs
    torchrun --nproc_per_node=4 ncsn_sde.py --dataset cifar10 --batch-size 32

Objectives (--objective): dsm, the denoising loss with the analytic target -z / sigma; ssm, sliced score
matching (variance-reduced: v^T (ds/dx) v + 1/2 ||s||^2); ism, implicit score matching with the trace by
autograd (low dimensions only). Each is weighted by lambda = sigma^2 (NCSN, Eq. 6) or lambda(t) = sigma_t^2,
the variance of the perturbation kernel (Song et al. 2021, Eq. 7). Samplers (--sampler): ald (NCSN,
Algorithm 1), pc (reverse-diffusion predictor + Langevin corrector, Song et al. 2021 Algorithms 2 and 3), em
(Euler-Maruyama predictor alone), ode (the probability-flow ODE, torchdiffeq dopri5). Likelihood: the
probability-flow ODE with the instantaneous change of variables, the divergence exact (2D) or by Hutchinson's
estimator (images); nats and KL(data || model) = NLL - H(data) for toys, bits/dim of uniformly dequantized
data for images, with the number of function evaluations (nfe). Latents (Song et al. 2021, Sec. 4.3): the
same ODE solved forward is an invertible encoder x -> x(T); image runs end with interp.png, pairs of test
images encoded, their codes interpolated spherically and decoded (--interp-frames; ode_encode, slerp,
interpolate).

Deviations from the papers:
- The noise level enters the networks as t in [0, 1] (for NCSN and VE, log sigma is affine in t), through
  DDPM's sinusoidal embedding of 999 t (30 t in the toy MLP, for a cheaper ODE; see build_model); the score is
  net(x, t) / sigma_t (Song & Ermon 2020, Technique 3; for VP this is the eps-parameterization
  -eps_theta / sigma_t of the authors' code). Both losses carry a factor 1/2 (NCSN Eq. 5; SDE Eq. 7 has none:
  a constant). The toy MLP and the MNIST-sized U-Net are not in the papers.
- The VE kernel is N(x(0), (sigma(t)^2 - sigma_min^2) I) (Eq. 30); the authors' code uses sigma(t)^2.
- The Langevin corrector's step 2 alpha (r ||z|| / ||s||)^2 takes the norms averaged over the batch, as the
  authors' code does (a per-example ratio is unstable in 2D); the PC loop runs corrector then predictor at
  each time, as in the code (the paper's order shifted by one level), and returns the noise-free mean of
  the last step.
- Images are trained on uniformly dequantized data (k + u) / 256 (the paper trains on k / 255 and evaluates on
  dequantized data); VP and sub-VP see it scaled to [-1, 1], VE and NCSN on [0, 1].
- --method ncsn is evaluated with the probability-flow ODE of the VE SDE whose discretization NCSN's ladder is
  (Song et al. 2021, Sec. 3.4): between its L trained levels the network is interpolated, so that figure is
  only indicative; NCSN itself has no likelihood.

Expected result: the paper reports 2.99 bits/dim on CIFAR-10 (VP, deep DDPM++, 1.3M steps on TPUs).
README.md's rows ncsn_sde-8gaussians / ncsn_sde-two_moons (the 2nd command: VP SDE, DSM, 6000 steps;
probability-flow ODE NLL and KL(data || model)) and ncsn_sde-mnist (the CPU recipe) have the measured figures
with their commands.
"""

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchdiffeq import odeint

import common


@dataclass
class Args:
    dataset: str = "8gaussians"  # a 2D toy or an 8-bit image dataset (mnist, fashion_mnist,
                                 # cifar10; see README)
    method: Literal["ncsn", "sde"] = "sde"  # ncsn: L discrete sigmas (Song & Ermon 2019);
                                            # sde: continuous time
    sde: Literal["ve", "vp", "subvp"] = "vp"  # the forward SDE of --method sde (Song et al. 2021, Sec. 3.4)
    objective: Literal["dsm", "ssm", "ism"] = "dsm"  # denoising, sliced or implicit score matching
    num_scales: int = 10  # NCSN: L, the number of sigmas (paper: 10); >= 1
    sigma_min: float = 0.01  # smallest noise level of NCSN and VE (both papers: 0.01); > 0
    sigma_max: float = 0.0  # largest (0: 1.0 for NCSN on images as in the paper, else the largest distance
                            # between two of the first 1000 training examples, Song & Ermon 2020
                            # Technique 1); >= 0
    beta_min: float = 0.1  # VP / sub-VP: beta(0) (paper: 0.1); >= 0
    beta_max: float = 20.0  # VP / sub-VP: beta(1) (paper: 20); > 0
    sampler: Literal["auto", "ald", "pc", "em", "ode"] = "auto"  # pictures (auto: ald for --method ncsn,
                                                                 # pc for sde)
    sample_steps: int = 1000  # N, discretization steps of the pc / em samplers (paper: 1000); >= 1
    snr: float = 0.16  # r, signal-to-noise ratio of the Langevin corrector (paper: 0.16); > 0
    corrector_steps: int = 1  # M, corrector steps per predictor step (0: predictor only); >= 0
    ald_eps: float = 2e-5  # annealed Langevin step epsilon (Song & Ermon 2019: 2e-5); > 0
    ald_steps: int = 100  # annealed Langevin steps per noise level, T (Song & Ermon 2019: 100); >= 1
    divergence: Literal["auto", "exact", "rademacher", "gaussian"] = "auto"  # likelihood ODE trace
                                                                             # (auto: exact to 64 dims)
    rtol: float = 1e-5  # ODE solver relative tolerance (paper: 1e-5); > 0
    atol: float = 1e-5  # ODE solver absolute tolerance (paper: 1e-5); > 0
    interp_frames: int = 8  # images: interp.png, 4 pairs of test images with this many codes between
                            # and including theirs, by the probability-flow ODE (0: none; not 1); >= 0
    interp_tol: float = 1e-5  # rtol and atol of interp.png's encoding and decoding solves (paper: 1e-5); > 0
    grid_bins: int = 100  # toys: the density heatmap's grid is grid_bins x grid_bins over [-4, 4]^2; >= 2
    hidden: int = 256  # hidden units of the toy MLP; >= 1
    channels: int = 0  # U-Net base channels (0: 128 for 32x32, 64 for 28x28); >= 0
    channel_mult: tuple[int, ...] = ()  # U-Net multipliers per resolution (empty: (1, 2, 2, 2) for 32x32,
                                        # (1, 2, 2) for 28x28); >= 1
    num_res_blocks: int = 2  # residual blocks per resolution; >= 1
    attn_res: tuple[int, ...] = ()  # resolutions with self-attention (empty: half the image side;
                                    # 0: none); >= 0
    dropout: float = 0.1  # dropout in the residual blocks; in [0, 1)
    steps: int = 0  # optimizer steps (0: 20,000 for toys, 50,000 for 28x28, 1,300,000 for 32x32 as in the
                    # paper); >= 0
    batch_size: int = 128  # minibatch per process (both papers: 128); >= 1
    lr: float = 2e-4  # Adam learning rate (Song et al. 2021: 2e-4; Song & Ermon 2019: 1e-3); > 0
    warmup: int = 5000  # steps of linear learning-rate warm-up (Song et al. 2021: 5000); >= 0
    grad_clip: float = 1.0  # clip the gradient norm at this value (0: off); >= 0
    ema_decay: float = 0.999  # EMA of the weights, used for sampling and evaluation (Song et al. 2021,
                              # VE: 0.999); in [0, 1)
    eval_n: int = 0  # test examples in the final likelihood (0: all); >= 0
    eval_every: int = 0  # steps between evaluations and sample pictures (0: five per run); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 5000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda (training only; the ODE runs in float32)
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/ncsn_sde-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a 2D toy: its modes in 40 s; images: a smoke test that ends with the CPU recipe


QUICK = dict(steps=300, hidden=64, grid_bins=40, channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attn_res=(0,), lr=1e-3, warmup=50, ema_decay=0.99, sample_steps=100, rtol=1e-3, atol=1e-3,
             interp_tol=1e-3, eval_n=500, eval_every=300, log_every=50, ckpt_every=300)
QUICK_TOY = dict(steps=3000, batch_size=256, lr=1e-3, warmup=100, sample_steps=200, rtol=1e-3, atol=1e-3,
                 eval_n=2000, eval_every=3000, log_every=500, ckpt_every=3000)
PRESETS = {"quick": common.toy_or_image(QUICK, QUICK_TOY, Args.dataset)}  # --quick: QUICK_TOY on a 2D toy
T_EPS = 1e-5  # smallest t for training and likelihood (the authors' code)
SAMPLE_EPS = {"ve": 1e-5, "vp": 1e-3, "subvp": 1e-3}  # last time of the samplers (the authors' code)
EXACT_TRACE_MAX_DIMS = 64  # the likelihood uses the exact divergence up to this many dimensions by default
PERIODIC_EVAL_N = 1000  # test points in the evaluations during training
TOY_BATCH, IMAGE_BATCH = 5000, 100  # test examples per ODE solve
# density heatmap: grid (pictures: --grid-bins) on [-4, 4]^2, tolerance
GRID_BINS, GRID_LIM, GRID_TOL = 100, 4.0, 1e-3
TOY_SAMPLES = 2000  # samples in a toy picture
INTERP_PAIRS = 4  # pairs of test images in interp.png


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), to multiply x (B, ...) example by example."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------------------------
# Score-matching objectives, per example (B,): J(theta) = 1/2 E||s - grad log p||^2 up to a constant
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


def implicit_score_matching(score_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """Hyvarinen 2005, Theorem 1: J(theta) = E[tr(grad_x s(x)) + 1/2 ||s(x)||^2] (+ a constant),
    exact trace."""
    x, create_graph = x.detach().requires_grad_(True), torch.is_grad_enabled()  # a graph only when training
    with torch.enable_grad():
        s = score_fn(x)
        return divergence_exact(s, x, create_graph=create_graph) + 0.5 * s.flatten(1).pow(2).sum(1)


def sliced_score_matching(score_fn: Callable, x: torch.Tensor, v: torch.Tensor | None = None,
                          noise: str = "gaussian") -> torch.Tensor:
    """Song, Garg, Shi & Ermon 2019 (sliced score matching), Eq. 8 with the variance reduction of Sec. 3:
    J(theta) = E_x E_v[v^T grad_x s(x) v + 1/2 ||s(x)||^2], one random projection v per example."""
    x, create_graph = x.detach().requires_grad_(True), torch.is_grad_enabled()  # a graph only when training
    v = sample_probe(x, noise) if v is None else v
    with torch.enable_grad():
        s = score_fn(x)
        return divergence_hutchinson(s, x, v, create_graph=create_graph)[0] + 0.5 * s.flatten(1).pow(2).sum(1)


def denoising_score_matching(score: torch.Tensor, x_tilde: torch.Tensor, x: torch.Tensor,
                             sigma) -> torch.Tensor:
    # Vincent 2011, Eq. 11; Song & Ermon 2019, Eq. 5: 1/2 || s(x~) - grad log q(x~|x) ||^2,
    # grad_x~ log N(x~; x, sigma^2 I) = -(x~ - x) / sigma^2
    target = -(x_tilde - x) / sigma**2
    return 0.5 * (score - target).flatten(1).pow(2).sum(1)


# ----------------------------------------------------------------------------------------------------------
# NCSN: a geometric ladder of sigmas and annealed Langevin dynamics
# ----------------------------------------------------------------------------------------------------------
def ncsn_sigmas(sigma_max: float, sigma_min: float, L: int) -> torch.Tensor:
    # Song & Ermon 2019, Sec. 4.1: {sigma_i}_{i=1}^L geometric,
    # sigma_1 / sigma_2 = ... = sigma_{L-1} / sigma_L
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), L, dtype=torch.float64))


@torch.no_grad()
def annealed_langevin(score_fn: Callable, x: torch.Tensor, sigmas: torch.Tensor, eps: float = 2e-5,
                      T: int = 100, progress: Callable = iter) -> torch.Tensor:
    """Song & Ermon 2019, Algorithm 1. score_fn(x, i) is the score at noise level sigmas[i]; sigmas
    decreasing. With one sigma it is plain Langevin dynamics with step eps. `progress` wraps the loop over
    the levels."""
    sigma_L = sigmas[-1].item()
    for i, sigma in progress(list(enumerate(sigmas.tolist()))):  # line 2: for i <- 1 to L
        alpha = eps * sigma**2 / sigma_L**2  # line 3: alpha_i = eps sigma_i^2 / sigma_L^2
        for _ in range(T):  # line 4
            z = torch.randn_like(x)  # line 5
            x = x + alpha / 2 * score_fn(x, i) + math.sqrt(alpha) * z  # line 6
    return x


# ----------------------------------------------------------------------------------------------------------
# SDEs dx = f(x, t) dt + g(t) dw on t in [0, 1],
# their perturbation kernels p_0t(x(t) | x(0)) and discretizations
# ----------------------------------------------------------------------------------------------------------
class SDE:
    """The interface: sde(x, t) -> (f, g); marginal_prob(x0, t) -> (mean, std); prior;
    discretize(x, t) -> (f_i, G_i), one step x_{i+1} = x_i + f_i(x_i) + G_i z of the discrete chain. t is a
    tensor (B,)."""

    T = 1.0

    def __init__(self, N: int = 1000):
        self.N = N

    def index(self, t: torch.Tensor) -> torch.Tensor:
        return (t / self.T * (self.N - 1)).round().long()  # t in [0, T] -> step i in 0..N-1

    def prior_std(self) -> float:
        return 1.0

    def prior_sample(self, shape: tuple[int, ...], device=None) -> torch.Tensor:
        return torch.randn(shape, device=device) * self.prior_std()

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        # log N(z; 0, s^2 I), summed over all but the batch dimension: (B,)
        s, d = self.prior_std(), z[0].numel()
        return -0.5 * d * math.log(2 * math.pi * s**2) - z.flatten(1).pow(2).sum(1) / (2 * s**2)

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Euler-Maruyama with dt = T / N: f_i = f(x, t) dt, G_i = g(t) sqrt(dt)
        dt = self.T / self.N
        f, g = self.sde(x, t)
        return f * dt, g * math.sqrt(dt)

    def corrector_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)  # Song et al. 2021, Algorithm 2 (VE): alpha = 1


class VESDE(SDE):
    """Variance exploding, Song et al. 2021, Eq. 9: dx = sqrt(d[sigma^2(t)]/dt) dw,
    sigma(t) = s_min (s_max/s_min)^t."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        # d[sigma^2(t)]/dt = 2 sigma(t)^2 log(sigma_max / sigma_min)
        g = self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), g

    def marginal_prob(self, x0, t):
        # Eq. 30 (Appendix B): p_0t(x(t) | x(0)) = N(x(0), [sigma^2(t) - sigma^2(0)] I)
        return x0, self.marginal_std(t)

    def marginal_std(self, t):
        return (self.sigma(t) ** 2 - self.sigma_min**2).sqrt()

    def prior_std(self) -> float:
        return self.sigma_max  # p_T ~ N(0, sigma_max^2 I)

    def discretize(self, x, t):
        # Eq. 8, NCSN's chain: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, sigma_i geometric,
        # sigma_{-1} = 0
        i = self.index(t)
        sigma = self.sigma(i / (self.N - 1))
        prev = torch.where(i > 0, self.sigma((i - 1).clamp(min=0) / (self.N - 1)), torch.zeros_like(sigma))
        return torch.zeros_like(x), (sigma**2 - prev**2).sqrt()


class VPSDE(SDE):
    """Variance preserving, Song et al. 2021, Eq. 11: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw
    (DDPM's limit)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t):
        # int_0^t beta(s) ds
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def sde(self, x, t):
        return -0.5 * bcast(self.beta(t), x) * x, self.beta(t).sqrt()

    def marginal_prob(self, x0, t):
        # Eq. 29: N(x(0) e^{-1/2 int beta}, (1 - e^{-int beta}) I)
        return bcast((-0.5 * self.int_beta(t)).exp(), x0) * x0, self.marginal_std(t)

    def marginal_std(self, t):
        return (-torch.expm1(-self.int_beta(t))).sqrt()

    def discrete_beta(self, t):
        # Appendix B/E: beta_i = beta-bar_i / N, beta-bar_i linear from beta_min to beta_max
        # (DDPM's 1e-4 .. 0.02)
        i = self.index(t)
        return (self.beta_min + i / (self.N - 1) * (self.beta_max - self.beta_min)) / self.N

    def discretize(self, x, t):
        # DDPM's chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z: f_i = (sqrt(1 - beta_i) - 1) x,
        # G_i = sqrt(beta_i)
        beta = self.discrete_beta(t)
        return (bcast((1 - beta).sqrt(), x) - 1) * x, beta.sqrt()

    def corrector_alpha(self, t):
        return 1 - self.discrete_beta(t)  # Algorithm 3 (VP): alpha_i = 1 - beta_i


class SubVPSDE(VPSDE):
    """sub-VP, Song et al. 2021, Eq. 16:
    dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - e^{-2 int_0^t beta})) dw."""

    def sde(self, x, t):
        g2 = self.beta(t) * -torch.expm1(-2 * self.int_beta(t))
        return -0.5 * bcast(self.beta(t), x) * x, g2.sqrt()

    def marginal_std(self, t):
        # Eq. 29: N(x(0) e^{-1/2 int beta}, (1 - e^{-int beta})^2 I), the mean as VP's
        return -torch.expm1(-self.int_beta(t))

    discretize = SDE.discretize  # no closed-form chain: Euler-Maruyama, as the authors' code


def make_sde(name: str, args, sigma_max: float) -> SDE:
    if name == "ve":
        return VESDE(args.sigma_min, sigma_max, args.sample_steps)
    return (VPSDE if name == "vp" else SubVPSDE)(args.beta_min, args.beta_max, args.sample_steps)


# ----------------------------------------------------------------------------------------------------------
# Networks s_theta(x, t) = net(x, t) / sigma_t, t in [0, 1]
# ----------------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1.0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Vaswani et al. 2017, Sec. 3.5 (as in Ho et al., Appendix B, and the authors' VP SDE code):
    # sin(scale t / 10000^(i/(d/2-1))), then the cosines; scale 1 for DDPM's integer t in 1..T, 999 for t in
    # [0, 1]; in the network's dtype (float32 also under bf16 autocast, whose first Linear casts it)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dtype) / (half - 1))
    angles = scale * t.to(dtype)[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, dim)


class MLP(nn.Module):
    """For 2D toys: x -> SiLU hidden layers with the embedding of time_scale * t added to each -> an output of
    x's size (1 for DDPM's integer t in 1..T; ncsn_sde.py's build_model says why it takes 30 for t
    in [0, 1])."""

    def __init__(self, dim: int = 2, hidden: int = 256, layers: int = 3, emb: int = 128,
                 time_scale: float = 1.0):
        super().__init__()
        self.emb, self.time_scale = emb, time_scale
        self.time = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU(), nn.Linear(hidden, layers * hidden))
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # (B, layers hidden)
        temb = self.time(timestep_embedding(t, self.emb, self.time_scale, self.inp.weight.dtype))
        temb = temb.chunk(len(self.layers), dim=1)  # (B, hidden) each
        h = self.inp(x)
        for layer, e in zip(self.layers, temb):
            h = layer(F.silu(h + e))
        return self.out(F.silu(h))


def group_norm(channels: int) -> nn.GroupNorm:
    # Ho et al., Appendix B: group normalization, 32 groups; gcd(32, channels) groups where 32 does not divide
    # the channels (with --channels 16 an up-path block takes 32 + 16 = 48 channels: 16 groups, where
    # 32 would fail)
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    # the authors' code starts the last layer of every residual branch at zero: each block begins as
    # the identity
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GN, SiLU, conv3x3, + Dense(temb), GN, SiLU, dropout, conv3x3; a 1x1 conv on the skip if
    channels change."""

    def __init__(self, c_in: int, c_out: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb, c_out)
        self.norm2, self.drop = group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H x W positions (Ho et al., Appendix B: at the 16x16
    resolution)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(c), nn.Conv2d(c, 3 * c, 1), zero_init(nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 1 head, HW, 3C) with channels innermost: the fused attention kernels take only 4-D inputs whose
        # last dimension is contiguous (otherwise the unfused math runs, 3x slower on a CPU at 14x14); the
        # copy is free when the activations are channels-last
        qkv = rearrange(self.qkv(self.norm(x)), "b c h w -> b 1 (h w) c").contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, (B, 1, HW, C)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class UNet(nn.Module):
    """The PixelCNN++-style U-Net of Ho et al., Appendix B (DDPM++ of Song et al. 2021 is a deeper variant of
    it): num_res_blocks residual blocks per resolution, self-attention at `attn_res`, stride-2 conv
    downsampling, nearest-neighbour + conv upsampling, skip connections from every block of the down path, and
    a sinusoidal embedding of time_scale * t fed to every block (1 for DDPM's integer t in 1..T, 999 for t
    in [0, 1])."""

    def __init__(self, shape: tuple[int, int, int], channels: int = 128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_res=(16,), dropout: float = 0.1, time_scale: float = 1.0):
        super().__init__()
        c_img, res = shape[0], shape[1]
        self.ch, self.time_scale, temb = channels, time_scale, 4 * channels
        self.time = nn.Sequential(nn.Linear(channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(c_img, channels, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(c, channels * mult, temb, dropout)])
                c = channels * mult
                if res in attn_res:
                    block.append(AttnBlock(c))
                self.down.append(block)
                skips.append(c)
            if level < len(channel_mult) - 1:  # downsample: (B, c, res, res) -> (B, c, res/2, res/2)
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, temb, dropout), AttnBlock(c), ResBlock(c, c, temb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(c + skips.pop(), channels * mult, temb, dropout)])
                c = channels * mult
                if res in attn_res:
                    block.append(AttnBlock(c))
                self.up.append(block)
            if level > 0:  # upsample: nearest neighbour x2, then a 3x3 conv
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(group_norm(c), nn.SiLU(), zero_init(nn.Conv2d(c, c_img, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # (B, 4 ch)
        temb = self.time(timestep_embedding(t, self.ch, self.time_scale, self.conv_in.weight.dtype))
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(self._run(block, hs[-1], temb))
        h = self._run(self.mid, hs[-1], temb)
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], 1) if isinstance(block, nn.ModuleList) else h, temb)
        return self.out(h)

    @staticmethod
    def _run(block: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in block if isinstance(block, nn.ModuleList) else [block]:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return h


# ----------------------------------------------------------------------------------------------------------
# The score model and its training objective
# ----------------------------------------------------------------------------------------------------------
class ScoreModel(nn.Module):
    """s_theta(x, t) = net(x, t) / sigma_t with the noise schedule of NCSN or of an SDE; `forward(x)` returns
    the training loss (for DDP). NCSN's level i sits at t_i = (L - 1 - i) / (L - 1), where
    sigma(t_i) = sigma_i."""

    def __init__(self, net: nn.Module, method: str, sde: SDE, objective: str = "dsm",
                 sigmas: torch.Tensor | None = None):
        super().__init__()
        self.net, self.method, self.sde, self.objective = net, method, sde, objective
        if method == "ncsn":
            self.register_buffer("sigmas", sigmas.float(), persistent=False)  # (L,) decreasing
            self.register_buffer("level_t", torch.linspace(1, 0, len(sigmas)), persistent=False)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        # NCSN: x~ = x + sigma z, sigma = sigma_min (sigma_max / sigma_min)^t; SDE: the kernel's
        # standard deviation
        return self.sde.sigma(t) if self.method == "ncsn" else self.sde.marginal_std(t)

    def perturbation(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (B,) of the noised x_t given x at noise time t."""
        return (x, self.std(t)) if self.method == "ncsn" else self.sde.marginal_prob(x, t)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Song & Ermon 2020, Technique 3: s_theta(x, sigma) = s_theta(x) / sigma
        return self.net(x, t.to(x.dtype)).to(x.dtype) / bcast(self.std(t), x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        b = x.shape[0]
        if self.method == "ncsn":  # Song & Ermon 2019, Eq. 6: a level i ~ U{1..L} per example
            t = self.level_t[torch.randint(len(self.sigmas), (b,), device=x.device)].to(x.dtype)
        else:  # Song et al. 2021, Eq. 7: t ~ U(eps, T)
            t = torch.rand(b, device=x.device, dtype=x.dtype) * (self.sde.T - T_EPS) + T_EPS
        mean, std = self.perturbation(x, t)
        z = torch.randn_like(x)
        x_t = mean + bcast(std, x) * z  # x(t) ~ p_0t(x(t) | x(0))
        # lambda = sigma^2 (NCSN, Eq. 6) or lambda(t) ∝ 1 / E||grad log p_0t||^2 = sigma_t^2 / D
        # (Song et al. 2021, Eq. 7): lambda(t) = sigma_t^2
        lam = std**2
        if self.objective == "dsm":
            # lambda * 1/2 ||s + (x_t - mean) / sigma^2||^2 = 1/2 ||sigma s + z||^2
            per_example = lam * denoising_score_matching(self.score(x_t, t), x_t, mean, bcast(std, x))
        elif self.objective == "ssm":
            per_example = lam * sliced_score_matching(lambda y: self.score(y, t), x_t)
        else:
            per_example = lam * implicit_score_matching(lambda y: self.score(y, t), x_t)
        loss = per_example.mean()
        return loss, {"loss": loss}


# ----------------------------------------------------------------------------------------------------------
# Likelihood: the probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) and the change of variables
# ----------------------------------------------------------------------------------------------------------
def probability_flow_drift(sde: SDE, score_fn: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Song et al. 2021, Eq. 13: dx = [f(x, t) - 1/2 g(t)^2 grad_x log p_t(x)] dt
    f, g = sde.sde(x, t)
    return f - 0.5 * bcast(g**2, x) * score_fn(x, t)


def ode_log_likelihood(sde: SDE, score_fn: Callable, x: torch.Tensor, eps: float = T_EPS, rtol: float = 1e-5,
                       atol: float = 1e-5, divergence: str = "exact", probe: torch.Tensor | None = None):
    """log p_eps(x) (B,) in nats and the number of function evaluations.

    Song et al. 2021, Appendix D.2, Eq. 40 (the instantaneous change of variables of Chen et al. 2018):
    log p_0(x(0)) = log p_T(x(T)) + int_0^T div f~(x(t), t) dt, x(t) the solution of the probability-flow ODE.
    The divergence is exact or Hutchinson's estimate with one probe fixed for the solve
    (Grathwohl et al. 2019).
    """
    b, nfe = x.shape[0], [0]
    v = None if divergence == "exact" else (sample_probe(x, divergence) if probe is None else probe)

    def func(t, state):
        nfe[0] += 1
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            drift = probability_flow_drift(sde, score_fn, y, t.expand(b))
            div = (divergence_exact(drift, y, False) if v is None
                   else divergence_hutchinson(drift, y, v, False)[0])
        return drift.detach(), div.detach()

    times = torch.tensor([eps, sde.T], device=x.device, dtype=x.dtype)
    # step_t: the solver lands on the end times instead of stepping past them (the kernels are undefined
    # for t < 0)
    x_T, int_div = odeint(func, (x, torch.zeros(b, device=x.device, dtype=x.dtype)), times, rtol=rtol,
                          atol=atol, method="dopri5", options={"step_t": times})
    return sde.prior_logp(x_T[-1]) + int_div[-1], nfe[0]


# ----------------------------------------------------------------------------------------------------------
# Samplers of the reverse SDE dx = [f - g^2 s] dt + g dw-bar, and of the probability-flow ODE
# ----------------------------------------------------------------------------------------------------------
def reverse_diffusion_step(sde: SDE, score_fn: Callable, x: torch.Tensor, t: torch.Tensor):
    # Song et al. 2021, Eq. 46 (Appendix E):
    # x_i = x_{i+1} - f_{i+1}(x_{i+1}) + G_{i+1} G_{i+1}^T s(x_{i+1}, i+1) + G_{i+1} z
    # VE: Algorithm 2 lines 3-5; VP: Algorithm 3 lines 3-5,
    # x_i = (2 - sqrt(1 - beta)) x + beta s + sqrt(beta) z
    f, G = sde.discretize(x, t)
    x_mean = x - f + bcast(G**2, x) * score_fn(x, t)
    return x_mean + bcast(G, x) * torch.randn_like(x), x_mean


def euler_maruyama_step(sde: SDE, score_fn: Callable, x: torch.Tensor, t: torch.Tensor, dt: float):
    # Song et al. 2021, Eq. 6 solved backwards with step -dt: x <- x - [f - g^2 s] dt + g sqrt(dt) z
    f, g = sde.sde(x, t)
    x_mean = x - (f - bcast(g**2, x) * score_fn(x, t)) * dt
    return x_mean + bcast(g, x) * math.sqrt(dt) * torch.randn_like(x), x_mean


def langevin_corrector_step(sde: SDE, score_fn: Callable, x: torch.Tensor, t: torch.Tensor, snr: float):
    # Song et al. 2021, Algorithm 2 lines 7-9 (alpha = 1) and Algorithm 3 lines 7-9 (alpha_i = 1 - beta_i):
    # eps = 2 alpha (r ||z|| / ||s||)^2, x <- x + eps s + sqrt(2 eps) z; norms averaged over the batch
    # (authors' code)
    s = score_fn(x, t)
    z = torch.randn_like(x)
    s_norm, z_norm = s.flatten(1).norm(dim=1).mean(), z.flatten(1).norm(dim=1).mean()
    step = bcast(2 * sde.corrector_alpha(t) * (snr * z_norm / s_norm) ** 2, x)
    x_mean = x + step * s
    return x_mean + (2 * step).sqrt() * z, x_mean


@torch.no_grad()
def pc_sample(sde: SDE, score_fn: Callable, shape: tuple[int, ...], device=None, eps: float = 1e-3,
              predictor: str = "reverse_diffusion", snr: float = 0.16, corrector_steps: int = 1,
              progress: Callable = iter) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 1-3) on N = sde.N times from T down to eps.
    predictor: reverse_diffusion or euler_maruyama; corrector_steps = 0 leaves the predictor alone. `progress`
    wraps the loop over the N times."""
    x = sde.prior_sample(shape, device)  # x_N ~ p_T
    times = torch.linspace(sde.T, eps, sde.N, device=device, dtype=x.dtype)
    dt = (sde.T - eps) / sde.N
    x_mean = x
    for i in progress(range(sde.N)):
        t = times[i].expand(shape[0])
        for _ in range(corrector_steps):  # corrector at t, then the predictor from t to the next time
            x, x_mean = langevin_corrector_step(sde, score_fn, x, t, snr)
        if predictor == "reverse_diffusion":
            x, x_mean = reverse_diffusion_step(sde, score_fn, x, t)
        else:
            x, x_mean = euler_maruyama_step(sde, score_fn, x, t, dt)
    return x_mean  # no noise on the last step


@torch.no_grad()
def ode_sample(sde: SDE, score_fn: Callable, z: torch.Tensor, eps: float = 1e-3, rtol: float = 1e-5,
               atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """The probability-flow ODE (Song et al. 2021, Sec. 4.3) solved from x(T) = z to x(eps) with
    adaptive steps."""
    nfe = [0]

    def func(t, x):
        nfe[0] += 1
        return probability_flow_drift(sde, score_fn, x, t.expand(x.shape[0]))

    times = torch.tensor([sde.T, eps], device=z.device, dtype=z.dtype)
    return (odeint(func, z, times, rtol=rtol, atol=atol, method="dopri5", options={"step_t": times})[-1],
            nfe[0])


# ----------------------------------------------------------------------------------------------------------
# Latents by the probability-flow ODE: an invertible encoder x(eps) -> x(T), and interpolation between codes
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ode_encode(sde: SDE, score_fn: Callable, x: torch.Tensor, eps: float = 1e-3, rtol: float = 1e-5,
               atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """The latent code z = x(T) of data x = x(eps): the probability-flow ODE solved forward in time.

    Song et al. 2021, Sec. 4.3 ("manipulating latent representations"): the ODE is deterministic and
    invertible, so x -> x(T) is an encoder and ode_sample (from T down to eps) its decoder;
    ode_sample(ode_encode(x)) = x up to the solver's tolerance. Returns z and the function evaluations."""
    nfe = [0]

    def func(t, y):
        nfe[0] += 1
        return probability_flow_drift(sde, score_fn, y, t.expand(y.shape[0]))

    times = torch.tensor([eps, sde.T], device=x.device, dtype=x.dtype)
    return (odeint(func, x, times, rtol=rtol, atol=atol, method="dopri5", options={"step_t": times})[-1],
            nfe[0])


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between codes z0, z1 (B, ...) at the fractions alpha (F,): (F, B, ...).

    Shoemake 1985, as used for the latents of Song et al. 2021 (Fig. 4):
    slerp(z0, z1; a) = sin((1 - a) omega) / sin(omega) z0 + sin(a omega) / sin(omega) z1,
    cos(omega) = <z0, z1> / (|z0| |z1|). Gaussian codes in many dimensions concentrate on a sphere of radius
    sqrt(D); the straight line between two of them passes well inside it, where the prior puts no mass."""
    a0, a1 = z0.flatten(1), z1.flatten(1)
    cos = (a0 * a1).sum(1) / (a0.norm(dim=1) * a1.norm(dim=1))
    omega = cos.clamp(-1, 1).acos()[None, :]  # (1, B)
    a = alpha.to(z0)[:, None]  # (F, 1)
    w0 = torch.sin((1 - a) * omega) / torch.sin(omega)
    w1 = torch.sin(a * omega) / torch.sin(omega)
    # parallel codes (omega = 0): the sines vanish; the line is the limit
    w0, w1 = torch.where(omega > 1e-6, w0, 1 - a), torch.where(omega > 1e-6, w1, a)
    return (w0[:, :, None] * a0 + w1[:, :, None] * a1).view(len(alpha), *z0.shape)


@torch.no_grad()
def interpolate(sde: SDE, score_fn: Callable, x0: torch.Tensor, x1: torch.Tensor, frames: int,
                eps: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-5) -> torch.Tensor:
    """Encode x0 and x1 (B, ...) by the ODE, slerp their codes at `frames` evenly spaced fractions from 0 to
    1, and decode each: (B, frames, ...). The first and last frames are the reconstructions of x0 and x1."""
    z = ode_encode(sde, score_fn, torch.cat([x0, x1]), eps, rtol, atol)[0]
    z_path = slerp(*z.chunk(2), torch.linspace(0, 1, frames))  # (F, B, ...)
    x = ode_sample(sde, score_fn, z_path.flatten(0, 1), eps, rtol, atol)[0]
    return x.view(frames, *x0.shape).transpose(0, 1)


@torch.no_grad()
def sample(model: ScoreModel, n: int, shape: tuple[int, ...], args: Args, sde_name: str,
           progress: Callable = iter) -> torch.Tensor:
    """n samples in the model's coordinates with --sampler (`progress` wraps its loop; the ODE solver
    has none)."""
    device = next(model.parameters()).device
    sampler = args.sampler if args.sampler != "auto" else ("ald" if model.method == "ncsn" else "pc")
    eps = SAMPLE_EPS["ve" if model.method == "ncsn" else sde_name]
    if sampler == "ald":
        # images: uniform noise (Song & Ermon 2019)
        x = torch.rand(n, *shape, device=device) if len(shape) == 3 else \
            torch.randn(n, *shape, device=device) * model.sigmas[0]
        return annealed_langevin(lambda y, i: model.score(y, model.level_t[i].expand(n)), x, model.sigmas,
                                 args.ald_eps, args.ald_steps, progress)
    if sampler == "ode":
        z = model.sde.prior_sample((n, *shape), device)
        return ode_sample(model.sde, model.score, z, eps, args.rtol, args.atol)[0]
    predictor = "reverse_diffusion" if sampler == "pc" else "euler_maruyama"
    corrector_steps = args.corrector_steps if sampler == "pc" else 0
    return pc_sample(model.sde, model.score, (n, *shape), device, eps, predictor, args.snr, corrector_steps,
                     progress)


# ----------------------------------------------------------------------------------------------------------
# Evaluation and pictures
# ----------------------------------------------------------------------------------------------------------
def centered(method: str, sde_name: str) -> bool:
    # VP / sub-VP on [-1, 1], VE and NCSN on [0, 1] (authors' code)
    return method == "sde" and sde_name != "ve"


def to_model(x: torch.Tensor, kind: str, center: bool) -> torch.Tensor:
    """Images: k/255 -> dequantized (k + u) / 256 in [0, 1), then [-1, 1) if centered; toys unchanged."""
    if kind != "8bit":
        return x
    y = common.uniform_dequantize(x)
    return 2 * y - 1 if center else y


def to_data(x: torch.Tensor, kind: str, center: bool) -> torch.Tensor:
    if kind != "8bit":
        return x
    return ((x + 1) / 2 if center else x).clamp(0, 1)


@torch.no_grad()
def evaluate(model: ScoreModel, x: torch.Tensor, data: common.Data, args: Args, center: bool) -> dict:
    """Test NLL by the probability-flow ODE: nats (and KL) for toys, bits/dim of the 8-bit data for images."""
    divergence = args.divergence if args.divergence != "auto" else \
        ("exact" if data.num_dims <= EXACT_TRACE_MAX_DIMS else "rademacher")
    start, total, nfe, solves = time.time(), 0.0, 0, 0
    what = f"test NLL by the probability-flow ODE ({divergence} divergence), {len(x):,} " + \
        ("points" if data.kind == "toy" else "images")
    for xb in common.progress(x.split(TOY_BATCH if data.kind == "toy" else IMAGE_BATCH), what, len(x)):
        log_p, n = ode_log_likelihood(model.sde, model.score, to_model(xb, data.kind, center), T_EPS,
                                      args.rtol, args.atol, divergence)
        total, nfe, solves = total + log_p.sum().item(), nfe + n, solves + 1
    nll = -total / len(x)
    # a density over the dequantized data: bins 1/256 wide on [0, 1], 2/256 on [-1, 1]
    if data.kind == "8bit":
        out = {"nll_bpd": common.bits_per_dim(nll, data.num_dims, bin_width=(2 if center else 1) / 256)}
    else:
        out = {"nll_nats": nll, "kl_data_model": nll - data.entropy}  # KL(data || model) = NLL - H(data)
    out.update(nfe=nfe / solves, eval_s=time.time() - start)
    return out


def grid_points(bins: int, lim: float, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Centres of a bins x bins grid over [-lim, lim]^2, row-major with rows from y = lim down (as
    common.histogram_2d): (bins * bins, 2), in dtype (None: torch's default dtype)."""
    steps = torch.arange(bins, device=device, dtype=dtype or torch.get_default_dtype())
    centres = (steps + 0.5) * (2 * lim / bins) - lim
    y, x = torch.meshgrid(centres.flip(0), centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


@torch.no_grad()
def density_on_grid(model: ScoreModel, bins: int = GRID_BINS, lim: float = GRID_LIM, tol: float = GRID_TOL):
    """p(x) of a 2D model from the probability-flow ODE (exact divergence) at the grid centres:
    (bins, bins)."""
    points = grid_points(bins, lim, next(model.parameters()).device)
    log_p = torch.cat([ode_log_likelihood(model.sde, model.score, p, T_EPS, tol, tol)[0]
                       for p in points.split(TOY_BATCH)])
    return log_p.exp().view(bins, bins)


@torch.no_grad()
def draw_pictures(model: ScoreModel, data: common.Data, run: common.Run, args: Args, step: int,
                  center: bool) -> None:
    """samples.png (a grid, or a 2D histogram for toys) and a copy per evaluation; toys: density.png and
    data.png."""
    if data.kind == "toy":
        x = sample(model, TOY_SAMPLES, data.shape, args, args.sde,
                   common.steps_bar(f"sampling {TOY_SAMPLES:,} points"))
        counts = common.histogram_2d(x, GRID_BINS, GRID_LIM)
        common.save_heatmap(run.path("density.png"), density_on_grid(model, args.grid_bins))
        common.save_heatmap(run.path("data.png"), common.histogram_2d(data.test_x, GRID_BINS, GRID_LIM))
        for name in ("samples.png", f"samples_{step:07d}.png"):
            common.save_heatmap(run.path(name), counts)
        return
    x = to_data(sample(model, 64, data.shape, args, args.sde, common.steps_bar("sampling 64 images")),
                data.kind, center)
    for name in ("samples.png", f"samples_{step:07d}.png"):
        common.save_grid(run.path(name), x, nrow=8)


@torch.no_grad()
def draw_interpolation(model: ScoreModel, data: common.Data, run: common.Run, args: Args,
                       center: bool) -> None:
    """interp.png: test images 2i and 2i + 1 (i < INTERP_PAIRS) in the first and last columns, and between
    them the decoded slerp of their probability-flow codes, --interp-frames columns (its ends are the
    reconstructions)."""
    eps = SAMPLE_EPS["ve" if model.method == "ncsn" else args.sde]
    with common.eval_mode(model, seed=args.seed):
        x = to_model(data.test_x[: 2 * INTERP_PAIRS], data.kind, center)
        path = interpolate(model.sde, model.score, x[0::2], x[1::2], args.interp_frames, eps,
                           args.interp_tol, args.interp_tol)
    grid = torch.cat([x[0::2, None], path, x[1::2, None]], dim=1).flatten(0, 1)
    common.save_grid(run.path("interp.png"), to_data(grid, data.kind, center), nrow=args.interp_frames + 2)
    pairs = ", ".join(f"{2 * i} to {2 * i + 1}" for i in range(INTERP_PAIRS))
    run.print(f"interpolation by the probability-flow ODE: {run.path('interp.png')} (test images {pairs})")


def evaluate_and_draw(run: common.Run, model: ScoreModel, data: common.Data, args: Args, step: int, n: int,
                      center: bool) -> dict:
    """Likelihood on the first n test examples and pictures, from the EMA weights (rank 0); one log line."""
    x = data.test_x[:n] if n else data.test_x
    with common.eval_mode(model, seed=args.seed):
        metrics = evaluate(model, x, data, args, center)
        draw_pictures(model, data, run, args, step, center)
    divergence = args.divergence if args.divergence != "auto" else \
        ("exact" if data.num_dims <= EXACT_TRACE_MAX_DIMS else "rademacher")
    what = "VE SDE of the NCSN ladder" if model.method == "ncsn" else f"{args.sde} SDE"
    run.log("test", step, metrics, note=f"probability-flow ODE, {what}, {divergence} divergence, dopri5 "
                                        f"rtol={args.rtol:g} atol={args.atol:g}, n={len(x)}")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
class EMA(nn.Module):
    """An exponential moving average of a model's weights, a full model itself (sampled and evaluated)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.model, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # theta_ema <- d theta_ema + (1 - d) theta, d = min(decay, (1 + n) / (10 + n)) (warm-up: a deviation)
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)


def default_sigma_max(data: common.Data, args: Args) -> float:
    """--sigma-max, or 1 for NCSN on images (Song & Ermon 2019), or the largest pairwise distance of the first
    1000 training examples in the model's coordinates (Song & Ermon 2020, Technique 1)."""
    if args.sigma_max > 0:
        return args.sigma_max
    if args.method == "ncsn" and data.kind != "toy":
        return 1.0
    x = data.train_x[:1000].flatten(1).double()
    return torch.cdist(x, x).max().item()


def build_model(data: common.Data, args: Args) -> ScoreModel:
    if data.kind == "toy":
        # the embedding of 30 t, not 999 t: its fastest features then oscillate 33 times slower in t, and the
        # adaptive ODE solver took 710 function evaluations per likelihood solve with 999 t against 140 with
        # 30 t (same training)
        net = MLP(data.shape[0], args.hidden, time_scale=30.0)
    else:
        res = data.shape[1]
        mult = args.channel_mult or ((1, 2, 2, 2) if res >= 32 else (1, 2, 2))
        net = UNet(data.shape, args.channels or (128 if res >= 32 else 64), mult, args.num_res_blocks,
                   args.attn_res or (res // 2,), args.dropout, time_scale=999.0)
    sigma_max = default_sigma_max(data, args)
    # NCSN's ladder, and the VE SDE it discretizes (for the ODE likelihood and pc/em/ode)
    if args.method == "ncsn":
        sde = VESDE(args.sigma_min, sigma_max, args.sample_steps)
        return ScoreModel(net, "ncsn", sde, args.objective,
                          ncsn_sigmas(sigma_max, args.sigma_min, args.num_scales))
    return ScoreModel(net, "sde", make_sde(args.sde, args, sigma_max), args.objective)


def check_args(data: common.Data, args: Args) -> None:
    if args.objective == "ism" and data.num_dims > EXACT_TRACE_MAX_DIMS:
        raise common.RunError(
            f"--objective ism takes {data.num_dims} backward passes per step here: use ssm or dsm "
            f"for more than {EXACT_TRACE_MAX_DIMS} dimensions")
    if args.sampler == "ald" and args.method != "ncsn":
        raise common.RunError("--sampler ald anneals over NCSN's sigmas: use it with --method ncsn")
    if args.interp_frames == 1:
        raise common.RunError("--interp-frames 1 has no frames between the two codes: use 0 (none) or >= 2")


def train(args: Args) -> dict:
    dist, device = common.setup(args)
    if common.dataset_kind(args.dataset) == "binary":  # refused before any data is read or downloaded
        raise common.DataError(
            f"ncsn_sde.py models densities of continuous data: use mnist (8-bit, dequantized), "
            f"not {args.dataset}")
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    check_args(data, args)
    center = data.kind == "8bit" and centered(args.method, args.sde)
    model = build_model(data, args).to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "ncsn_sde", dist, model, optimizer, ema=ema,
                     resumable=("grid_bins", "interp_frames", "interp_tol", "sampler", "sample_steps", "snr",
                                "corrector_steps", "ald_eps", "ald_steps", "divergence", "rtol", "atol"))
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, None, args.batch_size, args.seed, dist)
    total = args.steps or (20_000 if data.kind == "toy" else 1_300_000 if data.shape[1] >= 32 else 50_000)
    eval_every = args.eval_every or max(1, total // 5)
    what = f"NCSN, L = {args.num_scales}" if args.method == "ncsn" else f"{args.sde} SDE"
    run.print(
        f"ncsn_sde: {what}, {args.objective}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{data.name} {data.shape}, {total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        # Song et al. 2021, Appendix H: linear warm-up of the learning rate
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        with common.autocast(device, args.amp):
            loss, metrics = ddp(to_model(x, data.kind, center))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:  # Song et al. 2021, Appendix H: gradient clipping at norm 1
            metrics["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        ema.update(model, step)
        run.log_train(step, metrics)
        if (step + 1) % eval_every == 0 and step + 1 < total and dist.is_main:
            n = min(args.eval_n or PERIODIC_EVAL_N, PERIODIC_EVAL_N)
            evaluate_and_draw(run, ema.model, data, args, step + 1, n, center)

    if dist.enabled:
        run.print(
            f"ddp: largest parameter difference between ranks {common.replicas_max_diff(model, dist):.3g}")
    if not dist.is_main:
        return {}
    if data.kind != "toy" and args.interp_frames:
        draw_interpolation(ema.model, data, run, args, center)
    return evaluate_and_draw(run, ema.model, data, args, total, args.eval_n, center)


if __name__ == "__main__":
    common.cli(train, Args, PRESETS)
