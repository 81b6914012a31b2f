"""vqvae.py: quantization (exact far from the origin), straight-through gradients, the two VQ terms, EMA
codebooks, restarts, the causal gated PixelCNN prior (exact dependencies), its normalization and sampler,
samplers in the model's dtype, the bound and the shapes."""

import itertools
import math

import pytest
import torch

import vqvae

pytestmark = pytest.mark.usefixtures("float64_one_thread")


def test_nearest_code_matches_brute_force_distances():
    torch.manual_seed(0)
    z, codebook = torch.randn(300, 5), torch.randn(17, 5)
    brute = torch.cdist(z, codebook).argmin(1)  # (N, K) distance matrix, then the smallest per row
    assert torch.equal(vqvae.nearest_code(z, codebook), brute)
    quantizer = vqvae.VectorQuantizer(17, 5).eval()
    quantizer.codebook.data.copy_(codebook)
    z_e = z.view(3, 10, 10, 5).permute(0, 3, 1, 2)  # (B, D, H, W), row (b, h, w) of z at [b, :, h, w]
    out = quantizer(z_e)
    assert torch.equal(out["index"].flatten(), brute)
    assert torch.allclose(out["z_q"].permute(0, 2, 3, 1).reshape(300, 5), codebook[brute], atol=1e-12)
    assert torch.equal(out["counts"], torch.bincount(brute, minlength=17).double())


@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("distance", [10.0, 30.0])
def test_nearest_code_is_exact_far_from_the_origin(distance, dim):
    """float32 codes and encoder outputs scattered 0.05 around a point `distance` from the origin: every
    assignment is the brute-force argmin in float64. The expansion |z|^2 - 2 z.e + |e|^2 got 2.6% (D = 2) and
    0.13% (D = 16) of them wrong at 10, 16% and 1% at 30."""
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(dim, generator=g)
    centre = distance * centre / centre.norm()
    codebook = (centre + 0.05 * torch.randn(64, dim, generator=g)).float()  # (K, D)
    z = (centre + 0.05 * torch.randn(4000, dim, generator=g)).float()  # (N, D)
    brute = ((z.double()[:, None] - codebook.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(vqvae.nearest_code(z, codebook), brute)
    quantizer = vqvae.VectorQuantizer(64, dim).float().eval()  # the training path, in float32
    quantizer.codebook.data.copy_(codebook)
    z_e = z.t().reshape(1, dim, 50, 80)  # (B, D, H, W), row (b, h, w) of z at [b, :, h, w]
    assert torch.equal(quantizer(z_e)["index"].flatten(), brute)


def test_straight_through_gradient_equals_decoder_input_gradient():
    torch.manual_seed(1)
    quantizer = vqvae.VectorQuantizer(8, 4).eval()
    quantizer.codebook.data.normal_()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    weight = torch.randn(2, 4, 3, 3)

    def decoder(z):  # any differentiable decoder
        return (weight * torch.tanh(z) + z.pow(3)).sum()

    z_q = quantizer(z_e)["z_q"]
    decoder(z_q).backward()
    z_q_leaf = quantizer.codebook[quantizer(z_e)["index"]].permute(0, 3, 1, 2).detach().requires_grad_()
    decoder(z_q_leaf).backward()  # the gradient at the decoder input, evaluated at e_k
    assert torch.allclose(z_q, z_q_leaf, atol=1e-12)
    assert torch.allclose(z_e.grad, z_q_leaf.grad, rtol=0, atol=1e-12)
    assert z_e.grad.abs().min() > 0


def test_straight_through_in_the_full_model():
    """With beta = 0 and EMA codes the loss is the decoder term alone: the encoder output gets exactly the
    gradient of the decoder input."""
    torch.manual_seed(2)
    model = vqvae.VQVAE((1, 8, 8), "8bit", hidden=8, res_blocks=1, codebook_size=6, code_dim=3, beta=0.0,
                        ema=True).eval()
    model.quant_b.codebook.normal_()
    grads = {}

    def keep(name, tensor):  # record the gradient that reaches this tensor
        tensor.register_hook(lambda g: grads.__setitem__(name, g))

    model.pre_b.register_forward_hook(lambda module, inputs, z_e: keep("z_e", z_e) and None)
    model.decoder.register_forward_pre_hook(lambda module, inputs: keep("z_q", inputs[0]) and None)
    loss, _ = model(torch.randint(0, 256, (3, 1, 8, 8)) / 255)
    loss.backward()
    assert torch.equal(grads["z_e"], grads["z_q"]) and grads["z_e"].abs().sum() > 0


def test_codebook_term_moves_only_the_codebook_and_commitment_only_the_encoder():
    torch.manual_seed(3)
    encoder = torch.nn.Conv2d(2, 3, 1)
    quantizer = vqvae.VectorQuantizer(5, 3).eval()
    quantizer.codebook.data.normal_()
    x = torch.randn(4, 2, 3, 3)
    out = quantizer(encoder(x))
    z_e = encoder(x).permute(0, 2, 3, 1).reshape(-1, 3).detach()  # (N, D)
    e = quantizer.codebook.detach()[out["index"].flatten()]  # (N, D) the assigned codes
    # values: both terms are ||z_e - e||^2 summed per example
    assert torch.allclose(out["codebook_loss"], (z_e - e).pow(2).sum(1).view(4, 9).sum(1))
    assert torch.allclose(out["commitment"], out["codebook_loss"])

    out["codebook_loss"].sum().backward(retain_graph=True)
    assert encoder.weight.grad is None and encoder.bias.grad is None  # sg[z_e]: nothing reaches the encoder
    # d/de_k sum_j ||z_j - e_k||^2 = 2 sum_{j -> k} (e_k - z_j)
    expected = torch.zeros(5, 3).index_add_(0, out["index"].flatten(), 2 * (e - z_e))
    assert torch.allclose(quantizer.codebook.grad, expected, atol=1e-12)

    quantizer.codebook.grad = None
    out["commitment"].sum().backward()
    assert quantizer.codebook.grad is None  # sg[e]: nothing reaches the codebook
    # d/dz_j ||z_j - e||^2 = 2 (z_j - e), through the 1x1 conv: dW = sum_j 2 (z_j - e) x_j^T
    g = 2 * (z_e - e)  # (N, 3)
    x_flat = x.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.allclose(encoder.weight.grad[:, :, 0, 0], g.t() @ x_flat, atol=1e-12)
    assert torch.allclose(encoder.bias.grad, g.sum(0), atol=1e-12)


def test_loss_is_equation_3():
    torch.manual_seed(4)
    x = torch.randint(0, 256, (3, 1, 8, 8)) / 255
    for ema in (False, True):
        model = vqvae.VQVAE((1, 8, 8), "8bit", hidden=8, res_blocks=1, codebook_size=6, code_dim=3, beta=0.25,
                            ema=ema).eval()
        loss, metrics = model(x)
        z_e = model.pre_b(model.enc_b(x))  # (B, D, 2, 2)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
        index = torch.cdist(flat, model.quant_b.codebook).argmin(1)
        e = model.quant_b.codebook[index]
        sq = (flat - e).pow(2).sum(1).view(3, -1).sum(1)  # ||z_e - e||^2 per example
        params = model.decoder(e.view(3, 2, 2, 3).permute(0, 3, 1, 2)).view(3, 2, 64)
        rec = -vqvae.discretized_logistic_log_prob(x.flatten(1), params)
        expected = rec + (0 if ema else sq) + 0.25 * sq
        assert torch.allclose(loss, expected.mean(), rtol=1e-10)
        assert torch.allclose(metrics["rec"], rec.mean(), rtol=1e-10)


def test_ema_update_with_decay_zero_is_the_cluster_means():
    torch.manual_seed(5)
    K, D = 6, 3
    z = torch.randn(2, D, 5, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    quantizer = vqvae.VectorQuantizer(K, D, ema=True, decay=0.0, eps=0.0)
    quantizer.codebook.copy_(flat[:K])  # every code owns at least its own point: no empty cluster
    index = quantizer(z)["index"].flatten()
    means = torch.stack([flat[index == k].mean(0) for k in range(K)])
    assert torch.allclose(quantizer.codebook, means, atol=1e-12)
    assert torch.equal(quantizer.cluster_size, torch.bincount(index, minlength=K).double())
    # with Laplace smoothing the codes move by a relative O(eps) only
    smoothed = vqvae.VectorQuantizer(K, D, ema=True, decay=0.0, eps=1e-5)
    smoothed.codebook.copy_(flat[:K])
    smoothed(z)
    assert torch.allclose(smoothed.codebook, means, rtol=1e-4, atol=0)


def test_ema_update_follows_the_moving_averages():
    torch.manual_seed(6)
    K, D, gamma, eps = 4, 2, 0.9, 1e-3
    quantizer = vqvae.VectorQuantizer(K, D, ema=True, decay=gamma, eps=eps)
    quantizer.codebook.normal_()
    quantizer.cluster_size.copy_(torch.tensor([3.0, 0.5, 2.0, 1.0]))
    quantizer.embed_sum.normal_()
    N0, m0 = quantizer.cluster_size.clone(), quantizer.embed_sum.clone()
    z = torch.randn(1, D, 3, 3)
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    index = quantizer(z)["index"].flatten()
    n = torch.tensor([(index == k).sum() for k in range(K)], dtype=torch.float64)
    s = torch.stack([flat[index == k].sum(0) for k in range(K)])
    N, m = gamma * N0 + (1 - gamma) * n, gamma * m0 + (1 - gamma) * s  # Eqs. 6 and 7
    N_smooth = (N + eps) / (N.sum() + K * eps) * N.sum()
    assert torch.allclose(quantizer.codebook, m / N_smooth[:, None], atol=1e-12)  # Eq. 8


def test_dead_codes_restart_on_encoder_outputs():
    torch.manual_seed(7)
    K, D = 8, 2
    quantizer = vqvae.VectorQuantizer(K, D, restart=1.0)
    quantizer.codebook.data.copy_(
        torch.tensor([[0.0, 0.0], [0.1, 0.0]] + [[100.0 + i, 100.0] for i in range(6)]))
    quantizer.usage.fill_(50.0)
    # these two fall below 1 once this batch (with no assignments) is averaged in
    quantizer.usage[[3, 5]] = 1.0
    before = quantizer.codebook.detach().clone()
    z = torch.randn(2, D, 4, 4) * 0.1
    quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    for k in range(K):
        if k in (3, 5):  # restarted onto an encoder output of the batch, with usage back at the threshold
            assert (quantizer.codebook[k].detach() == flat).all(1).any()  # exactly one of the batch's outputs
            assert quantizer.usage[k] == 1.0
        else:
            assert torch.equal(quantizer.codebook[k], before[k])
    quantizer.eval()  # evaluation changes nothing
    after = quantizer.codebook.detach().clone()
    quantizer(torch.randn(2, D, 4, 4))
    assert torch.equal(quantizer.codebook, after)


def test_perplexity():
    assert math.isclose(vqvae.perplexity(torch.ones(37)).item(), 37)
    assert math.isclose(vqvae.perplexity(torch.tensor([0.0, 5.0, 0.0])).item(), 1)
    p = torch.tensor([0.25, 0.75])
    assert math.isclose(vqvae.perplexity(torch.tensor([1.0, 3.0])).item(),
                        math.exp(-(p * p.log()).sum().item()))


def dependencies(fn, inputs: torch.Tensor) -> torch.Tensor:
    """(H*W, H*W) boolean: output position p depends on input position q (any channel)."""
    jac = torch.autograd.functional.jacobian(fn, inputs)  # (1, K, H, W, 1, C, H, W)
    h, w = inputs.shape[-2:]
    return (jac[0].abs().sum((0, 4)) > 0).reshape(h * w, h * w)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_gated_pixelcnn_is_causal_in_raster_order_without_blind_spot(num_classes):
    torch.manual_seed(8)
    K, H, W = 4, 5, 6
    net = vqvae.GatedPixelCNN(K, hidden=8, layers=6, num_classes=num_classes)
    y = torch.tensor([2]) if num_classes else None
    deps = dependencies(lambda u: net(u, y), torch.randn(1, K, H, W))
    earlier = torch.ones(H * W, H * W).tril(-1).bool()  # q < p in raster order
    assert torch.equal(deps, earlier)  # exactly zero at and after p, non-zero at every earlier position


def test_bottom_prior_is_causal_and_sees_top_codes_at_later_positions():
    torch.manual_seed(9)
    K = 3
    prior = vqvae.CodePrior(K, levels=2, hidden=8, layers=6)
    top = vqvae.one_hot(torch.randint(K, (1, 2, 3)), K, prior)
    cond = prior.top_to_bottom(top)
    deps = dependencies(lambda u: prior.bottom(u, None, cond), torch.randn(1, K, 4, 6))
    assert torch.equal(deps, torch.ones(24, 24).tril(-1).bool())
    jac = torch.autograd.functional.jacobian(lambda t: prior.bottom(torch.zeros(1, K, 4, 6), None,
                                                                    prior.top_to_bottom(t))[:, :, 0, 0], top)
    # the first bottom code depends on the top codes around it, also those later in raster order (the 3x3
    # window of the conditioning network): the top codes are known before any bottom code is drawn
    assert (jac.abs().sum((0, 1, 2, 3))[:, :2] > 0).all()


def all_grids(K: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(K), repeat=shape[0] * shape[1]))).view(-1, *shape)


def sharpen(prior: vqvae.CodePrior) -> None:
    """Scale the output layers so the conditionals are far from uniform."""
    for net in [prior.bottom] + ([prior.top] if prior.levels == 2 else []):
        net.out[-1].weight.data.mul_(20)


def test_prior_is_normalized_over_every_code_grid():
    torch.manual_seed(10)
    prior = vqvae.CodePrior(3, levels=1, hidden=8, layers=3, num_classes=2)
    sharpen(prior)
    grids = all_grids(3, (2, 2))  # 81
    for label in (0, 1):
        log_p = prior.log_prob([grids], torch.full((len(grids),), label))[0]
        assert abs(torch.logsumexp(log_p, 0).item()) < 1e-10
    two = vqvae.CodePrior(2, levels=2, hidden=8, layers=3)
    sharpen(two)
    bottom, top = all_grids(2, (2, 2)), all_grids(2, (1, 1))  # 16 x 2 pairs
    pairs = [bottom.repeat(2, 1, 1), top.repeat_interleave(16, 0)]
    assert abs(torch.logsumexp(sum(two.log_prob(pairs)), 0).item()) < 1e-10


@pytest.mark.parametrize("levels", [1, 2])
def test_sampler_draws_from_the_prior(levels):
    """Chi-square test of 20,000 ancestral samples against the exact probabilities of every grid."""
    torch.manual_seed(11)
    K = 3 if levels == 1 else 2
    prior = vqvae.CodePrior(K, levels, hidden=8, layers=3)
    sharpen(prior)
    shapes = [(1, 2)] if levels == 1 else [(2, 2), (1, 1)]
    grids = [all_grids(K, s) for s in shapes]
    if levels == 2:
        grids = [grids[0].repeat(K, 1, 1), grids[1].repeat_interleave(len(grids[0]), 0)]
    p = torch.exp(sum(prior.log_prob(grids)))  # (cells,)
    n = 20_000
    drawn = vqvae.sample_codes(prior, n, shapes)
    key = lambda codes: torch.cat([c.flatten(1) for c in codes], 1) @ (K ** torch.arange(sum(
        h * w for h, w in shapes))).flip(0)  # noqa: E731  a grid -> its cell number
    counts = torch.bincount(key(drawn), minlength=len(p)).double()
    order = key(grids)
    expected = torch.zeros(len(p)).index_copy_(0, order, p) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    df = len(p) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)  # about 5 standard deviations of a chi-square(df)


@pytest.mark.parametrize("levels", [1, 2])
def test_samplers_follow_the_model_dtype(levels):
    """Built in float32 (the default dtype) and converted with .double(): codes from the prior and the decoded
    pictures come out of float64 networks as float64, and encoding works on float64 images."""
    torch.set_default_dtype(torch.float32)
    model = vqvae.VQVAE((1, 8, 8), "8bit", levels, hidden=8, res_blocks=1, codebook_size=5,
                        code_dim=3).double()
    prior = vqvae.CodePrior(5, levels, hidden=8, layers=2).double()
    codes = vqvae.sample_codes(prior, 3, model.code_shapes())
    assert [tuple(c.shape) for c in codes] == [(3, *s) for s in model.code_shapes()]
    images = vqvae.sample(model, codes)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float64
    assert [c.shape for c in vqvae.encode(model, images)] == [c.shape for c in codes]


def test_discretized_logistic_sums_to_one_over_the_256_values():
    torch.manual_seed(12)
    params = torch.randn(1, 2, 5) * torch.tensor([[1.0], [2.0]])
    x = (torch.arange(256) / 255.0)[:, None].expand(256, 5)
    log_p = torch.stack([vqvae.discretized_logistic_log_prob(x[:, d : d + 1], params[..., d : d + 1])
                         for d in range(5)], 1)
    assert torch.allclose(torch.logsumexp(log_p, 0), torch.zeros(5), atol=1e-10)


@pytest.mark.parametrize("shape, levels, down, code_shapes", [
    ((3, 32, 32), 1, 0, [(8, 8)]),
    ((3, 32, 32), 2, 0, [(8, 8), (4, 4)]),
    ((1, 28, 28), 1, 0, [(7, 7)]),
    ((1, 28, 28), 2, 0, [(14, 14), (7, 7)]),
    ((1, 28, 28), 1, 2, [(14, 14)]),
])
def test_shapes_and_the_uniform_prior_bound(shape, levels, down, code_shapes):
    torch.manual_seed(13)
    model = vqvae.VQVAE(shape, "8bit", levels, hidden=8, res_blocks=1, down=down, codebook_size=5, code_dim=3)
    assert model.code_shapes() == code_shapes
    quantized = model.quantize(torch.rand(2, *shape))
    assert [tuple(q["index"].shape[1:]) for q in quantized] == code_shapes
    assert model.decode([q["z_q"] for q in quantized]).shape == (2, 2, math.prod(shape))
    codes = [torch.randint(5, (2, *s)) for s in code_shapes]
    assert vqvae.sample(model, codes).shape == (2, *shape)
    assert math.isclose(vqvae.uniform_prior_nll(model), sum(h * w for h, w in code_shapes) * math.log(5))


def test_paper_configuration_parameter_count():
    """The paper's CIFAR-10 autoencoder: 256 channels, two residual blocks, K = 512, D = 64."""
    model = vqvae.VQVAE((3, 32, 32), "8bit")
    # counted by hand: encoder 2,449,088, decoder 1,996,166, codebook 32,768
    assert sum(p.numel() for p in model.parameters()) == 4_478_022
    assert model.quant_b.codebook.shape == (512, 64)
    with pytest.raises(ValueError, match="does not divide"):
        vqvae.VQVAE((1, 28, 28), "8bit", levels=2, down=4)


def test_index_and_one_hot_inputs_agree_and_rows_below_do_not_matter():
    """The sampler feeds indices and crops the grid below the current row: both give the same logits."""
    torch.manual_seed(14)
    K = 5
    net = vqvae.GatedPixelCNN(K, hidden=8, layers=3, num_classes=2, cond_channels=3)
    codes, y, cond = torch.randint(K, (2, 4, 5)), torch.tensor([0, 1]), torch.randn(2, 3, 4, 5)
    full = net(codes, y, cond)
    assert torch.allclose(full, net(vqvae.one_hot(codes, K, net), y, cond), atol=1e-12)
    for i in range(4):
        assert torch.allclose(net(codes[:, : i + 1], y, cond[:, :, : i + 1]), full[:, :, : i + 1], atol=1e-12)
