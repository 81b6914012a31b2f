"""nvae.py end to end: --help, --quick on binarized MNIST with resume, 8-bit MNIST, exact resume,
the presets."""

import dataclasses

import pytest
import torch
from helpers import data_dir, needs_mnist, run_script

import common
import nvae


def run_nvae(*flags, timeout=300):
    return run_script("nvae.py", *flags, timeout=timeout)


def test_help_lists_every_option_with_its_default():
    result = run_nvae("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--temperature", "(default: 1.0)", "--bn-readjust", "--paper-mnist", "--paper-cifar10",
                 "--sr-weight"):
        assert text in result.stdout, text


@needs_mnist
def test_quick_writes_samples_metrics_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    result = run_nvae("--quick", "--steps", "4", "--eval-n", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and last.endswith("(iwae k=10)")
    for name in ("samples.png", "recon.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 4
    resumed = run_nvae("--quick", "--steps", "6", "--eval-n", "10", "--bn-readjust", "1",
                       "--temperature", "0.7", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 6


TINY = dict(channels=4, groups=1, z_channels=4, expansion=2, batch_size=16, eval_n=10, eval_k=2, log_every=3,
            ckpt_every=100, device="cpu")


@needs_mnist
def test_8bit_mnist_reports_bits_per_dim(tmp_path):
    torch.set_num_threads(1)
    args = dataclasses.replace(nvae.Args(), dataset="mnist", mixtures=3, steps=3, data_dir=data_dir(),
                               out=str(tmp_path / "run"), **TINY)
    metrics = nvae.train(args)
    assert (0 < metrics["nll_bpd"] <= metrics["nelbo_bpd"] + 0.5
            and (tmp_path / "run" / "samples.png").exists())


def test_toy_data_are_refused():
    with pytest.raises(common.RunError, match="models images"):
        nvae.train(dataclasses.replace(nvae.Args(), dataset="8gaussians", device="cpu"))


@needs_mnist
def test_resume_is_exact(tmp_path):
    """N steps, a stop and N more give the same weights as 2N straight. The cosine learning rate and the KL
    warm-up follow the --steps of each invocation, so this check holds them constant."""
    torch.set_num_threads(1)
    base = dataclasses.replace(nvae.Args(), steps=6, lr_min=1e-2, kl_warmup=0.0, data_dir=data_dir(), **TINY)
    nvae.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    nvae.train(dataclasses.replace(base, steps=3, out=str(tmp_path / "split")))
    nvae.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:  # weights, BN statistics and the power-iteration vectors
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_paper_presets_build_the_paper_models():
    presets = {"quick": nvae.QUICK, "paper_mnist": nvae.PAPER_MNIST, "paper_cifar10": nvae.PAPER_CIFAR10}
    args = common.parse_args(nvae.Args, ["--paper-mnist", "--epochs", "1"], presets)
    sizes = (args.channels, args.scales, args.groups, args.z_channels, args.cells, args.epochs)
    assert sizes == (32, 2, 5, 20, 1, 1)
    torch.manual_seed(0)
    model = nvae.NVAE((1, 28, 28), "bernoulli", args.channels, args.pre_blocks, args.scales, args.groups,
                      args.z_channels, args.cells, args.expansion, args.mixtures).eval()
    params, groups = model.top_down(model.encode(torch.zeros(2, 1, 28, 28)))
    assert params.shape == (2, 1, 28, 28) and len(groups) == 10
    assert [g["z"].shape[-1] for g in groups] == [4] * 5 + [8] * 5  # the paper's 4x4 and 8x8 latents
    args = common.parse_args(nvae.Args, ["--paper-cifar10"], presets)
    model = nvae.NVAE((3, 32, 32), "discretized_logistic_mixture", args.channels, args.pre_blocks,
                      args.scales, args.groups, args.z_channels, args.cells, args.expansion, args.mixtures)
    assert model.num_groups == 30 and tuple(model.h0.shape[2:]) == (16, 16)  # 30 groups of 20 x 16 x 16
    assert model.head[-1].out_channels == 100  # 10 logistics: 10 x (1 + 3 + 3 + 3)
