"""Variational autoencoder: Kingma & Welling 2013, "Auto-Encoding Variational Bayes", arXiv:1312.6114.

A Gaussian encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))), the reparameterization z = mu + sigma * eps, a
standard normal prior and a decoder p(x|z); trained by maximizing the ELBO
E_q[log p(x|z)] - KL(q(z|x) || p(z)) with the KL in closed form. Evaluated by the ELBO and the
importance-sampled log-likelihood (k = 1000).

    python vae.py --quick                              # a few seconds on a CPU
    python vae.py --dataset binarized_mnist            # 10 epochs of the 784-400-20 MLP
    python vae.py --dataset cifar10 --arch conv --latent 128
    python vae.py --dataset binarized_mnist --kl-warmup 10000 --free-bits 0.25   # posterior-collapse remedies
    python vae.py --prior vamp                         # VampPrior, 500 pseudo-inputs (Tomczak & Welling 2018)
    python vae.py --prior mog                          # a learned mixture of 500 Gaussians as the prior
    python vae.py --objective wae --latent 8           # WAE-MMD (Tolstikhin et al. 2018), lambda = 10
    torchrun --nproc_per_node=2 vae.py --dataset binarized_mnist

Likelihoods: Bernoulli for binarized MNIST (nats), a discretized logistic per pixel for 8-bit data
(bits/dim), a Gaussian for 2D toys (nats, and KL(data || model) = NLL - H(data)).

Posterior-collapse remedies of the lecture, as flags: KL warm-up (--kl-warmup), free bits (--free-bits,
Kingma et al. 2016), a committed minimum rate (--min-rate, delta-VAE, Razavi et al. 2019) and aggressive
inference-network training (--aggressive, He et al. 2019). And the lecture's two remedies that change what
the KL is matched to:
- Expressive priors (--prior): a mixture of K Gaussians with learned means and variances, or the VampPrior
  p(z) = (1/K) sum_k q(z | u_k) with K learned pseudo-inputs u_k (Tomczak & Welling 2018, Eq. 9). The KL to a
  mixture has no closed form: the ELBO then uses its one-sample Monte Carlo estimate log q(z|x) - log p(z)
  (logged as kl_mc), and the importance-sampled log p(x) uses the mixture's log-density.
- Matching the aggregated posterior (--objective wae): the Wasserstein auto-encoder's WAE-MMD objective
  (Tolstikhin et al. 2018, Algorithm 2), a reconstruction cost plus lambda MMD(q(z), p(z)) between the codes
  of a batch and draws of N(0, I), with the inverse multiquadratic kernel summed over seven scales. The test
  log-likelihood is still the importance-sampled one, with the Gaussian encoder as the proposal.

Deviations from the paper:
- MLP: the 400-unit, 20-latent ReLU network of the PyTorch example, not the paper's 500 tanh units, and Adam
  (lr 1e-3, batch 128) instead of Adagrad with weight decay; the paper's Fig. 2 compares latent sizes instead.
- Binarized MNIST is dynamically binarized (a fresh Bernoulli draw per batch); the paper does not say.
- The discretized-logistic decoder for 8-bit data and the conv networks are not in the paper.
- VampPrior: no warm-up and the one-layer MLP VAE (the paper: warm-up over 100 epochs, and also HVAE and
  convolutional models); --prior mog initializes its means N(0, 1) and unit variances (ours).
- WAE: the cost c(x, G(z)) is the decoder's -log p(x|z) with a Gaussian encoder (the paper: squared error
  with a deterministic encoder on MNIST), so the model keeps a likelihood to report; no --prior, warm-up or
  other collapse remedy with it.

Expected result: README.md's likelihood tables, rows vae-bmnist (this command; about 97 nats),
vae-long-bmnist, vae-mnist and the two toys, each with its command, wall time and figure
(`python -m results.table run vae-bmnist`).
"""

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import common


@dataclass
class Args:
    dataset: str = "binarized_mnist"  # an image dataset or a 2D toy (see README)
    arch: Literal["mlp", "conv"] = "mlp"  # mlp: D-hidden-latent; conv: two stride-2 convs
                                          # (H, W divisible by 4)
    hidden: int = 400  # hidden units (Kingma & Welling used 500 for MNIST); >= 1
    latent: int = 20  # latent dimensions; >= 1
    epochs: int = 10  # passes over the training set; >= 1
    steps: int = 0  # stop after this many optimizer steps instead (0: epochs x steps per epoch); >= 0
    batch_size: int = 128  # minibatch per process (paper: 100); >= 1
    lr: float = 1e-3  # Adam learning rate (paper: Adagrad); > 0
    kl_warmup: int = 0  # steps over which the KL weight rises linearly from 0 to 1 (0: off); >= 0
    free_bits: float = 0.0  # free bits: minimum batch-mean KL per latent dimension, nats (0: off); >= 0
    min_rate: float = 0.0  # delta-VAE: posterior variance bounded so every KL_j >= min_rate nats
                           # (0: off); >= 0
    aggressive: bool = False  # He et al. 2019: train the encoder to convergence before each decoder step
    prior: Literal["normal", "mog", "vamp"] = "normal"  # p(z): N(0, I), a learned Gaussian mixture, or the
                                                        # VampPrior (Tomczak & Welling 2018)
    components: int = 500  # mixture components or VampPrior pseudo-inputs (Tomczak & Welling: 500); >= 1
    objective: Literal["elbo", "wae"] = "elbo"  # elbo: the VAE; wae: WAE-MMD (Tolstikhin et al. 2018)
    wae_lambda: float = 10.0  # WAE: weight lambda of the MMD penalty (paper, MNIST: 10); >= 0
    eval_k: int = 1000  # importance samples for the final test log-likelihood; >= 1
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test evaluations (0: once per epoch); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/vae-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a few seconds on a CPU: 300 steps, 1000 test images, k = 100


QUICK = dict(steps=300, eval_n=1000, eval_k=100, eval_every=0, log_every=50, ckpt_every=300)
ROWS_PER_CHUNK = 4096  # decoder rows (samples x images) per chunk of the importance-sampled evaluation


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


def gaussian_log_prob(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # log N(x; mean, exp(logvar)) per dimension
    mean, logvar = params[..., 0, :], params[..., 1, :]
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar)).sum(-1)


LIKELIHOODS = {  # name -> (log p(x|z) of x (..., D) and params (..., P, D), decoder outputs P per dimension)
    # params[..., 0, :]: the logits
    "bernoulli": (lambda x, params: bernoulli_log_prob(x, params[..., 0, :]), 1),
    "discretized_logistic": (discretized_logistic_log_prob, 2),
    "gaussian": (gaussian_log_prob, 2),
}


def decoder_mean(likelihood: str, params: torch.Tensor) -> torch.Tensor:
    """E[x|z]: sigmoid of the Bernoulli logits, or the location (the mode) of a logistic or Gaussian."""
    return torch.sigmoid(params[..., 0, :]) if likelihood == "bernoulli" else params[..., 0, :]


# ----------------------------------------------------------------------------------------------------------
# Gaussian latent: reparameterization, closed-form KL, log densities
# ----------------------------------------------------------------------------------------------------------
def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, samples: int | None = None) -> torch.Tensor:
    # Kingma & Welling 2013, Sec. 2.4: z = mu + sigma * eps, eps ~ N(0, I); (S, B, d) when samples is given
    shape = mu.shape if samples is None else (samples, *mu.shape)
    eps = torch.randn(shape, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # Kingma & Welling 2013, Appendix B:
    # KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # per dimension, (B, d)


def log_normal_logvar(z: torch.Tensor, mu: torch.Tensor | float = 0.0, logvar: torch.Tensor | float = 0.0):
    # log N(z; mu, diag(exp(logvar))), summed over the last dimension
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def max_logvar_for_rate(rate: float) -> float:
    """log sigma_max^2 < 0 with sigma^2 - 1 - log sigma^2 = 2 rate: any sigma <= sigma_max has KL_j >= rate.

    Razavi et al. 2019 (delta-VAE), Sec. 2: a committed rate by constraining the posterior family; here the
    prior is N(0, 1), so KL_j >= 1/2 (sigma^2 - 1 - log sigma^2), which decreases on (0, 1).
    """
    s = 0.5  # sigma^2; Newton's method on g(s) = s - 1 - log s - 2 rate, which is convex and decreasing here
    for _ in range(100):
        s = min(max(s - (s - 1 - math.log(s) - 2 * rate) / (1 - 1 / s), 1e-30), 1 - 1e-12)
    return math.log(s)


# ----------------------------------------------------------------------------------------------------------
# Priors beyond N(0, I): a Gaussian mixture and the VampPrior; the KL to them by Monte Carlo
# ----------------------------------------------------------------------------------------------------------
def log_mixture(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # log p(z) = log (1/K) sum_k N(z; mu_k, diag(exp(logvar_k))): z (..., d), mu and logvar (K, d) -> (...)
    return torch.logsumexp(log_normal_logvar(z[..., None, :], mu, logvar), dim=-1) - math.log(len(mu))


def kl_monte_carlo(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_prior: torch.Tensor):
    # KL(q(z|x) || p(z)) = E_q[log q(z|x) - log p(z)]: with no closed form for a mixture prior, the one-sample
    # estimate at the z ~ q(z|x) the ELBO uses, unbiased; (B,)
    return log_normal_logvar(z, mu, logvar) - log_prior


# ----------------------------------------------------------------------------------------------------------
# Wasserstein auto-encoder: match the aggregated posterior q(z) = E_x q(z|x) to p(z) with an MMD penalty
# ----------------------------------------------------------------------------------------------------------
MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # multiples of C = 2 d sigma^2 (the WAE authors' code)


def imq_kernel(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    # Tolstikhin et al. 2018, Sec. 4: the inverse multiquadratic kernel k(x, y) = C / (C + ||x - y||^2);
    # (n, m) for a (n, d) and b (m, d)
    return c / (c + (a[:, None] - b[None]).pow(2).sum(-1))


def mmd_unbiased(z_q: torch.Tensor, z_p: torch.Tensor, scales: tuple[float, ...] = MMD_SCALES):
    """Unbiased estimate of MMD^2 between the distributions of the rows of z_q and z_p, (n, d) each, summed
    over kernel scales C = 2 d s (prior N(0, I), sigma^2 = 1), as in the WAE authors' code.

    Gretton et al. 2012, Eq. 3 (the U-statistic), Tolstikhin et al. 2018, Algorithm 2:
        MMD^2 = 1/(n(n-1)) sum_{i != j} [k(q_i, q_j) + k(p_i, p_j)] - 2/n^2 sum_{i, j} k(q_i, p_j).
    """
    n, d = z_q.shape
    off_diagonal = 1 - torch.eye(n, device=z_q.device, dtype=z_q.dtype)
    mmd = z_q.new_zeros(())
    for s in scales:
        c = 2 * d * s
        within = (imq_kernel(z_q, z_q, c) + imq_kernel(z_p, z_p, c)) * off_diagonal
        mmd = mmd + within.sum() / (n * (n - 1)) - 2 * imq_kernel(z_q, z_p, c).mean()
    return mmd


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
def mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class ConvEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], hidden: int, out: int):
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(
            nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, H/4, W/4)
            nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], hidden: int, latent: int, params_per_dim: int):
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 64 * (h // 4) * (w // 4)), nn.ReLU(),
            nn.Unflatten(1, (64, h // 4, w // 4)),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, H/2, W/2)
            nn.ConvTranspose2d(32, params_per_dim * c, 4, 2, 1))  # (B, P*C, H, W)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    """Encoder q(z|x), decoder p(x|z), prior p(z): N(0, I), a Gaussian mixture with learned means and
    variances ("mog"), or the VampPrior ("vamp"). `forward` returns the training loss (for DDP)."""

    def __init__(self, shape: tuple[int, ...], likelihood: str, arch: str = "mlp", hidden: int = 400,
                 latent: int = 20, min_rate: float = 0.0, prior: str = "normal", components: int = 500):
        super().__init__()
        self.shape, self.likelihood, self.latent = tuple(shape), likelihood, latent
        self.log_px_given_z, self.params_per_dim = LIKELIHOODS[likelihood]
        num_dims, p = math.prod(shape), self.params_per_dim
        # the MLP encoder reads x flattened to (B, D), the conv one (B, C, H, W)
        self.flat_input = arch == "mlp"
        if arch == "mlp":
            self.encoder = mlp([num_dims, hidden, 2 * latent])
            self.decoder = mlp([latent, hidden, p * num_dims])
        elif len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0:
            self.encoder = ConvEncoder(shape, hidden, 2 * latent)
            self.decoder = ConvDecoder(shape, hidden, latent, p)
        else:
            raise ValueError(f"--arch conv needs images with sides divisible by 4, not shape {shape}")
        self.max_logvar = max_logvar_for_rate(min_rate) if min_rate > 0 else None
        self.prior = prior
        # a mixture of K Gaussians, means and log-variances learned (our init: N(0, 1) means, unit variances)
        if prior == "mog":
            self.prior_mu = nn.Parameter(torch.randn(components, latent))
            self.prior_logvar = nn.Parameter(torch.zeros(components, latent))
        elif prior == "vamp":
            # Tomczak & Welling 2018, Eq. 9: p(z) = (1/K) sum_k q(z | u_k) with K learned pseudo-inputs u_k
            # (initialized N(0.05, 0.01^2) per pixel, as in the authors' code)
            self.pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(components, *shape))
        elif prior != "normal":
            raise ValueError(f"unknown prior {prior!r}: normal, mog or vamp")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, *shape) -> mu, logvar, each (B, latent)."""
        h = self.encoder(x.flatten(1) if self.flat_input else x)
        mu, logvar = h.chunk(2, dim=-1)
        if self.max_logvar is not None:  # delta-VAE: log sigma^2 in (-inf, max_logvar]
            logvar = self.max_logvar - F.softplus(logvar)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., latent) -> likelihood parameters (..., P, D)."""
        h = self.decoder(z.flatten(0, -2))
        return h.reshape(*z.shape[:-1], self.params_per_dim, -1)

    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mu, logvar), each (K, latent), of a mixture prior; None for N(0, I)."""
        if self.prior == "mog":
            return self.prior_mu, self.prior_logvar
        if self.prior == "vamp":
            # the posteriors at the pseudo-inputs; images keep theirs in [0, 1] (hardtanh, the authors' code)
            u = self.pseudo_inputs
            return self.encode(u if self.likelihood == "gaussian" else F.hardtanh(u, 0.0, 1.0))
        return None

    def log_prior(self, z: torch.Tensor, components: tuple[torch.Tensor, torch.Tensor] | None = None):
        """log p(z) (...,) for z (..., latent); `components` spares encoding the VampPrior's pseudo-inputs."""
        components = components or self.prior_components()
        return log_normal_logvar(z) if components is None else log_mixture(z, *components)

    def sample_prior(self, n: int) -> torch.Tensor:
        """n draws (n, latent) of p(z): pick a component uniformly, then draw from it."""
        components = self.prior_components()
        device = next(self.parameters()).device
        if components is None:
            return torch.randn(n, self.latent, device=device)
        mu, logvar = components
        k = torch.randint(len(mu), (n,), device=device)
        return reparameterize(mu[k], logvar[k])

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0, free_bits: float = 0.0,
                wae_lambda: float | None = None):
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        rec = self.log_px_given_z(x.flatten(1), self.decode(z))  # (B,) log p(x|z), one sample
        if self.prior == "normal":
            kl_j = gaussian_kl(mu, logvar)  # (B, latent), closed form
            kl = kl_j.sum(1)
        else:  # no closed form to a mixture: the one-sample Monte Carlo KL at the same z
            kl = kl_monte_carlo(z, mu, logvar, self.log_prior(z))
        # Kingma & Welling 2013, Eq. 10: ELBO = -KL(q(z|x) || p(z)) + log p(x|z), z ~ q(z|x)
        elbo = rec - kl
        kl_name = "kl" if self.prior == "normal" else "kl_mc"  # logged under its own name when estimated
        metrics = {"nelbo": -elbo.mean(), "rec": -rec.mean(), kl_name: kl.mean()}
        if wae_lambda is not None:
            # Tolstikhin et al. 2018, Eq. 4 and Algorithm 2 (WAE-MMD): a reconstruction cost plus lambda times
            # the MMD between the codes of the batch, samples of q(z) = E_x q(z|x), and samples of p(z)
            mmd = mmd_unbiased(z, self.sample_prior(len(z)))
            loss = -rec.mean() + wae_lambda * mmd
            metrics["mmd"] = mmd
        elif free_bits > 0:  # Kingma et al. 2016, free bits: sum_j max(lambda, E_batch[KL_j])
            loss = -rec.mean() + kl_weight * kl_j.mean(0).clamp(min=free_bits).sum()
        else:
            loss = -rec.mean() + kl_weight * kl.mean()
        return loss, {"loss": loss, **metrics}


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation
# ----------------------------------------------------------------------------------------------------------
def importance_weighted_log_px(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                               log_px_given_z: Callable[[torch.Tensor], torch.Tensor], k: int,
                               chunk: int | None = None,
                               log_prior: Callable[[torch.Tensor], torch.Tensor] = log_normal_logvar):
    """log p(x) ~ log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x): (B,), vectorized over samples.

    Burda et al. 2016, Eq. 8 (the IWAE bound L_k; k = 1 is the ELBO). `log_px_given_z` maps z (S, B, d) to
    log p(x|z) (S, B); samples are drawn `chunk` at a time so memory stays bounded.
    """
    chunk = chunk or k
    log_w = []
    for start in range(0, k, chunk):
        z = reparameterize(mu, logvar, samples=min(chunk, k - start))  # (S, B, d)
        log_w.append(log_px_given_z(z) + log_prior(z) - log_normal_logvar(z, mu, logvar))  # (S, B)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    # Burda et al. 2016, Sec. 5.2: unit u is active if A_u = Cov_x(E_q(u|x)[u]) > 0.01
    return int((mu.var(dim=0) > threshold).sum())


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """I_q(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)], with q(z) the batch mean of the posteriors.

    He et al. 2019, Sec. 4 (estimated as in their code): one z per example, q(z) ~ (1/N) sum_j q(z|x_j).
    """
    z = reparameterize(mu, logvar)  # (N, d)
    log_q_cond = log_normal_logvar(z[:, None], mu[None], logvar[None])  # (N, N): log q(z_i | x_j)
    log_q_z = torch.logsumexp(log_q_cond, dim=1) - math.log(len(mu))
    return (log_q_cond.diagonal() - log_q_z).mean()


@torch.no_grad()
def evaluate(model: VAE, x: torch.Tensor, k: int = 0, batch_size: int = 500) -> dict[str, float]:
    """Test ELBO, KL, active units and mutual information; with k > 0 also the importance-sampled log p(x)."""
    sums = {"elbo": 0.0, "kl": 0.0, "log_px": 0.0}
    mus, logvars = [], []
    components = model.prior_components()  # once: the VampPrior encodes its pseudo-inputs
    for xb in common.progress(x.split(batch_size),
                              f"test ELBO, {len(x):,} images" + (f" x k = {k}" if k else ""), len(x)):
        xb_flat = xb.flatten(1)
        mu, logvar = model.encode(xb)
        mus.append(mu), logvars.append(logvar)
        z = reparameterize(mu, logvar)
        if components is None:
            kl = gaussian_kl(mu, logvar).sum(1)
        else:  # a mixture prior: the Monte Carlo KL at the ELBO's z
            kl = kl_monte_carlo(z, mu, logvar, model.log_prior(z, components))
        sums["kl"] += kl.sum().item()
        sums["elbo"] += (model.log_px_given_z(xb_flat, model.decode(z)) - kl).sum().item()
        if k:
            for i in range(0, len(xb), max(1, ROWS_PER_CHUNK // k)):  # images per chunk of decoder rows
                sl = slice(i, i + max(1, ROWS_PER_CHUNK // k))

                def log_px_given_z(z, xs=xb_flat[sl]):
                    return model.log_px_given_z(xs, model.decode(z))

                sums["log_px"] += importance_weighted_log_px(
                    xb_flat[sl], mu[sl], logvar[sl], log_px_given_z, k, chunk=min(k, ROWS_PER_CHUNK),
                    log_prior=lambda z: model.log_prior(z, components)).sum().item()
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    n = len(x)
    metrics = {"elbo": sums["elbo"] / n, "kl": sums["kl"] / n, "active_units": active_units(mu),
               "mi": torch.stack([mutual_information(m, v)
                                  for m, v in zip(mu.split(1000), logvar.split(1000))])
               .mean().item()}
    if k:
        metrics["log_px"] = sums["log_px"] / n
    return metrics


def report(metrics: dict[str, float], data: common.Data) -> dict[str, float]:
    """Express the evaluation in the repository's units: nats for binary data and toys, bits/dim for 8-bit."""
    out = {}
    for key, name in (("log_px", "nll"), ("elbo", "nelbo")):
        if key not in metrics:
            continue
        if data.kind == "8bit":
            out[f"{name}_bpd"] = common.bits_per_dim(-metrics[key], data.num_dims)
        else:
            out[f"{name}_nats"] = -metrics[key]
    if data.kind == "toy" and "log_px" in metrics:
        out["kl_data_model"] = -metrics["log_px"] - data.entropy  # KL(data || model) = NLL - H(data)
    out.update(kl=metrics["kl"], active_units=metrics["active_units"], mi=metrics["mi"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling and pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: VAE, n: int, mean: bool = True) -> torch.Tensor:
    """z ~ p(z), then E[x|z] (mean=True, the usual picture) or x ~ p(x|z). Returns (n, *shape)."""
    z = model.sample_prior(n)
    params = model.decode(z)
    if mean:
        x = decoder_mean(model.likelihood, params)
    elif model.likelihood == "bernoulli":
        x = torch.bernoulli(torch.sigmoid(params[:, 0]))
    else:  # a Gaussian draw; for 8-bit data a logistic draw rounded to the 256 levels
        loc, log_scale = params[:, 0], params[:, 1]
        if model.likelihood == "gaussian":
            x = loc + torch.exp(0.5 * log_scale) * torch.randn_like(loc)
        else:
            u = torch.rand_like(loc).clamp(1e-6, 1 - 1e-6)
            x = ((loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u)) * 255).round().clamp(0, 255)
                 / 255)
    return x.reshape(n, *model.shape)


@torch.no_grad()
def draw_pictures(model: VAE, data: common.Data, run: common.Run) -> None:
    """samples.png (prior samples), recon.png (inputs above reconstructions), interp.png (latent paths)."""
    if data.kind == "toy":  # 2D: histograms of model samples next to the data
        common.save_heatmap(run.path("samples.png"), common.histogram_2d(sample(model, 100_000, mean=False)))
        common.save_heatmap(run.path("data.png"), common.histogram_2d(data.test_x))
        return
    common.save_grid(run.path("samples.png"), sample(model, 64), nrow=8)
    x = data.test_x[:32]
    mu, _ = model.encode(x)
    recon = decoder_mean(model.likelihood, model.decode(mu)).reshape(x.shape)
    pairs = rearrange(torch.stack([x.view(4, 8, *x.shape[1:]), recon.view(4, 8, *x.shape[1:])], 1),
                      "r two n c h w -> (r two n) c h w")
    common.save_grid(run.path("recon.png"), pairs, nrow=8)
    # latent interpolation between the posterior means of 8 pairs of test images, 10 steps each
    mu_a, _ = model.encode(data.test_x[32:40])
    mu_b, _ = model.encode(data.test_x[40:48])
    t = torch.linspace(0, 1, 10, device=mu_a.device)[None, :, None]
    z = mu_a[:, None] + t * (mu_b - mu_a)[:, None]  # (8, 10, d)
    frames = decoder_mean(model.likelihood, model.decode(z)).reshape(80, *x.shape[1:])
    common.save_grid(run.path("interp.png"), frames, nrow=10)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def aggressive_encoder_steps(ddp: nn.Module, model: VAE, optimizer, batches: common.Batches, args: Args,
                             kl_weight: float, dist: common.Dist, max_steps: int = 100,
                             check_every: int = 10):
    """He et al. 2019, Algorithm 1, lines 4-7: update only the encoder on fresh batches until its loss stops
    improving (compared over blocks of `check_every` steps, as in the authors' code), at most `max_steps`."""
    previous, block = math.inf, 0.0
    for i in range(max_steps):
        loss, _ = ddp(batches.random(), kl_weight, args.free_bits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.decoder.parameters():  # Adam skips parameters without a gradient
            p.grad = None
        optimizer.step()
        block = block + loss.detach()
        if (i + 1) % check_every == 0:
            current = common.all_reduce_mean(block, dist).item()  # one sync per block; ranks decide alike
            if current >= previous:
                break
            previous, block = current, 0.0


def evaluate_and_draw(run: common.Run, model: VAE, data: common.Data, args: Args, step: int, k: int) -> dict:
    """Evaluate on the test set (rank 0), log one line, draw the pictures."""
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    with common.eval_mode(model, seed=args.seed):
        metrics = report(evaluate(model, x, k), data)
        draw_pictures(model, data, run)
    note = f"iwae k={k}" if k else "elbo"
    if model.prior != "normal":
        note += f", {args.prior} prior: KL by Monte Carlo"
    if args.objective == "wae":
        note += ", a WAE-MMD model"
    run.log("test", step, metrics, note=note)
    return metrics


def check_options(args: Args) -> None:
    """Combinations that have no meaning, refused before any data is read."""
    if args.prior != "normal" and (args.free_bits or args.min_rate):
        raise common.RunError(f"--free-bits and --min-rate bound the KL to N(0, I) per dimension; with "
                              f"--prior {args.prior} the KL has no per-dimension closed form")
    if args.objective == "wae":
        clash = [flag for flag, on in (("--prior", args.prior != "normal"), ("--kl-warmup", args.kl_warmup),
                                       ("--free-bits", args.free_bits), ("--min-rate", args.min_rate),
                                       ("--aggressive", args.aggressive)) if on]
        if clash:
            raise common.RunError(f"--objective wae matches q(z) to N(0, I) by MMD; it takes no "
                                  f"{', '.join(clash)}")


# data kind -> p(x|z)
LIKELIHOOD_OF = {"binary": "bernoulli", "8bit": "discretized_logistic", "toy": "gaussian"}


def train(args: Args) -> dict:
    check_options(args)
    dist, device = common.setup(args)
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = VAE(data.shape, LIKELIHOOD_OF[data.kind], args.arch, args.hidden, args.latent, args.min_rate,
                args.prior, args.components).to(device)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "vae", dist, model, optimizer)
    run.state.update(aggressive=args.aggressive, best_mi=-math.inf)
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist,
                             binarize=data.dynamic_binarization)
    total = args.steps or args.epochs * batches.steps_per_epoch
    eval_every = args.eval_every or batches.steps_per_epoch
    wae_lambda = args.wae_lambda if args.objective == "wae" else None
    run.print(f"vae: {sum(p.numel() for p in model.parameters()):,} parameters, {data.name} {data.shape}, "
              f"{args.objective}, {args.prior} prior, "
              f"{total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        kl_weight = min(1.0, (step + 1) / args.kl_warmup) if args.kl_warmup else 1.0  # KL warm-up
        if run.state["aggressive"]:
            aggressive_encoder_steps(ddp, model, optimizer, batches, args, kl_weight, dist)
        with common.autocast(device, args.amp):
            loss, metrics = ddp(x, kl_weight, args.free_bits, wae_lambda)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.state["aggressive"]:  # He et al. 2019, Algorithm 1, line 8: then one decoder step
            for p in model.encoder.parameters():
                p.grad = None
        optimizer.step()
        run.log_train(step, metrics)
        if (step + 1) % eval_every == 0 and step + 1 < total:
            if dist.is_main:
                mi = evaluate_and_draw(run, model, data, args, step + 1, k=0)["mi"]
                # He et al.: stop once I_q plateaus
                if run.state["aggressive"] and mi <= run.state["best_mi"]:
                    run.state["aggressive"] = False
                    run.print(f"aggressive training ends at step {step + 1} (mutual information {mi:.3f})")
                run.state["best_mi"] = max(run.state["best_mi"], mi)
            run.state["aggressive"] = common.broadcast_flag(run.state["aggressive"], dist)

    if dist.enabled:
        run.print(
            f"ddp: largest parameter difference between ranks {common.replicas_max_diff(model, dist):.3g}")
    if not dist.is_main:
        return {}
    return evaluate_and_draw(run, model, data, args, total, k=args.eval_k)


if __name__ == "__main__":
    common.cli(train, Args, presets={"quick": QUICK})
