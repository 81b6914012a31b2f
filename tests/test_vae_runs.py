"""vae.py end to end: runs, resume, interrupts, other datasets, bad input, two processes."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, data_dir, needs_mnist, run_script

import common
import vae


def run_vae(*flags, timeout=300):
    return run_script("vae.py", *flags, timeout=timeout, one_thread=False)


@needs_mnist
def test_quick_writes_samples_metrics_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    result = run_vae("--quick", "--steps", "60", "--eval-n", "200", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and last.endswith("(iwae k=100)")
    for name in ("samples.png", "recon.png", "interp.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 60
    refused = run_vae("--quick", "--steps", "60", "--out", str(out))
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    resumed = run_vae("--quick", "--steps", "80", "--eval-n", "200", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 80


@needs_mnist
def test_resume_is_exact(tmp_path):
    base = dataclasses.replace(vae.Args(), steps=20, eval_n=50, eval_k=2, log_every=5, ckpt_every=100,
                               eval_every=7, data_dir=data_dir(), device="cpu")
    vae.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    vae.train(dataclasses.replace(base, steps=10, out=str(tmp_path / "split")))
    vae.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 20
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@needs_mnist
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "vae.py"), "--data-dir", data_dir(), "--quick", "--steps", "100000",
               "--log-every", "10", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "continue with --resume" in stderr
    step = common.load_checkpoint(out / "checkpoint.pt")["step"]
    assert step >= 10
    resumed = run_vae("--quick", "--steps", str(step + 10), "--eval-n", "100", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr


@needs_mnist
@pytest.mark.parametrize("flags, first_word", [
    (["--dataset", "mnist", "--arch", "conv", "--latent", "8", "--batch-size", "32"], "eval test nll_bpd="),
    (["--dataset", "8gaussians", "--hidden", "32", "--latent", "2", "--batch-size", "256"],
     "eval test nll_nats="),
    (["--kl-warmup", "20", "--free-bits", "0.1", "--aggressive"], "eval test nll_nats="),
])
def test_other_data_and_remedies_run_end_to_end(tmp_path, flags, first_word):
    result = run_vae("--quick", "--steps", "30", "--eval-n", "100", "--eval-k", "10", "--eval-every", "15",
                     "--out", str(tmp_path / "run"), *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(first_word)


def test_bad_input_gives_one_line_errors(tmp_path):
    result = run_vae("--dataset", "nope", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown dataset 'nope'" in result.stderr


@needs_mnist
def test_two_gloo_processes_end_with_identical_parameters(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "vae.py"), "--data-dir", data_dir(), "--quick", "--steps", "20", "--eval-n", "100",
               "--eval-k", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "largest parameter difference between ranks 0" in result.stdout
    assert "2 ranks" in result.stdout or "x 2" in result.stdout
