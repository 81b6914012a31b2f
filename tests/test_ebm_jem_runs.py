"""ebm_jem.py end to end: --help, a 2D toy and MNIST with --quick, composition, resume (exact), the divergence
stop, bad input."""

import dataclasses
import os

import torch
from helpers import data_dir, needs_mnist, run_script

import common
import ebm_jem

TOY = ["--model", "ebm", "--dataset", "8gaussians", "--arch", "mlp", "--hidden", "32", "--batch-size", "64",
       "--lr", "1e-3", "--energy-reg", "0.01", "--sgld-step", "0.01", "--sgld-noise", "0.1",
       "--data-noise", "0"]


def run(*flags, timeout=300):
    return run_script("ebm_jem.py", *flags, timeout=timeout)


def test_help_lists_every_option_with_its_default():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--sgld-step", "(default: 50.0)", "--reinit", "(default: 0.05)", "--buffer-size",
                 "--max-energy", "--compose", "--spectral-norm", "--model {jem,ebm}"):
        assert text in result.stdout, text


def test_toy_quick_runs_composes_resumes(tmp_path):
    out = tmp_path / "run"
    result = run("--quick", *TOY, "--compose", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and "kl_data_model=" in last and "grid-normalized" in last
    for name in ("density.png", "samples.png", "buffer.png", "data.png", "compose.png", "compose_density.png",
                 "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    ckpt = common.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 20 and ckpt["model"]["buffer.x"].shape == (500, 2)
    resumed = run("--quick", *TOY, "--steps", "30", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 30


@needs_mnist
def test_mnist_jem_quick_reports_accuracy_calibration_ood_and_samples(tmp_path):
    # a data folder with MNIST only: the Fashion-MNIST OOD set is then skipped with a note (no network here),
    # or scored when it can be downloaded
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(os.path.join(data_dir(), "mnist"), data / "mnist")
    out = tmp_path / "run"
    result = run("--quick", "--steps", "10", "--eval-n", "100", "--sample-steps", "3", "--compose",
                 "--ood", "noise", "fashion_mnist", "--data-dir", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test accuracy=") and "ece=" in last and "auroc_noise=" in last
    assert "auroc_fashion_mnist=" in last or "fashion_mnist skipped" in last
    for name in ("samples.png", "samples_fresh.png", "samples_by_class.png", "compose.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    assert common.load_checkpoint(out / "checkpoint.pt")["model"]["buffer.x"].shape == (500, 1, 28, 28)


@needs_mnist
def test_mnist_ebm_with_spectral_norm_runs(tmp_path):
    result = run("--quick", "--model", "ebm", "--arch", "mlp", "--spectral-norm", "--steps", "4",
                 "--eval-n", "100", "--sample-steps", "2", "--ood", "noise", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test auroc_noise=") and "accuracy" not in last


def test_resume_is_exact(tmp_path):
    base = dataclasses.replace(
        ebm_jem.Args(), model="ebm", dataset="two_moons", arch="mlp", hidden=16, batch_size=32, lr=1e-3,
        sgld_steps=3, sgld_step=0.01, sgld_noise=0.1, data_noise=0.0, buffer_size=100, steps=12, eval_n=100,
        grid_n=40, sample_steps=2, log_every=4, ckpt_every=100, energy_reg=0.01, device="cpu")
    ebm_jem.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    ebm_jem.train(dataclasses.replace(base, steps=6, out=str(tmp_path / "split")))
    ebm_jem.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 12
    assert "buffer.x" in a["model"]
    for key in a["model"]:  # the network and the replay buffer
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = run("--quick", *TOY, "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = (out / "checkpoint.pt").read_bytes()
    # a threshold every energy exceeds: the guard trips at the next check (step 30), before any checkpoint
    diverged = run("--quick", *TOY, "--steps", "40", "--max-energy", "1e-9", "--out", str(out), "--resume")
    assert diverged.returncode == 2
    assert "warning: energies diverged by step 30" in diverged.stdout
    error = diverged.stderr.strip()
    assert error.count("\n") == 0 and error.startswith("error: energies diverged by step 30")
    assert "the last good checkpoint is" in error
    assert (out / "checkpoint.pt").read_bytes() == before  # not overwritten with the diverged state
    # from scratch: nothing was written yet, and the message says so
    fresh = run("--quick", *TOY, "--max-energy", "1e-9", "--out", str(tmp_path / "fresh"))
    assert fresh.returncode == 2 and "no checkpoint had been written yet" in fresh.stderr
    assert not (tmp_path / "fresh" / "checkpoint.pt").exists()


def test_bad_combinations_give_one_line_errors(tmp_path):
    result = run("--model", "jem", "--dataset", "two_moons", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "needs labels" in result.stderr
