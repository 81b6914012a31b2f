"""Vector-quantized autoencoders: van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation
Learning", arXiv:1711.00937; Razavi, van den Oord & Vinyals 2019, "Generating Diverse High-Fidelity Images
with VQ-VAE-2", arXiv:1906.00446.

An encoder maps x to a grid of vectors z_e(x); each is replaced by its nearest code e_k of a codebook of K
vectors, and the decoder models p(x | z_q(x)). The straight-through estimator copies the decoder-input
gradient to the encoder. Stage two fits a gated PixelCNN prior p(z) over the code indices; samples are codes
from the prior, decoded.

    python vqvae.py --quick                                          # stage one, under a minute on a CPU
                                                                     # (mnist)
    python vqvae.py --quick --stage prior --vqvae runs/vqvae-mnist   # stage two on its codes, then samples
    python vqvae.py --dataset mnist --ema --restart 1 --hidden 64 --codebook-size 128 --code-dim 32 \
        --batch-size 64 --lr 1e-3 --steps 8000   # CPU recipe: stage one, 10 minutes on 2 cores
    python vqvae.py --stage prior --vqvae runs/vqvae-mnist --prior-hidden 64 --prior-layers 8 \
        --batch-size 64 --lr 1e-3 --steps 4000   # CPU recipe: stage two, 15 minutes
    python vqvae.py --dataset mnist --levels 2 --ema --restart 1    # VQ-VAE-2: 14x14 bottom and 7x7 top codes
    python vqvae.py --stage prior --vqvae runs/vqvae-mnist --class-cond     # one row of samples per digit
    python vqvae.py --dataset cifar10 --hidden 256 --res-blocks 2 --codebook-size 512 --code-dim 64 \
        --beta 0.25 --batch-size 128 --lr 2e-4 --steps 250000   # the paper's CIFAR-10 set-up
                                                                # (the defaults; a GPU)
    python vqvae.py --stage prior --vqvae runs/vqvae-cifar10 --prior-hidden 128 --prior-layers 12 \
        --steps 250000
    torchrun --nproc_per_node=2 vqvae.py --dataset cifar10 --batch-size 64 --ema

The likelihood is the bound of a deterministic one-hot q(z|x) (van den Oord et al. 2017, Sec. 3.2):
    -log p(x) <= -log p(x | z_q(x)) - log p(z_q(x)),
with a discretized logistic decoder for 8-bit data (bits/dim, `nll_bpd`) or a Bernoulli decoder for binarized
MNIST (nats, `nll_nats`). Stage one reports it with the uniform prior of the training objective (log K nats
per code), stage two with the trained PixelCNN prior; `rec` is the decoder term, `prior` the code term, `mse`
the squared reconstruction error per pixel of the decoder mean (pixels in [0, 1]), `perplexity` exp(H) of the
code frequencies and `codes_used` the fraction of the codebook assigned at least once.

Deviations from the paper:
- The decoder likelihood is a discretized logistic (Salimans et al. 2017) for 8-bit data and a Bernoulli for
  binarized data; the paper does not give its decoder likelihood for the CIFAR-10 bound.
- Dead-code restarts (--restart, off by default, not in either paper; as in Jukebox, Dhariwal et al. 2020,
  arXiv:2005.00341): a code whose moving-average count of assignments per batch falls below the threshold is
  moved onto a random encoder output of the batch; with restarts on, the first batch therefore initializes the
  whole codebook from encoder outputs.
- VQ-VAE-2 is scaled to small images: the bottom codes are H/4 x W/4 (H/2 x W/2 when H/8 is not an integer, as
  on 28 x 28 MNIST: 14 x 14 bottom and 7 x 7 top codes) and the top codes half that; no self-attention in the
  priors. The paper's 256 x 256 model has 64 x 64 and 32 x 32 codes.
- With --ema the moving averages start at N_i = 1, m_i = e_i (so e_i = m_i / N_i before the first update), not
  at N_i = 0: from 0, the Laplace-smoothed N_i of a code unused in the first batch is ~eps, which throws that
  code far away for good. The loss terms are sums over pixels and code vectors per image (Eq. 3 as written),
  averaged over the batch. --quick uses Adam 1e-3 and small networks.
- With --class-cond the prior is p(z | y) and the bound is one on -log p(x | y), not comparable with the
  unconditional figure.
- Stage one's samples.png decodes codes drawn from its uniform prior (what the stage-one bound assumes); stage
  two encodes the training set once (binarized MNIST: one Bernoulli draw, seed --seed) and fits the prior to
  those codes.
- The prior is a gated PixelCNN (van den Oord et al. 2016, arXiv:1606.05328) of --prior-layers layers with a
  7 x 7 first layer and 3 x 3 after, our choice; the paper's CIFAR-10 prior is not specified. K = 512 and
  D = 64 are our defaults for the codebook. Under torchrun the EMA statistics are summed over ranks and
  restarted codes are broadcast from rank 0.

Expected result: the paper reports 4.67 bits/dim on CIFAR-10 (250,000 steps, batch 128, Adam 2e-4; encoder of
two 4x4 stride-2 convolutions and two residual blocks, 256 hidden units), not run here. On 8-bit MNIST the two
CPU recipes above are README.md's rows vqvae-mnist (the bound with the uniform prior, and the reconstructions)
and vqvae-prior-mnist (with the PixelCNN prior, and its samples), with their figures and wall times.
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import common


@dataclass
class Args:
    stage: Literal["vqvae", "prior"] = "vqvae"  # vqvae: the autoencoder (stage one); prior: a PixelCNN
                                                # over its codes
    vqvae: str = ""  # --stage prior: the stage-one run folder (or its checkpoint.pt)
    dataset: str = ""  # default: cifar10 (the paper's), mnist with --quick, the stage-one dataset for
                       # --stage prior
    levels: Literal[1, 2] = 1  # 1: VQ-VAE; 2: VQ-VAE-2, top codes and bottom codes conditioned on them
    hidden: int = 256  # channels of the encoder and decoder convolutions (paper: 256); >= 1
    res_blocks: int = 2  # residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv) in each encoder and decoder
                         # (paper: 2); >= 0
    down: int = 0  # downsampling factor of the (bottom) codes (0: 4, or 2 when the top codes would
                   # not fit); >= 0
    codebook_size: int = 512  # K, codes per codebook; >= 1
    code_dim: int = 64  # D, dimension of each code; >= 1
    beta: float = 0.25  # commitment weight (paper: 0.25); >= 0
    ema: bool = False  # codebook by exponential moving averages (paper, Appendix A.1) instead of the
                       # codebook loss
    ema_decay: float = 0.99  # gamma of the EMA codebook update (paper: 0.99); in [0, 1)
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes; >= 0
    restart: float = 0.0  # restart codes whose moving-average assignments per batch fall below this
                          # (0: off); >= 0
    prior_hidden: int = 128  # channels of the gated PixelCNN prior; >= 1
    prior_layers: int = 12  # gated layers of the prior (7x7 first layer, then 3x3); >= 1
    class_cond: bool = False  # condition the prior on the class label
    samples: int = 64  # images drawn for samples.png (with --class-cond, rounded to a multiple of the
                       # classes); >= 1
    steps: int = 250_000  # optimizer steps (paper: 250,000 for the autoencoder); >= 0
    batch_size: int = 128  # minibatch per process (paper: 128); >= 1
    lr: float = 2e-4  # Adam learning rate (paper: 2e-4); > 0
    train_n: int = 0  # training examples to use (0: all), for quick checks; >= 0
    eval_every: int = 0  # steps between test evaluations (0: only at the end); >= 0
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/vqvae-<dataset>, runs/vqvae-prior-<dataset> for --stage prior)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a minute on a CPU: mnist, small networks, 300 steps, 1000 test images


QUICK = dict(steps=300, hidden=32, res_blocks=1, codebook_size=64, code_dim=16, prior_hidden=32,
             prior_layers=5, batch_size=64, lr=1e-3, eval_n=1000, eval_every=0, log_every=50, ckpt_every=300)
MODEL_FIELDS = ("levels", "hidden", "res_blocks", "down", "codebook_size", "code_dim", "beta", "ema",
                "ema_decay",
                "ema_eps", "restart")  # the stage-one fields that define the autoencoder


# ----------------------------------------------------------------------------------------------------------
# Likelihoods log p(x|z), summed over the last dimension D; the LIKELIHOODS entries take params (..., P, D)
# broadcast against x (..., D) and return (...,)
# ----------------------------------------------------------------------------------------------------------
def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # log Bern(x; sigmoid(l)) = x l - log(1 + e^l), summed over the last dimension (the D pixels)
    return (x * logits - F.softplus(logits)).sum(-1)


def discretized_logistic_log_prob(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """x in {0, 1/255, ..., 1}: the logistic's mass on the bin of width 1/255 around x, the two
    edge bins open.

    Salimans et al. 2017 (PixelCNN++), Sec. 2.1, with a single logistic per sub-pixel.
    """
    mean, log_scale = params[..., 0, :], params[..., 1, :].clamp(min=-9.0)
    inv_scale = torch.exp(-log_scale)
    plus = inv_scale * (x - mean + 0.5 / 255)  # upper bin edge, standardized
    minus = inv_scale * (x - mean - 0.5 / 255)  # lower bin edge
    # P = sigmoid(plus) - sigmoid(minus), computed on whichever tail is more accurate:
    # left of the mean  log P = log s(plus) + log(1 - s(minus)/s(plus))
    # right of the mean log P = log s(-minus) + log(1 - s(-plus)/s(-minus))
    left = F.logsigmoid(plus) + _log1mexp(F.logsigmoid(plus) - F.logsigmoid(minus))
    right = F.logsigmoid(-minus) + _log1mexp(F.logsigmoid(-minus) - F.logsigmoid(-plus))
    log_p = torch.where(plus + minus < 0, left, right)
    log_p = torch.where(x < 0.5 / 255, F.logsigmoid(plus), log_p)  # x = 0: P = sigmoid(plus)
    log_p = torch.where(x > 1 - 0.5 / 255, F.logsigmoid(-minus), log_p)  # x = 1: P = 1 - sigmoid(minus)
    return log_p.sum(-1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-a)) for a > 0. One formula, finite everywhere: torch.where would turn an infinite value in
    the branch it discards into a NaN gradient."""
    return torch.log(-torch.expm1(-a.clamp(min=1e-12)))


# data kind -> (log p(x|z) of x (..., D) and params (..., P, D), decoder outputs P per dimension)
LIKELIHOODS = {
    # params[..., 0, :]: the logits
    "binary": (lambda x, params: bernoulli_log_prob(x, params[..., 0, :]), 1),
    "8bit": (discretized_logistic_log_prob, 2),
}


def clipped_decoder_mean(kind: str, params: torch.Tensor) -> torch.Tensor:
    """The picture of p(x|z): sigmoid of the Bernoulli logits, or the logistic's location clipped
    to [0, 1]."""
    return torch.sigmoid(params[..., 0, :]) if kind == "binary" else params[..., 0, :].clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Vector quantization
# ----------------------------------------------------------------------------------------------------------
def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """z (N, D), codebook (K, D) -> (N,) index of the nearest code in Euclidean distance.

    van den Oord et al. 2017, Eq. 1: k = argmin_j ||z_e(x) - e_j||_2, from the differences z - e_j themselves.
    The expansion |z|^2 - 2 z.e + |e|^2 (one matmul) cancels away the digits that separate near codes when
    both lie far from the origin: in float32, with 64 codes and the outputs scattered 0.05 around a point 10
    away (D = 2) it picks the wrong code for 2.6% of the outputs, 16% at 30 away (tests/test_vqvae.py).
    cdist's direct mode sums (z - e_j)^2 without an (N, K, D) intermediate, and autocast keeps it in float32
    (a matmul would run in bf16 under --amp).
    """
    # ||z - e_j||_2 = sqrt(sum_d (z_d - e_jd)^2), exact to rounding; the sqrt keeps the order of the squares
    distances = torch.cdist(z, codebook, compute_mode="donot_use_mm_for_euclid_dist")  # (N, K)
    return distances.argmin(1)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) of code frequencies p = counts / sum(counts): K when all K codes are used equally,
    1 for one."""
    p = counts / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


class VectorQuantizer(nn.Module):
    """A codebook of K vectors of dimension D; `forward` quantizes a (B, D, H, W) map of encoder outputs."""

    def __init__(self, K: int, D: int, ema: bool = False, decay: float = 0.99, eps: float = 1e-5,
                 restart: float = 0.0):
        super().__init__()
        self.K, self.ema, self.decay, self.eps, self.restart = K, ema, decay, eps, restart
        init = torch.empty(K, D).uniform_(-1 / K, 1 / K)  # our choice (common in PyTorch ports)
        if ema:  # a buffer: moved by the moving averages below, not by the optimizer
            self.register_buffer("codebook", init)
            # N_i = 1 and m_i = e_i to start with, so that e_i = m_i / N_i holds before any update
            # (from N_i = 0, a code unused in the first batch would be divided by the smoothing eps and never
            # be chosen again)
            self.register_buffer("cluster_size", torch.ones(K))  # N_i
            self.register_buffer("embed_sum", init.clone())  # m_i
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.zeros(K))  # moving average of assignments per batch, for restarts

    def forward(self, z_e: torch.Tensor) -> dict[str, torch.Tensor]:
        """z_e (B, D, H, W) -> z_q (straight-through), indices (B, H, W), per-example codebook and commitment
        terms (B,), and the code counts (K,)."""
        B, D, H, W = z_e.shape
        z_flat = rearrange(z_e, "b d h w -> (b h w) d")
        with torch.no_grad():
            index = nearest_code(z_flat.to(self.codebook.dtype), self.codebook)  # (B*H*W,), in full precision
        z_q = rearrange(F.embedding(index, self.codebook), "(b h w) d -> b d h w",
                        b=B, h=H, w=W).to(z_e.dtype)
        # van den Oord et al. 2017, Eq. 3: ||sg[z_e(x)] - e||^2 moves the codebook, beta ||z_e(x) - sg[e]||^2
        # the encoder (beta is applied by the caller); summed over the code grid and D, per example
        codebook_loss = (z_e.detach() - z_q).pow(2).sum((1, 2, 3))
        commitment = (z_e - z_q.detach()).pow(2).sum((1, 2, 3))
        # straight-through estimator (Sec. 3.2): forward z_q, backward the identity,
        # d loss/d z_e = d loss/d z_q
        z_q_st = z_e + (z_q - z_e).detach()
        # (K,) in full precision (bf16 would round counts above 256), and no host sync
        # (bincount sizes on the host)
        ones = torch.ones_like(index, dtype=self.codebook.dtype)
        counts = torch.zeros(self.K, device=index.device, dtype=ones.dtype).index_add_(0, index, ones)
        if self.training:
            self.update(z_flat.detach().to(self.codebook.dtype), index, counts)
        return {"z_q": z_q_st, "index": index.view(B, H, W), "codebook_loss": codebook_loss,
                "commitment": commitment, "counts": counts}

    @torch.no_grad()
    def update(self, z_flat: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> None:
        """After a training forward: the EMA codebook update (with --ema), then dead-code restarts."""
        distributed = torch_dist.is_available() and torch_dist.is_initialized()
        sums = torch.zeros_like(self.codebook).index_add_(0, index, z_flat)  # sum of z_e per code
        if distributed:  # every rank sees the codes of the whole global batch
            torch_dist.all_reduce(counts)
            torch_dist.all_reduce(sums)
        if self.ema:
            ema_codebook_update(self.codebook, self.cluster_size, self.embed_sum, counts, sums,
                                self.decay, self.eps)
        if self.restart > 0:
            self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            # a dead code moves onto a random encoder output of this batch (rank 0's, broadcast to the others)
            dead = self.usage < self.restart  # (K,)
            new = z_flat[torch.randint(len(z_flat), (self.K,), device=z_flat.device)]  # (K, D)
            self.codebook.copy_(torch.where(dead[:, None], new, self.codebook))
            self.usage.copy_(torch.where(dead, torch.full_like(self.usage, self.restart), self.usage))
            if self.ema:  # restart the moving averages at one assignment to the new code
                self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size),
                                                    self.cluster_size))
                self.embed_sum.copy_(torch.where(dead[:, None], new, self.embed_sum))
            if distributed:
                for buffer in (self.codebook, self.usage) + ((self.cluster_size, self.embed_sum)
                                                             if self.ema else ()):
                    torch_dist.broadcast(buffer.data, src=0)


@torch.no_grad()
def ema_codebook_update(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor,
                        counts: torch.Tensor, sums: torch.Tensor, decay: float, eps: float) -> None:
    """van den Oord et al. 2017, Appendix A.1, Eqs. 6-8, in place:
        N_i <- gamma N_i + (1 - gamma) n_i,
        m_i <- gamma m_i + (1 - gamma) sum_j z_e(x)_{i,j},
        e_i = m_i / N_i,
    with the Laplace smoothing of the authors' Sonnet module, N_i -> (N_i + eps) / (n + K eps) n,
    n = sum_i N_i, so that a code without assignments is not divided by zero. With gamma = 0 and eps = 0, e_i
    is the mean of the encoder outputs assigned to code i (one k-means step)."""
    cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + len(cluster_size) * eps) * n
    codebook.copy_(embed_sum / smoothed[:, None])


# ----------------------------------------------------------------------------------------------------------
# Encoder and decoder (van den Oord et al. 2017, Sec. 4.1; Razavi et al. 2019, Fig. 2a)
# ----------------------------------------------------------------------------------------------------------
class ResidualStack(nn.Module):
    # "residual 3x3 blocks (implemented as ReLU, 3x3 conv, ReLU, 1x1 conv)", x + block(x), then a ReLU
    def __init__(self, channels: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1))
            for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


def encoder(c_in: int, hidden: int, res_blocks: int, down: int) -> nn.Sequential:
    """log2(down) 4x4 stride-2 convolutions, a 3x3 convolution and the residual stack:
    (B, hidden, H/down, W/down)."""
    layers, c = [], c_in
    for i in range(int(math.log2(down))):
        c_out = hidden if 2 ** (i + 1) == down else hidden // 2
        layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.ReLU()]
        c = c_out
    return nn.Sequential(*layers, nn.Conv2d(c, hidden, 3, 1, 1), ResidualStack(hidden, res_blocks))


def decoder(c_in: int, hidden: int, c_out: int, res_blocks: int, up: int) -> nn.Sequential:
    """A 3x3 convolution, the residual stack, log2(up) 4x4 stride-2 transposed convolutions:
    (B, c_out, H*up, W*up)."""
    layers, c, n_up = ([nn.Conv2d(c_in, hidden, 3, 1, 1), ResidualStack(hidden, res_blocks)], hidden,
                       int(math.log2(up)))
    for i in range(n_up):
        last = i == n_up - 1
        layers += ([nn.ConvTranspose2d(c, c_out if last else hidden // 2, 4, 2, 1)]
                   + ([] if last else [nn.ReLU()]))
        c = hidden // 2
    return nn.Sequential(*layers)


def bottom_factor(down: int, levels: int, height: int, width: int) -> int:
    """The downsampling of the bottom codes: `down`, or 4 (the paper's), or 2 when H/8 or W/8 is
    fractional."""
    for f in [down] if down else [4, 2]:
        whole = f * (2 if levels == 2 else 1)
        if f >= 2 and f & (f - 1) == 0 and height % whole == 0 and width % whole == 0:
            return f
    raise ValueError(
        f"--down {down or 'auto'} with --levels {levels} does not divide images of {height}x{width}")


class VQVAE(nn.Module):
    """Encoder, one or two codebooks, decoder. `forward` returns the training loss (for DDP) and metrics."""

    def __init__(self, shape: tuple[int, int, int], kind: str, levels: int = 1, hidden: int = 256,
                 res_blocks: int = 2, down: int = 0, codebook_size: int = 512, code_dim: int = 64,
                 beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99, ema_eps: float = 1e-5,
                 restart: float = 0.0):
        super().__init__()
        c, h, w = shape
        self.shape, self.kind, self.levels, self.beta = tuple(shape), kind, levels, beta
        self.log_px_given_z, self.params_per_dim = LIKELIHOODS[kind]
        self.down = bottom_factor(down, levels, h, w)
        D = code_dim

        def quantizer():
            return VectorQuantizer(codebook_size, D, ema, ema_decay, ema_eps, restart)

        self.enc_b = encoder(c, hidden, res_blocks, self.down)  # (B, hidden, H/down, W/down)
        if levels == 2:  # Razavi et al. 2019, Fig. 2a: the top encoder halves the bottom features again
            self.enc_t = encoder(hidden, hidden, res_blocks, 2)
            self.pre_t = nn.Conv2d(hidden, D, 1)
            self.quant_t = quantizer()
            # top codes -> bottom resolution, conditions z_e_b
            self.dec_t = decoder(D, hidden, D, res_blocks, 2)
            self.up_t = nn.ConvTranspose2d(D, D, 4, 2, 1)  # top codes -> bottom resolution, for the decoder
        self.pre_b = nn.Conv2d(hidden + (D if levels == 2 else 0), D, 1)
        self.quant_b = quantizer()
        self.decoder = decoder(D * levels, hidden, self.params_per_dim * c, res_blocks, self.down)

    def quantizers(self) -> list[VectorQuantizer]:
        return [self.quant_b] + ([self.quant_t] if self.levels == 2 else [])  # bottom first

    def code_shapes(self) -> list[tuple[int, int]]:
        h, w = self.shape[1] // self.down, self.shape[2] // self.down
        return [(h, w)] + ([(h // 2, w // 2)] if self.levels == 2 else [])

    def quantize(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """x (B, C, H, W) -> one quantizer output per level, bottom first."""
        h_b = self.enc_b(x)
        if self.levels == 1:
            return [self.quant_b(self.pre_b(h_b))]
        q_t = self.quant_t(self.pre_t(self.enc_t(h_b)))
        # the bottom codes see the encoder features and the decoded top codes
        q_b = self.quant_b(self.pre_b(torch.cat([h_b, self.dec_t(q_t["z_q"])], 1)))
        return [q_b, q_t]

    def decode(self, z_q: list[torch.Tensor]) -> torch.Tensor:
        """Quantized maps, bottom first -> likelihood parameters (B, P, C*H*W)."""
        h = z_q[0] if self.levels == 1 else torch.cat([z_q[0], self.up_t(z_q[1])], 1)
        return rearrange(self.decoder(h), "b (p c) h w -> b p (c h w)", p=self.params_per_dim)

    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Code indices (B, h, w) per level, bottom first -> likelihood parameters (B, P, C*H*W)."""
        return self.decode([rearrange(F.embedding(k, q.codebook), "b h w d -> b d h w")
                            for k, q in zip(codes, self.quantizers())])

    def forward(self, x: torch.Tensor):
        quantized = self.quantize(x)
        params = self.decode([q["z_q"] for q in quantized])
        rec = -self.log_px_given_z(x.flatten(1), params)  # (B,) -log p(x | z_q(x))
        codebook_loss = sum(q["codebook_loss"] for q in quantized)  # (B,)
        commitment = sum(q["commitment"] for q in quantized)
        # van den Oord et al. 2017, Eq. 3:
        # L = -log p(x|z_q(x)) + ||sg[z_e(x)] - e||^2 + beta ||z_e(x) - sg[e]||^2; with --ema the codebook
        # term is replaced by the moving averages (Appendix A.1)
        vq = commitment if self.quant_b.ema else codebook_loss
        loss = (rec + (0 if self.quant_b.ema else codebook_loss) + self.beta * commitment).mean()
        metrics = {"loss": loss, "rec": rec.mean(), "vq": vq.mean(),
                   "mse": (clipped_decoder_mean(self.kind, params) - x.flatten(1)).pow(2).mean()}
        for name, q in zip(["", "_top"], quantized):
            metrics[f"perplexity{name}"] = perplexity(q["counts"])
            metrics[f"codes_used{name}"] = (q["counts"] > 0).float().mean()
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# The prior: a gated PixelCNN over code indices (van den Oord et al. 2016, arXiv:1606.05328, Fig. 2)
# ----------------------------------------------------------------------------------------------------------
def gate(h: torch.Tensor) -> torch.Tensor:
    # van den Oord et al. 2016, Eq. 2: y = tanh(W_f * x) . sigmoid(W_g * x)
    a, b = h.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i gets row i - 1 (zeros in row 0): the vertical stack at row i then sees only rows above i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Column j gets column j - 1 (zeros in column 0): mask A, the first layer does not see its own
    position."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class GatedLayer(nn.Module):
    """A vertical stack (a (k//2 + 1) x k window over rows i-k//2..i) and a horizontal stack (row i, columns
    j-k//2..j), the vertical one fed into the horizontal one a row down so that the horizontal stack at (i, j)
    sees every row above in full and row i up to j: no blind spot. `first`: mask A, column j itself
    excluded."""

    def __init__(self, c_in: int, hidden: int, kernel: int, first: bool, num_classes: int,
                 cond_channels: int):
        super().__init__()
        self.p, self.first = kernel // 2, first
        self.v_conv = nn.Conv2d(c_in, 2 * hidden, (self.p + 1, kernel))  # rows i-p..i, columns j-p..j+p
        self.h_conv = nn.Conv2d(c_in, 2 * hidden, (1, self.p + 1))  # row i, columns j-p..j
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_out = nn.Conv2d(hidden, hidden, 1)
        # conditioning h (Eq. 4): V^T y for a class, V * s for a map of (upsampled top) codes, seen everywhere
        self.class_bias = nn.Embedding(num_classes, 4 * hidden) if num_classes else None
        self.cond_conv = nn.Conv2d(cond_channels, 4 * hidden, 1) if cond_channels else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.p
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2h, H, W), sees rows <= i
        # sees (i, <= j), or < j
        h_pre = self.h_conv(F.pad(shift_right(h) if self.first else h, (p, 0, 0, 0)))
        h_pre = h_pre + self.v_to_h(shift_down(v_pre))  # rows < i enter the horizontal stack
        bias = 0
        if self.class_bias is not None:
            bias = bias + self.class_bias(y)[:, :, None, None]
        if self.cond_conv is not None:
            bias = bias + self.cond_conv(cond)
        if self.class_bias is not None or self.cond_conv is not None:
            v_bias, h_bias = bias.chunk(2, dim=1)
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        v_out = gate(v_pre)
        h_out = self.h_out(gate(h_pre))
        return v_out, h_out if self.first else h + h_out  # residual connection in the horizontal stack


class GatedPixelCNN(nn.Module):
    """p(k) = prod_{i,j} p(k_ij | k_<ij) over a (H, W) grid of indices in {0..K-1}, raster order."""

    def __init__(self, K: int, hidden: int = 128, layers: int = 12, num_classes: int = 0,
                 cond_channels: int = 0):
        super().__init__()
        self.K = K
        # a code's embedding: a 1x1 convolution of its one-hot
        self.embed = nn.Conv2d(K, hidden, 1, bias=False)
        self.layers = nn.ModuleList(
            GatedLayer(hidden, hidden, 7 if i == 0 else 3, i == 0, num_classes, cond_channels)
            for i in range(layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, K, 1))

    def forward(self, codes: torch.Tensor, y: torch.Tensor | None = None, cond: torch.Tensor | None = None
                ) -> torch.Tensor:
        """codes: (B, H, W) indices, or (B, K, H, W) one-hot (or any real) inputs -> logits (B, K, H, W) of
        p(k_ij | k_<ij). Indices are looked up in the embedding directly (the same numbers, K times
        cheaper)."""
        if codes.dtype == torch.long:
            v = h = rearrange(F.embedding(codes, self.embed.weight[:, :, 0, 0].t()), "b h w c -> b c h w")
        else:
            v = h = self.embed(codes)
        for layer in self.layers:
            v, h = layer(v, h, y, cond)
        return self.out(h)


def one_hot(codes: torch.Tensor, K: int, like: nn.Module) -> torch.Tensor:
    """(B, H, W) indices -> (B, K, H, W) one-hot codes, in the dtype of the module `like`'s weights."""
    return rearrange(F.one_hot(codes, K), "b h w k -> b k h w").to(next(like.parameters()).dtype)


class CodePrior(nn.Module):
    """p(z) over the code grids: p(k_b) for VQ-VAE, p(k_t) p(k_b | k_t) for VQ-VAE-2
    (Razavi et al. 2019, Sec. 3.2), optionally p(. | class). `forward` returns the training loss (for DDP) and
    metrics."""

    def __init__(self, K: int, levels: int, hidden: int = 128, layers: int = 12, num_classes: int = 0):
        super().__init__()
        self.K, self.levels = K, levels
        self.bottom = GatedPixelCNN(K, hidden, layers, num_classes, hidden if levels == 2 else 0)
        if levels == 2:
            self.top = GatedPixelCNN(K, hidden, layers, num_classes)
            # the top codes, embedded and upsampled to the bottom grid: every bottom position sees all of them
            self.top_to_bottom = nn.Sequential(nn.Conv2d(K, hidden, 3, 1, 1), nn.ReLU(),
                                               nn.ConvTranspose2d(hidden, hidden, 4, 2, 1))

    def logits(self, codes: list[torch.Tensor], y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Code indices per level (bottom first) -> logits per level (B, K, h, w)."""
        if self.levels == 1:
            return [self.bottom(codes[0], y)]
        cond = self.top_to_bottom(one_hot(codes[1], self.K, self))
        return [self.bottom(codes[0], y, cond), self.top(codes[1], y)]

    def log_prob(self, codes: list[torch.Tensor], y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """log p per level, (B,) each: sum over positions of log softmax at the observed code."""
        return [-F.cross_entropy(logits, k, reduction="none").sum((1, 2))
                for logits, k in zip(self.logits(codes, y), codes)]

    def forward(self, codes: list[torch.Tensor], y: torch.Tensor | None = None):
        nll = [-lp for lp in self.log_prob(codes, y)]  # nats per image, per level
        loss = sum(nll).mean()
        metrics = {"loss": loss, "prior": sum(nll).mean()}
        if self.levels == 2:
            metrics.update(prior_bottom=nll[0].mean(), prior_top=nll[1].mean())
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation: -log p(x) <= -log p(x | z_q(x)) - log p(z_q(x))
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_vqvae(model: VQVAE, x: torch.Tensor, batch_size: int = 500) -> dict:
    """Decoder NLL (nats per image), MSE per pixel and code counts per level on x, and the codes
    themselves."""
    rec, mse, counts, codes = 0.0, 0.0, [0.0] * model.levels, [[] for _ in range(model.levels)]
    for xb in common.progress(x.split(batch_size), f"reconstruction NLL, {len(x):,} test images", len(x)):
        quantized = model.quantize(xb)
        params = model.decode([q["z_q"] for q in quantized])
        rec += -model.log_px_given_z(xb.flatten(1), params).sum().item()
        mse += (clipped_decoder_mean(model.kind, params) - xb.flatten(1)).pow(2).mean(1).sum().item()
        for level, q in enumerate(quantized):
            counts[level] = counts[level] + q["counts"]
            codes[level].append(q["index"])
    return {"rec": rec / len(x), "mse": mse / len(x), "counts": counts,
            "codes": [torch.cat(c) for c in codes]}


@torch.no_grad()
def encode(model: VQVAE, x: torch.Tensor, batch_size: int = 1000) -> list[torch.Tensor]:
    """The code indices of x, per level (bottom first): the deterministic q(z|x) of stage two's
    training data."""
    codes = [model.quantize(xb) for xb in x.split(batch_size)]
    return [torch.cat([c[level]["index"] for c in codes]) for level in range(model.levels)]


@torch.no_grad()
def evaluate_prior(prior: CodePrior, codes: list[torch.Tensor], y: torch.Tensor | None, batch_size: int = 500
                   ) -> list[float]:
    """Test NLL of the codes under the prior, nats per image, per level (bottom first)."""
    sums = [0.0] * prior.levels
    starts = range(0, len(codes[0]), batch_size)
    for i in common.progress(starts, f"prior NLL of the codes, {len(codes[0]):,} test images",
                             len(starts), "batch"):
        sl = slice(i, i + batch_size)
        for level, lp in enumerate(prior.log_prob([c[sl] for c in codes], None if y is None else y[sl])):
            sums[level] -= lp.sum().item()
    return [s / len(codes[0]) for s in sums]


def uniform_prior_nll(model: VQVAE) -> float:
    """-log p(z) of the uniform prior of stage one: log K nats per code, at every position of every level."""
    return sum(h * w * math.log(q.K) for (h, w), q in zip(model.code_shapes(), model.quantizers()))


def report(rec: float, prior: float, data: common.Data) -> dict[str, float]:
    """The bound and its two terms in the repository's units: bits/dim for 8-bit data, nats for binary."""
    if data.kind == "8bit":
        return {"nll_bpd": common.bits_per_dim(rec + prior, data.num_dims),
                "rec_bpd": common.bits_per_dim(rec, data.num_dims),
                "prior_bpd": common.bits_per_dim(prior, data.num_dims)}
    return {"nll_nats": rec + prior, "rec_nats": rec, "prior_nats": prior}


# ----------------------------------------------------------------------------------------------------------
# Sampling and pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_grid(pixelcnn: GatedPixelCNN, n: int, shape: tuple[int, int], y: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling in raster order: k_ij ~ p(k_ij | k_<ij), one position at a time for all n grids.
    Row i depends on rows <= i only, so the network runs on the rows 0..i (the same logits, half the work)."""
    device = next(pixelcnn.parameters()).device
    codes = torch.zeros(n, *shape, dtype=torch.long, device=device)
    for i in range(shape[0]):
        for j in range(shape[1]):
            rows = slice(0, i + 1)
            # (n, K)
            logits = pixelcnn(codes[:, rows], y, None if cond is None else cond[:, :, rows])[:, :, i, j]
            codes[:, i, j] = torch.multinomial(F.softmax(logits.float(), dim=1), 1)[:, 0]
    return codes


@torch.no_grad()
def sample_codes(prior: CodePrior, n: int, shapes: list[tuple[int, int]], y: torch.Tensor | None = None
                 ) -> list[torch.Tensor]:
    """Codes per level (bottom first) from the prior: the top grid first, then the bottom grid given it."""
    if prior.levels == 1:
        return [sample_grid(prior.bottom, n, shapes[0], y)]
    top = sample_grid(prior.top, n, shapes[1], y)
    return [sample_grid(prior.bottom, n, shapes[0], y,
                        prior.top_to_bottom(one_hot(top, prior.K, prior))), top]


@torch.no_grad()
def sample(model: VQVAE, codes: list[torch.Tensor]) -> torch.Tensor:
    """Decode code grids (bottom first) to pictures: the decoder mean, (n, C, H, W)."""
    return clipped_decoder_mean(model.kind, model.decode_codes(codes)).reshape(len(codes[0]), *model.shape)


def usage_picture(counts: list[torch.Tensor], height: int = 64) -> torch.Tensor:
    """One bar per code (index order, bottom codebook on top), heights proportional to its count:
    (rows, K)."""
    rows = []
    for c in counts:
        bars = (c / c.max().clamp(min=1) * height).round()  # (K,)
        # height .. 1, top to bottom
        level = torch.arange(height, 0, -1, device=c.device, dtype=c.dtype)[:, None]
        rows += [(level <= bars[None]).float(), torch.zeros(4, len(c), device=c.device)]
    return torch.cat(rows[:-1])


@torch.no_grad()
def draw_vqvae_pictures(model: VQVAE, data: common.Data, run: common.Run, counts: list[torch.Tensor],
                        n: int = 64) -> None:
    """recon.png (inputs above reconstructions), samples.png (codes from the uniform prior of stage one,
    decoded), codebook.png (assignments per code on the test images)."""
    x = data.test_x[:32]
    recon = sample(model, [q["index"] for q in model.quantize(x)])
    pairs = rearrange(torch.stack([x.view(4, 8, *x.shape[1:]), recon.view(4, 8, *x.shape[1:])], 1),
                      "r two n c h w -> (r two n) c h w")
    common.save_grid(run.path("recon.png"), pairs, nrow=8)
    device = x.device
    codes = [torch.randint(q.K, (n, *s), device=device)
             for q, s in zip(model.quantizers(), model.code_shapes())]
    common.save_grid(run.path("samples.png"), sample(model, codes), nrow=8)
    common.save_heatmap(run.path("codebook.png"), usage_picture(counts))


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def build_vqvae(config: dict, data: common.Data) -> VQVAE:
    if data.kind not in LIKELIHOODS:
        raise common.DataError(
            f"vqvae.py models images (8-bit or binarized), not {data.name}; try --dataset mnist")
    try:
        return VQVAE(data.shape, data.kind, **{k: config[k] for k in MODEL_FIELDS})
    except ValueError as e:
        raise common.RunError(str(e)) from None


def evaluate_and_draw(run: common.Run, model: VQVAE, data: common.Data, args: Args, step: int) -> dict:
    """Stage one: the bound with the uniform prior on the test set, perplexities, pictures (rank 0),
    one line."""
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    with common.eval_mode(model, seed=args.seed):
        result = evaluate_vqvae(model, x)
        metrics = report(result["rec"], uniform_prior_nll(model), data)
        metrics["mse"] = result["mse"]
        for name, c in zip(["", "_top"], result["counts"]):
            metrics[f"perplexity{name}"] = perplexity(c).item()
            metrics[f"codes_used{name}"] = (c > 0).float().mean().item()
        draw_vqvae_pictures(model, data, run, result["counts"], args.samples)
    run.log("test", step, metrics, note="bound: decoder NLL + uniform prior, log K nats per code")
    return metrics


def train_vqvae(args: Args) -> dict:
    dist, device = common.setup(args)
    args = dataclasses.replace(args, dataset=args.dataset or ("mnist" if args.quick else "cifar10"))
    if common.dataset_kind(args.dataset) not in LIKELIHOODS:  # refused before any data is read or downloaded
        raise common.DataError(
            f"vqvae.py models images (8-bit or binarized), not {args.dataset}; try --dataset mnist")
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = build_vqvae(dataclasses.asdict(args), data).to(device)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "vqvae", dist, model, optimizer, resumable=("samples",))
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    n = args.train_n or len(data.train_x)
    batches = common.Batches(data.train_x[:n], None, args.batch_size, args.seed, dist,
                             binarize=data.dynamic_binarization)
    total = args.steps
    run.print(
        f"vqvae: {sum(p.numel() for p in model.parameters()):,} parameters, {data.name} {data.shape}, codes "
        f"{' + '.join(f'{h}x{w}' for h, w in model.code_shapes())} of K = {args.codebook_size}, "
        f"{total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        with common.autocast(device, args.amp):
            loss, metrics = ddp(x)
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


def load_stage_one(path: str, device: torch.device) -> tuple[dict, dict]:
    """The stage-one checkpoint (torch.load with weights_only=True): its config and model weights."""
    if not path:
        raise common.RunError("--stage prior needs --vqvae RUN, the folder of a stage-one run of vqvae.py")
    file = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise common.RunError(f"--vqvae: there is no stage-one checkpoint at {file}")
    ckpt = common.load_checkpoint(file, map_location=device)
    config = ckpt.get("config", {})
    if ckpt.get("model_name") != "vqvae" or config.get("stage") != "vqvae" or "model" not in ckpt:
        raise common.RunError(f"--vqvae: {file} is not a stage-one checkpoint of vqvae.py")
    return config, ckpt["model"]


def prior_evaluate_and_draw(run: common.Run, prior: CodePrior, model: VQVAE, test_codes, test_y, rec: float,
                            data: common.Data, args: Args, step: int) -> dict:
    """Stage two: the bound with the trained prior on the test set, samples (rank 0), one line."""
    with common.eval_mode(prior, seed=args.seed):
        nll = evaluate_prior(prior, test_codes, test_y)
        metrics = report(rec, sum(nll), data)
        if prior.levels == 2:
            metrics.update(prior_bottom_nats=nll[0], prior_top_nats=nll[1])
        n, y, nrow = args.samples, None, 8
        if prior.bottom.layers[0].class_bias is not None:  # one row per class
            classes = prior.bottom.layers[0].class_bias.num_embeddings
            nrow = max(1, args.samples // classes)
            n, y = nrow * classes, torch.arange(classes, device=test_codes[0].device).repeat_interleave(nrow)
        images = sample(model, sample_codes(prior, n, model.code_shapes(), y))
        common.save_grid(run.path("samples.png"), images, nrow=nrow)
    conditional = ", given the class: a bound on -log p(x | y)" if args.class_cond else ""
    run.log("test", step, metrics, note=f"bound: decoder NLL + PixelCNN prior NLL of the codes{conditional}")
    return metrics


def train_prior(args: Args) -> dict:
    dist, device = common.setup(args)
    config, weights = load_stage_one(args.vqvae, device)
    if args.dataset and args.dataset != config["dataset"]:
        raise common.RunError(f"--dataset {args.dataset}, but the stage-one run {args.vqvae} modelled "
                              f"{config['dataset']}")
    args = dataclasses.replace(args, dataset=config["dataset"],
                               out=args.out or f"runs/vqvae-prior-{config['dataset']}")
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = build_vqvae(config, data).to(device)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise common.RunError(f"--vqvae: the checkpoint does not fit its own config: "
                              f"{str(e).splitlines()[0]}") from None
    model.eval().requires_grad_(False)
    if args.class_cond and data.train_y is None:
        raise common.DataError(f"--class-cond needs labels, and {data.name} has none")
    num_classes = int(data.train_y.max()) + 1 if args.class_cond else 0
    prior = CodePrior(model.quant_b.K, model.levels, args.prior_hidden, args.prior_layers,
                      num_classes).to(device)
    optimizer = common.adam(prior.parameters(), lr=args.lr)
    run = common.Run(args, "vqvae", dist, prior, optimizer, resumable=("vqvae", "samples"))
    start = run.restore()
    ddp = common.wrap_ddp(prior, dist)
    # the codes of every image, once: q(z|x) is deterministic (the binarized training set is drawn once,
    # seed --seed)
    with common.eval_mode(model, seed=args.seed):
        train_x = data.train_x[: args.train_n or len(data.train_x)]
        if data.dynamic_binarization:
            train_x = torch.bernoulli(train_x, generator=torch.Generator(device).manual_seed(args.seed))
        train_codes = encode(model, train_x)
        test_x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
        test = evaluate_vqvae(model, test_x)
    test_y = None if not num_classes else data.test_y[: len(test_x)]
    train_y = None if data.train_y is None else data.train_y[: len(train_x)]
    batches = common.Batches(torch.arange(len(train_x), device=device), train_y,
                             args.batch_size, args.seed, dist)
    total = args.steps
    run.print(f"vqvae prior: {sum(p.numel() for p in prior.parameters()):,} parameters over codes "
              f"{' + '.join(f'{h}x{w}' for h, w in model.code_shapes())} of {args.vqvae}, "
              f"{total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        index, y = batches(step)
        with common.autocast(device, args.amp):
            loss, metrics = ddp([c[index] for c in train_codes], y if num_classes else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log_train(step, metrics)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total and dist.is_main:
            prior_evaluate_and_draw(run, prior, model, test["codes"], test_y, test["rec"],
                                    data, args, step + 1)

    if not dist.is_main:
        return {}
    return prior_evaluate_and_draw(run, prior, model, test["codes"], test_y, test["rec"], data, args, total)


def train(args: Args) -> dict:
    return train_prior(args) if args.stage == "prior" else train_vqvae(args)


if __name__ == "__main__":
    common.cli(train, Args, presets={"quick": QUICK})
