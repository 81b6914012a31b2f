"""Nouveau VAE: Vahdat & Kautz 2020, "NVAE: A Deep Hierarchical Variational Autoencoder", arXiv:2007.03898.

A hierarchy of latent groups z_1..z_L at several scales. A bottom-up encoder tower reads x once; a top-down
generative tower, shared by the prior p(z_l | z_<l) and the posterior q(z_l | x, z_<l), draws the groups from
the coarsest to the finest and decodes x. Trained on the hierarchical ELBO (Eq. 1) with one closed-form KL per
group, the residual normal posterior (Eq. 2), spectral regularization, KL warm-up and KL balancing.

    python nvae.py --quick                              # seconds on a CPU: 30 steps of 32, 100 test images,
                                                        # k = 10
    python nvae.py --dataset binarized_mnist            # the small CPU model: 4 groups at 8x8 and 4x4,
                                                        # 3 epochs
    python nvae.py --eval-n 1000 --eval-k 100           # the same, evaluated on 1000 test images with k = 100
    python nvae.py --paper-mnist                        # the paper's MNIST model (GPU): 2 x 5 groups,
                                                        # 400 epochs
    python nvae.py --paper-cifar10                      # the paper's CIFAR-10 model without its flows (GPUs)
    python nvae.py --dataset mnist --mixtures 10        # 8-bit data: discretized logistic mixture, bits/dim
    python nvae.py --dataset mnist --steps 700 --eval-n 500 --eval-k 20  # CPU recipe: 10 minutes, 8-bit MNIST
    torchrun --nproc_per_node=2 nvae.py --paper-mnist --batch-size 200

Networks (Sec. 3.1, Fig. 2-3): encoder cells BN-Swish-conv3x3-BN-Swish-conv3x3-SE; generative cells
BN-conv1x1-BN-Swish-dwconv5x5-BN-Swish-conv1x1-BN-SE (depthwise separable, expansion E); each cell is
residual. The first group's prior is N(0, I); every later prior and every posterior comes from the shared
top-down state h. Likelihoods: Bernoulli for binarized MNIST (nats), a discretized logistic mixture for 8-bit
data (Salimans et al. 2017; bits/dim). Evaluation: the ELBO and the importance-weighted NLL
(Burda et al. 2016, k = 1000, chunked, vectorized over samples); the final `nll_nats` / `nll_bpd` is that
IWAE estimate. On a CPU the k = 1000 evaluation of all 10,000 test images costs 10 million top-down passes
(hours), hence the 2nd command. Sampling with temperature t (z_l = mu_p + t sigma_p eps), optionally after
re-estimating the batch-norm statistics in train mode at that temperature (Sec. 5, "the BN statistics
readjustment"), on a copy.

Scaled down from the paper (default configuration, for 2 CPU cores): 8 channels at 32x32 doubling with every
halving (32 at 8x8, 64 at 4x4) instead of 32; 2 groups per scale instead of 5; 8 latent channels per group
instead of 20; generative-cell expansion 3 instead of 6; batch 128 for 3 epochs instead of 400 epochs. The
presets --paper-mnist and --paper-cifar10 set the paper's Table 6 sizes for a GPU.

Deviations from the paper:
- No normalizing flows in the encoder (the paper's CIFAR-10 model has 2 per group; its MNIST model none) and
  no weight normalization on the convolutions; residual branches are scaled by 0.1, means and log-scales are
  soft-clamped to (-5, 5) (5 tanh(x / 5)), as in the authors' code.
- Down-sampling skips are a stride-2 1x1 convolution (the paper: factorized reduction); up-sampling is nearest
  neighbour followed by the cell (the paper: the same with a 1x1 convolution on the skip, as here).
- KL balancing: gamma_l is proportional to the batch-mean KL of group l divided by its size, normalized to sum
  to L, and used only during warm-up. The paper's appendix reads as "proportional to the size"; the authors'
  code and the first author's explanation (NVlabs/NVAE issue 26) divide by it, as here.
- The prior of z_1 is N(0, I) (the authors' code); Adamax with cosine decay of the learning rate from 1e-2 to
  1e-4 as in the paper, without its learning-rate warm-up (short CPU runs).
- MNIST is padded from 28x28 to 32x32 for the networks (the encoder's input 2x - 1 is padded with 0, the
  decoder's output is cropped); the likelihood covers only the 28x28 pixels.

Expected result: the paper reports about 78 nats on dynamically binarized MNIST and 2.91 bits/dim on CIFAR-10
(with flows) after days on V100s. README.md's rows nvae-bmnist and nvae-mnist have the CPU default's figures,
next to vae-long-bmnist: vae.py trained for as long on the same images with the same estimator.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import common


@dataclass
class Args:
    dataset: str = "binarized_mnist"  # an image dataset (binarized_mnist, mnist, cifar10, ...; see README)
    channels: int = 8  # stem channels at full size, doubled at every halving
                       # (paper: 32 MNIST, 128 CIFAR-10); >= 1
    pre_blocks: int = 2  # pre-processing blocks, each halving the resolution (post-processing
                         # mirrors them); >= 0
    scales: int = 2  # latent scales, from the coarsest; each finer scale doubles the resolution
                     # (paper MNIST: 2); >= 1
    groups: int = 2  # latent groups per scale (paper: 5 MNIST, 30 CIFAR-10); >= 1
    z_channels: int = 8  # channels of each latent group (paper: 20); >= 1
    cells: int = 1  # residual cells per group, encoder and decoder (paper: 1 MNIST, 2 CIFAR-10); >= 1
    expansion: int = 3  # channel expansion E in the depthwise-separable generative cells (paper: 6); >= 1
    mixtures: int = 10  # discretized logistic mixture components (8-bit data; paper: 10); >= 1
    epochs: int = 3  # passes over the training set (paper: 400); >= 1
    steps: int = 0  # stop after this many optimizer steps instead (0: epochs x steps per epoch); >= 0
    batch_size: int = 128  # minibatch per process (paper: 200 per GPU on MNIST, 32 on CIFAR-10); >= 1
    lr: float = 1e-2  # Adamax learning rate, cosine-decayed to lr_min (paper: 1e-2); > 0
    lr_min: float = 1e-4  # final learning rate of the cosine decay (paper: 1e-4); >= 0
    weight_decay: float = 3e-4  # Adamax weight decay (authors' code: 3e-4); >= 0
    kl_warmup: float = 0.3  # fraction of the steps over which the KL weight rises linearly to 1
                            # (paper: 0.3); in [0, 1]
    kl_balance: bool = True  # KL balancing across groups during warm-up (paper: on)
    sr_weight: float = 1e-2  # lambda, weight of the spectral regularization sum_i s_i
                             # (paper: 1e-2 MNIST); >= 0
    sr_iters: int = 1  # power iterations per training step on the persistent u, v (20 at the
                       # first step); >= 1
    temperature: float = 1.0  # sampling temperature t of the prior for the pictures
                              # (paper shows t in 0.6-1); >= 0
    bn_readjust: int = 0  # batches of 100 samples to re-estimate BN statistics before drawing pictures
                          # (0: off); >= 0
    eval_k: int = 1000  # importance samples for the final test log-likelihood; >= 1
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test ELBO evaluations (0: once per epoch); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/nvae-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # seconds on a CPU: 30 steps of 32, 100 test images, k = 10
    paper_mnist: bool = False  # the paper's MNIST model (Table 6), for a GPU
    paper_cifar10: bool = False  # the paper's CIFAR-10 model (Table 6, without the flows), for GPUs


QUICK = dict(steps=30, batch_size=32, eval_n=100, eval_k=10, eval_every=0, log_every=10, ckpt_every=30)
# Vahdat & Kautz 2020, Table 6: MNIST 2 scales x 5 groups of 20 channels at 4x4 and 8x8, 32 initial channels,
# 1 cell per group, 400 epochs, batch 200 per GPU (2 V100s); the pre-processing halves 32 -> 16 -> 8.
PAPER_MNIST = dict(dataset="binarized_mnist", channels=32, pre_blocks=2, scales=2, groups=5, z_channels=20,
                   cells=1, expansion=6, epochs=400, batch_size=200, sr_weight=1e-2)
# CIFAR-10: 1 scale x 30 groups of 20 channels at 16x16, 128 initial channels, 2 cells per group, 400 epochs,
# batch 32 per GPU (8 V100s); sr_weight as for MNIST. The paper's 2 flows per group are left out.
PAPER_CIFAR10 = dict(dataset="cifar10", channels=128, pre_blocks=1, scales=1, groups=30, z_channels=20,
                     cells=2, expansion=6, epochs=400, batch_size=32, sr_weight=1e-2)
ROWS_PER_CHUNK = 1000  # top-down rows (samples x images) per chunk of the importance-weighted evaluation
RESIDUAL_SCALE = 0.1  # residual branches are scaled by 0.1 (authors' code)


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    # bound tanh(x / bound): identity near 0, smooth and bounded; keeps means and log-scales finite
    return bound * torch.tanh(x / bound)


# ----------------------------------------------------------------------------------------------------------
# Residual normal distribution and its closed-form KL
# ----------------------------------------------------------------------------------------------------------
def residual_normal_kl(delta_mu: torch.Tensor, delta_log_sigma: torch.Tensor, log_sigma_p: torch.Tensor):
    """KL(q || p) per latent dimension for q = N(mu_p + delta_mu, sigma_p delta_sigma), p = N(mu_p, sigma_p).

    Vahdat & Kautz 2020, Eq. 2: KL = 1/2 (delta_mu^2 / sigma_p^2 + delta_sigma^2 - log delta_sigma^2 - 1).
    """
    delta_sigma_sq = torch.exp(2 * delta_log_sigma)
    return 0.5 * (delta_mu**2 * torch.exp(-2 * log_sigma_p) + delta_sigma_sq - 2 * delta_log_sigma - 1)


def log_normal_log_sigma(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    # log N(z; mu, sigma^2), summed over all but the first dimension: (B,)
    log_p = -0.5 * math.log(2 * math.pi) - log_sigma - 0.5 * ((z - mu) * torch.exp(-log_sigma)) ** 2
    return log_p.flatten(1).sum(1)


def kl_balance_coefficients(kl_groups: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """gamma_l for kl_groups (B, L), the KL of each group in nats: (L,), detached, summing to L.

    Vahdat & Kautz 2020, Appendix A (with the correction of NVlabs/NVAE issue 26): gamma_l is proportional to
    the batch mean of KL_l divided by the size of group l, so groups with a small KL per dimension are
    penalized less and are encouraged to carry information; 0.01 keeps a collapsed group from weight 0.
    """
    gamma = (kl_groups.detach().abs().mean(0) + 0.01) / group_sizes
    return len(gamma) * gamma / gamma.sum()


# ----------------------------------------------------------------------------------------------------------
# Spectral regularization: largest singular value of each convolution by power iteration
# ----------------------------------------------------------------------------------------------------------
class Conv2d(nn.Conv2d):
    """nn.Conv2d with persistent power-iteration vectors u (C_out,) and v (C_in/groups * k * k,).

    Vahdat & Kautz 2020, Sec. 3.2: L_SR = lambda sum_i s^(i), s^(i) the largest singular value of layer i,
    estimated by power iteration (Yoshida & Miyato 2017) on the weight reshaped to (C_out, C_in * k * k).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        self.register_buffer("sr_u", F.normalize(torch.randn(rows), dim=0))
        self.register_buffer("sr_v", F.normalize(torch.randn(cols), dim=0))

    def spectral_norm(self, iters: int = 1) -> torch.Tensor:
        """s = u^T W v after `iters` power iterations on u, v (updated in place, no gradient);
        s carries W's."""
        weight = self.weight.flatten(1)  # (C_out, C_in * k * k)
        with torch.no_grad():
            for _ in range(iters):
                # v <- W^T u / ||W^T u||,  u <- W v / ||W v||
                self.sr_v.copy_(F.normalize(weight.T @ self.sr_u, dim=0, eps=1e-12))
                self.sr_u.copy_(F.normalize(weight @ self.sr_v, dim=0, eps=1e-12))
        return self.sr_u @ weight @ self.sr_v


def spectral_loss(model: nn.Module, iters: int = 1) -> torch.Tensor:
    # Vahdat & Kautz 2020, Sec. 3.2: L_SR = sum_i s^(i) over every convolution
    return torch.stack([m.spectral_norm(iters) for m in model.modules() if isinstance(m, Conv2d)]).sum()


# ----------------------------------------------------------------------------------------------------------
# Cells: small named blocks
# ----------------------------------------------------------------------------------------------------------
def batch_norm(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=0.05)  # authors' code: momentum 0.05


class SqueezeExcitation(nn.Module):
    """Hu et al. 2018: channel gates sigmoid(W2 relu(W1 avgpool(h))) multiply h
    (Vahdat & Kautz 2020, Fig. 3)."""

    def __init__(self, c: int, reduction: int = 16):
        super().__init__()
        hidden = max(c // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, c), nn.Sigmoid())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.fc(h.mean((2, 3)))[:, :, None, None]


class EncoderCell(nn.Module):
    """Fig. 3b: h + 0.1 * SE(conv3x3(Swish(BN(conv3x3(Swish(BN(h))))))); `down` halves H, W and doubles C."""

    def __init__(self, c: int, down: bool = False):
        super().__init__()
        c_out, stride = (2 * c, 2) if down else (c, 1)
        self.skip = Conv2d(c, c_out, 1, stride=2) if down else nn.Identity()
        self.branch = nn.Sequential(
            batch_norm(c), nn.SiLU(), Conv2d(c, c_out, 3, stride=stride, padding=1),
            batch_norm(c_out), nn.SiLU(), Conv2d(c_out, c_out, 3, padding=1),
            SqueezeExcitation(c_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.skip(h) + RESIDUAL_SCALE * self.branch(h)


class GenerativeCell(nn.Module):
    """Fig. 3a: BN-conv1x1(C -> EC)-BN-Swish-dwconv5x5-BN-Swish-conv1x1(EC -> C)-BN-SE, residual.

    Depthwise separable: the 5x5 convolution has one filter per channel (groups = EC), so its cost grows with
    EC, not (EC)^2. `up` doubles H, W (nearest neighbour) and halves C.
    """

    def __init__(self, c: int, expansion: int, up: bool = False):
        super().__init__()
        c_out = c // 2 if up else c
        hidden = expansion * c_out
        self.up = nn.Upsample(scale_factor=2, mode="nearest") if up else nn.Identity()
        self.skip = Conv2d(c, c_out, 1) if up else nn.Identity()
        self.branch = nn.Sequential(
            batch_norm(c), Conv2d(c, hidden, 1), batch_norm(hidden), nn.SiLU(),
            Conv2d(hidden, hidden, 5, padding=2, groups=hidden), batch_norm(hidden), nn.SiLU(),
            Conv2d(hidden, c_out, 1), batch_norm(c_out), SqueezeExcitation(c_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.up(h)
        return self.skip(h) + RESIDUAL_SCALE * self.branch(h)


class NormalHead(nn.Module):
    """ELU then a convolution to (mu, log_sigma) of a latent group, each (B, z_channels, H, W),
    soft-clamped."""

    def __init__(self, c: int, z_channels: int, kernel: int):
        super().__init__()
        self.conv = Conv2d(c, 2 * z_channels, kernel, padding=kernel // 2)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.conv(F.elu(h)).chunk(2, dim=1)
        return soft_clamp(mu), soft_clamp(log_sigma)


class EncoderCombiner(nn.Module):
    """Posterior input for group l: the encoder feature plus a 1x1 convolution of the top-down state h."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = Conv2d(c, c, 1)

    def forward(self, feature: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return feature + self.conv(h)


class DecoderCombiner(nn.Module):
    """The top-down state after group l: a 1x1 convolution of [h, z_l] (concatenated channels)."""

    def __init__(self, c: int, z_channels: int):
        super().__init__()
        self.conv = Conv2d(c + z_channels, c, 1)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([h, z], dim=1))


# ----------------------------------------------------------------------------------------------------------
# Likelihoods log p(x | params): images (B, C, H, W) in [0, 1], returns (B,) summed over pixels
# ----------------------------------------------------------------------------------------------------------
def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # log Bern(x; sigmoid(l)) = x l - log(1 + e^l), summed over the last dimension (the D pixels)
    return (x * logits - F.softplus(logits)).sum(-1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-a)) for a > 0. One formula, finite everywhere: torch.where would turn an infinite value in
    the branch it discards into a NaN gradient."""
    return torch.log(-torch.expm1(-a.clamp(min=1e-12)))


def logistic_bin_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log of a logistic's mass on the bin of x in {-1, -1 + 2/255, ..., 1}, width 2/255; edge bins open.

    Salimans et al. 2017 (PixelCNN++), Sec. 2.1; elementwise.
    """
    inv_scale = torch.exp(-log_scale)
    plus = inv_scale * (x - mean + 1 / 255)  # upper bin edge, standardized
    minus = inv_scale * (x - mean - 1 / 255)  # lower bin edge
    # P = sigmoid(plus) - sigmoid(minus), on whichever tail is accurate:
    # left of the mean  log P = log s(plus) + log(1 - s(minus) / s(plus))
    # right of the mean log P = log s(-minus) + log(1 - s(-plus) / s(-minus))
    left = F.logsigmoid(plus) + _log1mexp(F.logsigmoid(plus) - F.logsigmoid(minus))
    right = F.logsigmoid(-minus) + _log1mexp(F.logsigmoid(-minus) - F.logsigmoid(-plus))
    log_p = torch.where(plus + minus < 0, left, right)
    log_p = torch.where(x < -1 + 1 / 255, F.logsigmoid(plus), log_p)  # x = -1: P = sigmoid(plus)
    return torch.where(x > 1 - 1 / 255, F.logsigmoid(-minus), log_p)  # x = 1: P = 1 - sigmoid(minus)


def mixture_params_per_pixel(c: int, mixtures: int) -> int:
    # per component: a logit, C means, C log-scales, and for RGB 3 coefficients (g on r; b on r and g)
    return mixtures * (1 + 2 * c + (3 if c == 3 else 0))


def _split_mixture(params: torch.Tensor, c: int, mixtures: int):
    """params (B, P, H, W) -> logits (B, M, H, W), means, log_scales (B, M, C, H, W),
    coeffs (B, M, 3, H, W)."""
    m = mixtures
    logits = params[:, :m]
    means = rearrange(params[:, m : m + m * c], "b (m c) h w -> b m c h w", m=m)
    log_scales = rearrange(params[:, m + m * c : m + 2 * m * c], "b (m c) h w -> b m c h w",
                           m=m).clamp(min=-7.0)
    coeffs = (torch.tanh(rearrange(params[:, m + 2 * m * c :], "b (m k) h w -> b m k h w", m=m)) if c == 3
              else None)
    return logits, means, log_scales, coeffs


def _channel_means(means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Salimans et al. 2017, Sec. 2.2: mu_g += c0 r, mu_b += c1 r + c2 g (x (B, 1, C, H, W) in [-1, 1])."""
    if coeffs is None:
        return means
    r, g = x[:, :, 0], x[:, :, 1]
    return torch.stack([means[:, :, 0], means[:, :, 1] + coeffs[:, :, 0] * r,
                        means[:, :, 2] + coeffs[:, :, 1] * r + coeffs[:, :, 2] * g], dim=2)


def discretized_mixture_log_prob(x: torch.Tensor, params: torch.Tensor, mixtures: int) -> torch.Tensor:
    """log p(x) of 8-bit images x (B, C, H, W) in {0, 1/255, ..., 1} under the mixture: (B,).

    Salimans et al. 2017, Eq. 2: p(x_ij) = sum_m pi_m prod_c logistic bin mass of channel c (means of later
    channels shifted linearly by earlier ones for RGB); summed over pixels.
    """
    logits, means, log_scales, coeffs = _split_mixture(params, x.shape[1], mixtures)
    x = (2 * x - 1)[:, None]  # (B, 1, C, H, W) in [-1, 1]
    log_bins = logistic_bin_log_prob(x, _channel_means(means, coeffs, x), log_scales).sum(2)  # (B, M, H, W)
    log_px = torch.logsumexp(F.log_softmax(logits, dim=1) + log_bins, dim=1)  # (B, H, W)
    return log_px.flatten(1).sum(1)


def sample_discretized_mixture(params: torch.Tensor, c: int, mixtures: int) -> torch.Tensor:
    """x ~ the mixture, pixel by pixel in parallel and channel by channel: (B, C, H, W) in
    {0, ..., 255}/255."""
    logits, means, log_scales, coeffs = _split_mixture(params, c, mixtures)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)))
    pick = F.one_hot((logits + gumbel).argmax(1), mixtures).permute(0, 3, 1, 2)[:, :, None].to(params.dtype)
    mean, log_scale = (means * pick).sum(1), (log_scales * pick).sum(1)  # (B, C, H, W)
    coeff = None if coeffs is None else (coeffs * pick).sum(1)
    u = torch.rand_like(mean).clamp(1e-5, 1 - 1e-5)
    noise = torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))  # logistic(0, s)
    levels, x = [], []  # levels k in {0, ..., 255}, and x = 2 k / 255 - 1 in [-1, 1]
    for ch in range(c):  # the channels of RGB depend on the earlier ones: at most 3 steps
        mu = mean[:, ch]
        if coeff is not None and ch == 1:
            mu = mu + coeff[:, 0] * x[0]
        if coeff is not None and ch == 2:
            mu = mu + coeff[:, 1] * x[0] + coeff[:, 2] * x[1]
        levels.append(((mu + noise[:, ch]).clamp(-1, 1) * 127.5 + 127.5).round())
        x.append(2 * levels[-1] / 255 - 1)
    return torch.stack(levels, 1) / 255


# ----------------------------------------------------------------------------------------------------------
# The model: encoder tower, top-down tower with latent groups, likelihood
# ----------------------------------------------------------------------------------------------------------
class NVAE(nn.Module):
    """Bottom-up encoder, top-down generative tower shared by prior and posterior (Fig. 2), decoder head.

    Resolutions: the image is padded to a multiple of 2^(pre_blocks + scales - 1); the stem works at full size
    with `channels`, each pre-processing block halves the size and doubles the channels; the latent scales
    follow, each again halving (so the coarsest, top group sits at size / 2^(pre_blocks + scales - 1)).
    """

    def __init__(self, shape: tuple[int, int, int], likelihood: str, channels: int = 8, pre_blocks: int = 2,
                 scales: int = 2, groups: int = 2, z_channels: int = 8, cells: int = 1, expansion: int = 3,
                 mixtures: int = 10):
        super().__init__()
        c_img, height, width = shape
        self.shape, self.likelihood, self.mixtures = tuple(shape), likelihood, mixtures
        self.scales, self.groups, self.z_channels = scales, groups, z_channels
        factor = 2 ** (pre_blocks + scales - 1)
        self.padded = (math.ceil(height / factor) * factor, math.ceil(width / factor) * factor)
        # left right top bottom
        self.pad = ((self.padded[1] - width) // 2, (self.padded[1] - width + 1) // 2,
                    (self.padded[0] - height) // 2, (self.padded[0] - height + 1) // 2)
        self.num_groups = scales * groups
        c_latent = channels * 2**pre_blocks  # channels at the finest latent scale
        c_top = c_latent * 2 ** (scales - 1)  # channels at the coarsest (top) scale
        top_size = (self.padded[0] // factor, self.padded[1] // factor)

        # bottom-up: stem, pre-processing (halving), then per scale from the finest: groups x cells, halving
        self.stem = Conv2d(c_img, channels, 3, padding=1)
        self.pre = nn.Sequential(*[EncoderCell(channels * 2**i, down=True) for i in range(pre_blocks)])
        self.enc_groups = nn.ModuleList()  # bottom-up order: finest scale first
        self.enc_down = nn.ModuleList()
        for s in range(scales):
            c = c_latent * 2**s
            self.enc_groups.extend(nn.Sequential(*[EncoderCell(c) for _ in range(cells)])
                                   for _ in range(groups))
            if s < scales - 1:
                self.enc_down.append(EncoderCell(c, down=True))
        self.enc0 = nn.Sequential(nn.ELU(), Conv2d(c_top, c_top, 1))  # top feature -> q(z_1 | x)

        # top-down: a learned initial state h_0, then per group (coarsest first) cells, prior,
        # posterior, combine
        self.h0 = nn.Parameter(torch.zeros(1, c_top, *top_size))
        self.group_channels = [c_top // 2 ** (l // groups) for l in range(self.num_groups)]  # top-down order
        self.dec_up = nn.ModuleList(GenerativeCell(c_top // 2**s, expansion, up=True)
                                    for s in range(scales - 1))
        self.dec_cells = nn.ModuleList(
            nn.Sequential(*[GenerativeCell(c, expansion) for _ in range(cells)]) if l > 0 else nn.Identity()
            for l, c in enumerate(self.group_channels))
        self.prior_heads = nn.ModuleList(
            NormalHead(c, z_channels, 1) if l > 0 else nn.Identity()
            for l, c in enumerate(self.group_channels))
        self.posterior_heads = nn.ModuleList(NormalHead(c, z_channels, 3) for c in self.group_channels)
        self.enc_combiners = nn.ModuleList(
            EncoderCombiner(c) if l > 0 else nn.Identity() for l, c in enumerate(self.group_channels))
        self.dec_combiners = nn.ModuleList(DecoderCombiner(c, z_channels) for c in self.group_channels)

        # post-processing mirrors the pre-processing (doubling), then ELU + conv3x3 to the
        # likelihood parameters
        self.post = nn.Sequential(*[GenerativeCell(c_latent // 2**i, expansion, up=True)
                                    for i in range(pre_blocks)])
        out = 1 if likelihood == "bernoulli" else mixture_params_per_pixel(c_img, mixtures)
        self.head = nn.Sequential(nn.ELU(), Conv2d(channels, out, 3, padding=1))
        # number of dimensions of each group (for KL balancing), top-down order
        sizes = [z_channels * (top_size[0] * top_size[1]) * 4 ** (l // groups)
                 for l in range(self.num_groups)]
        self.register_buffer("group_sizes", torch.tensor(sizes, dtype=torch.float32))

    # -- the towers ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Bottom-up: x (B, C, H, W) in [0, 1] -> one feature per group, in top-down order
        (coarsest first)."""
        h = self.pre(self.stem(F.pad(2 * x - 1, self.pad)))
        features = []
        for s in range(self.scales):
            for g in range(self.groups):
                h = self.enc_groups[s * self.groups + g](h)
                features.append(h)
            if s < self.scales - 1:
                h = self.enc_down[s](h)
        features[-1] = self.enc0(features[-1])  # the top group's posterior reads the top feature only
        return features[::-1]

    def top_down(self, features: list[torch.Tensor] | None = None, n: int = 0, t: float = 1.0,
                 zs: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[dict]]:
        """The generative tower, shared by prior and posterior (Fig. 2).

        With `features` (posterior, training and evaluation): z_l ~ q(z_l | x, z_<l) = N(mu_p + delta_mu,
        sigma_p delta_sigma). Without (sampling, n images): z_l ~ N(mu_p, (t sigma_p)^2). `zs[l]`, when given
        and not None, replaces the draw of group l. Returns the likelihood parameters (B, P, H, W) and one
        dict per group (top-down) with z, mu_p, log_sigma_p and, for the posterior, delta_mu, delta_log_sigma.
        """
        n = len(features[0]) if features is not None else n
        h = self.h0.expand(n, -1, -1, -1)
        out = []
        for l in range(self.num_groups):
            if l > 0 and l % self.groups == 0:  # next finer scale
                h = self.dec_up[l // self.groups - 1](h)
            h = self.dec_cells[l](h)
            if l == 0:  # p(z_1) = N(0, I)
                size = (n, self.z_channels, *h.shape[2:])
                mu_p = torch.zeros(size, device=h.device, dtype=h.dtype)
                log_sigma_p = torch.zeros_like(mu_p)
            else:  # p(z_l | z_<l) from the top-down state
                mu_p, log_sigma_p = self.prior_heads[l](h)
            group = {"mu_p": mu_p, "log_sigma_p": log_sigma_p}
            if features is not None:
                e = features[0] if l == 0 else self.enc_combiners[l](features[l], h)
                delta_mu, delta_log_sigma = self.posterior_heads[l](e)
                # Vahdat & Kautz 2020, Eq. 2: q(z_l | z_<l, x) = N(mu_p + delta_mu, sigma_p * delta_sigma)
                mu, log_sigma = mu_p + delta_mu, log_sigma_p + delta_log_sigma
                group.update(delta_mu=delta_mu, delta_log_sigma=delta_log_sigma)
            else:  # sampling at temperature t: the prior's standard deviation times t
                mu, log_sigma = mu_p, log_sigma_p
            if zs is not None and zs[l] is not None:
                z = zs[l]
            else:  # reparameterization: z = mu + sigma * eps
                scale = torch.exp(log_sigma) * (t if features is None else 1.0)
                z = mu + scale * torch.randn_like(mu)
            group.update(z=z, mu=mu, log_sigma=log_sigma)
            out.append(group)
            h = self.dec_combiners[l](h, z)
        params = self.head(self.post(h))
        left, right, top, bottom = self.pad
        return params[:, :, top : params.shape[2] - bottom, left : params.shape[3] - right], out

    # -- likelihood ---------------------------------------------------------------------------------------
    def log_px_given_z(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "bernoulli":
            return bernoulli_log_prob(x.flatten(1), params.flatten(1))
        return discretized_mixture_log_prob(x, params, self.mixtures)

    def decoder_mean(self, params: torch.Tensor) -> torch.Tensor:
        """Pictures: Bernoulli means, or a draw from the mixture for 8-bit data."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params)
        return sample_discretized_mixture(params, self.shape[0], self.mixtures)

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0, kl_balance: bool = False,
                sr_weight: float = 0.0, sr_iters: int = 1):
        """The training loss (for DDP): -ELBO with the KL weighted and balanced, plus lambda L_SR."""
        params, groups = self.top_down(self.encode(x))
        rec = self.log_px_given_z(x, params)  # (B,) log p(x | z), one sample
        kl_groups = torch.stack([residual_normal_kl(g["delta_mu"], g["delta_log_sigma"], g["log_sigma_p"])
                                 .flatten(1).sum(1) for g in groups], dim=1)  # (B, L)
        # Vahdat & Kautz 2020, Eq. 1:
        # ELBO = E_q[log p(x|z)] - sum_l E_q(z_<l|x)[KL(q(z_l|x,z_<l) || p(z_l|z_<l))]
        kl = kl_groups.sum(1)
        elbo = rec - kl
        if kl_balance and kl_weight < 1:  # Appendix A: balancing only during warm-up
            kl_term = (kl_groups * kl_balance_coefficients(kl_groups, self.group_sizes)).sum(1)
        else:
            kl_term = kl
        loss = (-rec + kl_weight * kl_term).mean()
        metrics = {"nelbo": -elbo.mean(), "rec": -rec.mean(), "kl": kl.mean()}
        if sr_weight > 0:  # Sec. 3.2: L_SR = lambda sum_i s^(i)
            sr = spectral_loss(self, sr_iters)
            loss = loss + sr_weight * sr
            metrics["sr"] = sr.detach()
        metrics["loss"] = loss
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation
# ----------------------------------------------------------------------------------------------------------
def log_weights(model: NVAE, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """log w = log p(x | z) + sum_l [log p(z_l | z_<l) - log q(z_l | x, z_<l)], z ~ q: (B,) (rows of x)."""
    params, groups = model.top_down(features)
    log_w = model.log_px_given_z(x, params)
    for g in groups:
        log_w = log_w + (log_normal_log_sigma(g["z"], g["mu_p"], g["log_sigma_p"])
                         - log_normal_log_sigma(g["z"], g["mu"], g["log_sigma"]))
    return log_w


def importance_weighted_log_px(model: NVAE, x: torch.Tensor, k: int,
                               chunk: int | None = None) -> torch.Tensor:
    """log p(x) ~ log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x): (B,).

    Burda et al. 2016, Eq. 8, with q the hierarchical posterior. The encoder runs once; the top-down tower
    runs on the features repeated `chunk` times (sample-major rows), so each chunk is one vectorized pass.
    """
    chunk = chunk or k
    features = model.encode(x)
    log_w = []
    for start in range(0, k, chunk):
        s = min(chunk, k - start)
        rows = [f.repeat(s, 1, 1, 1) for f in features]  # (S * B, ...)
        log_w.append(log_weights(model, x.repeat(s, 1, 1, 1), rows).view(s, len(x)))
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)


@torch.no_grad()
def evaluate(model: NVAE, x: torch.Tensor, k: int = 0, batch_size: int = 500) -> dict[str, float]:
    """Test ELBO, its KL and reconstruction terms, KL per group; with k > 0 the importance-weighted
    log p(x)."""
    sums = {"elbo": 0.0, "kl": 0.0, "log_px": 0.0}
    kl_groups = 0.0
    for xb in common.progress(x.split(batch_size),
                              f"test ELBO, {len(x):,} images" + (f" x k = {k}" if k else ""), len(x)):
        params, groups = model.top_down(model.encode(xb))
        kl = torch.stack([residual_normal_kl(g["delta_mu"], g["delta_log_sigma"], g["log_sigma_p"])
                          .flatten(1).sum(1) for g in groups], dim=1)  # (B, L)
        kl_groups = kl_groups + kl.sum(0)
        sums["kl"] += kl.sum().item()
        sums["elbo"] += (model.log_px_given_z(xb, params) - kl.sum(1)).sum().item()
        if k:
            per_chunk = max(1, ROWS_PER_CHUNK // k)  # images per chunk of top-down rows
            for xs in xb.split(per_chunk):
                log_px = importance_weighted_log_px(model, xs, k, chunk=min(k, ROWS_PER_CHUNK))
                sums["log_px"] += log_px.sum().item()
    n = len(x)
    metrics = {"elbo": sums["elbo"] / n, "kl": sums["kl"] / n,
               "kl_groups": [round(v, 3) for v in (kl_groups / n).tolist()]}
    if k:
        metrics["log_px"] = sums["log_px"] / n
    return metrics


def report(metrics: dict, data: common.Data) -> dict:
    """The evaluation in the repository's units: nats for binary data, bits/dim for 8-bit data."""
    out = {}
    for key, name in (("log_px", "nll"), ("elbo", "nelbo")):
        if key not in metrics:
            continue
        if data.kind == "8bit":  # a discrete likelihood: bits/dim directly, no bin width
            out[f"{name}_bpd"] = common.bits_per_dim(-metrics[key], data.num_dims)
        else:
            out[f"{name}_nats"] = -metrics[key]
    out.update(kl=metrics["kl"], kl_groups=metrics["kl_groups"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling and pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: NVAE, n: int, t: float = 1.0) -> tuple[torch.Tensor, list[dict]]:
    """z_l ~ N(mu_p, (t sigma_p)^2) from the top down, then the decoder mean: (n, C, H, W), and the groups."""
    params, groups = model.top_down(n=n, t=t)
    return model.decoder_mean(params), groups


@torch.no_grad()
def readjust_batch_norm(model: NVAE, batches: int, t: float = 1.0, n: int = 100) -> NVAE:
    """A copy of the model whose BN statistics are re-estimated from its own samples at temperature t.

    Vahdat & Kautz 2020, Sec. 5: the running statistics were collected on posterior samples; before sampling
    at t < 1 they are recomputed by drawing `batches` batches in train mode (cumulative averages,
    momentum None).
    """
    copied = copy.deepcopy(model)
    generative_path = [*copied.dec_up.modules(), *copied.dec_cells.modules(), *copied.post.modules()]
    for m in generative_path:
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    copied.train()
    for _ in range(batches):
        copied.top_down(n=n, t=t)
    return copied.eval()


@torch.no_grad()
def draw_pictures(model: NVAE, data: common.Data, run: common.Run, t: float, bn_readjust: int) -> None:
    """samples.png (prior samples at temperature t, after BN readjustment if asked), recon.png."""
    sampler = readjust_batch_norm(model, bn_readjust, t) if bn_readjust else model
    x, _ = sample(sampler, 64, t)
    common.save_grid(run.path("samples.png"), x, nrow=8)
    x = data.test_x[:32]
    params, _ = model.top_down(model.encode(x))
    recon = model.decoder_mean(params)
    pairs = rearrange(torch.stack([x.view(4, 8, *x.shape[1:]), recon.view(4, 8, *x.shape[1:])], 1),
                      "r two n c h w -> (r two n) c h w")
    common.save_grid(run.path("recon.png"), pairs, nrow=8)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def learning_rate(step: int, total: int, args: Args) -> float:
    # cosine decay from lr to lr_min over the run (paper: Adamax 1e-2 -> 1e-4)
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1 + math.cos(math.pi * step / max(total, 1)))


def evaluate_and_draw(run: common.Run, model: NVAE, data: common.Data, args: Args, step: int, k: int) -> dict:
    """Evaluate on the test set (rank 0), log one line, draw the pictures."""
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    with common.eval_mode(model, seed=args.seed):
        metrics = report(evaluate(model, x, k), data)
        draw_pictures(model, data, run, args.temperature, args.bn_readjust)
    run.log("test", step, metrics, note=f"iwae k={k}" if k else "elbo")
    return metrics


LIKELIHOOD_OF = {"binary": "bernoulli", "8bit": "discretized_logistic_mixture"}  # data kind -> p(x|z)


def train(args: Args) -> dict:
    dist, device = common.setup(args)
    if common.dataset_kind(args.dataset) == "toy":  # refused before any data is read or downloaded
        raise common.RunError("nvae.py models images; use vae.py or flows.py for the 2D toys")
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = NVAE(data.shape, LIKELIHOOD_OF[data.kind], args.channels, args.pre_blocks, args.scales,
                 args.groups, args.z_channels, args.cells, args.expansion, args.mixtures).to(device)
    # NHWC activations: the depthwise 5x5 convolutions run about 3x faster on CPU (oneDNN), no slower on GPUs
    model = model.to(memory_format=torch.channels_last)
    # Sec. 4 / authors' code: Adamax with weight decay; the cosine schedule is set below at every step
    optimizer = torch.optim.Adamax(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, eps=1e-3)
    run = common.Run(args, "nvae", dist, model, optimizer, resumable=("temperature", "bn_readjust"))
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist,
                             binarize=data.dynamic_binarization)
    total = args.steps or args.epochs * batches.steps_per_epoch
    eval_every = args.eval_every or batches.steps_per_epoch
    warmup = max(1, round(args.kl_warmup * total))
    run.print(
        f"nvae: {sum(p.numel() for p in model.parameters()):,} parameters, {model.num_groups} latent groups "
        f"of {args.z_channels} channels, {data.name} {data.shape}, {total} steps of {args.batch_size} x "
        f"{dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, args)
        # KL warm-up: the KL weight rises linearly over the first kl_warmup of the run (min 1e-4)
        kl_weight = max(min(1.0, (step + 1) / warmup), 1e-4) if args.kl_warmup > 0 else 1.0
        with common.autocast(device, args.amp):
            loss, metrics = ddp(x, kl_weight, args.kl_balance, args.sr_weight,
                                20 if step == 0 else args.sr_iters)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log_train(step, metrics)
        if (step + 1) % eval_every == 0 and step + 1 < total and dist.is_main:
            evaluate_and_draw(run, model, data, args, step + 1, k=0)

    if dist.enabled:
        run.print(
            f"ddp: largest parameter difference between ranks {common.replicas_max_diff(model, dist):.3g}")
    if not dist.is_main:
        return {}
    return evaluate_and_draw(run, model, data, args, total, k=args.eval_k)


if __name__ == "__main__":
    common.cli(train, Args,
               presets={"quick": QUICK, "paper_mnist": PAPER_MNIST, "paper_cifar10": PAPER_CIFAR10})
