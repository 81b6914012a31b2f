"""Importance weighted autoencoder: Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders",
arXiv:1509.00519.

The same model as a VAE, trained on a tighter bound: with k samples h_i ~ q(h|x) and weights
w_i = p(x, h_i) / q(h_i|x), L_k = E[log (1/k) sum_i w_i] <= log p(x), L_1 is the ELBO and L_k rises to
log p(x) as k grows. Both objectives of the paper's Table 1 (the VAE with k samples and the IWAE bound),
its one- and two-stochastic-layer networks, and its evaluation: test log-likelihood with k = 5000 and active
units.

    python iwae.py --quick                                         # a few seconds on a CPU
    python iwae.py --k 5                                           # IWAE, k = 5, one stochastic layer
    python iwae.py --objective vae --k 5                           # the VAE row of Table 1 at k = 5
    python iwae.py --k 5 --schedule cosine --epochs 80 --eval-k 1000 --eval-n 2000 --eval-every 40000 \
        --eval-every-k 1000                                        # CPU recipe: 25 minutes
    python iwae.py --layers 2 --k 50 --schedule paper              # the paper's full run (3280 epochs)
    python iwae.py --k 50 --dreg                                   # doubly-reparameterized encoder gradient

Why DReG (Tucker, Lawson, Gu & Maddison 2019, arXiv:1810.04152): the signal-to-noise ratio of the IWAE
encoder gradient falls like 1/sqrt(k) (Rainforth et al. 2018), because its score-function part
sum_i w~_i d/dphi log q(h_i|x) has expectation zero but non-vanishing variance. DReG rewrites that part by a
second reparameterization, giving sum_i w~_i^2 (d log w_i / d h_i)(d h_i / d phi) with the score term gone:
the same expectation, and a gradient signal that grows with k. The decoder gradient is unchanged.

Deviations from the paper:
- The default schedule is short (--epochs 10 at lr 1e-3) for a CPU; --schedule paper runs the paper's 3280
  epochs (3^i passes at lr 1e-3 * 10^(-i/7), i = 0..7). Adam, beta = (0.9, 0.999), eps = 1e-4, batch 20.
  --schedule cosine (ours, for short budgets) decays --lr to 0 over --epochs, which the paper's schedule
  cannot: compressed, its stages at lr 1e-3 would last a fraction of an epoch.
- Binarized MNIST is dynamically binarized (as the paper did), with the repository's fixed test binarization.
- Initialization is PyTorch's default, not the paper's heuristic of Glorot & Bengio 2010.
- DReG (--dreg) is from Tucker et al. 2019, not from this paper.

Expected result: after 3280 epochs the paper's Table 1 reports a test NLL of 86.76 nats for one layer at
k = 1 and 84.78 for the one-layer IWAE at k = 50 (82.90 with two layers). The CPU recipe above (80 epochs,
cosine decay) gave 88.86 nats here, and the k = 5 VAE 89.92 with the same flags (README.md's rows iwae-bmnist
and iwae-vae-k5-bmnist, `python -m results.table run iwae-bmnist`); its IWAE section has the comparisons at
equal time and equal epochs with their commands.
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
    layers: Literal[1, 2] = 1  # stochastic layers: 1: 784-200-200-50; 2: adds 100-100-50 above a
                               # 100-unit layer
    objective: Literal["iwae", "vae"] = "iwae"  # iwae: log (1/k) sum_i w_i; vae: (1/k) sum_i log w_i
    k: int = 5  # samples per example in the training objective (paper: 1, 5 or 50); >= 1
    dreg: bool = False  # doubly-reparameterized encoder gradient (Tucker et al. 2019); with --objective iwae
    schedule: Literal["constant", "cosine", "paper"] = "constant"  # cosine: --lr decayed to 0 over the run
                                            # (ours); paper: 3^i epochs at lr 1e-3 * 10^(-i/7), 3280 in all
    epochs: int = 10  # passes over the training set with --schedule constant or cosine (paper: 3280); >= 1
    steps: int = 0  # stop after this many optimizer steps instead (0: from the epochs); >= 0
    batch_size: int = 20  # minibatch per process (paper: 20); >= 1
    lr: float = 1e-3  # Adam learning rate (cosine: the first; paper: 1e-3 at first, this flag unused); > 0
    eval_k: int = 5000  # importance samples for the final test log-likelihood (paper: 5000); >= 1
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test evaluations (0: once per epoch); >= 0
    eval_every_k: int = 0  # importance samples of the test log-likelihood at those evaluations (0: the ELBO
                           # only); >= 0
    log_every: int = 500  # steps between log lines; >= 1
    ckpt_every: int = 5000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/iwae-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a few seconds on a CPU: 300 steps of 100, 1000 test images, k = 100


QUICK = dict(steps=300, batch_size=100, eval_n=1000, eval_k=100, eval_every=0, log_every=50, ckpt_every=300)
ROWS_PER_CHUNK = 4096  # decoder rows (samples x images) per chunk of the importance-sampled evaluation
# Burda et al. 2016, Sec. 5: (deterministic units, stochastic units) of each stochastic layer, bottom up
ARCHITECTURES = {1: [(200, 50)], 2: [(200, 100), (100, 50)]}
PAPER_EPOCHS = sum(3**i for i in range(8))  # 3280


def learning_rate(args: "Args", step: int, total: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step `step` (counted from 0) of a run of `total` steps."""
    if args.schedule == "paper":
        return paper_lr(step // steps_per_epoch)
    if args.schedule == "cosine":
        # Loshchilov & Hutter 2017, "SGDR", Eq. 5, one cycle without restarts: lr (1 + cos(pi t / T)) / 2
        return args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    return args.lr


def paper_lr(epoch: int) -> float:
    # Burda et al. 2016, Sec. 5: for i = 0..7, 3^i passes over the data at learning rate 1e-3 * 10^(-i/7)
    i = 0
    while i < 7 and epoch >= 3**i:
        epoch -= 3**i
        i += 1
    return 1e-3 * 10 ** (-i / 7)


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
# Gaussian latents: reparameterization and log densities
# ----------------------------------------------------------------------------------------------------------
def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, samples: int | None = None) -> torch.Tensor:
    # Kingma & Welling 2013, Sec. 2.4: z = mu + sigma * eps, eps ~ N(0, I); (S, B, d) when samples is given
    shape = mu.shape if samples is None else (samples, *mu.shape)
    eps = torch.randn(shape, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def log_normal_logvar(z: torch.Tensor, mu: torch.Tensor | float = 0.0, logvar: torch.Tensor | float = 0.0):
    # log N(z; mu, diag(exp(logvar))), summed over the last dimension
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
def tanh_mlp(sizes: list[int]) -> nn.Sequential:
    # Burda et al. 2016, Sec. 5: tanh hidden units
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class IWAE(nn.Module):
    """q(h_1|x) q(h_2|h_1) ... and p(h_L) ... p(h_1|h_2) p(x|h_1), each a Gaussian (Bernoulli etc. for x)
    whose parameters come from a two-hidden-layer tanh MLP. `forward` returns the training loss (for DDP)."""

    def __init__(self, shape: tuple[int, ...], likelihood: str, layers: int = 1,
                 sizes: list[tuple[int, int]] | None = None):
        super().__init__()
        self.shape, self.likelihood = tuple(shape), likelihood
        self.log_px_given_z, self.params_per_dim = LIKELIHOODS[likelihood]
        sizes = sizes or ARCHITECTURES[layers]
        num_dims = math.prod(shape)
        below = [num_dims] + [d for _, d in sizes[:-1]]  # the variable under each stochastic layer
        outs = [self.params_per_dim * num_dims] + [2 * d for d in below[1:]]  # what p(below | h_l) needs
        # q(h_l | h_{l-1})
        self.q = nn.ModuleList(tanh_mlp([n, h, h, 2 * d]) for n, (h, d) in zip(below, sizes))
        self.p = nn.ModuleList(tanh_mlp([d, h, h, o]) for (h, d), o in zip(sizes, outs))  # p(h_{l-1} | h_l)
        self.latent = sizes[-1][1]

    def decode(self, h1: torch.Tensor) -> torch.Tensor:
        """h_1 (..., d_1) -> likelihood parameters of x (..., P, D)."""
        return rearrange(self.p[0](h1), "... (p d) -> ... p d", p=self.params_per_dim)

    def log_weights(self, x: torch.Tensor, k: int, dreg: bool = False) -> tuple[torch.Tensor, list]:
        """log w_i = log p(x, h_i) - log q(h_i|x) for k samples h_i ~ q(h|x): (k, B), and the samples h_l.

        With dreg, log q is evaluated with the encoder's parameters held fixed (stop-gradient on phi, not on
        h), so gradients reach phi only through the samples (the path term of Tucker et al. 2019).
        """
        x = x.flatten(1)  # (B, D)
        # 1. sample h_l ~ q(h_l | h_{l-1}) bottom up, k per example: (k, B, d_l)
        hs, q_params, below = [], [], x
        for l, net in enumerate(self.q):
            mu, logvar = net(below).chunk(2, dim=-1)
            h = reparameterize(mu, logvar, samples=k if l == 0 else None)
            hs.append(h), q_params.append((mu, logvar))
            below = h
        if dreg:  # 2. re-score the same samples under q with phi stopped (copies, so hooks can see d/dh)
            hs = [h.view_as(h) for h in hs]
            for l, net in enumerate(self.q):
                stopped = {name: p.detach() for name, p in net.named_parameters()}
                inputs = x if l == 0 else hs[l - 1]
                q_params[l] = torch.func.functional_call(net, stopped, (inputs,)).chunk(2, dim=-1)
        # 3. log q(h|x) = sum_l log q(h_l | h_{l-1})
        log_q = sum(log_normal_logvar(h, mu, logvar) for h, (mu, logvar) in zip(hs, q_params))
        # 4. log p(x, h) = log p(h_L) + sum_{l>1} log p(h_{l-1} | h_l) + log p(x | h_1)
        log_p = log_normal_logvar(hs[-1]) + self.log_px_given_z(x, self.decode(hs[0]))
        for l in range(1, len(hs)):
            mu, logvar = self.p[l](hs[l]).chunk(2, dim=-1)
            log_p = log_p + log_normal_logvar(hs[l - 1], mu, logvar)
        return log_p - log_q, hs

    def forward(self, x: torch.Tensor, k: int = 5, objective: str = "iwae", dreg: bool = False):
        log_w, hs = self.log_weights(x, k, dreg and objective == "iwae")  # (k, B)
        # Burda et al. 2016, Eq. 8: L_k = log (1/k) sum_i w_i, by logsumexp
        bound = torch.logsumexp(log_w, dim=0) - math.log(k)
        # the VAE objective with k samples (Burda et al., Sec. 5): (1/k) sum_i log w_i, an ELBO estimate
        elbo = log_w.mean(0)
        if objective == "vae":
            loss = -elbo.mean()
        elif dreg:
            # Tucker et al. 2019: grad_phi = sum_i w~_i^2 (d log w_i / d h_i)(d h_i / d phi),
            # w~ = softmax(log w). The surrogate -sum_i w~_i log w_i gives the decoder its IWAE gradient
            # sum_i w~_i grad_theta log w_i; a hook multiplies d/dh_i by w~_i once more, so the encoder
            # (reached only through h) gets w~_i^2.
            w_tilde = torch.softmax(log_w.detach(), dim=0)  # (k, B)
            for h in hs:
                h.register_hook(lambda g: g * w_tilde[..., None])
            loss = -(w_tilde * log_w).sum(0).mean()
        else:
            loss = -bound.mean()  # its autograd gradient is sum_i w~_i grad log w_i (Burda et al., Sec. 3)
        trained = bound if objective == "iwae" else elbo
        return loss, {"loss": -trained.mean(), "nelbo": -elbo.mean(), "niwae": -bound.mean()}


# ----------------------------------------------------------------------------------------------------------
# Likelihood evaluation
# ----------------------------------------------------------------------------------------------------------
def importance_weighted_log_px(log_weights: Callable[[int], torch.Tensor], k: int,
                               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) ~ log (1/k) sum_i w_i (Burda et al. 2016, Eq. 8, here the estimator of Sec. 5 with k = 5000),
    and the ELBO estimate (1/k) sum_i log w_i: each (B,). `log_weights(s)` draws s samples; `chunk`
    at a time."""
    chunk = chunk or k
    log_w = torch.cat([log_weights(min(chunk, k - start)) for start in range(0, k, chunk)])  # (k, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k), log_w.mean(0)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    # Burda et al. 2016, Sec. 5.2: unit u is active if A_u = Cov_x(E_q(u|x)[u]) > 0.01
    return int((mu.var(dim=0) > threshold).sum())


def posterior_means(model: IWAE, x: torch.Tensor, samples: int = 100) -> list[torch.Tensor]:
    """E_q(h_l|x)[h_l] for every stochastic layer: exact for h_1, Monte Carlo over h_1, ... above it."""
    mu, logvar = model.q[0](x.flatten(1)).chunk(2, dim=-1)
    means, h = [mu], reparameterize(mu, logvar, samples=samples)  # (S, B, d_1)
    for net in model.q[1:]:
        mu, logvar = net(h).chunk(2, dim=-1)
        means.append(mu.mean(0))
        h = reparameterize(mu, logvar)
    return means


@torch.no_grad()
def evaluate(model: IWAE, x: torch.Tensor, k: int = 0, batch_size: int = 500) -> dict[str, float]:
    """Test ELBO and active units per layer; with k > 0 also the importance-sampled log p(x)."""
    sums = {"elbo": 0.0, "log_px": 0.0}
    means = []
    for xb in common.progress(x.split(batch_size), f"test bound, {len(x):,} images x k = {k or 10}", len(x)):
        means.append(posterior_means(model, xb))
        # the ELBO as the mean of log w over the same samples (10 when only the ELBO is asked)
        elbo_k = k or 10
        images = max(1, ROWS_PER_CHUNK // elbo_k)  # images per chunk of decoder rows
        for xs in xb.split(images):
            log_px, elbo = importance_weighted_log_px(lambda s, xs=xs: model.log_weights(xs, s)[0], elbo_k,
                                                      chunk=min(elbo_k, ROWS_PER_CHUNK))
            sums["log_px"] += log_px.sum().item()
            sums["elbo"] += elbo.sum().item()
    n = len(x)
    metrics = {"elbo": sums["elbo"] / n}
    if k:
        metrics["log_px"] = sums["log_px"] / n
    for l, layer_means in enumerate(zip(*means)):
        metrics["active_units" if l == 0 else f"active_units_h{l + 1}"] = active_units(torch.cat(layer_means))
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
    out.update({key: value for key, value in metrics.items() if key.startswith("active_units")})
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling and pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: IWAE, n: int, mean: bool = True) -> torch.Tensor:
    """h_L ~ N(0, I), h_{l-1} ~ p(h_{l-1} | h_l) top down, then E[x|h_1] (mean=True) or x ~ p(x|h_1)."""
    h = torch.randn(n, model.latent, device=next(model.parameters()).device)
    for net in reversed(model.p[1:]):
        h = reparameterize(*net(h).chunk(2, dim=-1))
    params = model.decode(h)
    if mean:
        x = decoder_mean(model.likelihood, params)
    elif model.likelihood == "bernoulli":
        x = torch.bernoulli(torch.sigmoid(params[:, 0]))
    else:  # a Gaussian draw; for 8-bit data a logistic draw rounded to the 256 levels
        loc = params[:, 0]
        if model.likelihood == "gaussian":  # params[:, 1] is the log-variance
            x = loc + torch.exp(0.5 * params[:, 1]) * torch.randn_like(loc)
        else:  # params[:, 1] is the logistic's log-scale, in the units of x
            u = torch.rand_like(loc).clamp(1e-6, 1 - 1e-6)
            x = loc + torch.exp(params[:, 1]) * (torch.log(u) - torch.log1p(-u))
            x = (x * 255).round().clamp(0, 255) / 255
    return x.reshape(n, *model.shape)


@torch.no_grad()
def draw_pictures(model: IWAE, data: common.Data, run: common.Run) -> None:
    """samples.png (prior samples), recon.png (inputs above reconstructions from the posterior means)."""
    if data.kind == "toy":  # 2D: histograms of model samples next to the data
        common.save_heatmap(run.path("samples.png"), common.histogram_2d(sample(model, 100_000, mean=False)))
        common.save_heatmap(run.path("data.png"), common.histogram_2d(data.test_x))
        return
    common.save_grid(run.path("samples.png"), sample(model, 64), nrow=8)
    x = data.test_x[:32]
    mu, _ = model.q[0](x.flatten(1)).chunk(2, dim=-1)
    recon = decoder_mean(model.likelihood, model.decode(mu)).reshape(x.shape)
    pairs = rearrange(torch.stack([x.view(4, 8, *x.shape[1:]), recon.view(4, 8, *x.shape[1:])], 1),
                      "r two n c h w -> (r two n) c h w")
    common.save_grid(run.path("recon.png"), pairs, nrow=8)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def evaluate_and_draw(run: common.Run, model: IWAE, data: common.Data, args: Args, step: int, k: int) -> dict:
    """Evaluate on the test set (rank 0), log one line, draw the pictures."""
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    with common.eval_mode(model, seed=args.seed):
        metrics = report(evaluate(model, x, k), data)
        draw_pictures(model, data, run)
    run.log("test", step, metrics, note=f"iwae k={k}" if k else "elbo")
    return metrics


# data kind -> p(x|z)
LIKELIHOOD_OF = {"binary": "bernoulli", "8bit": "discretized_logistic", "toy": "gaussian"}


def train(args: Args) -> dict:
    dist, device = common.setup(args)
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    model = IWAE(data.shape, LIKELIHOOD_OF[data.kind], args.layers).to(device)
    optimizer = common.adam(model.parameters(), lr=args.lr, eps=1e-4)  # Burda et al., Sec. 5: eps = 1e-4
    run = common.Run(args, "iwae", dist, model, optimizer)
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist,
                             binarize=data.dynamic_binarization)
    epochs = PAPER_EPOCHS if args.schedule == "paper" else args.epochs
    total = args.steps or epochs * batches.steps_per_epoch
    eval_every = args.eval_every or batches.steps_per_epoch
    run.print(
        f"iwae: {sum(p.numel() for p in model.parameters()):,} parameters, {data.name} {data.shape}, "
        f"{args.objective} k={args.k}{' dreg' if args.dreg else ''}, {args.layers} stochastic layer(s), "
        f"{total} steps of {args.batch_size} x {dist.world_size}, device {device}")

    for step in run.steps(start, total, args.batch_size * dist.world_size):
        x, _ = batches(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step, total, batches.steps_per_epoch)
        with common.autocast(device, args.amp):
            loss, metrics = ddp(x, args.k, args.objective, args.dreg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log_train(step, metrics)
        if (step + 1) % eval_every == 0 and step + 1 < total and dist.is_main:
            evaluate_and_draw(run, model, data, args, step + 1, k=args.eval_every_k)

    if dist.enabled:
        run.print(
            f"ddp: largest parameter difference between ranks {common.replicas_max_diff(model, dist):.3g}")
    if not dist.is_main:
        return {}
    return evaluate_and_draw(run, model, data, args, total, k=args.eval_k)


if __name__ == "__main__":
    common.cli(train, Args, presets={"quick": QUICK})
