"""The training driver's plumbing: args, batches, units, PNG files, checkpoints and runs."""

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

import common


@dataclass
class ToyArgs:
    dataset: str = "8gaussians"  # which data
    width: int = 64  # hidden units
    lr: float = 1e-3  # learning rate
    mode: Literal["a", "b"] = "a"  # a choice
    mults: tuple[int, ...] = (1, 2)  # channel multipliers
    flag: bool = False  # a switch
    steps: int = 10  # total steps
    log_every: int = 5  # log interval
    ckpt_every: int = 5  # checkpoint interval
    seed: int = 0  # seed
    device: str = "cpu"  # device
    out: str = ""  # run folder
    resume: bool = False  # continue
    overwrite: bool = False  # start again
    quick: bool = False  # small


# ---------------------------------------------------------------------------------------------- args
def test_parse_args_types_defaults_and_presets():
    args = common.parse_args(ToyArgs, [])
    assert args == ToyArgs()
    args = common.parse_args(ToyArgs, ["--width", "8", "--lr", "0.5", "--mode", "b", "--mults", "1", "2", "4",
                                       "--flag"])
    assert (args.width, args.lr, args.mode, args.mults, args.flag) == (8, 0.5, "b", (1, 2, 4), True)
    presets = {"quick": {"width": 4, "steps": 2}}
    assert common.parse_args(ToyArgs, ["--quick"], presets).width == 4
    quick_but_wide = common.parse_args(ToyArgs, ["--quick", "--width", "32"], presets)
    assert (quick_but_wide.width, quick_but_wide.steps) == (32, 2)  # explicit values win over the preset
    assert common.parse_args(ToyArgs, [], presets).width == 64
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, ["--mode", "c"])


def test_toy_or_image_preset_follows_the_dataset():
    """--quick takes the toy preset on a 2D toy and the image preset otherwise (the default dataset
    included)."""
    presets = {"quick": common.toy_or_image({"dataset": "mnist", "width": 4}, {"width": 8}, ToyArgs.dataset)}
    image = common.parse_args(ToyArgs, ["--quick"], presets)
    assert (image.dataset, image.width) == ("mnist", 4)
    toy = common.parse_args(ToyArgs, ["--quick", "--dataset", "two_moons"], presets)
    assert (toy.dataset, toy.width) == ("two_moons", 8)
    # no --quick, no preset
    assert common.parse_args(ToyArgs, ["--dataset", "two_moons"], presets).width == 64
    on_toy_default = {"quick": common.toy_or_image({"width": 4}, {"width": 8}, ToyArgs.dataset)}
    assert common.parse_args(ToyArgs, ["--quick"], on_toy_default).width == 8  # ToyArgs' default is a toy


@pytest.mark.parametrize("argv, printed", [(["--quick", "--dataset", "mnist"], True), (["--quick"], False),
                                           (["--dataset", "mnist"], False),
                                           (["--quick", "--dataset", ""], False)])
def test_quick_on_images_ends_with_the_recipe(tmp_path, capsys, monkeypatch, argv, printed):
    """The recipe is the command of the module docstring marked "# CPU recipe"."""
    monkeypatch.setattr(sys.modules[__name__], "__doc__",
                        "Title.\n\n    python x.py --quick  # a smoke test\n"
                        "    python x.py --long   # CPU recipe: 30 minutes\n")
    def train(args):
        dist, _ = common.setup(args)
        model = torch.nn.Linear(1, 1)
        common.Run(args, "toymodel", dist, model, torch.optim.SGD(model.parameters(), lr=0.1))

    common.cli(train, ToyArgs, argv=[*argv, "--out", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("smoke test" in last and last.endswith("python x.py --long")) == printed
    assert last.startswith("run folder:") != printed


def test_help_shows_field_comment_and_default(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, ["--help"])
    text = capsys.readouterr().out
    assert "--width" in text and "hidden units (default: 64)" in text
    assert "--no-flag" in text and "a switch (default: False)" in text


@dataclass
class WrappedArgs:
    steps: int = 10  # optimizer steps, a comment long enough
                     # to go on over two lines; >= 1
    # a section comment at the fields' indentation belongs to no field
    lr: float = 0.1  # learning rate; > 0
    width: int = 4  # hidden units
    # not a continuation: not indented deeper than the field


def test_a_field_comment_goes_on_over_deeper_indented_comment_lines(capsys):
    docs = common._field_comments(WrappedArgs)
    assert docs == {"steps": "optimizer steps, a comment long enough to go on over two lines; >= 1",
                    "lr": "learning rate; > 0", "width": "hidden units"}
    with pytest.raises(SystemExit) as e:  # the range on the continuation line is checked
        common.parse_args(WrappedArgs, ["--steps", "0"])
    assert e.value.code == 2 and "argument --steps: must be >= 1 (got 0)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- device
def test_device_autodetect_and_override():
    assert common.get_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert common.get_device("auto").type == "cuda"
    else:
        assert common.get_device("auto").type in ("mps", "cpu")
        with pytest.raises(common.RunError, match="CUDA is not available"):
            common.get_device("cuda")


def test_eval_mode_leaves_training_rng_untouched():
    model = torch.nn.Linear(2, 2)
    torch.manual_seed(5)
    reference = torch.rand(3)
    torch.manual_seed(5)
    with common.eval_mode(model, seed=123):
        torch.rand(1000)
        assert not model.training
    assert model.training
    assert torch.equal(torch.rand(3), reference)


# ---------------------------------------------------------------------------------------------- batches
def test_batches_are_a_function_of_the_step_and_cover_the_epoch():
    x = torch.arange(100, dtype=torch.float32)[:, None]
    b1, b2 = common.Batches(x, None, 10, seed=3), common.Batches(x, None, 10, seed=3)
    assert b1.steps_per_epoch == 10
    epoch0 = torch.cat([b1(s)[0] for s in range(10)]).flatten()
    assert sorted(epoch0.tolist()) == list(range(100))  # one epoch sees every example once
    assert torch.equal(b2(13)[0], b1(13)[0]) and torch.equal(b2(3)[0], b1(3)[0])  # any order, same batch
    assert not torch.equal(b1(10)[0], b1(0)[0])  # a fresh permutation each epoch


def test_batches_give_each_rank_its_own_slice():
    x = torch.arange(64, dtype=torch.float32)[:, None]
    ranks = [common.Batches(x, x, 8, seed=0, dist=common.Dist(rank=r, world_size=2)) for r in range(2)]
    assert ranks[0].steps_per_epoch == 4
    seen = torch.cat([b(s)[0] for b in ranks for s in range(4)]).flatten()
    assert sorted(seen.tolist()) == list(range(64))


def test_dynamic_binarization_draws_fresh_bits():
    x = torch.full((50, 1, 4, 4), 0.5)
    batches = common.Batches(x, None, 50, seed=0, binarize=True)
    a, b = batches(0)[0], batches(0)[0]
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- units
def test_bits_per_dim_units():
    assert common.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    # the uniform density on [0, 1]^D (log density 0) is 8 bits/dim on 8-bit data: every value has 1/256^D
    assert common.bits_per_dim(0.0, 3072, bin_width=1 / 256) == pytest.approx(8.0)
    # on [-1, 1]^D the uniform density is 2^-D: NLL = D log 2, and again 8 bits/dim
    assert common.bits_per_dim(10 * math.log(2), 10, bin_width=2 / 256) == pytest.approx(8.0)


def test_uniform_dequantization_stays_in_its_bin():
    k = torch.randint(0, 256, (1000,))
    y = common.uniform_dequantize(k.float() / 255)
    assert torch.equal(torch.floor(y * 256).long(), k)
    assert (y >= 0).all() and (y < 1).all()


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("channels", [1, 3])
def test_png_reads_back_equal(tmp_path, channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(17, 23, channels), dtype=np.uint8)
    common.save_png(tmp_path / "x.png", image)
    back = np.array(Image.open(tmp_path / "x.png"))
    assert np.array_equal(back.reshape(image.shape), image)


def test_image_grid_places_tiles():
    x = torch.zeros(5, 3, 4, 4)
    x[4, 0] = 1.0  # the fifth tile is red
    grid = common.image_grid(x, nrow=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert (grid[6:10, 6:10, 0] == 255).all() and (grid[6:10, 6:10, 1:] == 0).all()
    assert grid[:6, :, 0].max() == 0


def test_histogram_2d_counts_points_in_their_cells():
    points = torch.tensor([[-3.9, -3.9], [3.9, 3.9], [3.9, 3.9], [10.0, 0.0]])
    counts = common.histogram_2d(points, bins=8, lim=4.0)
    assert counts.sum() == 3 and counts[7, 0] == 1 and counts[0, 7] == 2


# --------------------------------------------------------------------------------------- checkpoints and runs
def _run(tmp_path, **overrides):
    args = dataclasses.replace(ToyArgs(), out=str(tmp_path / "run"), **overrides)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    return common.Run(args, "toymodel", common.Dist(), model, optimizer), model, optimizer


def _train(run, model, optimizer, start, total, nan_at=None):
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    for step in run.steps(start, total):
        loss = model(x).pow(2).mean() + torch.randn(()) * 0.01
        if step == nan_at:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.log_train(step, {"loss": loss})


def test_checkpoint_round_trip(tmp_path):
    state = {"w": torch.randn(4, 4), "step": 7, "nested": {"a": [1, 2.5, "x"], "b": (1, None)}}
    common.save_checkpoint(tmp_path / "c.pt", state)
    back = common.load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7 and back["nested"]["a"] == [1, 2.5, "x"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_corrupt_checkpoint_gives_one_line_error(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.RunError, match="cannot read checkpoint") as info:
        common.load_checkpoint(tmp_path / "c.pt")
    assert "\n" not in str(info.value)


def test_run_refuses_to_clobber_and_resumes_exactly(tmp_path):
    run, model, optimizer = _run(tmp_path)
    _train(run, model, optimizer, 0, 10)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["width"] == 64
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10] and all(math.isfinite(r["loss"]) for r in lines)
    with pytest.raises(common.RunError, match="already holds a run"):
        _run(tmp_path)
    # straight through 20 steps, against 10 + resume + 10
    torch.manual_seed(1)
    straight, m1, o1 = _run(tmp_path / "a")
    _train(straight, m1, o1, 0, 20)
    torch.manual_seed(1)
    first, m2, o2 = _run(tmp_path / "b")
    _train(first, m2, o2, 0, 10)
    torch.manual_seed(99)  # the resumed process starts from another RNG state
    second, m3, o3 = _run(tmp_path / "b", resume=True)
    start = second.restore()
    assert start == 10
    _train(second, m3, o3, start, 20)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)


def test_incompatible_checkpoints_are_refused(tmp_path):
    run, model, optimizer = _run(tmp_path)
    _train(run, model, optimizer, 0, 5)
    other, *_ = _run(tmp_path, resume=True, width=128)
    with pytest.raises(common.RunError, match="width=64 in the checkpoint but 128 now"):
        other.restore()
    other, *_ = _run(tmp_path, resume=True, steps=50)  # a longer budget is a resumable change
    assert other.restore() == 5
    ckpt = common.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    ckpt["model_name"] = "othermodel"
    common.save_checkpoint(tmp_path / "run" / "checkpoint.pt", ckpt)
    other, *_ = _run(tmp_path, resume=True)
    with pytest.raises(common.RunError, match="written by othermodel.py"):
        other.restore()
    with pytest.raises(common.RunError, match="no checkpoint to resume"):
        _run(tmp_path / "empty", resume=True)


def test_shape_mismatch_is_refused(tmp_path):
    run, model, optimizer = _run(tmp_path)
    _train(run, model, optimizer, 0, 5)
    args = dataclasses.replace(ToyArgs(), out=str(tmp_path / "run"), resume=True)
    bigger = torch.nn.Linear(5, 1)
    with pytest.raises(common.RunError, match="does not fit this model"):
        common.Run(args, "toymodel", common.Dist(), bigger, torch.optim.Adam(bigger.parameters())).restore()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run, model, optimizer = _run(tmp_path)
    with pytest.raises(common.NonFiniteLoss, match="non-finite at step 7"):
        _train(run, model, optimizer, 0, 20, nan_at=7)
    ckpt = common.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_overwrite_starts_again(tmp_path):
    run, model, optimizer = _run(tmp_path)
    _train(run, model, optimizer, 0, 5)
    _run(tmp_path, overwrite=True)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
