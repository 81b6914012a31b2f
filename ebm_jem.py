"""Energy-based models trained with Langevin samples: Du & Mordatch 2019, "Implicit Generation and Modeling
with Energy-Based Models", arXiv:1903.08689; and JEM, Grathwohl, Wang, Jacobsen, Duvenaud, Norouzi & Swersky
2020, "Your Classifier is Secretly an Energy Based Model and You Should Treat it Like One", arXiv:1912.03263.

p(x) = exp(-E(x)) / Z. The gradient of the NLL is E_data[grad E] - E_p[grad E] (the second term is
grad log Z), estimated with samples of stochastic gradient Langevin dynamics (Welling & Teh 2011) started
from a replay buffer of earlier samples, 5% of them re-initialized with noise. JEM reads a classifier's
logits f(x) as an energy, E(x) = -logsumexp_y f(x)[y], and trains log p(y|x) + log p(x) with the same
sampler.

    python ebm_jem.py --quick                                  # JEM on MNIST, a few seconds on a CPU
    python ebm_jem.py --model jem --dataset mnist              # JEM: accuracy, ECE, OOD AUROC, samples
    python ebm_jem.py --model jem --dataset mnist --lr 3e-4 --steps 300 --compose  # 6 CPU min
    python ebm_jem.py --model jem --dataset mnist --compose --compose-classes 1 7   # sample E(x|1) + E(x|7)
    python ebm_jem.py --model ebm --dataset two_moons --arch mlp --batch-size 256 --lr 1e-3 --lr-decay \
        --energy-reg 0.01 --sgld-step 0.01 --sgld-noise 0.1 --data-noise 0 --steps 8000 --compose
    (8gaussians: the same with --sgld-step 0.05 --sgld-noise 0.2236, wider modes mix faster with longer steps)

Evaluation. 2D toys: exp(-E) is normalized on a grid over the box [-lim, lim]^2 (the model is the density
restricted to the box, where the sampler is clamped too), so the test NLL in nats and KL(data || model) =
NLL - H(data) are exact up to the midpoint rule; density.png is the normalized density. Images: Z is
intractable, so no likelihood is reported; instead test accuracy and expected calibration error (15 bins) for
JEM, and the out-of-distribution AUROC of the score log p(x) + log Z = -E(x) against uniform noise and against
Fashion-MNIST (skipped with a note when its files are absent); samples.png shows the replay buffer,
samples_fresh.png fresh chains from noise, and for JEM samples_by_class.png class-conditional chains on
E(x|y) = -f(x)[y]. With --compose, compose.png samples a sum of energies: two class energies (JEM, Du &
Mordatch Sec. 4.3's product of experts) or, in 2D, the model's energy plus the constraint w * relu(-x_2)^2.
Robustness (JEM Sec. 5.4): the classifier's test accuracy under L-inf and L2 PGD attacks (Madry et al. 2018;
--pgd-steps steps from a random start, radii --pgd-linf and --pgd-l2 in [0, 1] pixel units, first --pgd-n
test images), logged as acc_linf_<eps> and acc_l2_<eps> beside accuracy, ECE and AUROC.

Deviations from the papers:
- Networks: a 4-layer SiLU CNN (or an MLP) on 28 x 28 images instead of JEM's Wide-ResNet-28-10 and Du &
  Mordatch's ResNets on CIFAR-10; a 3-hidden-layer SiLU MLP on 2D toys. No batch norm (as in JEM).
- SGLD writes x <- x - (step/2) grad E(x) + noise * N(0, I) with step and noise as separate flags; step =
  noise^2 is Langevin dynamics proper. JEM's code adds 1 x grad log p per step, i.e. step 2 here, with noise
  0.01 (the default noise); the 2D commands use step = noise^2. With the small CNN, grad_x E is so small
  that step 2 leaves the chains at their noise start: the negatives are then trivially separable and the
  energy term swamps the classifier (chance accuracy after 150 steps), so the default step is 50.
  Samples are clamped to [-1, 1] (images, as in Du & Mordatch) or to the grid box (toys).
- Images are rescaled to [-1, 1] and JEM's N(0, 0.03^2) data noise is added during training (--data-noise).
- The re-initialized fraction of each batch is exact (round(0.05 B) chains) rather than a Bernoulli draw.
- --lr-decay (cosine to 0, not in the papers) for the 2D runs: with a constant step the relative depths of
  well-separated modes keep wandering, since chains rarely cross between modes to correct them.
- A divergence guard (not in the papers): when |E| exceeds --max-energy the run stops with the last good
  checkpoint, exit code 2.

Expected result (2 CPU cores shared with other jobs, one thread): in 8000 steps (about 3 minutes) the grid
test NLL is 2.823 nats on 8gaussians (KL to the data -0.008: the true density itself scores 2.811, KL -0.021,
on the 20,000 fixed test points, so the model is 0.012 above it) and 2.533 on two_moons (KL 0.140: the density
is heavier at the inner end of each arc than at its outer tip). At 2000 steps the KLs were about 0.07 and
0.17. JEM on MNIST, 300 steps (6 minutes): test accuracy 90.7%, ECE 0.313, AUROC against uniform noise 1.000,
digit-like class-conditional samples. README.md has the measured numbers with their commands.
"""

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

import common


@dataclass
class Args:
    model: Literal["jem", "ebm"] = "jem"  # jem: E(x) = -logsumexp f(x) of a classifier; ebm: a scalar E(x)
    dataset: str = "mnist"  # an image dataset (jem needs labels) or a 2D toy (ebm only)
    arch: Literal["conv", "mlp"] = "conv"  # images: conv or mlp; 2D toys always use the MLP
    hidden: int = 128  # MLP width (the CNN's widest layer has hidden / 2 channels); >= 2
    spectral_norm: bool = False  # spectral normalization of every layer (Du & Mordatch 2019, Sec. 3.3)
    steps: int = 2000  # optimizer steps; >= 0
    batch_size: int = 64  # data minibatch and SGLD chains per step (JEM: 64); >= 1
    lr: float = 1e-4  # Adam learning rate (JEM: 1e-4); > 0
    lr_decay: bool = False  # cosine decay of the learning rate to 0 over --steps (not in the papers)
    energy_reg: float = 0.0  # alpha of the L2 penalty alpha (E(x+)^2 + E(x-)^2) (Du & Mordatch: 1;
                             # JEM: 0); >= 0
    sgld_steps: int = 20  # SGLD steps per training step (JEM: 20); >= 1
    sgld_step: float = 50.0  # SGLD step size in x <- x - (step/2) grad E + noise eps (JEM's code: 2;
                             # see above); > 0
    sgld_noise: float = 0.01  # std of the SGLD noise (JEM: 0.01; Langevin proper: sqrt(step)); >= 0
    buffer_size: int = 10000  # replay buffer size (JEM: 10000); >= 1
    reinit: float = 0.05  # fraction of chains re-initialized from noise each step (JEM, Du & Mordatch:
                          # 0.05); in [0, 1]
    data_noise: float = 0.03  # std of Gaussian noise added to training data in [-1, 1] units
                              # (JEM: 0.03); >= 0
    grid_lim: float = 5.0  # 2D toys: the model lives on the box [-lim, lim]^2 (covers every toy set); > 0
    grid_n: int = 500  # 2D toys: grid cells per side for log Z; >= 2
    max_energy: float = 1e4  # divergence guard: stop when any |E| of data or samples exceeds this; > 0
    compose: bool = False  # also sample a sum of energies to compose.png (see the module docstring)
    compose_classes: tuple[int, ...] = (1, 7)  # JEM: the classes whose energies are added; in [0, 9]
    compose_weight: float = 10.0  # 2D: weight w of the constraint energy w * relu(-x_2)^2; >= 0
    sample_steps: int = 100  # SGLD steps of the fresh chains drawn for the pictures; >= 0
    ood: tuple[str, ...] = ("noise", "fashion_mnist")  # images: OOD sets scored against the test set
    pgd_linf: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)  # JEM: L-inf PGD radii, [0, 1] pixel units; > 0
    pgd_l2: tuple[float, ...] = (0.5, 1.0, 2.0)  # JEM: L2 PGD radii, [0, 1] pixel units; > 0
    pgd_steps: int = 20  # JEM: PGD steps per attack (0: no robustness evaluation); >= 0
    pgd_n: int = 1000  # JEM: test images attacked (0: all evaluated); >= 0
    eval_n: int = 0  # test examples to evaluate (0: all); >= 0
    eval_every: int = 0  # steps between test evaluations (0: only at the end); >= 0
    log_every: int = 100  # steps between log lines (and divergence checks); >= 1
    ckpt_every: int = 1000  # steps between checkpoints; >= 1
    seed: int = 0  # random seed; >= 0
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core or $OMP_NUM_THREADS); >= 0
    amp: bool = False  # bf16 autocast on cuda (the loss forward only; SGLD stays in float32)
    data_dir: str = ""  # dataset cache (default: $DATA_DIR or ./data)
    out: str = ""  # run folder (default: runs/ebm_jem-<dataset>)
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # start again in an --out that already holds a run
    quick: bool = False  # a few seconds on a CPU: 20 steps of 5 SGLD steps, 200 test images, small grid,
                         # OOD noise only


QUICK = dict(steps=20, batch_size=32, sgld_steps=5, buffer_size=500, eval_n=200, eval_every=0, log_every=10,
             ckpt_every=20, sample_steps=10, grid_n=100, ood=("noise",), pgd_steps=3, pgd_n=50)
# fields that only change evaluation, pictures or the divergence check: they may change on --resume
RESUMABLE = ("max_energy", "compose", "compose_classes", "compose_weight", "sample_steps", "ood", "grid_n",
             "pgd_linf", "pgd_l2", "pgd_steps", "pgd_n")
NUM_CLASSES = 10
ECE_BINS = 15  # Guo et al. 2017 and JEM use 15 equal-width confidence bins


class EnergyDiverged(common.RunError):
    """Energy magnitudes exploded; the last good checkpoint is kept (like common.NonFiniteLoss)."""


# ----------------------------------------------------------------------------------------------------------
# Networks: E(x) for an EBM, logits f(x) for JEM
# ----------------------------------------------------------------------------------------------------------
def maybe_sn(layer: nn.Module, on: bool) -> nn.Module:
    # Miyato et al. 2018: W / sigma_max(W), sigma_max by one power iteration per training forward
    return nn.utils.parametrizations.spectral_norm(layer) if on else layer


def silu_mlp(sizes: list[int], sn: bool = False) -> nn.Sequential:
    """Linear layers with SiLU between them: smooth, so grad_x E is continuous for Langevin dynamics."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [maybe_sn(nn.Linear(n_in, n_out), sn), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


def conv_net(shape: tuple[int, int, int], hidden: int, out: int, sn: bool = False) -> nn.Sequential:
    c, h, w = shape
    ch = max(hidden // 8, 4)
    return nn.Sequential(
        maybe_sn(nn.Conv2d(c, ch, 3, 1, 1), sn), nn.SiLU(),  # (B, ch, H, W)
        maybe_sn(nn.Conv2d(ch, 2 * ch, 4, 2, 1), sn), nn.SiLU(),  # (B, 2ch, H/2, W/2)
        maybe_sn(nn.Conv2d(2 * ch, 4 * ch, 4, 2, 1), sn), nn.SiLU(),  # (B, 4ch, H/4, W/4)
        maybe_sn(nn.Conv2d(4 * ch, 4 * ch, 3, 2, 1), sn), nn.SiLU(),  # (B, 4ch, ceil(H/8), ceil(W/8))
        nn.Flatten(), maybe_sn(nn.Linear(4 * ch * math.ceil(h / 8) * math.ceil(w / 8), out), sn))


def energy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    # Grathwohl et al. 2020, Eq. 5: p(x) = sum_y exp(f(x)[y]) / Z, so E(x) = -logsumexp_y f(x)[y]
    return -torch.logsumexp(logits, dim=-1)


class EnergyModel(nn.Module):
    """`energy(x)` (B,) for data x in model coordinates; `logits(x)` (B, K) for JEM. `forward` is the loss."""

    def __init__(self, shape: tuple[int, ...], model: str = "jem", arch: str = "conv", hidden: int = 128,
                 sn: bool = False, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.jem = model == "jem"
        out = num_classes if self.jem else 1
        self.conv = arch == "conv" and len(shape) == 3
        if self.conv:
            self.net = conv_net(shape, hidden, out, sn)
        else:  # toys (2D) and --arch mlp: a 3-hidden-layer MLP on the flattened input
            self.net = silu_mlp([math.prod(shape), hidden, hidden, hidden, out], sn)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): (B, K) for JEM; (B, 1) holding -E(x) for an EBM."""
        return self.net(x if self.conv else x.flatten(1))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return energy_from_logits(self.logits(x)) if self.jem else -self.logits(x)[:, 0]

    def class_energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Grathwohl et al. 2020, Eq. 4: p(x, y) = exp(f(x)[y]) / Z, so E(x, y) = -f(x)[y]
        return -self.logits(x).gather(1, y[:, None])[:, 0]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, x_sample: torch.Tensor, energy_reg: float):
        """The training loss on data x (with labels y for JEM) and SGLD samples x_sample: (loss, metrics)."""
        logits = self.logits(torch.cat([x, x_sample]))  # one pass over data and samples
        energies = energy_from_logits(logits) if self.jem else -logits[:, 0]
        e_data, e_sample = energies[: len(x)], energies[len(x):]
        loss, metrics = contrastive_loss(e_data, e_sample, energy_reg)
        if self.jem:
            # Grathwohl et al. 2020, Eq. 8: log p(x, y) = log p(y|x) + log p(x); the first by cross-entropy
            ce = F.cross_entropy(logits[: len(x)], y)
            loss = loss + ce
            metrics.update(loss=loss, ce=ce, acc=(logits[: len(x)].argmax(1) == y).float().mean())
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# The objective: the contrastive gradient of the NLL, with samples from SGLD and a replay buffer
# ----------------------------------------------------------------------------------------------------------
def contrastive_loss(e_data: torch.Tensor, e_sample: torch.Tensor, energy_reg: float = 0.0):
    """L = mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2), x+ data, x- model samples.

    With x- ~ p_theta its gradient is E_data[grad E] - E_p[grad E] = grad NLL, because grad log Z =
    -E_p[grad E] (the lecture's derivation; Du & Mordatch 2019, Eq. 2 and Sec. 3.3 for the L2 penalty). The
    samples are constants: no gradient flows through the sampler.
    """
    max_abs = torch.cat([e_data, e_sample]).detach().abs()
    max_abs = torch.where(torch.isfinite(max_abs), max_abs, torch.full_like(max_abs, math.inf)).max()
    # Du & Mordatch 2019, Eq. 2: the maximum-likelihood gradient through mean E(x+) - mean E(x-)
    cd = e_data.mean() - e_sample.mean()
    # Du & Mordatch 2019, Sec. 3.3: the L2 penalty alpha (E(x+)^2 + E(x-)^2) keeps the energies near 0
    reg = energy_reg * (e_data.pow(2).mean() + e_sample.pow(2).mean())
    loss = cd + reg
    metrics = {"loss": loss, "cd": cd, "e_data": e_data.mean(), "e_sample": e_sample.mean(),
               "max_abs_e": max_abs}
    return loss, metrics


def sgld(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int, step_size: float,
         noise: float, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """Run `steps` of stochastic gradient Langevin dynamics on all chains x (B, ...) at once.

    Welling & Teh 2011, Eq. 4 (on x instead of parameters): x <- x - (step/2) grad_x E(x) + eta, with
    eta ~ N(0, noise^2 I); noise^2 = step is Langevin dynamics, whose stationary law is ~ exp(-E) for small
    steps. Values are clamped to [lo, hi] when given. No gradient reaches the parameters.
    """
    with torch.enable_grad():
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(energy(x).sum(), x)[0]
            x = x - 0.5 * step_size * grad + noise * torch.randn_like(x)
            if lo is not None:
                x = x.clamp(lo, hi)
    return x.detach()


class ReplayBuffer(nn.Module):
    """Past SGLD samples, kept on the device (a buffer, so it is checkpointed with the model).

    Du & Mordatch 2019, Sec. 3.1 and JEM Algorithm 1: chains start from the buffer, a fraction from noise.
    """

    def __init__(self, size: int, shape: tuple[int, ...], lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.register_buffer("x", self.noise(size, shape, torch.device("cpu")))

    def noise(self, n: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.rand(n, *shape, device=device)  # U[lo, hi]^D

    def sample(self, n: int, reinit: float) -> tuple[torch.Tensor, torch.Tensor]:
        """n chains: round(reinit * n) fresh U[lo, hi] draws, the rest copies of random buffer entries; and
        the buffer indices the chains are written back to."""
        index = torch.randint(len(self.x), (n,), device=self.x.device)
        x = self.x[index]
        n_new = round(reinit * n)
        x[:n_new] = self.noise(n_new, x.shape[1:], x.device)  # the indices are random: any n_new will do
        return x, index

    def push(self, x: torch.Tensor, index: torch.Tensor) -> None:
        self.x[index] = x.detach()


def constraint_energy(x: torch.Tensor, weight: float) -> torch.Tensor:
    """A 2D constraint as an energy: w * relu(-x_2)^2, zero on the upper half-plane."""
    return weight * F.relu(-x[:, 1]) ** 2


def composed_energy(energies: list[Callable[[torch.Tensor], torch.Tensor]]) -> Callable:
    # Du & Mordatch 2019, Sec. 4.3: a product of experts p(x) ~ prod_i exp(-E_i(x)) has energy sum_i E_i(x)
    return lambda x: sum(e(x) for e in energies)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: exact grid NLL in 2D; accuracy, calibration and OOD detection for images
# ----------------------------------------------------------------------------------------------------------
def grid_points(bins: int, lim: float, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Centres of a bins x bins grid over [-lim, lim]^2, row-major with rows from y = lim down (as
    common.histogram_2d): (bins * bins, 2), in dtype (None: torch's default dtype)."""
    steps = torch.arange(bins, device=device, dtype=dtype or torch.get_default_dtype())
    centres = (steps + 0.5) * (2 * lim / bins) - lim
    y, x = torch.meshgrid(centres.flip(0), centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


def energy_in_chunks(energy: Callable, x: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    return torch.cat([energy(xb) for xb in x.split(chunk)])


def grid_log_z(energy: Callable, lim: float, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """log Z = log integral over [-lim, lim]^2 of exp(-E) by the midpoint rule: logsumexp(-E) + log(cell
    area). Returns log Z and the energies on the grid (n * n,)."""
    e = energy_in_chunks(energy, grid_points(n, lim, device))
    return torch.logsumexp(-e, 0) + 2 * math.log(2 * lim / n), e


def toy_nll(energy: Callable, x: torch.Tensor, lim: float, n: int) -> tuple[float, float, torch.Tensor]:
    """Test NLL (nats) of p(x) = exp(-E(x)) / Z on the box, the box's log Z, and the grid energies. Points
    outside the box have density 0 under the model, so their NLL is infinite."""
    log_z, e_grid = grid_log_z(energy, lim, n, x.device)
    nll = energy_in_chunks(energy, x) + log_z
    nll = torch.where((x.abs() <= lim).all(1), nll, torch.full_like(nll, math.inf))
    return nll.mean().item(), log_z.item(), e_grid


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve of scores that should be higher for `pos`, by ranks (Mann-Whitney U):
    (sum of the positives' ranks - n+ (n+ + 1) / 2) / (n+ n-), tied scores sharing their mean rank; equal to
    P(s+ > s-) + P(s+ = s-) / 2 over all pairs."""
    scores = torch.cat([pos, neg]).double()
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # sorted
    counts = counts.double()  # rank sums reach ~1e8 for 10,000 scores a side: float32 would round them
    first = torch.cumsum(counts, 0) - counts + 1  # 1-based rank of the first of each tied group
    mean_rank = first + (counts - 1) / 2
    rank_sum = mean_rank[inverse[: len(pos)]].sum()
    return ((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))).item()


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over equal-width bins of the confidence max_y p(y|x),
    bin b holding confidences in ((b-1)/bins, b/bins] (Guo et al. 2017, Eq. 3; JEM Sec. 5.2)."""
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    b = (conf.double() * bins).ceil().clamp(1, bins).long() - 1
    # |B_b| |acc(B_b) - conf(B_b)| = |sum of correct - sum of confidences| over the bin
    acc = torch.zeros(bins, dtype=torch.float64, device=probs.device).index_add_(0, b, correct)
    conf_sum = torch.zeros_like(acc).index_add_(0, b, conf.double())
    return ((acc - conf_sum).abs().sum() / len(y)).item()


# ----------------------------------------------------------------------------------------------------------
# Adversarial robustness of the classifier: projected gradient descent (JEM Sec. 5.4)
# ----------------------------------------------------------------------------------------------------------
def pgd_attack(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               eps: float, norm: str, steps: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Projected gradient ascent on the classifier's cross-entropy (Madry et al. 2018, Eq. 2.1 and Sec. 3):
    from a random point of the ball, `steps` steps of 2.5 eps / steps along the sign of the gradient (L-inf)
    or the normalized gradient (L2), each projected back onto the eps-ball around x and the box [lo, hi]."""
    step = 2.5 * eps / steps  # Madry et al.: 2.5 eps / steps, so a path can cross the whole ball
    shape = (-1,) + (1,) * (x.dim() - 1)
    if norm == "linf":
        delta = (2 * torch.rand_like(x) - 1) * eps
    else:  # a uniform random direction at a random radius
        delta = torch.randn_like(x)
        radius = eps * torch.rand(len(x), device=x.device).view(shape)
        delta = delta / delta.flatten(1).norm(dim=1).view(shape) * radius
    delta = (x + delta).clamp(lo, hi) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(logits_fn(x + delta), y, reduction="sum"), delta)
        with torch.no_grad():
            if norm == "linf":
                delta = (delta + step * grad.sign()).clamp(-eps, eps)
            else:  # the normalized gradient step, then back into the ball
                delta = delta + step * grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(shape)
                delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp(min=eps)).view(shape)
            # into the box: moving a coordinate towards x's shrinks |delta_i|, so delta stays in the ball
            delta = (x + delta).clamp(lo, hi) - x
    return (x + delta).detach()


def robust_accuracy(model: EnergyModel, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int,
                    chunk: int = 500) -> float:
    """Test accuracy under the PGD attack of radius eps (model coordinates), chunk images at a time."""
    correct = 0
    for xb, yb in zip(x.split(chunk), y.split(chunk)):
        x_adv = pgd_attack(model.logits, xb, yb, eps, norm, steps)
        correct += (model.logits(x_adv).argmax(1) == yb).sum().item()
    return correct / len(x)


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
def to_model(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Data -> model coordinates: images [0, 1] -> [-1, 1]; toys unchanged."""
    return x if kind == "toy" else 2 * x - 1


def to_data(x: torch.Tensor, kind: str) -> torch.Tensor:
    return x if kind == "toy" else ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample(energy: Callable, n: int, shape: tuple[int, ...], args: Args, lo: float, hi: float, device,
           steps: int | None = None) -> torch.Tensor:
    """Fresh chains: x_0 ~ U[lo, hi]^D, then SGLD on `energy` (model coordinates). Returns (n, *shape)."""
    x = lo + (hi - lo) * torch.rand(n, *shape, device=device)
    steps = args.sample_steps if steps is None else steps
    return sgld(energy, x, steps, args.sgld_step, args.sgld_noise, lo, hi)


def box(args: Args, kind: str) -> tuple[float, float]:
    return (-args.grid_lim, args.grid_lim) if kind == "toy" else (-1.0, 1.0)


@torch.no_grad()
def evaluate_toy(model: EnergyModel, buffer: ReplayBuffer, data: common.Data, args: Args, run: common.Run):
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    lo, hi = box(args, "toy")
    nll, log_z, e_grid = toy_nll(model.energy, x, args.grid_lim, args.grid_n)
    n = args.grid_n
    common.save_heatmap(run.path("density.png"), torch.exp(-(e_grid - e_grid.min())).view(n, n))
    n_draw = 2000 if args.quick else 20_000
    fresh = sample(model.energy, n_draw, (2,), args, lo, hi, x.device)
    common.save_heatmap(run.path("samples.png"), common.histogram_2d(fresh, lim=args.grid_lim))
    common.save_heatmap(run.path("buffer.png"), common.histogram_2d(buffer.x, lim=args.grid_lim))
    common.save_heatmap(run.path("data.png"), common.histogram_2d(x, lim=args.grid_lim))
    metrics = {"nll_nats": nll, "kl_data_model": nll - data.entropy, "log_z": log_z}
    if args.compose:
        energy = composed_energy([model.energy, lambda z: constraint_energy(z, args.compose_weight)])
        composed = sample(energy, n_draw, (2,), args, lo, hi, x.device)
        common.save_heatmap(run.path("compose.png"), common.histogram_2d(composed, lim=args.grid_lim))
        _, e_comp = grid_log_z(energy, args.grid_lim, n, x.device)
        common.save_heatmap(run.path("compose_density.png"), torch.exp(-(e_comp - e_comp.min())).view(n, n))
        metrics["compose_upper_fraction"] = (composed[:, 1] > 0).double().mean().item()
    return metrics, f"grid-normalized exact NLL on [-{args.grid_lim:g}, {args.grid_lim:g}]^2, {n}^2 cells"


@torch.no_grad()
def scores_in_chunks(model: EnergyModel, x: torch.Tensor, kind: str, chunk: int = 1000):
    """log p(x) + log Z = -E(x) (B,), and the logits (B, K) in model coordinates."""
    logits = torch.cat([model.logits(to_model(xb, kind)) for xb in x.split(chunk)])
    return (-energy_from_logits(logits) if model.jem else logits[:, 0]), logits


@torch.no_grad()
def evaluate_images(model: EnergyModel, buffer: ReplayBuffer, data: common.Data, args: Args, run: common.Run):
    x = data.test_x[: args.eval_n] if args.eval_n else data.test_x
    score, logits = scores_in_chunks(model, x, data.kind)
    metrics = {}
    if model.jem:
        y = data.test_y[: len(x)]
        metrics["accuracy"] = (logits.argmax(1) == y).double().mean().item()
        metrics["ece"] = expected_calibration_error(logits.softmax(1), y)
    notes = []
    if model.jem and args.pgd_steps:
        n = args.pgd_n or len(x)
        x_pgd, y_pgd = to_model(x[:n], data.kind), data.test_y[:n]
        for norm, radii in (("linf", args.pgd_linf), ("l2", args.pgd_l2)):
            for eps in radii:  # the model sees [-1, 1], twice the [0, 1] pixel scale the radii are given in
                metrics[f"acc_{norm}_{eps:g}"] = robust_accuracy(model, x_pgd, y_pgd, 2 * eps, norm,
                                                                  args.pgd_steps)
        notes.append(f"PGD-{args.pgd_steps} accuracy on {n} images, radii in [0, 1] pixel units")
    for name in args.ood:
        if name == "noise":  # uniform noise images, as many as the test images
            x_ood = torch.rand(len(x), *data.shape, device=x.device)
        else:
            try:
                ood = common.load_dataset(name, args.data_dir, "cpu")
            except common.DataError as e:
                notes.append(f"{name} skipped ({str(e).split(' (')[0]})")
                continue
            x_ood = ood.test_x[: len(x)].to(x.device)
            if x_ood.shape[1:] != x.shape[1:]:
                notes.append(f"{name} skipped: shape {tuple(x_ood.shape[1:])}")
                continue
        metrics[f"auroc_{name}"] = auroc(score, scores_in_chunks(model, x_ood, data.kind)[0])
    # pictures: the buffer, fresh chains from noise, class-conditional chains, the composition
    lo, hi = box(args, data.kind)
    common.save_grid(run.path("samples.png"), to_data(buffer.x[:64], data.kind), nrow=8)
    fresh = sample(model.energy, 64, data.shape, args, lo, hi, x.device)
    common.save_grid(run.path("samples_fresh.png"), to_data(fresh, data.kind), nrow=8)
    if model.jem:
        y = torch.arange(NUM_CLASSES, device=x.device).repeat_interleave(8)  # (80,): 8 chains per class
        by_class = sample(lambda z: model.class_energy(z, y), len(y), data.shape, args, lo, hi, x.device)
        common.save_grid(run.path("samples_by_class.png"), to_data(by_class, data.kind), nrow=8)
        if args.compose:
            energies = [lambda z, c=c: model.class_energy(z, torch.full((len(z),), c, device=z.device))
                        for c in args.compose_classes]
            composed = sample(composed_energy(energies), 64, data.shape, args, lo, hi, x.device)
            common.save_grid(run.path("compose.png"), to_data(composed, data.kind), nrow=8)
    notes.insert(0, "no likelihood: Z is intractable for images; AUROC of the score log p(x) + log Z = -E(x)")
    return metrics, "; ".join(notes)


def evaluate_and_draw(run: common.Run, model: EnergyModel, buffer: ReplayBuffer, data: common.Data,
                      args: Args, step: int) -> dict:
    """Evaluate on the test set (rank 0), log one line, draw the pictures."""
    with common.eval_mode(model, seed=args.seed):
        evaluate = evaluate_toy if data.kind == "toy" else evaluate_images
        metrics, note = evaluate(model, buffer, data, args, run)
    run.log("test", step, metrics, note=note)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args: Args) -> dict:
    dist, device = common.setup(args)
    data = common.load_dataset(args.dataset, args.data_dir, device, dist)
    if args.model == "jem" and data.train_y is None:
        raise common.RunError(f"--model jem needs labels; {data.name} has none (use --model ebm)")
    if args.compose and data.kind != "toy" and args.model != "jem":
        raise common.RunError("--compose on images adds class energies: it needs --model jem")
    lo, hi = box(args, data.kind)
    model = EnergyModel(data.shape, args.model, args.arch, args.hidden, args.spectral_norm).to(device)
    buffer = ReplayBuffer(args.buffer_size, data.shape, lo, hi).to(device)
    state = nn.ModuleDict({"model": model, "buffer": buffer})  # what the checkpoint holds
    optimizer = common.adam(model.parameters(), lr=args.lr)
    run = common.Run(args, "ebm_jem", dist, state, optimizer, resumable=RESUMABLE)
    start = run.restore()
    ddp = common.wrap_ddp(model, dist)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, args.seed, dist,
                             binarize=data.dynamic_binarization)
    total, eval_every = args.steps, args.eval_every or args.steps
    run.print(
        f"ebm_jem: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters, {data.name} "
        f"{data.shape}, {total} steps of {args.batch_size} x {dist.world_size} with {args.sgld_steps} "
        f"SGLD steps, device {device}")

    peak = torch.zeros((), device=device)  # largest |E| since the last divergence check, kept on the device
    for step in run.steps(start, total, args.batch_size * dist.world_size):
        # 1. a data batch in model coordinates, with JEM's small Gaussian noise
        x, y = batches(step)
        x = to_model(x, data.kind)
        if args.data_noise:
            x = x + args.data_noise * torch.randn_like(x)
        # 2. chains from the replay buffer, round(reinit * B) of them from noise (JEM, Algorithm 1, lines 4-5)
        x_init, index = buffer.sample(args.batch_size, args.reinit)
        # 3. SGLD on E (Algorithm 1, lines 6-8), then back into the buffer (line 10)
        model.eval()  # no spectral-norm power iterations inside the sampler's many forwards
        x_sample = sgld(model.energy, x_init, args.sgld_steps, args.sgld_step, args.sgld_noise, lo, hi)
        model.train()
        buffer.push(x_sample, index)
        # 4. the contrastive loss (plus cross-entropy for JEM) and one Adam step (line 9)
        if args.lr_decay:  # the mode weights of a toy EBM random-walk under a constant step: settle them
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        with common.autocast(device, args.amp):
            loss, metrics = ddp(x, y, x_sample, args.energy_reg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log_train(step, metrics)
        # 5. the divergence guard: one host sync per log interval, before any checkpoint is written
        peak = torch.maximum(peak, metrics["max_abs_e"])
        if (step + 1) % args.log_every == 0 or (step + 1) % args.ckpt_every == 0 or step + 1 == total:
            if dist.enabled:  # every rank stops together, or the others would wait for it forever
                torch_dist.all_reduce(peak, op=torch_dist.ReduceOp.MAX)
            if not peak.item() <= args.max_energy:  # NaN counts as diverged
                kept = f"the last good checkpoint is {run.checkpoint_path}" if run.checkpoint_path.exists() \
                    else "no checkpoint had been written yet"
                run.print(f"warning: energies diverged by step {step + 1}: max |E| = {peak.item():.3g} > "
                          f"--max-energy {args.max_energy:g}; try a lower --lr, a larger --energy-reg or "
                          f"--spectral-norm")
                raise EnergyDiverged(f"energies diverged by step {step + 1}; stopping ({kept})")
            peak.zero_()
        if (step + 1) % eval_every == 0 and step + 1 < total and dist.is_main:
            evaluate_and_draw(run, model, buffer, data, args, step + 1)

    if not dist.is_main:
        return {}
    return evaluate_and_draw(run, model, buffer, data, args, total)


if __name__ == "__main__":
    common.cli(train, Args, presets={"quick": QUICK})
