"""Semi-amortized VAE: Kim, Wiseman, Miller, Sontag & Rush 2018, "Semi-Amortized Variational Autoencoders",
arXiv:1802.02550.

The encoder proposes variational parameters lambda_0 = (mu, logvar); K steps of stochastic variational
inference (gradient ascent on the ELBO with respect to lambda, with momentum and clipping) refine them per
example; the decoder trains on the refined lambda_K and the encoder trains end to end through the unrolled
refinement, whose derivative holds Hessian-vector products of the ELBO (autograd's double backward computes
them exactly).

    python savae.py --quick                                  # a few seconds on a CPU
    python savae.py --eval-k 100 --eval-n 1000               # CPU recipe: 12 minutes, one thread
    python savae.py --mode savae                             # encoder + 20 refinement steps
                                                             # (the paper's method)
    python savae.py --mode vae                               # amortized inference only
    python savae.py --mode svi                               # per-example optimization from N(0, I) only
    python savae.py --decoder mlp                            # a factorized decoder, not the
                                                             # autoregressive one

The three modes are the VAE, SVI and SA-VAE rows of Kim et al. 2018's results tables. Every evaluation refines
the posterior with the same K steps (from the encoder's proposal, or from N(0, I) for svi) and reports the
ELBO and the importance-sampled NLL under the refined q, the ELBO of the unrefined proposal, their difference
(the part of the amortization gap that K steps of SVI close), the KL and the active units: with a strong
decoder a VAE's KL collapses towards 0.

Deviations from the paper:
- Data: binarized MNIST (dynamically binarized), not the paper's OMNIGLOT images and Yahoo / synthetic text.
- Networks: an MLP encoder (784-500-2x32) and, as the strong decoder, a one-hidden-layer MADE (Germain et al.
  2015) conditioned on z, p(x|z) = prod_i Bern(x_i | x_<i, z), which is cheap on a CPU; the paper used a
  ResNet encoder and a 12-layer gated PixelCNN decoder for images. --decoder mlp gives a factorized decoder.
- The backward pass through the refinement uses exact Hessian-vector products (double backward); the paper
  approximated them by finite differences to save memory.
- The decoder's gradient is grad_theta ELBO(lambda_K, theta) with lambda_K held fixed: no second-order term
  through the refinement reaches theta (the decoder is frozen while the SVI steps run).
- Adam, lr 1e-3, batch 50, 5 epochs by default: a CPU budget, far short of the paper's training.
- SVI: 20 steps, momentum 0.5 and each example's gradient norm clipped at 5, as in the paper's text settings,
  but step size 0.03 instead of 1: on binarized MNIST (784 Bernoulli pixels, 32 latents) a step of 1 makes
  refinement lower a trained VAE's test ELBO by about 40 nats; 0.03 was the best of 0.01, 0.03, 0.1, 0.3, 1
  (gain 2.4 nats in 10 steps, 3.7 in 50, on 200 test images of a 600-step VAE).

Expected result, after 600 steps of 50 (half an epoch) with --hidden 256 on 2 CPU cores: test NLL (k = 100,
first 1000 test images) 116.3 nats for SA-VAE, 123.5 for the VAE and 139.0 for SVI, with KL 32.9, 24.6 and 6.6
nats; 20 SVI steps raise the VAE's test ELBO by 3.3 nats (the part of its amortization gap they close). The
VAE's KL had not collapsed this early; README.md has the commands and wall times. The CPU recipe (5 epochs,
12 minutes on one thread; row savae-bmnist): test NLL 93.33 nats, refined ELBO 97.47 against 112.65 for the
unrefined proposal, KL 31.8, all 32 latents active; its prior samples are digit shapes with a speckle of
single pixels, each pixel a Bernoulli draw of the MADE decoder.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import common


@dataclass
class Args:
    dataset: str = "binarized_mnist"  # a binary image dataset: binarized_mnist or static_binarized_mnist
    mode: Literal["savae", "vae", "svi"] = "savae"  # savae: encoder + K SVI steps; vae: encoder;
                                                    # svi: SVI only
    decoder: Literal["made", "mlp"] = "made"  # made: autoregressive p(x_i | x_<i, z); mlp: factorized p(x|z)
    hidden: int = 500  # hidden units of the encoder and the decoder; >= 1
    latent: int = 32  # latent dimensions (paper, images: 32); >= 1
    svi_steps: int = 20  # K, refinement steps in training and evaluation (paper: 20); >= 0
    svi_lr: float = 0.03  # SVI step size (paper, text: 1, which diverges here; see the docstring); > 0
    momentum: float = 0.5  # SVI momentum (paper: 0.5); in [0, 1)
    max_grad_norm: float = 5.0  # clip each example's SVI gradient to this norm (paper: 5); > 0
    epochs: int = 5  # passes over the training set; >= 1
    steps: int = 0  # stop after this many optimizer steps instead (0: epochs x steps per epoch); >= 0
    batch_size: int = 50  # minibatch per process; >= 1
    lr: float = 1e-3  # Adam learning rate; > 0
    eval_k: int = 500  # importance samples for the final test log-likelihood; >= 1
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test evaluations (0: once per epoch); >= 0
    log_every: int = 100  # steps between log lines; >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/savae-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a few seconds on a CPU: 100 steps, 128 hidden units, K = 5, 200 test images, k = 50


QUICK = dict(steps=100, hidden=128, svi_steps=5, eval_n=200, eval_k=50, eval_every=0, log_every=25,
             ckpt_every=100)
ROWS_PER_CHUNK = 4096  # decoder rows (samples x images) per chunk of the importance-sampled evaluation
ELBO_SAMPLES = 10  # samples per test example for the ELBO estimates


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


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # log Bern(x; sigmoid(l)) = x l - log(1 + e^l), summed over the last dimension (the D pixels)
    return (x * logits - F.softplus(logits)).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
def mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class MLPDecoder(nn.Module):
    """p(x|z) = prod_i Bern(x_i; sigmoid(l_i(z))): pixels independent given z."""

    def __init__(self, num_dims: int, latent: int, hidden: int):
        super().__init__()
        self.net = mlp([latent, hidden, num_dims])

    def context(self, x: torch.Tensor) -> None:
        return None  # nothing to precompute from x

    def logits(self, x: torch.Tensor, z: torch.Tensor, context=None) -> torch.Tensor:
        return self.net(z)  # (..., B, D)

    def forward(self, x: torch.Tensor, z: torch.Tensor, context=None) -> torch.Tensor:
        return bernoulli_log_prob(x, self.logits(x, z, context))  # (..., B)


class MADEDecoder(nn.Module):
    """p(x|z) = prod_i Bern(x_i; sigmoid(l_i(x_<i, z))): MADE (Germain et al. 2015) with one hidden layer, its
    masks in raster order, and z fed to every hidden and output unit. Strong enough to model the pixels
    without z, which is what makes a VAE with this decoder collapse."""

    def __init__(self, num_dims: int, latent: int, hidden: int):
        super().__init__()
        self.x_in, self.out = nn.Linear(num_dims, hidden), nn.Linear(hidden, num_dims)
        self.z_in, self.z_out = nn.Linear(latent, hidden, bias=False), nn.Linear(latent, num_dims, bias=False)
        # Germain et al. 2015, Sec. 4: hidden unit h has degree m(h) in 1..D-1; input d (1-based) feeds h if
        # m(h) >= d, and h feeds output d if d > m(h): output d sees only x_<d
        degree = torch.arange(hidden) % max(num_dims - 1, 1) + 1  # (H,)
        position = torch.arange(1, num_dims + 1)  # (D,)
        self.register_buffer("mask_in", (degree[:, None] >= position[None]).float())  # (H, D)
        self.register_buffer("mask_out", (position[:, None] > degree[None]).float())  # (D, H)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the hidden pre-activation that depends on x alone: (B, H), reused across
        samples of z."""
        return F.linear(x, self.x_in.weight * self.mask_in, self.x_in.bias)

    def logits(self, x: torch.Tensor, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        a = torch.relu((self.context(x) if context is None else context) + self.z_in(z))  # (..., B, H)
        return F.linear(a, self.out.weight * self.mask_out, self.out.bias) + self.z_out(z)  # (..., B, D)

    def forward(self, x: torch.Tensor, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return bernoulli_log_prob(x, self.logits(x, z, context))  # (..., B)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Hold a module's parameters fixed: graphs built inside carry no gradient to them."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------------------
# Stochastic variational inference: K steps of gradient ascent on the ELBO in lambda = (mu, logvar)
# ----------------------------------------------------------------------------------------------------------
def refine(elbo_fn, mu: torch.Tensor, logvar: torch.Tensor, steps: int, lr: float,
           momentum: float, max_norm: float,
           create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Kim et al. 2018, Algorithm 1, forward loop: v_{k+1} = gamma v_k + clip(grad_lambda ELBO(lambda_k)),
    lambda_{k+1} = lambda_k + alpha v_{k+1}, one reparameterized sample per step.

    `elbo_fn(mu, logvar)` returns the per-example ELBO estimate (B,). With create_graph the steps stay in the
    graph, so backpropagating from lambda_K to lambda_0 applies the Hessian-vector products of the paper's
    backward loop; without it lambda_0 is a constant start. Returns lambda_K and the ELBO before each step.
    """
    if steps == 0:
        return mu, logvar, []
    if not create_graph:  # a fixed start: gradients are taken with respect to these tensors only
        mu, logvar = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
    v_mu, v_logvar = torch.zeros_like(mu), torch.zeros_like(logvar)
    elbos = []
    for _ in range(steps):
        elbo = elbo_fn(mu, logvar)  # (B,)
        g_mu, g_logvar = torch.autograd.grad(elbo.sum(), (mu, logvar), create_graph=create_graph)
        # clip each example's gradient to norm max_norm (the sum over examples separates per example)
        norm = torch.sqrt(g_mu.pow(2).sum(1, keepdim=True) + g_logvar.pow(2).sum(1, keepdim=True) + 1e-12)
        scale = max_norm / norm.clamp(min=max_norm)  # (B, 1), 1 when the norm is below max_norm
        v_mu, v_logvar = momentum * v_mu + scale * g_mu, momentum * v_logvar + scale * g_logvar
        mu, logvar = mu + lr * v_mu, logvar + lr * v_logvar
        elbos.append(elbo.detach())
    return mu, logvar, elbos


# ----------------------------------------------------------------------------------------------------------
# The model and its objective
# ----------------------------------------------------------------------------------------------------------
class SAVAE(nn.Module):
    """Encoder q(z|x) (the amortized proposal), decoder p(x|z), prior N(0, I). `forward` returns the loss."""

    def __init__(self, shape: tuple[int, ...], decoder: str = "made", hidden: int = 500, latent: int = 32):
        super().__init__()
        self.shape, self.latent = tuple(shape), latent
        num_dims = math.prod(shape)
        self.encoder = mlp([num_dims, hidden, 2 * latent])
        self.decoder = (MADEDecoder if decoder == "made" else MLPDecoder)(num_dims, latent, hidden)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> lambda_0 = (mu, logvar), each (B, latent)."""
        return self.encoder(x).chunk(2, dim=-1)

    def start(self, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """lambda_0: the encoder's proposal, or for svi the fixed start N(0, I) (mu = 0, logvar = 0)."""
        if mode == "svi":
            zeros = x.new_zeros(len(x), self.latent)
            return zeros, zeros
        return self.encode(x)

    def elbo(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, context=None) -> torch.Tensor:
        # Kingma & Welling 2013, Eq. 10: ELBO = log p(x|z) - KL(q(z|x) || p(z)), one z ~ q(z|x); (B,)
        z = reparameterize(mu, logvar)
        return self.decoder(x, z, context) - gaussian_kl(mu, logvar).sum(1)

    def refined(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, steps: int, lr: float,
                momentum: float, max_norm: float, create_graph: bool = False):
        """lambda_K from lambda_0 = (mu, logvar), with the decoder frozen during the steps."""
        with frozen(self.decoder):
            context = self.decoder.context(x)  # the x-only part of the decoder, computed once for all K steps

            def elbo_fn(mu, logvar):
                return self.elbo(x, mu, logvar, context)

            return refine(elbo_fn, mu, logvar, steps, lr, momentum, max_norm, create_graph)

    def forward(self, x: torch.Tensor, mode: str = "savae", svi_steps: int = 20, svi_lr: float = 0.03,
                momentum: float = 0.5, max_norm: float = 5.0):
        x = x.flatten(1)  # (B, D)
        # 1. lambda_0 from the encoder (vae, savae) or the fixed start (svi)
        mu, logvar = self.start(x, mode)
        # 2. Kim et al. 2018, Algorithm 1: lambda_K by K SVI steps; savae keeps them differentiable in
        # lambda_0
        steps = 0 if mode == "vae" else svi_steps
        mu, logvar, elbos = self.refined(x, mu, logvar, steps, svi_lr, momentum, max_norm,
                                         create_graph=mode == "savae")
        if mode == "svi":
            mu, logvar = mu.detach(), logvar.detach()
        # 3. the loss -ELBO(lambda_K, theta): theta gets grad_theta ELBO at lambda_K; the encoder (savae) gets
        #    d ELBO / d lambda_K (d lambda_K / d lambda_0)(d lambda_0 / d phi), through the unrolled steps
        z = reparameterize(mu, logvar)
        rec = self.decoder(x, z)  # (B,) log p(x|z)
        kl = gaussian_kl(mu, logvar).sum(1)
        elbo = rec - kl
        loss = -elbo.mean()
        metrics = {"loss": loss, "nelbo": -elbo.mean(), "rec": -rec.mean(), "kl": kl.mean()}
        if elbos:
            metrics["nelbo_start"] = -elbos[0].mean()  # -ELBO at lambda_0, the same single-sample estimate
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation
# ----------------------------------------------------------------------------------------------------------
def log_weights(model: SAVAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, samples: int,
                context=None) -> torch.Tensor:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for z_i ~ q = N(mu, exp(logvar)): (samples, B)."""
    z = reparameterize(mu, logvar, samples=samples)  # (S, B, d)
    return model.decoder(x, z, context) + log_normal_logvar(z) - log_normal_logvar(z, mu, logvar)


def importance_weighted_log_px(model: SAVAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, k: int,
                               chunk: int | None = None) -> torch.Tensor:
    """log p(x) ~ log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x): (B,), vectorized over samples.

    Burda et al. 2016, Eq. 8, with q the refined posterior; samples are drawn `chunk` at a time.
    """
    chunk, context = chunk or k, model.decoder.context(x)
    log_w = torch.cat(
        [log_weights(model, x, mu, logvar, min(chunk, k - s), context) for s in range(0, k, chunk)])
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    # Burda et al. 2016, Sec. 5.2: unit u is active if A_u = Cov_x(E_q(u|x)[u]) > 0.01
    return int((mu.var(dim=0) > threshold).sum())


@torch.no_grad()
def evaluate(model: SAVAE, x: torch.Tensor, args: Args, k: int = 0,
             batch_size: int = 500) -> dict[str, float]:
    """Refine q with K SVI steps, then the ELBO, KL and active units under it, the ELBO of the unrefined
    start, and with k > 0 the importance-sampled log p(x) with the refined q as proposal."""
    sums = {"elbo": 0.0, "elbo_start": 0.0, "kl": 0.0, "log_px": 0.0}
    mus = []
    what = f"test: K = {args.svi_steps} SVI steps" + (f", k = {k}" if k else "") + f", {len(x):,} images"
    for xb in common.progress(x.flatten(1).split(batch_size), what, len(x)):
        mu0, logvar0 = model.start(xb, args.mode)
        with torch.enable_grad():
            mu, logvar, _ = model.refined(xb, mu0, logvar0, args.svi_steps, args.svi_lr, args.momentum,
                                          args.max_grad_norm)
        mu, logvar = mu.detach(), logvar.detach()
        mus.append(mu)
        context = model.decoder.context(xb)
        for key, (m, v) in (("elbo", (mu, logvar)), ("elbo_start", (mu0, logvar0))):
            log_p = model.decoder(xb, reparameterize(m, v, samples=ELBO_SAMPLES), context).mean(0)
            sums[key] += (log_p - gaussian_kl(m, v).sum(1)).sum().item()
        sums["kl"] += gaussian_kl(mu, logvar).sum().item()
        if k:
            images = max(1, ROWS_PER_CHUNK // k)  # images per chunk of decoder rows
            for sl in (slice(i, i + images) for i in range(0, len(xb), images)):
                sums["log_px"] += importance_weighted_log_px(model, xb[sl], mu[sl], logvar[sl], k,
                                                             chunk=min(k, ROWS_PER_CHUNK)).sum().item()
    n = len(x)
    metrics = {key: value / n for key, value in sums.items() if key != "log_px"}
    metrics["active_units"] = active_units(torch.cat(mus))
    if k:
        metrics["log_px"] = sums["log_px"] / n
    return metrics


def report(metrics: dict[str, float], args: Args) -> dict[str, float]:
    """Nats per image: the NLL and -ELBO under the refined q, -ELBO of the start, and what
    refinement gained."""
    out = {"nll_nats": -metrics["log_px"]} if "log_px" in metrics else {}
    out.update(nelbo_nats=-metrics["elbo"], nelbo_start_nats=-metrics["elbo_start"],
               refine_gain=metrics["elbo"] - metrics["elbo_start"], kl=metrics["kl"],
               active_units=metrics["active_units"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling and pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: SAVAE, n: int, z: torch.Tensor | None = None) -> torch.Tensor:
    """z ~ N(0, I) (or given), then x ~ p(x|z): pixel by pixel in raster order for the autoregressive decoder,
    all at once for the factorized one. Returns binary images (n, *shape)."""
    device = next(model.parameters()).device
    z = torch.randn(n, model.latent, device=device) if z is None else z
    num_dims = math.prod(model.shape)
    x = torch.zeros(n, num_dims, device=device)
    if isinstance(model.decoder, MLPDecoder):
        return torch.bernoulli(torch.sigmoid(model.decoder.logits(x, z))).reshape(n, *model.shape)
    for i in range(num_dims):  # x_i ~ p(x_i | x_<i, z): logit i depends only on x_<i, filled in already
        x[:, i] = torch.bernoulli(torch.sigmoid(model.decoder.logits(x, z)[:, i]))
    return x.reshape(n, *model.shape)


@torch.no_grad()
def draw_pictures(model: SAVAE, data: common.Data, run: common.Run, args: Args) -> None:
    """samples.png (prior samples) and recon.png (inputs above draws from p(x | z = refined mu))."""
    common.save_grid(run.path("samples.png"), sample(model, 64), nrow=8)
    x = data.test_x[:32]
    mu, logvar = model.start(x.flatten(1), args.mode)
    with torch.enable_grad():
        mu, _, _ = model.refined(x.flatten(1), mu, logvar, args.svi_steps, args.svi_lr, args.momentum,
                                 args.max_grad_norm)
    recon = sample(model, 32, z=mu.detach()).reshape(x.shape)
    pairs = rearrange(torch.stack([x.view(4, 8, *x.shape[1:]), recon.view(4, 8, *x.shape[1:])], 1),
                      "r two n c h w -> (r two n) c h w")
    common.save_grid(run.path("recon.png"), pairs, nrow=8)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def evaluate_and_draw(run: common.Run, model: SAVAE, data: common.Data, args: Args,
                      step: int, k: int) -> dict:
    """Evaluate on the test set (rank 0), log one line, draw the pictures."""
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    with common.eval_mode(model, seed=args.seed):
        metrics = report(evaluate(model, x, args, k), args)
        draw_pictures(model, data, run, args)
    run.log("test", step, metrics,
            note=f"{args.mode}, K={args.svi_steps}, " + (f"iwae k={k}" if k else "elbo"))
    return metrics


def train(args: Args) -> dict:
    dist, device = common.setup(args)
    kind = common.dataset_kind(args.dataset)  # refused before any data is read or downloaded
    if kind != "binary":
        raise common.RunError(f"savae.py models binary images (Bernoulli pixels); {args.dataset} is {kind}")
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = SAVAE(data.shape, args.decoder, args.hidden, args.latent).to(device)
    if args.mode == "svi":  # no encoder in svi: frozen, so DDP and Adam leave its parameters alone
        model.encoder.requires_grad_(False)
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "savae", dist, model, optimizer)
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist,
                             binarize=data.dynamic_binarization)
    total = args.steps or args.epochs * batches.steps_per_epoch
    eval_every = args.eval_every or batches.steps_per_epoch
    run.print(f"savae: {sum(p.numel() for p in model.parameters()):,} parameters, {data.name} {data.shape}, "
              f"mode {args.mode}, {args.decoder} decoder, K={args.svi_steps}, "
              f"{total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        with common.autocast(device, args.amp):
            loss, metrics = ddp(x, args.mode, args.svi_steps, args.svi_lr, args.momentum, args.max_grad_norm)
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
    common.cli(train, Args, presets={"quick": QUICK})
