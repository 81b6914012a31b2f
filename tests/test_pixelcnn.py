"""pixelcnn.py: causality of all three networks (exact zeros in the Jacobian, RGB channel order included),
their receptive fields against a reachability computation (PixelCNN's blind spot, the Row LSTM's triangle, the
Diagonal BiLSTM's full context), exact likelihoods (uniform output, probabilities summing to one), the sampler
against the model's joint distribution (chi-square), and end-to-end runs."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import common
import pixelcnn
from helpers import data_dir, needs_mnist, run_script

ARCHS = ("pixelcnn", "rowlstm", "diagbilstm", "wavenet")
GRID_ARCHS = ARCHS[:3]  # the 2D networks; the 1D causal one has its own receptive-field test


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def make(arch: str, colors: int = 1, levels: int = 2, layers: int = 2, hidden: int = 6, out_hidden: int = 12,
         seed: int = 0, scale: float = 0.5) -> pixelcnn.PixelModel:
    """A float64 model with every parameter random (biases too), so no dependence vanishes by accident."""
    torch.manual_seed(seed)
    model = pixelcnn.build_network(arch, colors, levels, layers, hidden, out_hidden).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model


def input_jacobian(model: pixelcnn.PixelModel, shape: tuple[int, int, int], batch: int = 6) -> torch.Tensor:
    """|d (random mix of the logits at each (c, i, j)) / d x| summed over a batch: (C, H, W, C, H, W)."""
    torch.manual_seed(1)
    x = torch.rand(batch, *shape)
    mix = torch.randn(model.levels)  # a random combination is zero only if every logit's gradient is

    def outputs(x):  # logits of each example depend on that example only: summing keeps them apart
        return torch.einsum("bckhw,k->chw", model(x), mix)

    jac = jacobian(outputs, x)  # (C, H, W, B, C, H, W)
    return jac.abs().sum(3)


def raster_order(shape: tuple[int, int, int]) -> torch.Tensor:
    """Position of sub-pixel (c, i, j) in the autoregressive order: pixels in raster order, R, G, B inside."""
    colors, rows, width = shape
    c, i, j = torch.meshgrid(torch.arange(colors), torch.arange(rows), torch.arange(width), indexing="ij")
    return (i * width + j) * colors + c


# ---------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("colors, levels", [(1, 2), (3, 4)])
def test_logits_never_depend_on_the_current_or_later_sub_pixels(arch, colors, levels):
    shape = (colors, 4, 5)
    model = make(arch, colors, levels, hidden=6 * colors, out_hidden=12 * colors)  # 6 LSTM units per colour
    jac = input_jacobian(model, shape).flatten(0, 2).flatten(1)  # (out, in)
    order = raster_order(shape).flatten()
    later_or_same = order[None, :] >= order[:, None]  # [out, in]
    assert (jac[later_or_same] == 0).all()  # exactly zero, not merely small
    # and the model is not trivially causal: the left neighbour and, in colour, earlier channels of the same
    # pixel do matter
    c, i, j = (t.flatten() for t in torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij"))
    for out in range(len(order)):
        if j[out] > 0:
            # same channel, the pixel to the left (rows of jac are flattened c, i, j)
            assert jac[out, out - 1] > 0
    if colors == 3:
        index = torch.arange(len(order)).view(shape)
        assert (jac[index[1].flatten(), index[0].flatten()] > 0).all()  # G sees R of its own pixel
        assert (jac[index[2].flatten(), index[1].flatten()] > 0).all()  # B sees G
        assert (jac[index[2].flatten(), index[0].flatten()] > 0).all()  # B sees R


# ------------------------------------------------------------------------------------------- receptive fields
def dilate(mask: np.ndarray, offsets) -> np.ndarray:
    """{p + o : p in mask, o in offsets}, clipped to the image (zero padding carries no input)."""
    rows, width = mask.shape
    out = np.zeros_like(mask)
    for dr, dc in offsets:
        src = mask[max(0, -dr) : rows - max(0, dr), max(0, -dc) : width - max(0, dc)]
        out[max(0, dr) : rows - max(0, -dr), max(0, dc) : width - max(0, -dc)] |= src
    return out


def closure(mask: np.ndarray, offsets) -> np.ndarray:
    """Everything reachable by repeated steps (an LSTM state's chain of earlier states)."""
    while True:
        grown = mask | dilate(mask, offsets)
        if (grown == mask).all():
            return mask
        mask = grown


MASK_A_7x7 = [(r, c) for r in range(-3, 1) for c in range(-3, 4) if r < 0 or c < 0]
MASK_B_3x3 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0)]


def expected_receptive_field(arch: str, layers: int, p: tuple[int, int], rows: int, width: int) -> np.ndarray:
    """Pixels whose values can reach the logits at p, by following each layer's connections backwards."""
    s = np.zeros((rows, width), bool)
    s[p] = True  # the 1x1 output convolutions stay at p
    for _ in range(layers):
        if arch == "pixelcnn":  # residual block: the 3x3 mask B (the 1x1s and the skip stay in place)
            s = dilate(s, MASK_B_3x3)
        elif arch == "rowlstm":  # states above-left/above/above-right,
                                 # each reading its input at (0, -1), (0, 0)
            s = s | dilate(closure(s, [(-1, -1), (-1, 0), (-1, 1)]), [(0, -1), (0, 0)])
        else:  # left-to-right: states above and left; right-to-left, one row up: states above and right
            s = s | closure(s, [(-1, 0), (0, -1)]) | closure(dilate(s, [(-1, 0)]), [(-1, 0), (0, 1)])
    return dilate(s, MASK_A_7x7)  # the first layer: mask A, the pixel itself excluded


@pytest.mark.parametrize("arch", GRID_ARCHS)
def test_receptive_fields_match_the_architecture(arch):
    rows, width, layers = 6, 11, 2
    jac = input_jacobian(make(arch, layers=layers), (1, rows, width))[0, :, :, 0]  # (H, W, H, W)
    earlier = raster_order((1, rows, width))[0].numpy()
    for p in itertools.product(range(rows), range(width)):
        depends = jac[p].numpy() > 0
        assert (depends == expected_receptive_field(arch, layers, p, rows, width)).all(), p
        if arch == "diagbilstm":
            # Sec. 3.2 claims the whole available context. It holds but for one pixel: the first layer's mask
            # A keeps x_(i-1, W-1) out of every feature of row i - 1, the shifted right-to-left pass reads
            # only row i - 1, so only the 7x7 window (3 columns) carries that pixel to row i.
            unseen = (earlier < earlier[p]) & ~depends
            i, j = p
            assert unseen.sum() == (i >= 1 and j < width - 4), p
            assert i == 0 or j >= width - 4 or unseen[i - 1, width - 1], p
    last = jac[rows - 1, width - 1].numpy() > 0
    if arch == "diagbilstm":
        assert last.sum() == rows * width - 1  # the last pixel depends on every earlier pixel
    if arch == "pixelcnn":
        # Sec. 3.4 (and van den Oord et al. 2016b, Fig. 1): a blind spot to the upper right. The logits at
        # (5, 3) cannot see (4, 7) although it comes earlier: along a row, masked convolutions
        # reach only left.
        assert earlier[4, 7] < earlier[5, 3] and jac[5, 3][4, 7] == 0
    if arch == "rowlstm":
        # Sec. 3.1: a triangle above the pixel; the far end of the row above lies outside it
        assert jac[5, 3][4, 10] == 0 and jac[5, 3][0, 10] > 0


# ---------------------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("colors, levels", [(1, 2), (3, 256)])
def test_uniform_output_has_nll_d_log_levels(arch, colors, levels):
    model = make(arch, colors, levels)
    with torch.no_grad():
        model.out2.weight.zero_()
        model.out2.bias.zero_()
    x = torch.randint(0, levels, (4, colors, 5, 6)) / (levels - 1)
    nll = pixelcnn.nll(model(x), x)
    assert torch.allclose(nll, torch.full((4,), colors * 5 * 6 * math.log(levels)), rtol=0, atol=1e-10)
    loss, metrics = pixelcnn.loss(model(x), x)
    assert loss.item() == pytest.approx(colors * 30 * math.log(levels), abs=1e-10)


def all_images(shape: tuple[int, int, int], levels: int) -> torch.Tensor:
    """Every image of the given shape, (levels^D, C, H, W)."""
    values = torch.tensor(list(itertools.product(range(levels), repeat=math.prod(shape))),
                          dtype=torch.float64)
    return (values / (levels - 1)).view(-1, *shape)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape, levels", [((1, 2, 2), 2), ((3, 1, 2), 2), ((1, 3, 2), 3)])
def test_probabilities_of_all_images_sum_to_one(arch, shape, levels):
    model = make(arch, shape[0], levels, scale=1.0)
    x = all_images(shape, levels)
    log_p = -pixelcnn.nll(model(x), x)
    assert torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-12)
    assert log_p.exp().max() > 2 / len(x)  # far from uniform, so the check is not trivial


def test_evaluate_is_the_mean_nll_over_batches():
    model = make("rowlstm", 1, 2)
    x = torch.bernoulli(torch.full((7, 1, 4, 4), 0.4))
    expected = pixelcnn.nll(model(x), x).mean().item()
    assert pixelcnn.evaluate(model, x, batch_size=3) == pytest.approx(expected, abs=1e-12)
    data = common.Data("mnist", "8bit", x, None, x, None)
    assert pixelcnn.report(expected, data)["nll_bpd"] == pytest.approx(expected / (16 * math.log(2)))


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("arch", ARCHS)
def test_cropped_rows_give_the_same_logits(arch):
    """The sampler runs the network on rows [top, i] only; row i's logits must not change."""
    model = make(arch, 3, 4, layers=2)
    x = torch.randint(0, 4, (2, 3, 9, 5)) / 3
    full = model(x)
    for i in range(9):
        top = 0 if model.context_rows is None else max(0, i - model.context_rows)
        assert torch.allclose(model(x[:, :, top : i + 1])[:, :, :, -1], full[:, :, :, i], rtol=0, atol=1e-12)


def chi_square_limit(df: int, z: float = 3.29) -> float:
    """Upper 0.9995 quantile of chi-square(df), Wilson-Hilferty approximation (accurate to ~1% here)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape, levels", [((1, 2, 2), 2), ((3, 1, 2), 2)])
def test_sample_frequencies_match_the_joint_probabilities(arch, shape, levels):
    model = make(arch, shape[0], levels, scale=0.4)
    images = all_images(shape, levels)
    with torch.no_grad():
        p = (-pixelcnn.nll(model(images), images)).exp()  # (levels^D,)
    n = 10_000
    torch.manual_seed(2)
    draws = pixelcnn.sample(model, n, shape)
    digits = pixelcnn.to_levels(draws, levels).flatten(1)  # (n, D): the image's index in base `levels`
    index = (digits * levels ** torch.arange(digits.shape[1] - 1, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=len(images)).double()
    expected = n * p
    assert p.max() > 2 * p.min()  # far from uniform
    # the chi-square approximation needs >= 5 expected: pool the rare images into one cell
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    statistic = ((counts - expected) ** 2 / expected).sum().item()
    assert statistic < chi_square_limit(len(expected) - 1)


def test_skew_moves_row_r_right_by_r_and_unskew_inverts_it():
    x = torch.arange(2 * 3 * 4.0).view(1, 2, 3, 4)
    s = pixelcnn.skew(x)
    assert s.shape == (1, 2, 3, 6)
    for r in range(3):
        assert torch.equal(s[0, :, r, r : r + 4], x[0, :, r])
        assert (s[0, :, r, :r] == 0).all() and (s[0, :, r, r + 4 :] == 0).all()
    assert torch.equal(pixelcnn.unskew(s, 4), x)


@pytest.mark.parametrize("layers, colors", [(3, 1), (4, 3), (12, 1)])
def test_causal_1d_receptive_field_is_the_one_its_dilations_give(layers, colors):
    """Output k (raster order of the sub-pixels) depends on exactly the inputs k - R .. k - 1, R = 2 + sum of
    the dilations (1, 2, 4, ..., cycling after 512), clipped at the image's start; on none at or after k."""
    shape = (colors, 5, 6) if layers < 12 else (1, 40, 60)  # 12 layers: dilations up to 512 and back to 1
    model = make("wavenet", colors, 3, layers=layers)
    receptive = 2 + sum(2 ** (i % 10) for i in range(layers))
    assert model.receptive_field == receptive
    n = math.prod(shape)
    order = raster_order(shape).flatten()
    if n > 200:  # a few outputs by backprop instead of the full Jacobian
        torch.manual_seed(1)
        x = torch.rand(2, *shape, requires_grad=True)
        logits = model(x).permute(0, 3, 4, 1, 2).reshape(2, n, -1)  # (B, n, K), raster order
        for k in (0, 1, 600, 1100, 1100 + receptive, n - 1):
            (grad,) = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)
            seen = grad.abs().sum(0).permute(1, 2, 0).flatten() > 0  # (n,), raster order
            positions = torch.arange(n)
            assert torch.equal(seen, (positions < k) & (positions >= k - receptive)), k
        return
    jac = input_jacobian(model, shape).flatten(0, 2).flatten(1)  # (out, in), indexed (c, i, j)
    for out in range(n):
        k = order[out]
        seen = jac[out] > 0
        assert torch.equal(seen, (order < k) & (order >= k - receptive)), out


def test_parameter_counts_and_output_shape():
    """The paper's MNIST sizes (7 layers, h = 16), each layer's parameters counted by hand."""
    h, out = 16, 32
    first, head = 49 * 2 * h + 2 * h, 2 * h * out + out + out * 2 + 2
    per_layer = {
        "pixelcnn": (2 * h * h + h) + (9 * h * h + h) + (h * 2 * h + 2 * h),
        "rowlstm": (3 * 2 * h * 4 * h + 4 * h) + (3 * h * 4 * h + 4 * h) + (h * 2 * h + 2 * h),
        "diagbilstm": (2 * h * 8 * h + 8 * h) + 2 * (2 * h * 4 * h + 4 * h) + (h * 2 * h + 2 * h),
    }
    for arch, n in per_layer.items():
        model = pixelcnn.PixelModel(pixelcnn.ARCHS[arch], 1, 2, 7, h, out)
        assert sum(p.numel() for p in model.parameters()) == first + 7 * n + head
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 1, 2, 28, 28)
    assert (pixelcnn.PixelModel(pixelcnn.DiagonalBiLSTM, 3, 256, 1, 6, 8)(torch.zeros(1, 3, 4, 5)).shape
            == (1, 3, 256, 4, 5))


# ---------------------------------------------------------------------------------------------- end to end
def run_pixelcnn(*flags, timeout=300):
    return run_script("pixelcnn.py", *flags, timeout=timeout)


def test_help_lists_the_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(pixelcnn.Args, ["--help"], presets={"quick": pixelcnn.QUICK})
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--arch {pixelcnn,rowlstm,diagbilstm,wavenet}" in text and "(default: pixelcnn)" in text
    assert "--layers LAYERS" in text and "--samples SAMPLES" in text


@needs_mnist
@pytest.mark.parametrize("arch", ARCHS)
def test_quick_writes_samples_metrics_checkpoint_and_resumes(tmp_path, arch):
    out = tmp_path / "run"
    # one Diagonal BiLSTM layer: sampling is 784 passes of a sequential network
    layers = ["--layers", "1"] if arch == "diagbilstm" else []
    result = run_pixelcnn("--quick", "--arch", arch, "--steps", "6", "--eval-n", "50", "--samples", "1",
                          "--out", str(out), *layers)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert (last.startswith("eval test nll_nats=") and "sample_s=" in last
            and last.endswith("(exact, 50 images)"))
    for name in ("samples.png", "checkpoint.pt", "config.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 6
    if arch != "pixelcnn":
        return  # resuming is the same code for all three; once is enough for the time budget
    resumed = run_pixelcnn("--quick", "--arch", arch, "--steps", "9", "--eval-n", "50", "--samples", "1",
                           "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and common.load_checkpoint(out / "checkpoint.pt")["step"] == 9


@needs_mnist
def test_resume_is_exact(tmp_path):
    base = dataclasses.replace(pixelcnn.Args(), arch="rowlstm", layers=1, hidden=4, out_hidden=8, steps=6,
                               batch_size=8, eval_n=20, samples=0, log_every=2, ckpt_every=100, eval_every=4,
                               data_dir=data_dir(), device="cpu")
    torch.set_default_dtype(torch.float32)  # as a run trains
    pixelcnn.train(dataclasses.replace(base, out=str(tmp_path / "straight")))
    pixelcnn.train(dataclasses.replace(base, steps=3, out=str(tmp_path / "split")))
    pixelcnn.train(dataclasses.replace(base, out=str(tmp_path / "split"), resume=True))
    a = common.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = common.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_toy_data_is_refused(tmp_path):
    args = dataclasses.replace(pixelcnn.Args(), dataset="8gaussians", device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(common.DataError, match="models images"):
        pixelcnn.train(args)


@pytest.mark.parametrize("arch", ["rowlstm", "diagbilstm"])
@pytest.mark.parametrize("colors, levels", [(1, 2), (3, 4)])
def test_lstm_pixel_by_pixel_equals_the_parallel_forward(arch, colors, levels):
    """The sampler's cached per-pixel recursion (teacher forced on a fixed image) gives forward's logits."""
    model = make(arch, colors, levels, layers=2, hidden=3 * colors)
    x = torch.randint(0, levels, (2, colors, 5, 7)) / (levels - 1)
    full = model(x)  # (B, C, K, H, W)
    caches = pixelcnn.layer_caches(model, x)
    for i in range(5):
        for j in range(7):
            step = pixelcnn.pixel_logits(model, x, i, j, caches)  # (B, C, K)
            assert torch.allclose(step, full[..., i, j], rtol=0, atol=1e-12), (i, j)
        for layer, cache in zip(model.layers, caches):
            layer.finish_row(i, cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_follows_the_model_dtype_and_reports_each_row(arch):
    # built in float32, then .double(), as a user would (fixture restores)
    torch.set_default_dtype(torch.float32)
    model = pixelcnn.build_network(arch, 3, 4, 1, 4, 8).double()
    rows = []
    x = pixelcnn.sample(model, 2, (3, 3, 4), progress=lambda steps: rows.extend(steps) or steps)
    assert x.dtype == torch.float64 and x.shape == (2, 3, 3, 4) and rows == [0, 1, 2]
    assert set(x.unique().tolist()) <= {0, 1 / 3, 2 / 3, 1}
