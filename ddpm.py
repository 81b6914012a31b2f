"""Denoising diffusion: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.

A fixed forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) turns data into noise in
T = 1000 steps; a network eps_theta(x_t, t) learns to predict the noise, which gives the reverse process
p(x_{t-1} | x_t). Trained with L_simple (Eq. 14), sampled with Algorithm 2 or DDIM, evaluated by the
variational bound (Table 2).

    python ddpm.py --quick --dataset 8gaussians       # under a minute on a CPU: the MLP on a 2D toy
    python ddpm.py --quick --dataset mnist            # a 2-minute smoke test on a CPU: a small U-Net,
                                                      # 1000 steps
    python ddpm.py --dataset mnist --channels 32 --channel-mult 1 2 --num-res-blocks 1 --attn-res 0 \
        --dropout 0 --batch-size 32 --lr 1e-3 --warmup 100 --steps 3000 --eval-every 1000 --eval-n 1000 \
        --eval-t 50 --sampler ddim --sample-steps 50   # CPU recipe: 30 minutes on 2 cores
    python ddpm.py --dataset cifar10                  # the paper's 35.7M-parameter U-Net, 800k steps (GPU)
    python ddpm.py --dataset cifar10 --amp --compile  # the same in bf16, compiled
                                                      # (channels-last is on for cuda)
    python -m results.bench --gpu-ddpm --device cuda  # that training step and sampling in images/s,
                                                      # against lucidrains'
    python ddpm.py --dataset cifar10 --amp --fid --eval-t 100 --sampler ddim --sample-steps 100
                                                      # faster checks
    python ddpm.py --dataset 8gaussians --batch-size 256 --steps 6000 --lr 1e-3 --warmup 100 --ema-decay 0.999
    torchrun --nproc_per_node=8 ddpm.py --dataset cifar10 --batch-size 16 --amp

Data are scaled to [-1, 1] (images) or used as they are (2D toys). The bound is L_T + sum_{t>1} L_{t-1} + L_0:
closed-form Gaussian KL terms, and a discretized Gaussian decoder L_0 over the 256 pixel values (Eq. 13), so
images report bits/dim of the discrete data directly; toys use a Gaussian density decoder and report nats and
KL(data || model) = NLL - H(data). The sum over t is exact (--eval-t 0 or T) or a stratified estimate.

Deviations from the paper:
- The EMA decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs (and --quick) sample
  from useful weights; after ~90k steps it is the paper's 0.9999.
- L_simple is the mean over pixels of (eps - eps_theta)^2 rather than the sum (a constant factor, which Adam
  ignores); the toy MLP, the MNIST-sized U-Net (64 channels, multipliers (1, 2, 2)), the cosine schedule and
  DDIM are not in the paper. At t = 1 the decoder variance is beta_1 (sigma_t^2 = beta_t) or beta~_2
  (sigma_t^2 = beta~_t, whose first value is 0), as in the authors' code for the latter.
- Image sampling clips the predicted x_0 to [-1, 1] at every step (`--clip-denoised`, the default), as the
  authors' code does (clip_denoised); Algorithm 2 as printed does not (`--no-clip-denoised`). An undertrained
  model otherwise drifts to saturated images.

Expected result: the paper reports NLL <= 3.75 bits/dim and FID 3.17 on CIFAR-10 (800k steps of batch 128 on a
TPU v3-8). README.md's rows ddpm-mnist (the CPU recipe) and ddpm-8gaussians / ddpm-two_moons have the measured
bounds, wall times and pictures (`python -m results.table run ddpm-mnist`).
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import common


@dataclass
class Args:
    dataset: str = "cifar10"  # an 8-bit image dataset (cifar10, mnist, fashion_mnist) or a 2D toy
                              # (see README)
    timesteps: int = 1000  # T, the number of diffusion steps; >= 2
    schedule: Literal["linear", "cosine"] = "linear"  # linear: beta_1 = 1e-4 .. beta_T = 0.02 (paper);
                                                      # cosine: Nichol & Dhariwal 2021
    variance: Literal["beta", "posterior"] = "beta"  # reverse variance sigma_t^2: beta_t or
                                                     # beta~_t (posterior)
    channels: int = 0  # U-Net base channels (0: 128 for 32x32 as in the paper, 64 for 28x28); >= 0
    channel_mult: tuple[int, ...] = ()  # U-Net channel multipliers per resolution (empty: (1, 2, 2, 2) for
                                        # 32x32, (1, 2, 2) for 28x28); >= 1
    num_res_blocks: int = 2  # residual blocks per resolution; >= 1
    attn_res: tuple[int, ...] = ()  # resolutions with self-attention (empty: the second, 16 for 32x32, 14 for
                                    # 28x28; 0: none); >= 0
    dropout: float = 0.1  # dropout in the residual blocks; in [0, 1)
    hidden: int = 256  # hidden units of the toy MLP; >= 1
    steps: int = 0  # optimizer steps (0: 800,000 for 32x32 as in the paper, 50,000 for 28x28, 20,000
                    # for toys); >= 0
    batch_size: int = 128  # minibatch per process; >= 1
    lr: float = 2e-4  # Adam learning rate; > 0
    warmup: int = 5000  # steps of linear learning-rate warm-up; >= 0
    grad_clip: float = 1.0  # clip the gradient norm at this value (0: off); >= 0
    ema_decay: float = 0.9999  # EMA of the weights, used for sampling and evaluation; in [0, 1)
    sampler: Literal["ancestral", "ddim"] = "ancestral"  # pictures: Algorithm 2, or DDIM (Song et al. 2021)
    sample_steps: int = 0  # DDIM steps (0: T); >= 0
    eta: float = 0.0  # DDIM eta: 0 deterministic, 1 ancestral with the posterior variance; in [0, 1]
    clip_denoised: bool = True  # images: clip the predicted x_0 to [-1, 1] when sampling (the authors' code)
    eval_t: int = 0  # timesteps per test example in the final bound (0: all T, exact; fewer:
                     # stratified); >= 0
    eval_n: int = 0  # test examples in the final evaluation (0: all; during training on a CPU at
                     # most 1000); >= 0
    eval_every: int = 0  # steps between evaluations and sample grids (0: ten per run); >= 0
    fid: bool = False  # final FID against the training set (needs the pytorch-fid package)
    fid_n: int = 50_000  # samples (and training images) for FID; >= 2
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 5000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    channels_last: bool | None = None  # U-Net weights and activations in channels-last (NHWC) memory
                                       # (None: cuda only)
    compile: bool = False  # torch.compile the network (its first steps compile it, minutes; faster
                           # after, on a GPU)
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/ddpm-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a 2D toy: its modes in 30 s; images: a smoke test that ends with the CPU recipe


QUICK = dict(dataset="mnist", steps=1000, batch_size=64, channels=32, channel_mult=(1, 2), num_res_blocks=1,
             warmup=100, eval_n=500, eval_t=50, eval_every=1000, sampler="ddim", sample_steps=50,
             log_every=100, ckpt_every=1000)
QUICK_TOY = dict(steps=3000, batch_size=256, lr=1e-3, warmup=100, ema_decay=0.999, eval_t=100, eval_n=5000,
                 eval_every=3000, sampler="ddim", sample_steps=100, log_every=500, ckpt_every=3000)
PRESETS = {"quick": common.toy_or_image(QUICK, QUICK_TOY, Args.dataset)}  # --quick: QUICK_TOY on a 2D toy
PERIODIC_EVAL_T = 20  # stratified timesteps per example in the evaluations during training
# test examples in the evaluations during training on a CPU (the final one: --eval-n)
PERIODIC_EVAL_N_CPU = 1000
# (example, t) pairs per noise draw in the bound (toys; images use ROWS_PER_CHUNK // 16)
ROWS_PER_CHUNK = 4096
# CPU: values (pairs x C x H x W) per network call of the bound: 41 MNIST pairs, 10 CIFAR-10
VALUES_PER_CALL = 2**15


# ----------------------------------------------------------------------------------------------------------
# Noise schedules: index t = 0..T, with beta_0 = 0 so alphas_cumprod[0] = 1 (no noise)
# ----------------------------------------------------------------------------------------------------------
def linear_betas(T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    # Ho et al. 2020, Sec. 4: beta_t increasing linearly from 1e-4 to 0.02; (T + 1,) with beta_0 = 0
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.linspace(beta_1, beta_T, T, dtype=torch.float64)])


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, Eq. 17: alphas_cumprod_t = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s)
    # * pi/2)^2; beta_t = 1 - alphas_cumprod_t / alphas_cumprod_{t-1}, clipped at 0.999
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cat([torch.zeros(1, dtype=torch.float64), betas])


# ----------------------------------------------------------------------------------------------------------
# Networks: eps_theta(x_t, t), t an integer tensor (B,) in 1..T
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
# The diffusion: forward process, posterior, reverse mean, L_simple
# ----------------------------------------------------------------------------------------------------------
class Diffusion(nn.Module):
    """Schedule buffers (index t = 0..T) and the noise predictor `net`. `forward(x0)` returns
    L_simple (for DDP).

    kind "8bit": x0 on the grid {-1, -1 + 2/255, ..., 1}, discretized Gaussian decoder; "toy":
    Gaussian density.
    """

    def __init__(self, net: nn.Module, kind: str, T: int = 1000, schedule: str = "linear",
                 variance: str = "beta"):
        super().__init__()
        self.net, self.kind, self.T, self.variance = net, kind, T, variance
        betas = linear_betas(T) if schedule == "linear" else cosine_betas(T)
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        # Ho et al., Eq. 7: beta~_t = (1 - alphas_cumprod_{t-1}) / (1 - alphas_cumprod_t) beta_t (0 at t = 1)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_var = torch.cat([torch.zeros(1, dtype=torch.float64),
                                   (1 - prev[1:]) / (1 - alphas_cumprod[1:]) * betas[1:]])
        # Ho et al., Sec. 3.2: sigma_t^2 = beta_t or beta~_t; at t = 1 beta~_1 = 0, so the decoder there
        # uses beta~_2
        sigma2 = betas.clone() if variance == "beta" else posterior_var.clone()
        if variance == "posterior":
            sigma2[1] = posterior_var[2]
        # computed in float64, kept in the model's dtype (the default one until .to / .double / .float);
        # rebuilt from the config, so not checkpointed
        self._schedule64 = dict(betas=betas, alphas=alphas, alphas_cumprod=alphas_cumprod,
                                posterior_var=posterior_var, sigma2=sigma2)
        for name, value in self._schedule64.items():
            self.register_buffer(name, value.to(torch.get_default_dtype()), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """.to(), .double(), .cuda() ... cast and move the buffers as usual; a float64 model then takes the
        schedule from its float64 original rather than from float32 values widened (which would keep float32
        precision)."""
        super()._apply(fn, recurse)
        for name, exact in self._schedule64.items():
            if self._buffers[name].dtype == torch.float64:
                self._buffers[name] = exact.to(self._buffers[name].device)
        return self

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Schedule value at t (B,), shaped (B, 1, ...) to broadcast against x."""
        return getattr(self, name)[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # Ho et al., Eq. 4: q(x_t | x_0) = N(sqrt(alphas_cumprod_t) x_0, (1 - alphas_cumprod_t) I)
        a = self._at("alphas_cumprod", t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Ho et al., Eq. 7: q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I), mu~_t =
        #   sqrt(alphas_cumprod_{t-1}) beta_t / (1 - alphas_cumprod_t) x_0
        #   + sqrt(alpha_t) (1 - alphas_cumprod_{t-1}) / (1 - alphas_cumprod_t) x_t
        a, a_prev = self._at("alphas_cumprod", t, x0), self._at("alphas_cumprod", t - 1, x0)
        beta, alpha = self._at("betas", t, x0), self._at("alphas", t, x0)
        mean = a_prev.sqrt() * beta / (1 - a) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a) * x_t
        return mean, self._at("posterior_var", t, x0)

    def p_mean(self, x_t: torch.Tensor, t: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
        # Ho et al., Eq. 11: mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphas_cumprod_t)
        # eps_theta(x_t, t))
        a, beta, alpha = (self._at("alphas_cumprod", t, x_t), self._at("betas", t, x_t),
                          self._at("alphas", t, x_t))
        return (x_t - beta / (1 - a).sqrt() * eps_pred) / alpha.sqrt()

    def forward(self, x0: torch.Tensor):
        # Ho et al., Algorithm 1: t ~ Uniform({1, ..., T}), eps ~ N(0, I), a gradient step on
        # Eq. 14: L_simple = || eps - eps_theta(sqrt(alphas_cumprod_t) x_0 + sqrt(1 - alphas_cumprod_t)
        # eps, t) ||^2
        t = torch.randint(1, self.T + 1, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        eps_pred = self.net(self.q_sample(x0, t, eps), t).to(x0.dtype)  # float32 under bf16 autocast
        loss = (eps - eps_pred).pow(2).mean()
        return loss, {"loss": loss}


# ----------------------------------------------------------------------------------------------------------
# Likelihood: the variational bound L = L_T + sum_{t=2}^T L_{t-1} + L_0 (Ho et al., Eq. 5)
# ----------------------------------------------------------------------------------------------------------
def normal_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor,
              var2: torch.Tensor) -> torch.Tensor:
    # KL(N(m1, v1) || N(m2, v2)) = 1/2 (log v2/v1 + (v1 + (m1 - m2)^2) / v2 - 1), summed over all but dim 0
    kl = 0.5 * (torch.log(var2) - torch.log(var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)
    return kl.flatten(1).sum(1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-a)) for a > 0. One formula, finite everywhere: torch.where would turn an infinite value in
    the branch it discards into a NaN gradient."""
    return torch.log(-torch.expm1(-a.clamp(min=1e-12)))


def discretized_gaussian_log_prob(x0: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log p(x_0 | x_1) of 8-bit data on [-1, 1], summed per example: (B,).

    Ho et al., Eq. 13: the Gaussian's mass on [x - 1/255, x + 1/255], with the edge bins open to
    -inf and +inf.
    """
    z_plus = (x0 - mean + 1 / 255) / var.sqrt()  # upper edge, standardized
    z_minus = (x0 - mean - 1 / 255) / var.sqrt()  # lower edge
    log_cdf_plus, log_sf_minus = torch.special.log_ndtr(z_plus), torch.special.log_ndtr(-z_minus)
    # Phi(b) - Phi(a) on the accurate tail: left of the mean Phi(b) (1 - Phi(a)/Phi(b)), right of
    # it the mirror
    left = log_cdf_plus + _log1mexp(log_cdf_plus - torch.special.log_ndtr(z_minus))
    right = log_sf_minus + _log1mexp(log_sf_minus - torch.special.log_ndtr(-z_plus))
    log_p = torch.where(z_plus + z_minus < 0, left, right)
    log_p = torch.where(x0 < -1 + 1 / 255, log_cdf_plus, log_p)  # x = -1: Phi(upper edge)
    log_p = torch.where(x0 > 1 - 1 / 255, log_sf_minus, log_p)  # x = 1: 1 - Phi(lower edge)
    return log_p.flatten(1).sum(1)


def continuous_gaussian_log_prob(x0: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    # log N(x_0; mean, var I), summed per example: the decoder for continuous (toy) data
    return (-0.5 * (math.log(2 * math.pi) + torch.log(var) + (x0 - mean) ** 2 / var)).flatten(1).sum(1)


def prior_kl(model: Diffusion, x0: torch.Tensor) -> torch.Tensor:
    # L_T = KL(q(x_T | x_0) || N(0, I)): no parameters, close to 0
    t = torch.full((len(x0),), model.T, device=x0.device)
    a = model._at("alphas_cumprod", t, x0)
    return normal_kl(a.sqrt() * x0, (1 - a).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0))


def bound_terms(model: Diffusion, x0: torch.Tensor, t: torch.Tensor, net_rows: int = 0) -> torch.Tensor:
    """One-sample estimate of L_{t-1} for each pair (x0[i], t[i]), nats (B,):
    t > 1: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)); t = 1: L_0 = -log p_theta(x_0 | x_1).
    The noise is drawn for all B pairs at once; the network sees at most `net_rows` of them at a time
    (0: all)."""
    x_t = model.q_sample(x0, t, torch.randn_like(x0))
    calls = -(-len(x0) // net_rows) if net_rows else 1  # equal calls of at most net_rows pairs
    eps_pred = model.net(x_t, t) if calls <= 1 else \
        torch.cat([model.net(xb, tb) for xb, tb in zip(x_t.tensor_split(calls), t.tensor_split(calls))])
    mean = model.p_mean(x_t, t, eps_pred.to(x0.dtype))
    var = model._at("sigma2", t, x0)
    q_mean, q_var = model.q_posterior(x0, x_t, t)
    kl = normal_kl(q_mean, q_var.clamp(min=1e-30).expand_as(x0), mean, var.expand_as(x0))  # Ho et al., Eq. 5
    # no L_0 among these pairs: skip the decoder's log-CDFs (a host sync on a GPU)
    if not bool((t == 1).any()):
        return kl
    decoder = discretized_gaussian_log_prob if model.kind == "8bit" else continuous_gaussian_log_prob
    return torch.where(t == 1, -decoder(x0, mean, var), kl)


def stratified_timesteps(n: int, k: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """t (n, k') and weights (n, k') with sum_j w_j L(t_j) an unbiased estimate of sum_{t=2}^T L(t): one t
    drawn uniformly from each of k' <= k contiguous strata of {2, ..., T}, weighted by the stratum's size."""
    # geometric strata: the terms at small t carry most of the bound and of its variance, so they get strata
    # of one or a few t each; strata that round to the same edges merge, so there may be fewer than k
    edges = torch.logspace(0, math.log10(T), k + 1, device=device,
                           dtype=torch.float64).round().long().unique() - 1
    sizes = edges[1:] - edges[:-1]  # stratum j: t = 2 + edges[j] .. 1 + edges[j+1]
    offset = (torch.rand(n, len(sizes), device=device) * sizes).long().clamp(max=sizes - 1)
    return 2 + edges[:-1] + offset, sizes.expand(n, -1).float()


def bound_net_rows(x0: torch.Tensor) -> int:
    """(example, t) pairs per network call in the bound: on a CPU, VALUES_PER_CALL values (the activations
    then stay in cache); on a GPU, 0 (every pair of a noise draw in one call)."""
    return max(1, VALUES_PER_CALL // x0[0].numel()) if x0.device.type == "cpu" else 0


@torch.no_grad()
def nll_bound(model: Diffusion, x0: torch.Tensor, num_t: int = 0, rows: int = ROWS_PER_CHUNK,
              net_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The variational bound on -log p(x_0) in nats per example (B,), and its parts L_T, L_1..L_{T-1}, L_0.

    Ho et al., Eq. 5 and Table 2: L = L_T + sum_{t=2}^T L_{t-1} + L_0; L_0 and L_T exactly, the middle sum
    over all t (num_t = 0 or >= T - 1) or over num_t stratified t per example. The noise is drawn `rows` pairs
    at a time and the network runs `net_rows` pairs at a time (None: bound_net_rows), which changes
    only the speed.
    """
    n, T = len(x0), model.T
    net_rows = bound_net_rows(x0) if net_rows is None else net_rows
    k = T - 1 if num_t <= 0 or num_t >= T - 1 else num_t
    if k == T - 1:  # exact: every t = 2..T, weight 1
        t = torch.arange(2, T + 1, device=x0.device).expand(n, k)
        w = torch.ones(n, k, device=x0.device, dtype=x0.dtype)
    else:
        t, w = stratified_timesteps(n, k, T, x0.device)
        k = t.shape[1]
    index = torch.arange(n, device=x0.device).repeat_interleave(k)  # pair j -> example index[j]
    t, w = t.reshape(-1), w.reshape(-1).to(x0.dtype)
    terms = torch.cat([bound_terms(model, x0[index[s:s + rows]], t[s:s + rows], net_rows)
                       for s in range(0, len(t), rows)])  # (n k,)
    middle = (w * terms).view(n, k).sum(1)
    l0 = torch.cat([bound_terms(model, xb, torch.ones(len(xb), dtype=torch.long, device=x0.device), net_rows)
                    for xb in x0.split(rows)])
    l_T = prior_kl(model, x0)
    return {"nll": l_T + middle + l0, "prior": l_T, "diffusion": middle, "decoder": l0}


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ancestral(model: Diffusion, shape: tuple[int, ...], keep: int = 0, progress: Callable = iter,
                     clip: bool = False):
    """Ho et al., Algorithm 2. Returns x_0 (n, ...) and `keep` snapshots of x_t from x_T to x_0. `progress`
    wraps the loop over t (a progress bar, say). clip: the authors' clip_denoised for images, the mean taken
    as q's posterior mean around the predicted x_0 clipped to [-1, 1] (the same mean when no
    clipping bites)."""
    device = model.betas.device
    # line 1: x_T ~ N(0, I), in the model's dtype
    x = torch.randn(shape, device=device, dtype=model.betas.dtype)
    frames, keep_at = [], _snapshot_steps(model.T, keep)
    for t in progress(range(model.T, 0, -1)):  # line 2
        if t in keep_at:
            frames.append(x)
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = model.net(x, tt).to(x.dtype)
        # x_0 = (x_t - sqrt(1 - alphas_cumprod_t) eps) / sqrt(alphas_cumprod_t) (Eq. 4), clipped; Eq. 7's mean
        if clip:
            a = model.alphas_cumprod[t]
            mean = model.q_posterior(((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1), x, tt)[0]
        else:  # Eq. 11
            mean = model.p_mean(x, tt, eps)
        # lines 3-4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) if t > 1, else z = 0
        x = mean + model.sigma2[t].sqrt() * torch.randn_like(x) if t > 1 else mean
    return x, frames + [x] if keep else []


@torch.no_grad()
def sample_ddim(model: Diffusion, shape: tuple[int, ...], steps: int = 0, eta: float = 0.0, keep: int = 0,
                progress: Callable = iter, clip: bool = False):
    """Song, Meng & Ermon 2021 (DDIM), Eq. 12 on `steps` evenly spaced timesteps T = tau_S > ... > tau_0 = 0.
    clip: the predicted x_0 clipped to [-1, 1] and eps re-derived from it (as guided-diffusion's
    ddim_sample)."""
    device = model.betas.device
    taus = torch.linspace(model.T, 0, (steps or model.T) + 1).round().long().unique_consecutive().tolist()
    x = torch.randn(shape, device=device, dtype=model.betas.dtype)
    frames, keep_at = [], _snapshot_steps(model.T, keep, taus[:-1])
    for t, s in progress(list(zip(taus[:-1], taus[1:]))):
        if t in keep_at:
            frames.append(x)
        a_t, a_s = model.alphas_cumprod[t], model.alphas_cumprod[s]
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = model.net(x, tt).to(x.dtype)
        x0_pred = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # "predicted x_0"
        if clip:
            x0_pred = x0_pred.clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0_pred) / (1 - a_t).sqrt()
        # sigma_tau(eta) = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s), Song et al., Eq. 16
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        # "direction pointing to x_t"
        x = a_s.sqrt() * x0_pred + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps
        if s > 0 and eta > 0:
            x = x + sigma * torch.randn_like(x)  # random noise
    return x, frames + [x] if keep else []


def _snapshot_steps(T: int, keep: int, grid: list[int] | None = None) -> set[int]:
    """The `keep` - 1 timesteps (of `grid`, default T..1) closest to evenly spaced ones from T down, x_0
    added last."""
    if keep <= 1:
        return set()
    grid = grid or list(range(T, 0, -1))
    return {min(grid, key=lambda g: abs(g - target)) for target in torch.linspace(T, 1, keep - 1).tolist()}


@torch.no_grad()
def sample(model: Diffusion, n: int, shape: tuple[int, ...], sampler: str = "ancestral", steps: int = 0,
           eta: float = 0.0, keep: int = 0, progress: Callable = iter, clip: bool = False):
    """n samples in the model's coordinates ([-1, 1] for images), and optional snapshots of the reverse
    process; clip: clip the predicted x_0 to [-1, 1] at every step (images)."""
    if sampler == "ddim":
        return sample_ddim(model, (n, *shape), steps, eta, keep, progress, clip)
    return sample_ancestral(model, (n, *shape), keep, progress, clip)


# ----------------------------------------------------------------------------------------------------------
# Sample quality: the Fréchet distance of Inception features (FID, Heusel et al. 2017)
# ----------------------------------------------------------------------------------------------------------
def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix, by its eigendecomposition."""
    values, vectors = torch.linalg.eigh(a)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    # Heusel et al. 2017, Eq. 6 (Dowson & Landau 1982): d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)),
    # with tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix
    mu1, sigma1, mu2, sigma2 = (v.double() for v in (mu1, sigma1, mu2, sigma2))
    root1 = sqrtm_psd(sigma1)
    cross = sqrtm_psd(root1 @ sigma2 @ root1)
    return float((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross.trace())


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


@torch.no_grad()
def inception_features(images: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
    """2048-d pool features of the FID Inception network (pytorch-fid) for images in [0, 1], (N, C, H, W)."""
    from pytorch_fid.inception import InceptionV3  # optional dependency, checked in train()

    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(images.device).eval()
    feats = [net(xb.expand(-1, 3, -1, -1))[0].flatten(1) for xb in images.split(batch_size)]  # grey -> RGB
    return torch.cat(feats)


# ----------------------------------------------------------------------------------------------------------
# Evaluation and pictures
# ----------------------------------------------------------------------------------------------------------
def to_model(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Images k/255 in [0, 1] -> the grid {-1, ..., 1} (Ho et al., Sec. 3.3); toys unchanged."""
    return torch.round(x * 255) / 255 * 2 - 1 if kind == "8bit" else x


def to_data(x: torch.Tensor, kind: str) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) / 2 * 255).round() / 255 if kind == "8bit" else x


@torch.no_grad()
def evaluate(model: Diffusion, x0: torch.Tensor, data: common.Data, num_t: int, batch_size: int) -> dict:
    """The bound on the test set in the repository's units: bits/dim for images, nats (and KL) for toys."""
    parts = {}
    what = f"test bound, {len(x0):,} {'points' if data.kind == 'toy' else 'images'} x " + \
        (f"{num_t} strata of t" if 0 < num_t < model.T - 1 else f"all {model.T} t")
    for xb in common.progress(x0.split(batch_size), what, len(x0)):
        rows = ROWS_PER_CHUNK if data.kind == "toy" else max(1, ROWS_PER_CHUNK // 16)
        for key, value in nll_bound(model, xb, num_t, rows).items():
            parts.setdefault(key, []).append(value)
    parts = {k: torch.cat(v) for k, v in parts.items()}
    se = parts["nll"].std().item() / math.sqrt(len(x0)) if len(x0) > 1 else 0.0
    if data.kind == "8bit":
        def unit(v):
            # discrete decoder: no bin width (Ho et al., Sec. 3.3)
            return common.bits_per_dim(v, data.num_dims)
        out = {"nll_bpd": unit(parts["nll"].mean().item()), "nll_se": unit(se)}
        out.update({f"{k}_bpd": unit(parts[k].mean().item()) for k in ("prior", "diffusion", "decoder")})
    else:
        out = {"nll_nats": parts["nll"].mean().item(), "nll_se": se,
               # KL(data || model) = NLL - H(data)
               "kl_data_model": parts["nll"].mean().item() - data.entropy}
        out.update({f"{k}_nats": parts[k].mean().item() for k in ("prior", "diffusion", "decoder")})
    return out


@torch.no_grad()
def draw_pictures(model: Diffusion, data: common.Data, run: common.Run, args: Args) -> None:
    """samples.png (a grid, or a 2D histogram for toys) and reverse.png (x_T to x_0 along the reverse
    process)."""
    if data.kind == "toy":
        # no clip
        x, frames = sample(model, 5000, data.shape, args.sampler, args.sample_steps, args.eta, keep=6,
                           progress=common.steps_bar(f"sampling 5,000 points ({args.sampler})"))
        common.save_heatmap(run.path("samples.png"), common.histogram_2d(x))
        common.save_heatmap(run.path("data.png"), common.histogram_2d(data.test_x))
        maps = [common.histogram_2d(f, bins=100) for f in frames]  # normalized one by one, side by side
        common.save_heatmap(run.path("reverse.png"), torch.cat([m / m.max().clamp(min=1) for m in maps], 1))
        return
    x, frames = sample(model, 64, data.shape, args.sampler, args.sample_steps, args.eta, keep=10,
                       progress=common.steps_bar(f"sampling 64 images ({args.sampler})"),
                       clip=args.clip_denoised)
    common.save_grid(run.path("samples.png"), to_data(x, data.kind), nrow=8)
    chains = torch.stack([to_data(f[:8], data.kind) for f in frames], 1)  # (8 chains, 10 frames, C, H, W)
    common.save_grid(run.path("reverse.png"), chains.flatten(0, 1), nrow=len(frames))


def fid(model: Diffusion, data: common.Data, args: Args) -> float:
    """FID of fid_n samples against fid_n training images (Ho et al., Sec. 4: 50k samples, training set)."""
    fake = []
    for i in range(0, args.fid_n, 500):
        what = f"FID samples {i + 1:,}-{min(i + 500, args.fid_n):,} of {args.fid_n:,} ({args.sampler})"
        x = sample(model, min(500, args.fid_n - i), data.shape, args.sampler, args.sample_steps, args.eta,
                   progress=common.steps_bar(what), clip=args.clip_denoised)[0]
        fake.append(to_data(x, data.kind))
    fake = torch.cat(fake)
    real = data.train_x[: args.fid_n]
    return frechet_distance(*feature_stats(inception_features(fake)),
                            *feature_stats(inception_features(real)))


def evaluate_and_draw(run: common.Run, model: Diffusion, data: common.Data, args: Args, step: int, num_t: int,
                      final: bool = False) -> dict:
    """Bound on the test set and pictures from the EMA weights (rank 0), one log line."""
    n = args.eval_n or len(data.test_x)
    # during training on a CPU: a subset, so the run moves on
    if not final and data.test_x.device.type == "cpu":
        n = min(n, PERIODIC_EVAL_N_CPU)
    x = to_model(data.test_x[:n], data.kind)
    with common.eval_mode(model, seed=args.seed):
        metrics = evaluate(model, x, data, num_t, batch_size=5000 if data.kind == "toy" else 100)
        draw_pictures(model, data, run, args)
        if final and args.fid:
            metrics["fid"] = fid(model, data, args)
    exact = num_t <= 0 or num_t >= model.T - 1
    run.log("test", step, metrics, note="bound, all t" if exact else f"bound, {num_t} geometric strata of t")
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


def build_model(data: common.Data, args: Args) -> Diffusion:
    if data.kind == "toy":
        net = MLP(data.shape[0], args.hidden)
    else:
        res = data.shape[1]
        mult = args.channel_mult or ((1, 2, 2, 2) if res >= 32 else (1, 2, 2))
        net = UNet(data.shape, args.channels or (128 if res >= 32 else 64), mult, args.num_res_blocks,
                   args.attn_res or (res // 2,), args.dropout)
    return Diffusion(net, data.kind, args.timesteps, args.schedule, args.variance)


def train(args: Args) -> dict:
    dist, device = common.setup(args)
    if args.fid:
        try:
            import pytorch_fid  # noqa: F401
        except ImportError:
            raise common.RunError(
                "--fid needs the Inception network of pytorch-fid: pip install pytorch-fid") from None
    kind = common.dataset_kind(args.dataset)  # refused before any data is read or downloaded
    if kind == "binary" or (args.fid and kind == "toy"):
        raise common.DataError(f"ddpm.py models 8-bit images and 2D toys (FID for images only), not "
                               f"{'FID of ' if args.fid else ''}{args.dataset}; try --dataset mnist")
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = build_model(data, args).to(device)
    if args.channels_last if args.channels_last is not None else device.type == "cuda":
        # NHWC weights: every convolution's output, and so every activation after the first, is NHWC too, the
        # layout of the GPU's bf16 convolution kernels (on a CPU the bound ran 10% slower so: torch's NHWC
        # GroupNorm took 8x the time of its NCHW one, more than the convolutions gained)
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, args.ema_decay)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "ddpm", dist, model, optimizer, ema=ema,
                     resumable=("sampler", "sample_steps", "eta", "clip_denoised", "eval_t", "fid", "fid_n",
                                "channels_last", "compile"))
    start = run.restore()
    if args.compile:  # in place, so the checkpoint's names stay those of the plain network (torch >= 2.2)
        model.net.compile()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, None, args.batch_size, args.seed, dist)
    total = args.steps or (20_000 if data.kind == "toy" else 800_000 if data.shape[1] >= 32 else 50_000)
    eval_every = args.eval_every or max(1, total // 10)
    run.print(f"ddpm: {sum(p.numel() for p in model.parameters()):,} parameters, {data.name} {data.shape}, "
              f"{total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        for group in optimizer.param_groups:  # Ho et al., Appendix B: learning-rate warm-up over 5000 steps
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        with common.autocast(device, args.amp):
            loss, metrics = ddp(to_model(x, data.kind))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            metrics["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        ema.update(model, step)
        run.log_train(step, metrics)
        if (step + 1) % eval_every == 0 and step + 1 < total and dist.is_main:
            evaluate_and_draw(run, ema.model, data, args, step + 1, PERIODIC_EVAL_T)

    if dist.enabled:
        run.print(
            f"ddp: largest parameter difference between ranks {common.replicas_max_diff(model, dist):.3g}")
    if not dist.is_main:
        return {}
    return evaluate_and_draw(run, ema.model, data, args, total, args.eval_t, final=True)


if __name__ == "__main__":
    common.cli(train, Args, PRESETS)
