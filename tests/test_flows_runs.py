"""flows.py end to end: every task with --quick in a subprocess (samples, metrics, checkpoint, resume), exact
resume, every flow of every task for a few steps, and one-line errors."""

import dataclasses
import json

import pytest
import torch
from helpers import data_dir, needs_mnist, run_script

import common
import flows


def run_flows(*flags, timeout=300):
    return run_script("flows.py", *flags, timeout=timeout, one_thread=False)


def test_help_lists_every_option_with_its_default():
    result = run_flows("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--task", "--flow", "--flow-length", "--sylvester", "--resume", "--quick", "--device"):
        assert flag in result.stdout
    assert "(default: density)" in result.stdout


def test_quick_density_writes_pictures_metrics_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    # the toy preset's flow is larger
    small = ("--quick", "--hidden", "32", "--flow-length", "4", "--eval-n", "1000")
    result = run_flows(*small, "--steps", "60", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert (last.startswith("eval test nll_nats=") and "kl_data_model=" in last
            and last.endswith("test points)"))
    for name in ("samples.png", "density.png", "data.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(record["mass"] - 1) < 0.02  # the density integrates to about 1 over [-6, 6]^2
    assert abs(record["kl_data_model"] - (record["nll_nats"] - common.TOY_ENTROPY["8gaussians"])) < 1e-9
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 60
    refused = run_flows(*small, "--steps", "60", "--out", str(out))
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    resumed = run_flows(*small, "--steps", "80", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 80


def test_quick_energy_matching(tmp_path):
    out = tmp_path / "run"
    result = run_flows("--quick", "--task", "energy", "--flow", "radial", "--steps", "40", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test free_energy_nats=") and "kl_model_target=" in last
    for name in ("samples.png", "target.png", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0


@needs_mnist
def test_quick_images_in_bits_per_dim_and_resume(tmp_path):
    out = tmp_path / "run"
    flags = ("--quick", "--task", "images", "--flow", "glow", "--eval-n", "100", "--batch-size", "16")
    result = run_flows(*flags, "--steps", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_bpd=") and "bin width 1/256" in last
    bpd = float(last.split("nll_bpd=")[1].split()[0])
    assert 0.5 < bpd < 8.5  # at most the uniform density's 8 bits/dim plus a little
    for name in ("samples.png", "samples_t0.7.png", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    resumed = run_flows(*flags, "--steps", "15", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 15


@needs_mnist
def test_quick_vae_with_a_flow_posterior(tmp_path):
    out = tmp_path / "run"
    result = run_flows("--quick", "--task", "vae", "--flow", "planar", "--steps", "30", "--eval-n", "100",
                       "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and last.endswith("(iwae k=20)")
    nll, nelbo = (float(last.split(f"{k}=")[1].split()[0]) for k in ("nll_nats", "nelbo_nats"))
    assert nll <= nelbo  # the importance-sampled bound is at least as tight as the ELBO
    assert (out / "samples.png").stat().st_size > 0


def test_resume_is_exact(tmp_path):
    base = dataclasses.replace(flows.Args(), flow="glow", steps=20, flow_length=2, hidden=16, batch_size=64,
                               eval_n=50, log_every=5, ckpt_every=100, device="cpu")
    flows.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    flows.train(dataclasses.replace(base, steps=10, out=str(tmp_path / "split")))
    flows.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 20
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


CASES = [("density", f, "8gaussians") for f in flows.TOY_FLOWS] + \
        [("energy", f, "") for f in flows.ENERGY_FLOWS] + \
        [("images", "realnvp", "mnist")] + [("vae", f, "binarized_mnist") for f in flows.VAE_FLOWS] + \
        [("vae", f"planar+{p}", "binarized_mnist") for p in ("realnvp", "maf")]  # flow priors


@pytest.mark.parametrize("task, flow, dataset", CASES, ids=[f"{t}-{f}" for t, f, _ in CASES])
def test_every_flow_of_every_task_trains_and_evaluates(tmp_path, task, flow, dataset):
    if dataset in ("mnist", "binarized_mnist") and data_dir() is None:
        pytest.skip("MNIST files not found")
    flow, _, prior = flow.partition("+")
    args = flows.Args(task=task, flow=flow, prior=prior or "normal", prior_length=2, dataset=dataset,
                      steps=3, flow_length=2, hidden=8, depth=1,
                      width=4, batch_size=16, eval_n=40, eval_k=3, log_every=1, device="cpu", quick=True,
                      data_dir=data_dir() or "", out=str(tmp_path / "run"))
    metrics = flows.train(args)
    assert metrics and all(isinstance(v, float) and v == v for v in metrics.values()), metrics  # no NaN


def test_bad_flow_for_task_is_a_one_line_error(tmp_path):
    result = run_flows("--task", "energy", "--flow", "maf", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--task energy takes --flow" in result.stderr
