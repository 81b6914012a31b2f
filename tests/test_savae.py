"""savae.py: refinement raises the ELBO, K = 0 is the VAE, the encoder's gradient through the unrolled SVI
steps against finite differences, the autoregressive decoder's masks and normalization, the importance-sampled
log p(x) against numerical integration, and end-to-end runs of the three modes."""

import math

import pytest
import torch
from helpers import data_dir, needs_mnist, run_script

import common
import savae

SVI = dict(svi_lr=1.0, momentum=0.5, max_norm=5.0)  # the paper's SVI settings, as forward() takes them


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def tiny(decoder: str = "made", latent: int = 3, seed: int = 0) -> savae.SAVAE:
    torch.manual_seed(seed)
    return savae.SAVAE((1, 4, 4), decoder, hidden=24, latent=latent)


def binary(n: int, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(seed))


def elbo_estimate(model, x, mu, logvar, samples=20_000):
    """ELBO per example by many samples, and its standard error."""
    z = savae.reparameterize(mu, logvar, samples=samples)  # (S, B, d)
    rec = model.decoder(x, z)  # (S, B)
    kl = savae.gaussian_kl(mu, logvar).sum(1)
    return rec.mean(0) - kl, rec.std(0) / math.sqrt(samples)


# ---------------------------------------------------------------------------------------------- refinement
@pytest.mark.parametrize("decoder", ["made", "mlp"])
def test_refinement_steps_increase_the_elbo(decoder):
    model = tiny(decoder)
    x = binary(6)
    torch.manual_seed(2)
    with torch.no_grad():
        mu0, logvar0 = model.encode(x)
    mu0, logvar0 = mu0 + 1.5, logvar0 - 1.0  # a poor proposal, as from an untrained encoder
    start, start_se = elbo_estimate(model, x, mu0, logvar0)
    mean_gains = []
    for steps in (1, 5, 30):
        mu, logvar, elbos = model.refined(x, mu0, logvar0, steps, 0.3, 0.5, 5.0)
        with torch.no_grad():
            refined, se = elbo_estimate(model, x, mu.detach(), logvar.detach())
        assert (refined > start + 4 * (se + start_se)).all()  # every example gains, beyond Monte Carlo error
        mean_gains.append((refined - start).mean().item())
        assert len(elbos) == steps
    assert mean_gains[0] < mean_gains[1] < mean_gains[2]  # and more steps gain more


def test_clipping_bounds_each_examples_step():
    model = tiny()
    x = binary(5)
    with torch.no_grad():
        mu0, logvar0 = model.encode(x)
    # one step: lambda_1 - lambda_0 = lr * g
    mu, logvar, _ = model.refined(x, mu0, logvar0, 1, 1.0, 0.5, 0.01)
    step = torch.cat([mu - mu0, logvar - logvar0], 1).norm(dim=1)
    assert torch.allclose(step, torch.full_like(step, 0.01), atol=1e-12)


def test_with_k0_savae_is_exactly_the_vae():
    model = tiny()
    x = binary(8)
    results = []
    for mode in ("vae", "savae"):
        torch.manual_seed(3)
        loss, metrics = model(x, mode, svi_steps=0, **SVI)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, grads))
    (loss_vae, g_vae), (loss_sa, g_sa) = results
    assert loss_vae.item() == loss_sa.item()
    assert all(torch.equal(a, b) for a, b in zip(g_vae, g_sa))
    torch.manual_seed(3)  # and the VAE loss is -ELBO written out: -(log p(x|z) - KL), z = mu + sigma eps
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    logits = model.decoder.logits(x, z)
    rec = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                           torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert loss_vae.item() == pytest.approx(-(rec - kl).mean().item(), abs=1e-10)


@pytest.mark.parametrize("max_norm", [5.0, 0.5])  # clipping inactive, and active on some steps
def test_encoder_gradient_through_the_unrolled_steps_matches_finite_differences(max_norm):
    model = tiny()
    x = binary(4)
    encoder = list(model.encoder.parameters())

    def loss_at(shift: float, direction) -> torch.Tensor:
        with torch.no_grad():
            for p, v in zip(encoder, direction):
                p.add_(shift * v)
        torch.manual_seed(7)  # the same noise in every evaluation
        loss, _ = model(x, "savae", svi_steps=4, svi_lr=0.5, momentum=0.5, max_norm=max_norm)
        with torch.no_grad():
            for p, v in zip(encoder, direction):
                p.sub_(shift * v)
        return loss

    torch.manual_seed(7)
    loss, _ = model(x, "savae", svi_steps=4, svi_lr=0.5, momentum=0.5, max_norm=max_norm)
    grads = torch.autograd.grad(loss, encoder)
    assert sum(g.abs().sum() for g in grads) > 1e-3  # the encoder is reached only through the steps
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g) for p in encoder]
        eps = 1e-6
        numeric = (loss_at(eps, direction) - loss_at(-eps, direction)) / (2 * eps)
        analytic = sum((a * v).sum() for a, v in zip(grads, direction))
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-7)


def test_svi_mode_leaves_the_encoder_without_gradient_and_starts_at_the_prior():
    model = tiny()
    x = binary(4)
    loss, metrics = model(x, "svi", svi_steps=3, **SVI)
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    mu0, logvar0 = model.start(x, "svi")
    assert not mu0.any() and not logvar0.any()


# ---------------------------------------------------------------------------------------------- decoder
def test_made_decoder_is_autoregressive_and_normalized():
    model = tiny()
    z = torch.randn(3)
    jac = torch.autograd.functional.jacobian(lambda x: model.decoder.logits(x, z), torch.rand(16))  # (16, 16)
    assert (jac.triu() == 0).all()  # logit i depends on x_j only for j < i
    assert (jac.tril(-1) != 0).sum() > 60  # and on most of them
    small = savae.SAVAE((3,), "made", hidden=8, latent=2)
    every_x = torch.tensor([[(n >> i) & 1 for i in range(3)] for n in range(8)], dtype=torch.float64)
    log_p = small.decoder(every_x, torch.randn(2).expand(8, 2))  # the same z for all 8 images
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-12)


def test_sampler_draws_from_the_decoder():
    torch.manual_seed(0)
    small = savae.SAVAE((3,), "made", hidden=8, latent=2)
    for p in small.decoder.parameters():
        torch.nn.init.normal_(p, std=1.0)
    z = torch.randn(2)
    every_x = torch.tensor([[(n >> i) & 1 for i in range(3)] for n in range(8)], dtype=torch.float64)
    probs = small.decoder(every_x, z.expand(8, 2)).exp()
    draws = savae.sample(small, 40_000, z=z.expand(40_000, 2))  # (N, 3)
    counts = torch.bincount((draws * torch.tensor([1.0, 2.0, 4.0])).sum(1).long(), minlength=8).double()
    se = (probs * (1 - probs) / 40_000).sqrt()
    assert ((counts / 40_000 - probs).abs() < 5 * se + 1e-9).all()


# ---------------------------------------------------------------------------------------------- likelihood
def test_importance_sampled_log_px_matches_numerical_integration():
    model = tiny("mlp", latent=1)
    x = binary(3)
    # log p(x) = log int p(x|z) N(z; 0, 1) dz by the trapezoid rule on a fine grid
    z = torch.linspace(-12, 12, 24_001)[:, None, None]  # (G, 1, 1): broadcast over the 3 images
    with torch.no_grad():
        # (G, 3)
        log_joint = model.decoder(x, z.expand(-1, 3, 1)) + savae.log_normal_logvar(z.expand(-1, 3, 1))
    exact = torch.logsumexp(log_joint, 0) + math.log(z[1, 0, 0] - z[0, 0, 0])
    with torch.no_grad():
        mu, logvar = model.encode(x)
    mu, logvar, _ = model.refined(x, mu, logvar, 20, 1.0, 0.5, 5.0)
    torch.manual_seed(0)
    with torch.no_grad():
        estimate = savae.importance_weighted_log_px(model, x, mu.detach(), logvar.detach(),
                                                    k=20_000, chunk=5000)
    assert torch.allclose(estimate, exact, atol=0.01)
    with torch.no_grad():  # and the ELBO under the same q is below it
        elbo, se = elbo_estimate(model, x, mu.detach(), logvar.detach())
    assert (elbo < exact + 3 * se).all()


def test_evaluate_reports_the_refined_and_the_starting_elbo():
    model = tiny()
    x = binary(40).view(40, 1, 4, 4)
    args = savae.Args(svi_steps=10, svi_lr=0.3)
    metrics = savae.evaluate(model, x, args, k=50, batch_size=16)
    assert metrics["elbo"] > metrics["elbo_start"]  # the refined q is better than the encoder's proposal
    assert metrics["log_px"] > metrics["elbo"]
    assert 0 <= metrics["active_units"] <= 3
    report = savae.report(metrics, args)
    assert report["refine_gain"] == pytest.approx(metrics["elbo"] - metrics["elbo_start"])


# ---------------------------------------------------------------------------------------------- end to end
def run_savae(*flags, timeout=300):
    return run_script("savae.py", *flags, timeout=timeout)


def test_help_lists_options_with_defaults():
    result = run_savae("--help")
    assert result.returncode == 0 and "--svi-steps" in result.stdout and "(default: 20)" in result.stdout


@needs_mnist
def test_quick_writes_samples_metrics_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    flags = ["--quick", "--svi-steps", "2", "--hidden", "64", "--eval-n", "20", "--eval-k", "10",
             "--out", str(out)]
    result = run_savae(*flags, "--steps", "6")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and last.endswith("(savae, K=2, iwae k=10)")
    for name in ("samples.png", "recon.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 6
    resumed = run_savae(*flags, "--steps", "9", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 9


@needs_mnist
@pytest.mark.parametrize("mode, decoder", [("vae", "made"), ("svi", "mlp")])
def test_other_modes_run_end_to_end(tmp_path, mode, decoder):
    torch.set_default_dtype(torch.float32)  # as trained; the fixture restores the default afterwards
    args = savae.Args(mode=mode, decoder=decoder, hidden=32, latent=4, svi_steps=2, steps=4, batch_size=20,
                      eval_n=20, eval_k=8, log_every=2, ckpt_every=100, device="cpu", data_dir=data_dir(),
                      out=str(tmp_path / "run"))
    metrics = savae.train(args)
    assert math.isfinite(metrics["nll_nats"]) and metrics["kl"] >= 0
