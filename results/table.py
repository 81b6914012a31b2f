"""One likelihood table per data convention, across every model file, measured by the commands next to
the figures.

Every model file reports its test likelihood the same way (README.md, "Data conventions"): nats per image for
binarized MNIST, bits per dimension for 8-bit MNIST, and for the 2D toys nats per point with
KL(data || model) = NLL - H(data). This script holds the rows of README.md's tables (`ROWS`: file, flags,
estimator, budget, the paper's figure), runs them, records what each run printed, and renders the tables.

    python -m results.table list                          # every row and its command
    python -m results.table run vae-bmnist --seeds 0 1    # run rows (one thread per process),
                                                          # record the figures
    python -m results.table run --table toys --jobs 2     # a whole table, two runs at a time
    python -m results.table record vae-bmnist --seed 0 --run-dir runs/x   # a finished run of exactly
                                                          # that command, made with the code as it is now
    python -m results.table render                        # rewrite README.md's tables from
                                                          # results/measured.jsonl
    python -m results.table render --check                # fail if a row lacks a figure or its code
                                                          # changed since
    python -m results.table figure                        # results/samples.png: every row's samples
                                                          # in one figure, results/curves.png: test NLL
                                                          # against training minutes

A run of row R with seed S is `python FILE FLAGS --seed S --out runs/results/R-sS`. Its figure is the headline
key of the last "test" line of its metrics.jsonl; it is appended to results/measured.jsonl with the wall time,
the largest load average seen during the run (a shared CPU slows a run down), the host and the SHA-256 of the
model file and common.py, so `render --check` can tell which rows need re-running after a code change.
"""

import argparse
import ast
import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files and common.py, wherever this is run from
import common  # noqa: E402
MEASURED = ROOT / "results" / "measured.jsonl"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# config fields that do not change what a run computes
NOT_COMPARED = {"out", "resume", "overwrite", "data_dir", "device", "log_every", "ckpt_every"}


@dataclass(frozen=True)
class Row:
    id: str  # short name: `python -m results.table run ID`
    table: str  # "binarized_mnist", "mnist" or "toys"
    model: str  # what the reader sees in the first column
    file: str  # the model file
    flags: str  # its command-line flags, without --seed and --out
    estimator: str  # how the figure is computed (exact, ELBO, IWAE k, ODE with Hutchinson, bound ...)
    budget: str  # training budget in words
    paper: str = "–"  # the paper's figure in the same convention, with where it is from
    seeds: tuple[int, ...] = (0, 1)  # seeds to run (at least two where the budget allows)
    data: str = ""  # toys: the data set (also in the flags)
    picture: str = "samples.png"  # the run's picture in results/samples.png (flows: temperature 0.7 as
                                  # in Glow; VQ-VAE stage one: its reconstructions)

    @property
    def key(self) -> str:
        return {"binarized_mnist": "nll_nats", "mnist": "nll_bpd", "toys": "kl_data_model"}[self.table]

    def command(self, seed: int | str = "S") -> str:
        return f"python {self.file} {self.flags} --seed {seed}".replace("  ", " ")

    def argv(self, seed: int) -> list[str]:
        return [*shlex.split(self.flags), "--seed", str(seed), "--out",
                str(self.run_dir(seed)), "--overwrite"]

    def run_dir(self, seed: int) -> Path:
        return Path("runs") / "results" / f"{self.id}-s{seed}"


TABLES = {
    "binarized_mnist":
        "Binarized MNIST (dynamically binarized, README's `binarized_mnist`): test NLL, nats per "
        "image",
    "mnist":
        "8-bit MNIST: test NLL, bits per dimension (densities on dequantized data: an upper bound on the "
        "discrete NLL, README's units)",
    "toys": "2D toys: test KL(data || model) = NLL - H(data), nats per point (NLL in brackets)",
}
UNITS = {"binarized_mnist": ("nats", 2), "mnist": ("bpd", 3), "toys": ("nats", 3)}

ROWS: tuple[Row, ...] = (
    # -- binarized MNIST, nats ---------------------------------------------------------------------------
    Row("vae-bmnist", "binarized_mnist", "VAE, MLP 784-400-20", "vae.py", "--dataset binarized_mnist",
        "IWAE k = 1000, all 10,000 test images", "10 epochs"),
    Row("iwae-bmnist", "binarized_mnist", "IWAE k = 5, 1 stochastic layer", "iwae.py",
        "--k 5 --schedule cosine --epochs 80 --eval-k 1000 --eval-n 2000 "
        "--eval-every 40000 --eval-every-k 1000",
        "IWAE k = 1000, first 2000 test images",
        "80 epochs, lr 1e-3 decayed to 0 (cosine; ~25 min, one thread)",
        "85.54 (Burda et al. 2016, Table 1, k = 5, 3280 epochs)", seeds=(0,)),
    Row("iwae-vae-k5-bmnist", "binarized_mnist", "VAE with k = 5 samples (IWAE's network and budget)",
        "iwae.py", "--objective vae --k 5 --schedule cosine --epochs 80 --eval-k 1000 --eval-n 2000 "
        "--eval-every 40000 --eval-every-k 1000",
        "IWAE k = 1000, first 2000 test images",
        "80 epochs, lr 1e-3 decayed to 0 (cosine; ~25 min, one thread)",
        "86.47 (Burda et al. 2016, Table 1, VAE k = 5, 3280 epochs)", seeds=(0,)),
    Row("iwae-vae-k1-long-bmnist", "binarized_mnist",
        "VAE, k = 1 (IWAE's one-layer network, a paper comparison)", "iwae.py",
        "--objective vae --k 1 --schedule cosine --epochs 80 --eval-k 1000 --eval-n 2000 "
        "--eval-every 40000 --eval-every-k 1000",
        "IWAE k = 1000, first 2000 test images",
        "80 epochs, lr 1e-3 decayed to 0, as the two rows above (the paper's 3280 epochs shortened 41 times)",
        "86.76 (Burda et al. 2016, Table 1, VAE k = 1, 3280 epochs)", seeds=(0,)),
    Row("vae-vamp-bmnist", "binarized_mnist", "VAE with a VampPrior, K = 500 pseudo-inputs", "vae.py",
        "--dataset binarized_mnist --prior vamp --eval-n 2000", "IWAE k = 1000, first 2000 test images",
        "10 epochs"),
    Row("vae-mog-bmnist", "binarized_mnist", "VAE with a learned Gaussian-mixture prior, K = 500", "vae.py",
        "--dataset binarized_mnist --prior mog --eval-n 2000", "IWAE k = 1000, first 2000 test images",
        "10 epochs"),
    Row("wae-bmnist", "binarized_mnist", "WAE-MMD, 8 latents, lambda = 10 (Gaussian encoder)", "vae.py",
        "--dataset binarized_mnist --objective wae --latent 8 --eval-n 2000",
        "IWAE k = 1000 with the encoder as proposal, first 2000 test images", "10 epochs"),
    Row("savae-bmnist", "binarized_mnist", "SA-VAE, K = 20 SVI steps, MADE decoder", "savae.py",
        "--eval-k 100 --eval-n 1000",
        "IWAE k = 100 under the refined posterior, first 1000 test images",
        "5 epochs (6000 steps of 50; ~12 min at 1 epoch in 2.3 min, one thread)", seeds=(0,)),
    Row("vae-planar-bmnist", "binarized_mnist", "VAE with a planar-flow posterior, K = 8", "flows.py",
        "--task vae --flow planar --steps 2340 --eval-n 2000", "IWAE k = 1000, first 2000 test images",
        "5 epochs (2340 steps of 128)", seeds=(0,)),
    *(Row(f"vae-planar-{prior}-prior-bmnist", "binarized_mnist",
          f"VAE with a planar-flow posterior and a {name} prior p(z) (4 layers)", "flows.py",
          f"--task vae --flow planar --prior {prior} --steps 2340 --eval-n 2000",
          "IWAE k = 1000, first 2000 test images", "5 epochs (2340 steps of 128)", seeds=(0,))
      for prior, name in (("realnvp", "RealNVP"), ("maf", "MAF"))),
    Row("nvae-bmnist", "binarized_mnist", "NVAE, small CPU configuration (4 groups, 389k parameters)",
        "nvae.py", "--dataset binarized_mnist --eval-n 1000 --eval-k 100",
        "IWAE k = 100, first 1000 test images", "3 epochs",
        "about 78 (Vahdat & Kautz 2020, full model on GPUs)", seeds=(0,)),
    Row("vae-long-bmnist", "binarized_mnist", "VAE, MLP 784-400-20, at NVAE's training time", "vae.py",
        "--dataset binarized_mnist --epochs 115 --eval-n 1000 --eval-k 100",
        "IWAE k = 100, first 1000 test images", "115 epochs", seeds=(0,)),
    Row("pixelcnn-bmnist", "binarized_mnist", "PixelCNN", "pixelcnn.py",
        "--arch pixelcnn --epochs 6 --eval-n 1000", "exact, first 1000 test images",
        "6 epochs (11,250 steps of 32; 17 min at load 2, one thread)",
        "81.30 (static binarization; van den Oord et al. 2016, Table 4)", seeds=(0,)),
    Row("pixelcnn-long-bmnist", "binarized_mnist", "PixelCNN, trained long (a paper comparison)",
        "pixelcnn.py", "--arch pixelcnn --epochs 36 --eval-n 1000", "exact, first 1000 test images",
        "36 epochs (67,500 steps of 32; the paper's training length is not given)",
        "81.30 (static binarization; van den Oord et al. 2016, Table 4)", seeds=(0,)),
    Row("rowlstm-bmnist", "binarized_mnist", "Row LSTM", "pixelcnn.py",
        "--arch rowlstm --steps 5000 --eval-n 1000", "exact, first 1000 test images",
        "5000 steps of 32 (2.7 epochs; ~30 min at the bench's 90 img/s, one thread)",
        "80.54 (static binarization; Table 4)", seeds=(0,)),
    Row("diagbilstm-bmnist", "binarized_mnist", "Diagonal BiLSTM", "pixelcnn.py",
        "--arch diagbilstm --steps 2800 --eval-n 1000", "exact, first 1000 test images",
        "2800 steps of 32 (1.5 epochs; ~30 min at the bench's 53 img/s, one thread)",
        "79.20 (static binarization; Table 4, 7 layers, h = 16)", seeds=(0,)),
    Row("wavenet-bmnist", "binarized_mnist", "causal dilated 1D CNN over the raster order (10 layers)",
        "pixelcnn.py", "--arch wavenet --steps 2500 --eval-n 1000", "exact, first 1000 test images",
        "2500 steps of 32 (1.3 epochs)", seeds=(0,)),
    # -- 8-bit MNIST, bits/dim ---------------------------------------------------------------------------
    Row("vae-mnist", "mnist", "VAE, discretized logistic decoder", "vae.py", "--dataset mnist --eval-n 2000",
        "IWAE k = 1000, first 2000 test images", "10 epochs", seeds=(0, 1)),
    Row("realnvp-mnist", "mnist", "RealNVP, 2 levels x 4 couplings, width 32", "flows.py",
        "--task images --flow realnvp --dataset mnist --depth 4 --width 32 --steps 6000 --eval-every 1000",
        "exact, all 10,000 test images", "6000 steps of 64 (6.4 epochs)",
        "1.06 (Dinh et al. 2017, as reported by FFJORD)", seeds=(0,), picture="samples_t0.7.png"),
    Row("glow-mnist", "mnist", "Glow, 2 levels x 4 steps, width 32", "flows.py",
        "--task images --flow glow --dataset mnist --depth 4 --width 32 --steps 20000 --eval-every 4000",
        "exact, all 10,000 test images", "20,000 steps of 64 (21 epochs)",
        "1.05 (Kingma & Dhariwal 2018, Table 2)", seeds=(0,), picture="samples_t0.7.png"),
    Row("ffjord-mnist", "mnist", "FFJORD, one CNF block, 32-32", "ffjord.py",
        "--dataset mnist --hidden 32 32 --blocks 1 --batch-size 32 --rtol 1e-3 --atol 1e-3 --steps 200 "
        "--eval-every 50 --eval-n 200",
        "ODE (dopri5, tol 1e-3), Hutchinson, first 200 test images",
        "200 steps of 32 (~24 min at the 4.5 img/s of a timing run under load 3)",
        "0.99 (Grathwohl et al. 2019, Table 2)", seeds=(0,)),
    Row("ddpm-mnist", "mnist", "DDPM, small U-Net (32 channels, (1, 2), no attention: the CPU recipe)",
        "ddpm.py",
        "--dataset mnist --channels 32 --channel-mult 1 2 --num-res-blocks 1 --attn-res 0 --dropout 0 "
        "--batch-size 32 --lr 1e-3 --warmup 100 --steps 3000 --eval-every 1000 --eval-n 1000 --eval-t 50 "
        "--sampler ddim --sample-steps 50",
        "variational bound, 50 stratified t per image, first 1000 test images",
        "3000 steps of 32 (1.6 epochs)", "3.75 on CIFAR-10 (Ho et al. 2020, Table 2, L_simple)", seeds=(0,)),
    Row("ncsn_sde-mnist", "mnist", "score SDE (VP), small U-Net", "ncsn_sde.py",
        "--dataset mnist --channels 32 --channel-mult 1 2 --num-res-blocks 1 --attn-res 0 --dropout 0 "
        "--batch-size 32 --lr 1e-3 --warmup 100 --steps 3000 --eval-every 1500 --eval-n 100 "
        "--sample-steps 200 --rtol 1e-3 --atol 1e-3",
        "probability-flow ODE (dopri5, tol 1e-3), Hutchinson, first 100 test images",
        "3000 steps of 32 (1.6 epochs)", "2.99 on CIFAR-10 (Song et al. 2021, VP, deep DDPM++)", seeds=(0,)),
    Row("nvae-mnist", "mnist", "NVAE, small CPU configuration, logistic mixture decoder", "nvae.py",
        "--dataset mnist --steps 700 --eval-n 500 --eval-k 20", "IWAE k = 20, first 500 test images",
        "700 steps of 128 (1.5 epochs)", seeds=(0,)),
    Row("vqvae-mnist", "mnist", "VQ-VAE, K = 128, uniform prior (stage one)", "vqvae.py",
        "--dataset mnist --ema --restart 1 --hidden 64 --codebook-size 128 --code-dim 32 --batch-size 64 "
        "--lr 1e-3 --steps 8000", "bound: decoder NLL + log K per code, all 10,000 test images",
        "8000 steps of 64 (8.5 epochs)", seeds=(0,), picture="recon.png"),
    Row("vqvae-prior-mnist", "mnist", "VQ-VAE + gated PixelCNN prior (stage two on vqvae-mnist seed 0)",
        "vqvae.py", "--stage prior --vqvae runs/results/vqvae-mnist-s0 --prior-hidden 64 --prior-layers 8 "
        "--batch-size 64 --lr 1e-3 --steps 4000",
        "bound: decoder NLL + prior NLL of the codes, all 10,000 test images", "4000 prior steps of 64",
        "4.67 on CIFAR-10 (van den Oord et al. 2017)", seeds=(0,)),
    Row("pixelcnn-mnist", "mnist", "PixelCNN, 256-way softmax", "pixelcnn.py",
        "--dataset mnist --arch pixelcnn --epochs 4 --eval-n 1000", "exact, first 1000 test images",
        "4 epochs (7500 steps of 32; ~30 min at 160 img/s, one thread, load 2)", seeds=(0,)),
    # -- 2D toys, KL(data || model) in nats ---------------------------------------------------------------
    *(Row(f"{name}-{data}", "toys", model, file, f"--dataset {data} {flags}", estimator, budget, data=data)
      for data in ("8gaussians", "two_moons")
      for name, model, file, flags, estimator, budget in (
          ("vae", "VAE, Gaussian decoder", "vae.py", "--steps 5000", "IWAE k = 1000", "5000 steps of 128"),
          ("ddpm", "DDPM, MLP", "ddpm.py",
           "--batch-size 256 --steps 10000 --lr 1e-3 --warmup 100 --ema-decay 0.999 --eval-t 100 "
           "--eval-n 5000 --sampler ddim --sample-steps 100",
           "variational bound, 100 stratified t, 5000 test points", "10,000 steps of 256"),
          # 8gaussians's separated modes need more steps (MAF: and layers) to drain the filaments between them
          ("realnvp", "RealNVP, 8 couplings", "flows.py",
           "--flow realnvp" + {"8gaussians": " --steps 30000", "two_moons": ""}[data], "exact",
           {"8gaussians": "30,000 steps of 512", "two_moons": "10,000 steps of 512"}[data]),
          ("maf", {"8gaussians": "MAF, 16 MADEs", "two_moons": "MAF, 8 MADEs"}[data], "flows.py",
           "--flow maf" + {"8gaussians": " --flow-length 16 --steps 20000", "two_moons": ""}[data], "exact",
           {"8gaussians": "20,000 steps of 512", "two_moons": "10,000 steps of 512"}[data]),
          ("ffjord", "FFJORD, 64-64-64", "ffjord.py",
           "--steps 4000 --lr 3e-3 --rtol 1e-3 --atol 1e-3 --eval-n 5000",
           "ODE (dopri5, tol 1e-3), exact trace, 5000 test points", "4000 steps of 200"),
          ("ebm", "EBM, MLP, SGLD with a replay buffer", "ebm_jem.py",
           "--model ebm --arch mlp --batch-size 256 --lr 1e-3 --lr-decay --energy-reg 0.01 "
           + {"8gaussians": "--sgld-step 0.05 --sgld-noise 0.2236",
              "two_moons": "--sgld-step 0.01 --sgld-noise 0.1"}[data]
           + " --data-noise 0 --steps 8000 --compose", "exp(-E) normalized on a 500^2 grid over [-5, 5]^2",
           "8000 steps of 256"),
          ("ncsn_sde", "score SDE (VP), MLP", "ncsn_sde.py",
           "--batch-size 256 --lr 1e-3 --warmup 100 --steps 6000 --eval-every 3000 --eval-n 5000",
           "probability-flow ODE (dopri5, tol 1e-5), exact divergence, 5000 test points",
           "6000 steps of 256"),
      )),
)
BY_ID = {row.id: row for row in ROWS}


# ----------------------------------------------------------------------------------------------------------
# Reading a finished run
# ----------------------------------------------------------------------------------------------------------
class ResultError(Exception):
    pass


def final_test_line(run_dir: Path, key: str) -> dict:
    """The last "test" line of run_dir/metrics.jsonl that holds `key`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ResultError(f"{path} does not exist: the run did not start or wrote elsewhere")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tests = [r for r in lines if r.get("split") == "test" and key in r]
    if not tests:
        raise ResultError(f"{path} has no test line with {key!r}: the run did not finish its evaluation")
    return tests[-1]


def run_clock(run_dir: Path) -> float:
    """Seconds a run spent from its start to its last log line, summed over its invocations: every `--resume`
    restarts the clock of metrics.jsonl, so the times there fall back at each resumption."""
    times = [json.loads(line)["time"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    ends = [a for a, b in zip(times, times[1:]) if b < a]  # the last time of every invocation but the last
    return sum(ends) + (times[-1] if times else 0.0)


def test_curve(run_dir: Path, key: str) -> list[list[float]]:
    """[seconds since the start, step, figure] of every test line of run_dir/metrics.jsonl that holds `key`,
    the evaluations during training and the final one, on the clock of `run_clock` (summed over
    resumptions)."""
    lines = [json.loads(line)
             for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve, offset, last = [], 0.0, 0.0
    for line in lines:
        if line["time"] < last:  # a --resume restarted the clock
            offset += last
        last = line["time"]
        if line.get("split") == "test" and key in line:
            curve.append([round(offset + line["time"], 1), line.get("step", 0), line[key]])
    return curve


def module_of(file: str):
    """Import a model file by name (for its Args and presets), from the repository root."""
    return importlib.import_module(Path(file).stem)


def expected_config(row: Row, seed: int) -> dict:
    """The config.json a run of `row` with `seed` writes: the file's Args parsed from the row's flags, with
    the presets the file defines (a boolean field `quick` and a dict `QUICK`, ...)."""
    module = module_of(row.file)
    presets = getattr(module, "PRESETS", None) or {
        f.name: getattr(module, f.name.upper()) for f in dataclasses.fields(module.Args)
        if f.type in (bool, "bool") and isinstance(getattr(module, f.name.upper(), None), dict)}
    args = common.parse_args(module.Args, [*shlex.split(row.flags), "--seed", str(seed)], presets)
    return json.loads(json.dumps(dataclasses.asdict(args)))  # tuples as lists, like config.json


def check_config(row: Row, seed: int, run_dir: Path) -> None:
    """Refuse a run folder whose config differs from the row's command in anything that changes the result."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ResultError(f"{path} does not exist")
    saved, expected = json.loads(path.read_text()), expected_config(row, seed)
    differ = [f"{k}={saved.get(k)!r} (row: {v!r})" for k, v in expected.items()
              if k not in NOT_COMPARED and saved.get(k) != v]
    if differ:
        raise ResultError(f"{run_dir} was not run with the command of row {row.id}: {'; '.join(differ)}")


# the parts of common.py a figure depends on: the sections that fix the data, the seeds and the units (by the
# first words of their headers), and the optimizer; a change to run folders, logging or DDP plumbing leaves
# every figure as it was
FIGURE_SECTIONS = ("Device, seeds", "Data:", "2D toy datasets", "Datasets as tensors", "Units:")
FIGURE_FUNCTIONS = ("adam",)


def common_figure_parts(source: str) -> list[str]:
    """The texts of common.py's FIGURE_SECTIONS (each from its header to the next section)
    and FIGURE_FUNCTIONS."""
    lines = source.splitlines(keepends=True)
    rules = [i for i, line in enumerate(lines) if line.startswith("# -----")]
    heads = [i + 1 for i, j in zip(rules, rules[1:]) if j - i <= 4]  # a header: a few lines between two rules
    parts = []
    for k, head in enumerate(heads):
        if lines[head].removeprefix("# ").startswith(FIGURE_SECTIONS):
            end = heads[k + 1] - 1 if k + 1 < len(heads) else len(lines)
            parts.append("".join(lines[head:end]))
    tree = ast.parse(source)
    parts += [ast.get_source_segment(source, node) for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name in FIGURE_FUNCTIONS]
    return parts


def code_only(source: str) -> str:
    """The code of `source` without its comments, docstrings and layout (the dump of its syntax tree), so that
    editing a docstring or a comment keeps a figure fresh."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_hash(file: str) -> str:
    """SHA-256 over the code of the model file and of the parts of common.py its figures depend on
    (`common_figure_parts`), comments and docstrings aside: a figure is stale once that code changes."""
    digest = hashlib.sha256(code_only((ROOT / file).read_text()).encode())
    for part in common_figure_parts((ROOT / "common.py").read_text()):
        digest.update(code_only(part).encode())
    return digest.hexdigest()[:16]


def host(threads: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def make_record(row: Row, seed: int, run_dir: Path, wall_s: float, max_load: float | None,
                wall_source: str, threads: str) -> dict:
    """What a finished run measured. `wall_source` "runner" means the whole command, timed here;
    "metrics.jsonl" means the run's own clock (from its start to its last test line, imports excluded);
    `max_load` None: not observed (treated as a shared CPU); `threads` is the run's OMP_NUM_THREADS."""
    line = final_test_line(ROOT / run_dir, row.key)
    extra = {k: v for k, v in line.items() if k not in ("split", "step", "time", row.key)}
    extra["curve"] = test_curve(ROOT / run_dir, row.key)
    return {"row": row.id, "seed": seed, "figure": line[row.key], "extra": extra,
            "command": row.command(seed), "wall_s": round(wall_s, 1), "wall_source": wall_source,
            "max_load": None if max_load is None else round(max_load, 2), "host": host(threads),
            "code": code_hash(row.file), "commit": git_commit(), "run_dir": str(run_dir),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def append_record(record: dict, path: Path = MEASURED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_records(path: Path = MEASURED) -> dict[tuple[str, int], dict]:
    """The latest record of every (row, seed) whose command is still the row's command."""
    latest = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                row = BY_ID.get(r["row"])
                if row is not None and r["command"] == row.command(r["seed"]):
                    latest[(r["row"], r["seed"])] = r
    return latest


# ----------------------------------------------------------------------------------------------------------
# Running rows
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One running (row, seed): its process, its log file, when it started and the largest load seen."""
    row: Row
    seed: int
    proc: subprocess.Popen
    log: Path
    start: float
    max_load: float


def start_job(row: Row, seed: int, env: dict) -> Job:
    log = ROOT / "runs" / "results" / f"{row.id}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"start {row.id} seed {seed}: {row.command(seed)}", flush=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, row.file, *row.argv(seed)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return Job(row, seed, proc, log, time.time(), os.getloadavg()[0])


def run_rows(rows: list[Row], seeds: list[int] | None, jobs: int, threads: int, path: Path = MEASURED,
             timeout: float | None = None) -> int:
    """Run every (row, seed), `jobs` at a time, each with `threads` threads; record those that finish. Returns
    the number of failed runs (their logs stay in runs/results/)."""
    queue = [(row, s) for row in rows for s in (seeds if seeds is not None else row.seeds)]
    running, failed = [], 0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    while queue or running:
        while queue and len(running) < jobs:
            running.append(start_job(*queue.pop(0), env))
        time.sleep(2)
        for job in list(running):
            job.max_load = max(job.max_load, os.getloadavg()[0])
            if timeout and job.proc.poll() is None and time.time() - job.start > timeout:
                job.proc.terminate()
            if job.proc.poll() is None:
                continue
            running.remove(job)
            wall = time.time() - job.start
            try:
                if job.proc.returncode != 0:
                    raise ResultError(f"exit code {job.proc.returncode}, see {job.log.relative_to(ROOT)}")
                record = make_record(job.row, job.seed, job.row.run_dir(job.seed), wall, job.max_load,
                                     "runner", str(threads))
            except ResultError as e:
                failed += 1
                print(f"FAILED {job.row.id} seed {job.seed}: {e}", flush=True)
                continue
            append_record(record, path)
            print(f"done {job.row.id} seed {job.seed}: {job.row.key}={record['figure']:.4f} in {wall:.0f} s "
                  f"(max load {job.max_load:.1f})", flush=True)
    return failed


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_figure(row: Row, records: list[dict]) -> str:
    unit, digits = UNITS[row.table]
    mean, sd = mean_sd([r["figure"] for r in records])
    text = f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "") + f" {unit}"
    if row.table == "toys":
        nll = [r["extra"]["nll_nats"] for r in records if "nll_nats" in r["extra"]]
        if nll:
            text += f" ({sum(nll) / len(nll):.{digits}f})"
    return text


def format_wall(records: list[dict], cores: int) -> str:
    wall = sum(r["wall_s"] for r in records) / len(records)
    text = f"{wall / 60:.1f} min" if wall >= 120 else f"{wall:.0f} s"
    if any(r["wall_source"] != "runner" for r in records):
        text += " (run clock)"
    if any(r["max_load"] is None or r["max_load"] > cores + 0.5 for r in records):
        text += " †"
    return text


def render_table(table: str, records: dict[tuple[str, int], dict]) -> tuple[str, list[str]]:
    """A markdown table of the rows of `table`, and the problems (missing or stale rows) it found."""
    problems, lines = [], []
    head = ["model", "file", *(["data"] if table == "toys" else []), "estimator", "budget", "ours", "seeds",
            "paper", "wall time", "command"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in (r for r in ROWS if r.table == table):
        found = [records[(row.id, s)] for s in row.seeds if (row.id, s) in records]
        if not found:
            problems.append(f"{row.id}: no figure measured (python -m results.table run {row.id})")
            figure, wall, seeds = "not measured", "–", "–"
        else:
            stale = [r for r in found if r["code"] != code_hash(row.file)]
            if stale:
                problems.append(
                    f"{row.id}: {row.file} or common.py's data, seeds or units changed since seed(s) "
                    f"{[r['seed'] for r in stale]} ran")
            cores = max(int(r["host"]["cores"] or 1) for r in found)
            figure, wall = format_figure(row, found), format_wall(found, cores)
            figure += " ‡" if stale else ""
            seeds = ", ".join(str(r["seed"]) for r in found)
        cells = [row.model, f"`{row.file}`", *([row.data] if table == "toys" else []), row.estimator,
                 row.budget, figure, seeds, row.paper, wall, f"`{row.command()}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), problems


def hardware_line(records: dict) -> str:
    hosts = sorted({(r["host"]["cpu"], r["host"]["cores"], r["host"]["gpu"] or "no GPU", r["host"]["torch"],
                     r["host"]["threads"]) for r in records.values()})
    return "; ".join(f"{cpu}, {cores} cores, {gpu}, PyTorch {torch}, OMP_NUM_THREADS={threads}"
                     for cpu, cores, gpu, torch, threads in hosts) or "–"


def render(records: dict) -> tuple[str, list[str]]:
    parts, problems = [], []
    parts.append(
        f"Measured with `python -m results.table run ROW` on: {hardware_line(records)}. The `± x` is the "
        "standard deviation over the seeds listed; one seed where the budget allowed only one. A "
        "run's wall time is its whole command (imports, data, training, evaluation); † marks runs "
        "during which the load average exceeded the number of cores (other jobs shared the CPU, so "
        "an idle machine is faster); ‡ marks figures measured before the code last changed (their "
        "row needs a rerun). Figures: results/measured.jsonl.")
    for table, title in TABLES.items():
        text, found = render_table(table, records)
        parts += [f"**{title}**", text]
        problems += found
    return "\n\n".join(parts), problems


def splice(document: str, block: str) -> str:
    """Replace what lies between the BEGIN and END markers of `document` by `block`."""
    if document.count(BEGIN) != 1 or document.count(END) != 1 or document.index(BEGIN) > document.index(END):
        raise ResultError(f"README.md needs exactly one {BEGIN} ... {END} pair")
    head, rest = document.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


# ----------------------------------------------------------------------------------------------------------
# The samples figure
# ----------------------------------------------------------------------------------------------------------
# each row's picture, kept with the figures (run folders are not committed)
SAMPLES = ROOT / "results" / "samples"


def current_records(records: dict) -> list[tuple[Row, dict]]:
    """The record of the first recorded seed of every row whose code has not changed since it ran."""
    out = []
    for row in ROWS:
        found = [records[(row.id, s)] for s in row.seeds if (row.id, s) in records]
        if found and found[0]["code"] == code_hash(row.file):
            out.append((row, found[0]))
    return out


def save_png(image, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)


def samples_figure(records: dict, out: Path, tile: int = 196, columns: int = 6) -> int:
    """Tile the picture of every row with a current record, captioned, into one PNG. A row's picture is copied
    from its run folder into results/samples/ROW.png when the folder is here, and read from there."""
    from PIL import Image, ImageDraw

    tiles = []
    for row, record in current_records(records):
        kept, fresh = SAMPLES / f"{row.id}.png", ROOT / record["run_dir"] / row.picture
        if fresh.exists():
            save_png(Image.open(fresh).convert("RGB"), kept)
        if not kept.exists():
            continue
        image = Image.open(kept).convert("RGB")
        scale = tile / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.NEAREST)
        tiles.append((row.id, image))
    if not tiles:
        raise ResultError("no current row has a picture: run some rows first")
    caption = 16
    rows_n = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (tile + 8), rows_n * (tile + caption + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(tiles):
        x, y = (i % columns) * (tile + 8) + 4, (i // columns) * (tile + caption + 8) + 4
        sheet.paste(image, (x + (tile - image.width) // 2, y + caption + (tile - image.height) // 2))
        draw.text((x, y), label, fill="black")
    save_png(sheet, out)
    return len(tiles)


# ----------------------------------------------------------------------------------------------------------
# Test NLL against training wall-clock
# ----------------------------------------------------------------------------------------------------------
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aa0088", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]


def curve_of(record: dict) -> list[list[float]]:
    """The record's [seconds, step, figure] test curve, or the one of its run folder when that is
    still here."""
    curve = record["extra"].get("curve")
    run_dir = ROOT / record["run_dir"]
    if not curve and (run_dir / "metrics.jsonl").exists():
        curve = test_curve(run_dir, BY_ID[record["row"]].key)
    return curve or []


def value_range(lines: list[tuple[Row, list]]) -> tuple[float, float]:
    """The figures a curves panel spans, (lowest, highest drawn): every figure, except that the top stops at
    the median final figure plus 4 times its distance to the best final figure, so that one outlier (WAE's
    NLL) does not flatten every other line; figures above the top are drawn on its edge."""
    values = [point[2] for _, c in lines for point in c]
    finals = sorted(c[-1][2] for _, c in lines)
    median = finals[len(finals) // 2]
    return min(values), min(max(values), median + 4 * (median - finals[0]))


def curves_figure(records: dict, out: Path, width: int = 560, height: int = 400) -> int:
    """One panel per image table (binarized MNIST in nats, 8-bit MNIST in bits/dim): the test figure of every
    current row against the minutes its run had spent when it was measured, one line per row (first seed).
    Minutes are on a log axis, so 2-minute and 2-hour runs both stay readable; figures above `value_range`'s
    top are drawn on the top edge and listed under the legend."""
    from PIL import Image, ImageDraw

    panels = []
    for table in ("binarized_mnist", "mnist"):
        lines = [(row, curve_of(rec)) for row, rec in current_records(records) if row.table == table]
        lines = [(row, c) for row, c in lines if c]
        if lines:
            panels.append((table, lines))
    if not panels:
        raise ResultError("no current image row has a test curve: run some rows first")
    sheet = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(sheet)
    left, right, top, bottom = 60, 150, 30, 40  # margins: axis labels, legend
    for p, (table, lines) in enumerate(panels):
        x0 = p * width
        seconds = [point[0] for _, c in lines for point in c]
        t_lo, t_hi = (math.log10(max(t, 1.0) / 60) for t in (min(seconds), max(seconds)))  # from 1 s
        t_hi = t_lo + 1e-9 if t_hi <= t_lo else t_hi
        lo, hi = value_range(lines)
        hi = lo + 1e-9 if hi <= lo else hi
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad

        def xy(minute, value):
            u = (math.log10(max(minute, 1 / 60)) - t_lo) / (t_hi - t_lo)
            return (x0 + left + u * (width - left - right),
                    top + (hi - min(value, hi)) / (hi - lo) * (height - top - bottom))

        draw.rectangle([x0 + left, top, x0 + width - right, height - bottom], outline="black")
        for tick in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
            if t_lo - 1e-9 <= math.log10(tick) <= t_hi + 1e-9:
                x, _ = xy(tick, lo)
                draw.line([(x, height - bottom), (x, height - bottom + 3)], fill="black")
                draw.text((x - 6, height - bottom + 4), f"{tick:g}", fill="black")
        for k in range(5):
            value = lo + (hi - lo) * k / 4
            _, y = xy(1, value)
            draw.text((x0 + 6, y - 6), f"{value:.2f}" if hi - lo < 10 else f"{value:.0f}", fill="black")
        unit = "nats" if table == "binarized_mnist" else "bits/dim"
        name = "binarized MNIST" if table == "binarized_mnist" else "8-bit MNIST"
        draw.text((x0 + left, 8), f"{name}: test NLL ({unit}) against training minutes", fill="black")
        draw.text((x0 + (width - right) // 2 - 40, height - 16), "minutes (one CPU thread, log scale)",
                  fill="black")
        off_scale = []
        for i, (row, curve) in enumerate(lines):
            colour = COLOURS[i % len(COLOURS)]
            points = [xy(t / 60, v) for t, _, v in curve]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            off_scale += [f"{row.id} {v:.4g}" for _, _, v in curve if v > hi]
            ly = top + 14 * i
            draw.line([(x0 + width - right + 8, ly + 6), (x0 + width - right + 24, ly + 6)],
                      fill=colour, width=2)
            draw.text((x0 + width - right + 28, ly), row.id, fill="black")
        for j, text in enumerate(["off the top:", *off_scale] if off_scale else []):
            draw.text((x0 + width - right + 8, top + 14 * (len(lines) + 1 + j)), text, fill="black")
    save_png(sheet, out)
    return sum(len(lines) for _, lines in panels)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def select(ids: list[str], table: str | None) -> list[Row]:
    unknown = [i for i in ids if i not in BY_ID]
    if unknown:
        raise ResultError(f"unknown row(s) {unknown}; `python -m results.table list` shows them")
    rows = [BY_ID[i] for i in ids] if ids else list(ROWS)
    return [r for r in rows if table is None or r.table == table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("list", help="every row and its command")
    p.add_argument("--table", choices=list(TABLES))
    p = sub.add_parser("run", help="run rows and record their figures",
                       formatter_class=parser.formatter_class)
    p.add_argument("rows", nargs="*", help="row ids (default: all rows of --table, or every row)")
    p.add_argument("--table", choices=list(TABLES))
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: each row's own)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--timeout", type=float, default=0, help="stop a run after this many seconds (0: never)")
    p = sub.add_parser("record", help="record a finished run folder made by exactly a row's command")
    p.add_argument("row")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p = sub.add_parser("render", help="rewrite README.md's tables from results/measured.jsonl")
    p.add_argument("--check", action="store_true", help="exit 1 if a row is missing or stale")
    sub.add_parser("figure",
                   help="results/samples.png from every row's samples, results/curves.png from their "
                        "test curves")
    args = parser.parse_args(argv)
    try:
        if args.what == "list":
            for row in select([], args.table):
                print(f"{row.id:22s} {row.table:16s} seeds {list(row.seeds)}  {row.command()}")
        elif args.what == "run":
            return 1 if run_rows(select(args.rows, args.table), args.seeds, args.jobs, args.threads,
                                 timeout=args.timeout or None) else 0
        elif args.what == "record":
            row = select([args.row], None)[0]
            check_config(row, args.seed, Path(args.run_dir))
            wall = run_clock(Path(args.run_dir))
            record = make_record(row, args.seed, Path(args.run_dir), wall, None,
                                 "metrics.jsonl", "not recorded")
            append_record(record)
            print(f"recorded {row.id} seed {args.seed}")
        elif args.what == "render":
            block, problems = render(load_records())
            README.write_text(splice(README.read_text(), block))
            for problem in problems:
                print(f"warning: {problem}", file=sys.stderr)
            return 1 if args.check and problems else 0
        elif args.what == "figure":
            n = samples_figure(load_records(), ROOT / "results" / "samples.png")
            print(f"results/samples.png: {n} rows")
            try:
                n = curves_figure(load_records(), ROOT / "results" / "curves.png")
                print(f"results/curves.png: {n} rows")
            except ResultError as e:
                print(f"results/curves.png not drawn: {e}", file=sys.stderr)
    except ResultError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
