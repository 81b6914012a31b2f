"""iwae.py: the IWAE bound against a linear-Gaussian model with closed-form log p(x), its gradient against
per-sample autograd, DReG against the standard estimator, the paper's schedule, and end-to-end runs."""

import json
import math

import pytest
import torch
from torch import nn

import common
import iwae
from helpers import data_dir, run_script


pytestmark = pytest.mark.usefixtures("float64_one_thread")


class LinearGaussian:
    """z ~ N(0, I_d), x | z ~ N(W z + b, s2 I_D), W with orthogonal columns so the posterior is diagonal."""

    def __init__(self, D: int = 5, d: int = 3, s2: float = 0.3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
        self.W = q[:, :d] * torch.tensor([2.0, 1.0, 0.5][:d])
        self.b = torch.randn(D, generator=g)
        self.s2, self.D, self.d = s2, D, d

    def log_px(self, x):  # p(x) = N(b, W W^T + s2 I)
        cov = self.W @ self.W.T + self.s2 * torch.eye(self.D)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def sample(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=g)
        return z @ self.W.T + self.b + math.sqrt(self.s2) * torch.randn(n, self.D, generator=g)

    def iwae(self, mu_shift: float = 0.0, logvar_shift: float = 0.0) -> iwae.IWAE:
        """An IWAE with linear networks: the true decoder, and an encoder whose mean and log-variance are the
        exact posterior's shifted by the given amounts (0, 0: q is the true posterior)."""
        model = iwae.IWAE((self.D,), "gaussian", sizes=[(8, self.d)])
        var = 1 / (1 + (self.W**2).sum(0) / self.s2)  # posterior Sigma = (I + W^T W / s2)^-1, diagonal here
        A = self.W / self.s2 * var  # posterior mean = (x - b) @ A
        model.q[0] = nn.Sequential(nn.Linear(self.D, 2 * self.d))
        model.p[0] = nn.Sequential(nn.Linear(self.d, 2 * self.D))
        with torch.no_grad():
            model.q[0][0].weight.copy_(torch.cat([A.T, torch.zeros(self.d, self.D)]))
            model.q[0][0].bias.copy_(torch.cat([-self.b @ A + mu_shift, var.log() + logvar_shift]))
            model.p[0][0].weight.copy_(torch.cat([self.W, torch.zeros(self.D, self.d)]))
            model.p[0][0].bias.copy_(torch.cat([self.b, torch.full((self.D,), math.log(self.s2))]))
        return model


def tiny(layers: int, seed: int = 0) -> iwae.IWAE:
    torch.manual_seed(seed)
    sizes = [(6, 3)] if layers == 1 else [(6, 3), (5, 2)]
    return iwae.IWAE((4,), "gaussian", sizes=sizes)


# ---------------------------------------------------------------------------------------------- the bound
def test_k1_bound_is_the_elbo_of_the_same_sample():
    model = tiny(1)
    x = torch.randn(7, 4)
    torch.manual_seed(3)
    _, metrics = model(x, k=1, objective="iwae")
    torch.manual_seed(3)
    log_w, (h,) = model.log_weights(x, 1)
    # the ELBO of that sample, written out independently: log p(x|h) + log N(h; 0, I) - log q(h|x)
    mu, logvar = model.q[0](x).chunk(2, -1)
    mean, logvar_x = model.p[0](h[0]).chunk(2, -1)
    normal = torch.distributions.Normal
    elbo = (normal(mean, (0.5 * logvar_x).exp()).log_prob(x).sum(-1) + normal(0.0, 1.0).log_prob(h[0]).sum(-1)
            - normal(mu, (0.5 * logvar).exp()).log_prob(h[0]).sum(-1))
    assert torch.allclose(log_w[0], elbo, atol=1e-12)
    assert metrics["niwae"].item() == metrics["nelbo"].item() == pytest.approx(-elbo.mean().item(), abs=1e-12)


def test_expected_bound_rises_with_k_below_and_towards_log_px():
    lg = LinearGaussian()
    model = lg.iwae(mu_shift=0.5, logvar_shift=0.7)  # a poor encoder: the ELBO is well below log p(x)
    x = lg.sample(4)
    log_px = lg.log_px(x)
    torch.manual_seed(0)
    bounds, errors = [], []
    for k, reps in ((1, 4000), (4, 4000), (16, 2000), (64, 1000)):
        log_w, _ = model.log_weights(x.repeat(reps, 1), k)  # (k, reps * 4): independent estimates
        estimates = (torch.logsumexp(log_w, 0) - math.log(k)).view(reps, 4)
        bounds.append(estimates.mean(0))
        errors.append(estimates.std(0) / math.sqrt(reps))
    for (lower, e1), (higher, e2) in zip(zip(bounds, errors), zip(bounds[1:], errors[1:])):
        assert (higher - lower > 3 * (e1 + e2)).all()  # L_1 < L_4 < L_16 < L_64, beyond Monte Carlo error
    assert (bounds[-1] < log_px + 3 * errors[-1]).all()  # still a lower bound
    assert ((log_px - bounds[-1]) < 0.1 * (log_px - bounds[0])).all()  # and most of the gap is closed


def test_evaluation_is_exact_when_q_is_the_true_posterior():
    lg = LinearGaussian()
    model = lg.iwae()
    x = lg.sample(30)
    old, iwae.ROWS_PER_CHUNK = iwae.ROWS_PER_CHUNK, 64  # several chunks of images and of samples
    try:
        metrics = iwae.evaluate(model, x, k=150, batch_size=20)
    finally:
        iwae.ROWS_PER_CHUNK = old
    # every weight p(x, h) / q(h|x) equals p(x): the estimate and the mean log-weight are exact
    assert metrics["log_px"] == pytest.approx(lg.log_px(x).mean().item(), abs=1e-9)
    assert metrics["elbo"] == pytest.approx(metrics["log_px"], abs=1e-9)
    assert metrics["active_units"] == lg.d


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("layers", [1, 2])
def test_iwae_gradient_is_the_normalized_weighted_average_of_per_sample_gradients(layers):
    model = tiny(layers)
    x = torch.randn(1, 4)
    k = 6
    params = list(model.parameters())
    torch.manual_seed(5)
    loss, _ = model(x, k=k, objective="iwae")
    bound_grad = torch.autograd.grad(-loss, params)
    torch.manual_seed(5)  # the same samples again
    log_w, _ = model.log_weights(x, k)  # (k, 1)
    w_tilde = torch.softmax(log_w.detach()[:, 0], 0)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(k):  # Burda et al. 2016, Sec. 3: sum_i w~_i grad log w_i, each by its own autograd call
        per_sample = torch.autograd.grad(log_w[i, 0], params, retain_graph=True, allow_unused=True)
        for e, g in zip(expected, per_sample):
            e += w_tilde[i] * (0 if g is None else g)
    for got, want in zip(bound_grad, expected):
        assert torch.allclose(got, want, atol=1e-12)
    assert max(w_tilde) < 0.99  # the weights are not degenerate, so the check mixes several samples


def encoder_decoder_grads(model: iwae.IWAE, x, k, dreg, seed, hooks=True):
    torch.manual_seed(seed)
    if hooks:
        loss, _ = model(x, k=k, objective="iwae", dreg=dreg)
    else:  # path term with weights w~ instead of w~^2: a biased estimator, to show the test can tell
        log_w, _ = model.log_weights(x, k, dreg=True)
        loss = -(torch.softmax(log_w.detach(), 0) * log_w).sum(0).mean()
    enc = torch.autograd.grad(loss, list(model.q.parameters()), retain_graph=True)
    dec = torch.autograd.grad(loss, list(model.p.parameters()))
    return torch.cat([g.flatten() for g in enc]), torch.cat([g.flatten() for g in dec])


def test_dreg_decoder_gradient_is_the_iwae_one_and_encoder_gradients_agree_in_expectation():
    model = tiny(2)
    x = torch.randn(1, 4).repeat(200, 1)  # 200 independent replicas of one example per call
    k, diffs, wrong = 8, [], []
    for seed in range(40):
        enc_iwae, dec_iwae = encoder_decoder_grads(model, x, k, dreg=False, seed=seed)
        enc_dreg, dec_dreg = encoder_decoder_grads(model, x, k, dreg=True, seed=seed)
        enc_path, _ = encoder_decoder_grads(model, x, k, dreg=True, seed=seed, hooks=False)
        # same samples: the decoder gradient is identical, estimator by estimator
        assert torch.allclose(dec_iwae, dec_dreg, atol=1e-12)
        diffs.append(enc_iwae - enc_dreg)  # paired: the same samples under both estimators
        wrong.append(enc_iwae - enc_path)
    diffs, wrong = torch.stack(diffs), torch.stack(wrong)
    se = diffs.std(0) / math.sqrt(len(diffs))
    assert (diffs.mean(0).abs() < 5 * se + 1e-10).all()  # E[DReG] = E[IWAE] for the encoder
    se_wrong = wrong.std(0) / math.sqrt(len(wrong))
    assert (wrong.mean(0).abs() > 6 * se_wrong).any()  # while dropping one w~ factor is detectably biased


# ------------------------------------------------------------------------------------------- schedule, shapes
def test_paper_schedule_runs_3_to_the_i_epochs_at_each_learning_rate():
    assert iwae.PAPER_EPOCHS == 3280
    rates = [iwae.paper_lr(epoch) for epoch in range(iwae.PAPER_EPOCHS)]
    for i in range(8):
        assert rates.count(pytest.approx(1e-3 * 10 ** (-i / 7))) == 3**i
    assert rates == sorted(rates, reverse=True)
    assert iwae.paper_lr(10**6) == pytest.approx(1e-4)


def test_every_schedule_gives_the_learning_rate_it_names():
    steps_per_epoch, total = 10, 200
    lr = lambda schedule, step: iwae.learning_rate(iwae.Args(schedule=schedule, lr=3e-3), step,  # noqa: E731
                                                   total, steps_per_epoch)
    assert [lr("constant", step) for step in (0, 77, total - 1)] == [3e-3] * 3
    assert [lr("paper", step) for step in (0, 15, 45, 135)] == [iwae.paper_lr(e) for e in (0, 1, 4, 13)]
    cosine = [lr("cosine", step) for step in range(total)]
    assert cosine[0] == pytest.approx(3e-3) and cosine[total // 2] == pytest.approx(1.5e-3)
    assert cosine[total // 4] == pytest.approx(3e-3 * (1 + math.sqrt(0.5)) / 2)
    assert 0 < cosine[-1] < 1e-6 and all(a > b for a, b in zip(cosine, cosine[1:]))


def test_periodic_evaluations_report_the_importance_sampled_nll_when_asked(tmp_path):
    torch.set_default_dtype(torch.float32)  # as trained; the fixture restores the default afterwards
    for every_k in (0, 7):
        args = iwae.Args(dataset="8gaussians", schedule="cosine", steps=30, batch_size=50, eval_every=10,
                         eval_every_k=every_k, eval_k=20, eval_n=100, log_every=10, ckpt_every=100,
                         device="cpu", out=str(tmp_path / f"run{every_k}"))
        final = iwae.train(args)
        lines = [json.loads(line) for line in (tmp_path / f"run{every_k}" / "metrics.jsonl").open()]
        tests = [line for line in lines if line["split"] == "test"]
        assert [line["step"] for line in tests] == [10, 20, 30]
        assert [("nll_nats" in line) for line in tests[:2]] == [bool(every_k)] * 2
        assert tests[-1]["nll_nats"] == pytest.approx(final["nll_nats"])
        for line in tests[:2] if every_k else ():
            assert line["nll_nats"] <= line["nelbo_nats"] + 1e-6


def test_the_papers_architectures_have_the_right_sizes():
    one, two = iwae.IWAE((1, 28, 28), "bernoulli", 1), iwae.IWAE((1, 28, 28), "bernoulli", 2)
    mlp = lambda *s: sum(a * b + b for a, b in zip(s[:-1], s[1:]))  # noqa: E731
    assert sum(p.numel() for p in one.parameters()) == mlp(784, 200, 200, 100) + mlp(50, 200, 200, 784)
    assert sum(p.numel() for p in two.parameters()) == (mlp(784, 200, 200, 200) + mlp(100, 100, 100, 100)
                                                         + mlp(100, 200, 200, 784) + mlp(50, 100, 100, 200))
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3))
    log_w, hs = two.log_weights(x, 7)
    assert log_w.shape == (7, 3) and [h.shape for h in hs] == [(7, 3, 100), (7, 3, 50)]
    assert iwae.sample(two, 5).shape == (5, 1, 28, 28)
    assert any(isinstance(m, nn.Tanh) for m in two.modules())


# ---------------------------------------------------------------------------------------------- end to end
def run_iwae(*flags, timeout=300):
    return run_script("iwae.py", *flags, timeout=timeout)


def test_help_lists_options_with_defaults():
    result = run_iwae("--help")
    assert result.returncode == 0 and "--dreg" in result.stdout and "(default: 5000)" in result.stdout


@pytest.mark.skipif(data_dir() is None, reason="MNIST files not found under $DATA_DIR or ./data")
def test_quick_writes_samples_metrics_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    result = run_iwae("--quick", "--steps", "20", "--eval-n", "50", "--eval-k", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval test nll_nats=") and last.endswith("(iwae k=20)")
    for name in ("samples.png", "recon.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 20
    resumed = run_iwae("--quick", "--steps", "30", "--eval-n", "50", "--eval-k", "20", "--out", str(out),
                       "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 30


@pytest.mark.skipif(data_dir() is None, reason="MNIST files not found under $DATA_DIR or ./data")
def test_two_layers_dreg_and_the_paper_schedule_run_end_to_end(tmp_path):
    torch.set_default_dtype(torch.float32)  # as trained; the fixture restores the default afterwards
    args = iwae.Args(layers=2, k=3, dreg=True, schedule="paper", steps=10, batch_size=20, eval_n=20,
                     eval_k=10, log_every=5, ckpt_every=100, device="cpu", data_dir=data_dir(),
                     out=str(tmp_path / "run"))
    metrics = iwae.train(args)
    assert math.isfinite(metrics["nll_nats"]) and metrics["nll_nats"] <= metrics["nelbo_nats"] + 1e-6
    assert "active_units_h2" in metrics
