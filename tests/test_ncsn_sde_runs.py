"""ncsn_sde.py end to end: --help, --quick on a 2D toy (pictures, metrics, checkpoint with EMA, refusal,
resume), the other methods, objectives and samplers, MNIST in bits/dim, exact resume with the EMA, and
one-line errors."""

import dataclasses
import json
import math

import pytest
import torch

import common
import ncsn_sde
from helpers import data_dir, needs_mnist, run_script


def run_ncsn_sde(*flags, timeout=300):
    return run_script("ncsn_sde.py", *flags, timeout=timeout)


def test_help_lists_options_with_defaults():
    result = run_ncsn_sde("--help")
    assert result.returncode == 0
    for text in ("--method", "--sde", "--objective", "--sampler", "--snr", "--divergence", "--ema-decay",
                 "0.16", "--quick"):
        assert text in result.stdout


def test_quick_toy_writes_pictures_metrics_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    flags = ("--quick", "--dataset", "8gaussians", "--eval-n", "200", "--sample-steps", "20")
    result = run_ncsn_sde(*flags, "--steps", "60", "--eval-every", "30", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and "kl_data_model=" in last and "nfe=" in last
    assert "probability-flow ODE" in last and "exact divergence" in last
    for name in ("samples.png", "samples_0000030.png", "samples_0000060.png", "density.png", "data.png",
                 "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["split"] == "test" and final["nfe"] > 0 and final["eval_s"] > 0
    ckpt = common.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 60 and "ema" in ckpt
    # in-process: no second interpreter start-up
    with pytest.raises(common.RunError, match="already holds a run"):
        ncsn_sde.train(dataclasses.replace(ncsn_sde.Args(), dataset="8gaussians", device="cpu", out=str(out)))
    resumed = run_ncsn_sde(*flags, "--steps", "80", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 80


@pytest.mark.parametrize("changes", [
    dict(method="ncsn", objective="ssm", ald_steps=5),
    dict(sde="ve", objective="ism", sampler="ode"),
    dict(sde="subvp", sampler="em", divergence="rademacher"),
])
def test_methods_objectives_and_samplers_run_end_to_end(tmp_path, capsys, changes):
    # in-process (no interpreter start-up): the same train() the command line calls
    args = dataclasses.replace(ncsn_sde.Args(), **{**ncsn_sde.QUICK, **dict(
        quick=True, dataset="two_moons", steps=30, eval_n=100, sample_steps=20, device="cpu",
        out=str(tmp_path / "run")),
        **changes})
    metrics = ncsn_sde.train(args)
    assert math.isfinite(metrics["nll_nats"])
    assert metrics["kl_data_model"] == metrics["nll_nats"] - common.TOY_ENTROPY["two_moons"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert (last.startswith("eval test nll_nats=")
            and ("VE SDE of the NCSN ladder" in last) == (args.method == "ncsn"))
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0


@needs_mnist
def test_quick_mnist_runs_end_to_end_in_bits_per_dim(tmp_path):
    out = tmp_path / "run"
    result = run_ncsn_sde("--quick", "--dataset", "mnist", "--steps", "10", "--batch-size", "16",
                          "--eval-n", "8", "--sample-steps", "5", "--rtol", "1e-2", "--atol", "1e-2", "--out",
                          str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_bpd=") and "rademacher divergence" in last
    for name in ("samples.png", "interp.png", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    assert "interpolation by the probability-flow ODE" in result.stdout


def test_resume_is_exact_including_the_ema(tmp_path):
    torch.set_default_dtype(torch.float32)
    base = dataclasses.replace(ncsn_sde.Args(), dataset="two_moons", hidden=32, steps=20, warmup=5, eval_n=50,
                               log_every=5, ckpt_every=100, eval_every=12, sample_steps=5, rtol=1e-3,
                               atol=1e-3, grid_bins=10, device="cpu", data_dir=data_dir() or "data")
    ncsn_sde.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    ncsn_sde.train(dataclasses.replace(base, steps=10, out=str(tmp_path / "split")))
    ncsn_sde.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 20
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_unsupported_requests_give_one_line_errors(tmp_path):
    with pytest.raises(common.RunError, match="--method ncsn"):
        ncsn_sde.train(dataclasses.replace(ncsn_sde.Args(), sampler="ald", device="cpu",
                                           out=str(tmp_path / "a")))
    result = run_ncsn_sde("--dataset", "binarized_mnist", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    with pytest.raises(common.RunError, match="--interp-frames 1"):
        ncsn_sde.train(dataclasses.replace(ncsn_sde.Args(), interp_frames=1, device="cpu",
                                           out=str(tmp_path / "c")))
