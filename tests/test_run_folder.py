"""Bad input, refused starts and interruptions: what common's Args bridge, Run and cli promise a user."""

import argparse
import dataclasses
import importlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import typing
import time
from dataclasses import dataclass

import pytest
import torch

import common
from helpers import ROOT


@dataclass
class Args:
    dataset: str = "8gaussians"  # which data
    width: int = 64  # hidden units; >= 1
    lr: float = 1e-3  # learning rate; > 0
    decay: float = 0.99  # EMA decay; in [0, 1)
    mults: tuple[int, ...] = (1, 2)  # channel multipliers; >= 1
    steps: int = 10  # total steps; >= 0
    log_every: int = 5  # log interval; >= 1
    ckpt_every: int = 5  # checkpoint interval; >= 1
    seed: int = 0  # seed
    device: str = "cpu"  # device
    out: str = ""  # run folder
    resume: bool = False  # continue
    overwrite: bool = False  # start again
    quick: bool = False  # small


class Foreign:
    """An object that a weights_only load refuses to build."""


# ---------------------------------------------------------------------------------------------- flag ranges
@pytest.mark.parametrize("comment, inside, outside", [
    ("units; >= 1", [1, 7], [0, -5]),
    ("rate; > 0", [1e-9, 3.0], [0.0, -1.0, float("nan"), float("inf")]),
    ("decay; in [0, 1)", [0.0, 0.5], [1.0, 2.0, -0.1]),
    ("eta; in [0, 1]", [0.0, 1.0], [1.5]),
    ("p; in (0, 1)", [0.5], [0.0, 1.0]),
])
def test_field_bounds_from_the_comment(comment, inside, outside):
    bound = common.field_bound(comment)
    assert all(v in bound for v in inside) and not any(v in bound for v in outside)
    assert common.field_bound("plain help text") is None


@pytest.mark.parametrize("argv, message", [
    (["--width", "0"], "argument --width: must be >= 1 (got 0)"),
    (["--lr", "-1"], "argument --lr: must be > 0 (got -1.0)"),
    (["--lr", "nan"], "argument --lr: must be > 0 (got nan)"),
    (["--decay", "2"], "argument --decay: must be in [0, 1) (got 2.0)"),
    (["--mults", "1", "0"], "argument --mults: must be >= 1 (got 0)"),
    (["--steps", "-10"], "argument --steps: must be >= 0 (got -10)"),
])
def test_out_of_range_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        common.parse_args(Args, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"{os.path.basename(sys.argv[0])}: error: "
        f"{message}"]
    # the edges that are valid pass
    assert common.parse_args(Args, ["--width", "1", "--decay", "0"]).width == 1


def test_help_shows_the_range():
    parser_text = subprocess.run([sys.executable, str(ROOT / "vae.py"), "--help"],
                                 capture_output=True, text=True)
    assert (parser_text.returncode == 0
            and "per process (paper: 100); >= 1 (default: 128)" in " ".join(parser_text.stdout.split()))


# ---------------------------------------------------------------------------------------------- run folders
def _run(folder, **changes):
    args = dataclasses.replace(Args(), out=str(folder), **changes)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return common.Run(args, "toymodel", common.Dist(), model, optimizer), model, optimizer


def _train(run, model, optimizer, start, total):
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    for step in run.steps(start, total):
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.log_train(step, {"loss": loss})


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_refused_resume_changes_nothing_in_the_folder(tmp_path):
    run, model, optimizer = _run(tmp_path / "run")
    _train(run, model, optimizer, 0, 10)
    before = _snapshot(tmp_path / "run")
    refused, *_ = _run(tmp_path / "run", resume=True, width=128)
    with pytest.raises(common.RunError, match="width=64 in the checkpoint but 128 now"):
        refused.restore()
    assert _snapshot(tmp_path / "run") == before  # config.json still holds the checkpoint's flags
    short, model, optimizer = _run(tmp_path / "run", resume=True, steps=5)
    assert short.restore() == 10
    with pytest.raises(common.RunError, match="at step 10, past this run's 5 steps"):
        _train(short, model, optimizer, 10, 5)
    assert _snapshot(tmp_path / "run") == before


def test_a_folder_without_a_checkpoint_is_not_a_run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"width": 3}))  # a first attempt that failed early
    (folder / "metrics.jsonl").write_text('{"split": "train", "step": 5, "loss": 1.0}\n')
    run, model, optimizer = _run(folder)
    assert json.loads((folder / "config.json").read_text())["width"] == 64
    assert not (folder / "metrics.jsonl").exists()
    _train(run, model, optimizer, 0, 5)
    assert common.load_checkpoint(folder / "checkpoint.pt")["step"] == 5


def test_resume_removes_temporary_files_and_cuts_metrics_back_to_the_checkpoint(tmp_path):
    folder = tmp_path / "run"
    run, model, optimizer = _run(folder)
    _train(run, model, optimizer, 0, 10)
    with open(folder / "metrics.jsonl", "a") as f:  # what a run killed after its checkpoint had logged
        f.write(json.dumps({"split": "train", "step": 15, "loss": 0.5}) + "\n")
    for i in range(3):
        (folder / f".checkpoint.pt.x{i}.tmp").write_bytes(b"partial")
    resumed, model, optimizer = _run(folder, resume=True, steps=20)
    start = resumed.restore()
    _train(resumed, model, optimizer, start, 20)
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]
    assert not list(folder.glob(".*.tmp"))


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    run, model, optimizer = _run(folder)
    _train(run, model, optimizer, 0, 5)
    good = (folder / "checkpoint.pt").read_bytes()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.os, "fdopen", Full)
    with pytest.raises(common.RunError,
                       match="cannot save the checkpoint .*: No space left on device "
                             ".an earlier file there is unchanged"):
        run.save(7)
    assert (folder / "checkpoint.pt").read_bytes() == good and not list(folder.glob(".*.tmp"))


def test_garbage_checkpoint_is_named_without_torchs_unsafe_hint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"f": Foreign()}, path)  # a pickle that weights_only refuses
    with pytest.raises(common.RunError) as info:
        common.load_checkpoint(path)
    assert "not a valid checkpoint" in str(info.value) and "weights_only" not in str(info.value)
    path.write_bytes(b"garbage")
    with pytest.raises(common.RunError, match="not a valid checkpoint"):
        common.load_checkpoint(path)


def test_quick_runs_get_their_own_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, *_ = _run("", quick=True)
    assert run.dir.as_posix() == "runs/toymodel-8gaussians-quick"
    assert _run("")[0].dir.as_posix() == "runs/toymodel-8gaussians"


@pytest.mark.parametrize("value, text", [(132.0009, "132.0"), (14.0, "14"), (3.14159, "3.1416"),
                                         (12345.6, "12346"), (7, "7")])
def test_logged_numbers_are_rounded_for_reading(value, text):
    assert common._fmt(value) == text


# ------------------------------------------------------------------------------------------- the command line
SCRIPT = textwrap.dedent('''
    import sys, time
    from dataclasses import dataclass
    sys.path.insert(0, {root!r})
    import torch
    import common

    @dataclass
    class Args:
        dataset: str = "8gaussians"  # data
        steps: int = 100000  # steps; >= 0
        step_sleep: float = 0.01  # seconds per step; >= 0
        slow_step: int = -1  # this step sleeps a minute
        eval_sleep: float = 60.0  # seconds of evaluation; >= 0
        log_every: int = 10  # log interval; >= 1
        ckpt_every: int = 100000  # checkpoint interval; >= 1
        seed: int = 0  # seed
        device: str = "cpu"  # device
        out: str = ""  # run folder
        resume: bool = False  # continue
        overwrite: bool = False  # start again

    def train(args):
        dist, device = common.setup(args)
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        run = common.Run(args, "toymodel", dist, model, optimizer, resumable=("eval_sleep",))
        start = run.restore()
        for step in run.steps(start, args.steps):
            if step == start:
                print("training", flush=True)
            time.sleep(60 if step == args.slow_step else args.step_sleep)
            loss = model(torch.ones(1, 2)).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log_train(step, {{"loss": loss}})
        print("evaluating", flush=True)
        time.sleep(args.eval_sleep)
        print("eval test nll_nats=1.0", flush=True)

    common.cli(train, Args)
''')


def _start(tmp_path, *flags):
    script = tmp_path / "toy_script.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    return subprocess.Popen([sys.executable, str(script), "--out", str(tmp_path / "run"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(proc, word):
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        assert line or proc.poll() is None, proc.stderr.read()
    raise AssertionError(f"no {word!r} line within a minute")


def _finish(proc):
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


def test_first_ctrl_c_is_acknowledged_and_stops_after_the_step_with_a_checkpoint(tmp_path):
    proc = _start(tmp_path)
    _wait_for(proc, "training")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == 130
    assert err[0].startswith("Ctrl-C: stopping after this step") and "Ctrl-C again to abort" in err[0]
    assert err[-1].startswith("interrupted: stopped at step ") and "--resume" in err[-1] and len(err) == 2
    assert common.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] > 0


def test_second_ctrl_c_aborts_with_one_line_and_keeps_the_checkpoint(tmp_path):
    proc = _start(tmp_path, "--steps", "20", "--ckpt-every", "5", "--slow-step", "12")
    _wait_for(proc, "training")
    time.sleep(1.0)  # inside the minute-long step 12, after the step-10 checkpoint
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == 130 and len(err) == 2 and err[-1].startswith("interrupted: Ctrl-C; the checkpoint ")
    assert common.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 10


def test_sigterm_during_the_final_evaluation_exits_130_and_resume_reruns_only_the_evaluation(tmp_path):
    proc = _start(tmp_path, "--steps", "5")
    _wait_for(proc, "evaluating")
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 130 and len(err) == 1 and err[0].startswith("interrupted: SIGTERM; the checkpoint ")
    assert common.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 5
    resumed = _start(tmp_path, "--steps", "5", "--resume", "--eval-sleep", "0")
    out, err = resumed.communicate(timeout=60)
    assert (resumed.returncode == 0 and "training" not in out
            and out.strip().endswith("eval test nll_nats=1.0"))
    assert "run folder:" in err


@pytest.mark.parametrize("make, message", [
    (lambda tmp: (tmp / "run").write_text("a file"), "is a file, not a folder"),
    (lambda tmp: (tmp / "blocker").write_text("a file"), "Not a directory: "),
])
def test_file_system_errors_are_one_line(tmp_path, make, message):
    make(tmp_path)
    out = tmp_path / ("blocker/run" if (tmp_path / "blocker").exists() else "run")
    proc = _start(tmp_path, "--steps", "5", "--eval-sleep", "0", "--out", str(out))
    code, err = _finish(proc)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    os.chmod(tmp_path / "run", 0o500)
    try:
        code, err = _finish(_start(tmp_path, "--steps", "5", "--eval-sleep", "0"))
    finally:
        os.chmod(tmp_path / "run", 0o700)
    assert (code == 2 and len(err) == 1 and err[0].startswith("error: Permission denied: ")
            and err[0].endswith("config.json"))


# -------------------------------------------------------------------------------------------- the model files
MODEL_FILES = ("vae", "iwae", "savae", "vqvae", "nvae", "ddpm", "ebm_jem", "ncsn_sde",
               "pixelcnn", "flows", "ffjord")


@pytest.mark.parametrize("name", MODEL_FILES)
def test_every_numeric_flag_declares_its_range_and_every_preset_is_inside(name):
    module = importlib.import_module(name)
    docs, hints = common._field_comments(module.Args), typing.get_type_hints(module.Args)
    for field in dataclasses.fields(module.Args):
        hint = typing.get_args(hints[field.name])[0] if typing.get_origin(hints[field.name]) is tuple \
            else hints[field.name]
        if hint in (int, float):
            assert common.field_bound(docs.get(field.name, "")) is not None, (
                f"{name}.py --{field.name} has no range")
    assert "threads" in docs
    presets = {k: v for k, v in vars(module).items() if k.isupper() and isinstance(v, dict)
               and v and set(v) <= set(docs)}
    for preset in [{}, *presets.values()]:  # the defaults, --quick and the paper presets are all valid
        common._check_bounds(argparse.ArgumentParser(), dataclasses.replace(module.Args(), **preset), docs)


@pytest.mark.parametrize("name, argv, message", [
    ("vae", ["--batch-size", "0"], "--batch-size: must be >= 1 (got 0)"),
    ("vae", ["--batch-size", "-5"], "--batch-size: must be >= 1 (got -5)"),
    ("vae", ["--log-every", "0"], "--log-every: must be >= 1"),
    ("vae", ["--ckpt-every", "0"], "--ckpt-every: must be >= 1"),
    ("vae", ["--eval-k", "-3"], "--eval-k: must be >= 1"),
    ("vae", ["--hidden", "-1"], "--hidden: must be >= 1"),
    ("vae", ["--latent", "0"], "--latent: must be >= 1"),
    ("vae", ["--lr", "-1"], "--lr: must be > 0"),
    ("vae", ["--steps", "-10"], "--steps: must be >= 0"),
    ("vae", ["--eval-n", "-5"], "--eval-n: must be >= 0"),
    ("iwae", ["--k", "0"], "--k: must be >= 1"),
    ("iwae", ["--k", "-1"], "--k: must be >= 1"),
    ("ddpm", ["--timesteps", "0"], "--timesteps: must be >= 2"),
    ("ddpm", ["--timesteps", "1"], "--timesteps: must be >= 2"),
    ("ddpm", ["--ema-decay", "2"], "--ema-decay: must be in [0, 1)"),
    ("ebm_jem", ["--reinit", "1.5"], "--reinit: must be in [0, 1]"),
    ("ffjord", ["--rtol", "0"], "--rtol: must be > 0"),
])
def test_out_of_range_flags_of_the_model_files(name, argv, message, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as info:
        common.parse_args(module.Args, argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_flag_is_refused_by_the_script_before_any_data_is_read(tmp_path):
    empty = tmp_path / "data"
    result = subprocess.run([sys.executable, str(ROOT / "vae.py"), "--batch-size", "0",
                             "--data-dir", str(empty)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and errors == ["vae.py: error: argument --batch-size: must be >= 1 (got 0)"]
    assert not empty.exists()


@pytest.mark.parametrize("script, flags, message", [
    ("ddpm.py", ["--dataset", "binarized_mnist"], "ddpm.py models 8-bit images and 2D toys"),
    ("savae.py", ["--dataset", "mnist"], "savae.py models binary images"),
    ("ncsn_sde.py", ["--dataset", "binarized_mnist"], "ncsn_sde.py models densities of continuous data"),
    ("nvae.py", ["--dataset", "8gaussians"], "nvae.py models images"),
    ("vqvae.py", ["--dataset", "two_moons"], "vqvae.py models images"),
    ("flows.py", ["--task", "images", "--flow", "glow", "--dataset", "binarized_mnist"],
     "--task images needs 8-bit"),
    ("vae.py", ["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
])
def test_unsupported_datasets_are_refused_before_any_data_is_read(tmp_path, script, flags, message):
    empty = tmp_path / "data"  # no files and (in a test) no download: a refusal must come first
    result = subprocess.run([sys.executable, str(ROOT / script), *flags, "--data-dir", str(empty),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert (result.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: ")
            and message in errors[0])
    assert not empty.exists() and not (tmp_path / "run").exists()


def test_a_data_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    result = subprocess.run([sys.executable, str(ROOT / "vae.py"), "--dataset", "mnist", "--data-dir",
                             str(tmp_path / "blocker" / "data"), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert "Not a directory" in errors[0]


def test_quick_needs_no_second_dataset_and_no_cifar10():
    import ddpm
    import ebm_jem

    assert common.parse_args(ddpm.Args, ["--quick"], ddpm.PRESETS).dataset == "mnist"
    assert common.parse_args(ddpm.Args, ["--quick", "--dataset", "two_moons"], ddpm.PRESETS).dataset == \
        "two_moons"
    assert common.parse_args(ebm_jem.Args, ["--quick"], {"quick": ebm_jem.QUICK}).ood == ("noise",)
    assert common.parse_args(ebm_jem.Args, [], {"quick": ebm_jem.QUICK}).ood == ("noise", "fashion_mnist")


def test_quick_on_a_toy_takes_the_toy_preset_and_on_images_the_smoke_test():
    """--quick on a 2D toy trains long enough to show the modes; on images (or other tasks) it stays short."""
    import ddpm
    import ffjord
    import flows
    import ncsn_sde

    for module, toy_steps, image_flags, image_steps in [
            (ddpm, 3000, ["--dataset", "mnist"], 1000), (ffjord, 1200, ["--dataset", "mnist"], 150),
            (ncsn_sde, 3000, ["--dataset", "mnist"], 300), (flows, 3000, ["--task", "images"], 200)]:
        assert common.parse_args(module.Args, ["--quick", "--dataset", "two_moons"],
                                 module.PRESETS).steps == toy_steps
        assert common.parse_args(module.Args, ["--quick", *image_flags], module.PRESETS).steps == image_steps
        assert common.parse_args(module.Args, ["--quick", *image_flags, "--steps", "7"],
                                 module.PRESETS).steps == 7


@pytest.mark.parametrize("name", sorted(p.stem for p in ROOT.glob("*.py") if p.name != "common.py"))
def test_every_default_is_a_valid_value_of_its_flag(name):
    """A Literal flag's default is one of its choices (argparse would refuse it typed on the command line),
    and every preset sets only fields that exist."""
    module = importlib.import_module(name)
    hints = typing.get_type_hints(module.Args)
    for field in dataclasses.fields(module.Args):
        hint = hints[field.name]
        if typing.get_origin(hint) is typing.Literal:
            assert field.default in typing.get_args(hint), f"{name}.Args.{field.name} = {field.default!r}"
    names = {f.name for f in dataclasses.fields(module.Args)}
    for preset in [v for k, v in vars(module).items() if k.isupper() and isinstance(v, dict) and k in
                   ("QUICK", "QUICK_TOY", "PAPER_MNIST", "PAPER_CIFAR10")]:
        assert set(preset) <= names, set(preset) - names
