"""vqvae.py end to end: stage one then stage two on MNIST with --quick, resume, VQ-VAE-2 with EMA codes,
restarts and a class-conditional prior, and the one-line errors for a missing or wrong stage-one
checkpoint."""

import dataclasses
import json

import pytest
import torch
from helpers import data_dir, needs_mnist, run_script

import common
import vqvae

SMALL = ("--quick", "--steps", "30", "--eval-n", "200", "--train-n", "2000", "--batch-size", "32",
         "--samples", "16", "--prior-layers", "3")


def run_vqvae(*flags, timeout=300):
    return run_script("vqvae.py", *flags, timeout=timeout)


def last_line(result) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_help_lists_every_option_with_its_default():
    result = run_vqvae("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--stage {vqvae,prior}", "--levels {1,2}", "--ema", "--class-cond", "(default: 0.25)",
                 "(default: 0.99)", "1e-05)", "(default: 250000)"):
        assert text in result.stdout, text


@needs_mnist
def test_quick_stage_one_then_stage_two_write_samples_and_resume(tmp_path):
    out, prior_out = tmp_path / "vqvae", tmp_path / "prior"
    result = run_vqvae(*SMALL, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert last_line(result).startswith("eval test nll_bpd=") and "uniform prior" in last_line(result)
    for name in ("samples.png", "recon.png", "codebook.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rec", "vq", "mse", "perplexity", "codes_used"} <= set(records[0])  # training line
    test = records[-1]
    assert test["split"] == "test" and {"nll_bpd", "rec_bpd", "prior_bpd", "mse", "perplexity"} <= set(test)
    assert abs(test["nll_bpd"] - test["rec_bpd"] - test["prior_bpd"]) < 1e-9
    resumed = run_vqvae(*SMALL, "--steps", "40", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 40
    # the step-40 decoder stage two loads
    test = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    prior = run_vqvae(*SMALL, "--steps", "20", "--stage", "prior", "--vqvae", str(out),
                      "--out", str(prior_out))
    assert prior.returncode == 0, prior.stderr
    line = last_line(prior)
    assert (line.startswith("eval test nll_bpd=")
            and line.endswith("(bound: decoder NLL + PixelCNN prior NLL of the codes)"))
    assert (prior_out / "samples.png").stat().st_size > 0
    final = json.loads((prior_out / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(final["rec_bpd"] - test["rec_bpd"]) < 1e-6  # the same decoder on the same test images
    resumed = run_vqvae(*SMALL, "--steps", "25", "--stage", "prior", "--vqvae", str(out),
                        "--out", str(prior_out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(prior_out / "checkpoint.pt")["step"] == 25

    # stage two refuses what is not a stage-one checkpoint
    with pytest.raises(common.RunError, match="is not a stage-one checkpoint"):
        vqvae.train(dataclasses.replace(vqvae.Args(), stage="prior", vqvae=str(prior_out),
                                        out=str(tmp_path / "x")))


@needs_mnist
def test_vqvae2_with_ema_restarts_and_a_class_conditional_prior(tmp_path):
    out = tmp_path / "vqvae2"
    flags = (*SMALL, "--steps", "10", "--dataset", "binarized_mnist", "--levels", "2",
             "--ema", "--restart", "1")
    result = run_vqvae(*flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    line = last_line(result)
    assert line.startswith("eval test nll_nats=") and "perplexity_top=" in line
    assert "codes 14x14 + 7x7" in result.stdout
    prior = run_vqvae(*SMALL, "--steps", "4", "--stage", "prior", "--vqvae", str(out), "--class-cond",
                      "--prior-layers", "2", "--prior-hidden", "8", "--samples", "10", "--eval-n", "50",
                      "--out", str(tmp_path / "prior"))
    assert prior.returncode == 0, prior.stderr
    assert last_line(prior).startswith("eval test nll_nats=") and "prior_top_nats=" in last_line(prior)
    assert (tmp_path / "prior" / "samples.png").stat().st_size > 0


def test_missing_or_unreadable_stage_one_gives_one_line_errors(tmp_path):
    missing = run_vqvae("--stage", "prior", "--vqvae", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "a"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "no stage-one checkpoint" in missing.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    prior = dataclasses.replace(vqvae.Args(), stage="prior", device="cpu", out=str(tmp_path / "b"))
    with pytest.raises(common.RunError, match="cannot read checkpoint"):
        vqvae.train(dataclasses.replace(prior, vqvae=str(tmp_path / "bad.pt")))
    with pytest.raises(common.RunError, match="--stage prior needs --vqvae"):
        vqvae.train(prior)


@needs_mnist
def test_resume_is_exact_with_ema_codes_and_restarts(tmp_path):
    base = dataclasses.replace(vqvae.Args(), dataset="mnist", steps=6, hidden=8, res_blocks=1,
                               codebook_size=16, code_dim=4, batch_size=16, train_n=256, eval_n=20,
                               log_every=2, ckpt_every=100, ema=True, restart=1.0, data_dir=data_dir(),
                               device="cpu")
    vqvae.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    vqvae.train(dataclasses.replace(base, steps=3, out=str(tmp_path / "split")))
    vqvae.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert "quant_b.cluster_size" in a["model"] and "quant_b.usage" in a["model"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
