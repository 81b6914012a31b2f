"""The likelihood tables: every model file has a row, every row's command parses, and the script reads,
checks, records and renders runs correctly (on fake run folders, and one real tiny run)."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import common
from helpers import ROOT
from results import table

MODEL_FILES = sorted(p.name for p in ROOT.glob("*.py") if p.name != "common.py")


def test_every_model_file_has_a_row_in_some_table():
    covered = {row.file for row in table.ROWS}
    assert MODEL_FILES, "no model files found"
    assert set(MODEL_FILES) <= covered, f"model files without a row: {set(MODEL_FILES) - covered}"


def test_row_ids_are_unique_and_toys_name_their_data():
    ids = [row.id for row in table.ROWS]
    assert len(ids) == len(set(ids))
    for row in table.ROWS:
        assert row.table in table.TABLES and row.seeds
        if row.table == "toys":
            assert row.data in common.TOY_ENTROPY and f"--dataset {row.data}" in row.flags


@pytest.mark.parametrize("row", table.ROWS, ids=lambda r: r.id)
def test_row_command_parses_into_its_files_args(row):
    config = table.expected_config(row, seed=3)
    assert config["seed"] == 3
    dataset = config.get("dataset")  # empty: chosen by the file (flows.py --task vae, vqvae.py --stage prior)
    assert dataset or "--task vae" in row.flags or "--stage prior" in row.flags
    if dataset:
        assert dataset == (row.data if row.table == "toys" else row.table)


def write_run(folder: Path, lines: list[dict], config: dict | None = None, samples: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if samples:
        Image.new("L", (30, 20), 128).save(folder / "samples.png")
    return folder


def test_final_test_line_takes_the_last_test_line_with_the_key(tmp_path):
    run = write_run(tmp_path / "r", [
        {"split": "test", "step": 10, "time": 1.0, "nll_nats": 120.0},
        {"split": "train", "step": 20, "time": 2.0, "loss": 99.0},
        {"split": "test", "step": 20, "time": 3.0, "nll_nats": 100.0, "kl": 20.0},
        {"split": "test", "step": 20, "time": 3.5, "other": 1.0},
    ])
    assert table.final_test_line(run, "nll_nats")["nll_nats"] == 100.0
    with pytest.raises(table.ResultError, match="no test line with 'nll_bpd'"):
        table.final_test_line(run, "nll_bpd")
    with pytest.raises(table.ResultError, match="does not exist"):
        table.final_test_line(tmp_path / "missing", "nll_nats")


def test_check_config_accepts_the_rows_command_and_names_a_changed_field(tmp_path):
    row = table.BY_ID["vae-bmnist"]
    config = table.expected_config(row, seed=1)
    table.check_config(row, 1,
                       write_run(tmp_path / "ok", [], {**config, "out": "elsewhere", "device": "cpu"}))
    with pytest.raises(table.ResultError, match="latent=8"):
        table.check_config(row, 1, write_run(tmp_path / "bad", [], {**config, "latent": 8}))
    with pytest.raises(table.ResultError, match="seed=1"):
        table.check_config(row, 0, write_run(tmp_path / "seed", [], config))


def test_quick_preset_is_applied_when_a_row_uses_it():
    """A row's expected config applies the file's presets as its command line does: ddpm's --quick is the
    image smoke test on mnist and the toy preset on a 2D toy."""
    image = table.Row("q", "mnist", "m", "ddpm.py", "--quick", "e", "b")
    toy = table.Row("q", "toys", "m", "ddpm.py", "--quick --dataset 8gaussians", "e", "b")
    config = table.expected_config(image, seed=0)
    assert (config["quick"] and config["dataset"] == "mnist" and config["steps"] == 1000
            and config["channels"] == 32)
    config = table.expected_config(toy, seed=0)
    assert config["quick"] and config["dataset"] == "8gaussians" and config["steps"] == 3000
    assert config["batch_size"] == 256


def fake_record(row: table.Row, seed: int, figure: float, **extra) -> dict:
    return {"row": row.id, "seed": seed, "figure": figure, "extra": extra, "command": row.command(seed),
            "wall_s": 100.0 + 10 * seed, "wall_source": "runner", "max_load": 1.0,
            "code": table.code_hash(row.file),
            "host": {"cpu": "test cpu", "cores": 2, "threads": "1", "gpu": None, "torch": "x"},
            "commit": "abc", "run_dir": f"runs/results/{row.id}-s{seed}", "date": "2026-01-01T00:00:00+00:00"}


def test_render_shows_mean_and_sd_over_seeds_and_flags_missing_and_stale_rows():
    vae, iwae = table.BY_ID["vae-bmnist"], table.BY_ID["iwae-bmnist"]
    records = {("vae-bmnist", 0): fake_record(vae, 0, 96.0), ("vae-bmnist", 1): fake_record(vae, 1, 98.0),
               ("iwae-bmnist", 0): {**fake_record(iwae, 0, 101.0), "code": "0" * 16}}
    text, problems = table.render_table("binarized_mnist", records)
    vae_line = next(line for line in text.splitlines() if "`vae.py`" in line and "VAE, MLP" in line)
    assert "97.00 ± 1.41 nats" in vae_line and "| 0, 1 |" in vae_line and "105 s" in vae_line
    assert "101.00 nats ‡" in text  # one seed: no spread; measured on older code
    assert "‡" not in vae_line
    assert any(p.startswith("iwae-bmnist:") and "changed" in p for p in problems)
    assert any(p.startswith("savae-bmnist:") and "no figure" in p for p in problems)
    assert not any(p.startswith("vae-bmnist:") for p in problems)


def test_render_toys_shows_kl_and_nll_and_marks_a_loaded_machine():
    row = table.BY_ID["ddpm-8gaussians"]
    records = {(row.id, 0): {**fake_record(row, 0, 0.05, nll_nats=2.88), "max_load": 7.5}}
    text, _ = table.render_table("toys", records)
    line = next(line for line in text.splitlines() if row.command() in line)
    assert "0.050 nats (2.880)" in line and "†" in line and "| 8gaussians |" in line


def test_records_of_an_older_command_are_ignored_and_the_latest_wins(tmp_path):
    row = table.BY_ID["vae-bmnist"]
    path = tmp_path / "measured.jsonl"
    table.append_record(fake_record(row, 0, 97.0), path)
    table.append_record({**fake_record(row, 0, 90.0), "command": "python vae.py --epochs 1 --seed 0"}, path)
    table.append_record(fake_record(row, 0, 96.5), path)
    table.append_record(fake_record(row, 1, 97.5), path)
    records = table.load_records(path)
    assert records[(row.id, 0)]["figure"] == 96.5 and records[(row.id, 1)]["figure"] == 97.5


def test_splice_replaces_only_the_marked_block_and_is_idempotent():
    document = f"intro\n{table.BEGIN}\nold\n{table.END}\noutro\n"
    once = table.splice(document, "new table")
    assert once == f"intro\n{table.BEGIN}\nnew table\n{table.END}\noutro\n"
    assert table.splice(once, "new table") == once
    with pytest.raises(table.ResultError, match="exactly one"):
        table.splice("no markers", "x")


def test_readme_has_the_markers_and_every_table_title():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(table.BEGIN) == 1 and readme.count(table.END) == 1
    for title in table.TABLES.values():
        assert title in readme


def test_samples_figure_tiles_every_current_row_and_keeps_its_picture(tmp_path, monkeypatch):
    """Rows with a current record and a picture are tiled; the picture is kept in results/samples/ so the
    figure can be rebuilt once the run folders are gone; a stale row is left out."""
    monkeypatch.setattr(table, "code_hash", lambda file: "current")
    records = {}
    for i, row in enumerate(table.ROWS[:4]):
        record = {**fake_record(row, row.seeds[0], 1.0), "code": "old" if i == 3 else "current"}
        write_run(tmp_path / record["run_dir"], [], samples=i != 1)  # the second row has no samples.png
        records[(row.id, row.seeds[0])] = record
    monkeypatch.setattr(table, "ROOT", tmp_path)
    monkeypatch.setattr(table, "SAMPLES", tmp_path / "kept")
    out = tmp_path / "fig.png"
    assert table.samples_figure(records, out, tile=50, columns=6) == 2
    image = Image.open(out)
    assert image.size == (6 * 58, 1 * (50 + 16 + 8))
    kept = {p.name for p in (tmp_path / "kept").iterdir()}
    assert kept == {f"{table.ROWS[0].id}.png", f"{table.ROWS[2].id}.png"}
    shutil.rmtree(tmp_path / "runs")
    assert table.samples_figure(records, out, tile=50, columns=6) == 2  # from the kept pictures
    with pytest.raises(table.ResultError, match="no current row"):
        table.samples_figure({}, out)


def test_curves_figure_draws_one_line_per_current_image_row(tmp_path, monkeypatch):
    monkeypatch.setattr(table, "code_hash", lambda file: "current")
    records = {}
    for row_id in ("vae-bmnist", "iwae-bmnist", "vae-mnist", "vae-8gaussians"):
        row = table.BY_ID[row_id]
        record = {**fake_record(row, row.seeds[0], 1.0), "code": "current"}
        record["extra"]["curve"] = [[60.0, 100, 3.0], [600.0, 1000, 2.0]]
        records[(row.id, row.seeds[0])] = record
    monkeypatch.setattr(table, "ROOT", tmp_path)
    out = tmp_path / "curves.png"
    assert table.curves_figure(records, out, width=300, height=200) == 3  # the toy row has no panel
    image = Image.open(out)
    assert image.size == (600, 200)
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 3  # lines in colour, not a blank sheet
    with pytest.raises(table.ResultError, match="no current image row"):
        table.curves_figure({}, out)


def test_the_curves_value_range_leaves_out_only_an_outlier():
    row = table.BY_ID["vae-bmnist"]
    curves = [[[60.0, 1, 95.0], [600.0, 2, 90.0]], [[60.0, 1, 88.0]], [[120.0, 1, 92.0]]]
    assert table.value_range([(row, c) for c in curves]) == (88.0, 95.0)  # no outlier: every figure
    # finals 88, 90, 92, 152: the top stops at the median final 92 plus 4 x (92 - 88)
    outlier = [(row, c) for c in [*curves, [[60.0, 1, 152.0]]]]
    assert table.value_range(outlier) == (88.0, 108.0)


def test_test_curve_follows_the_clock_across_resumptions(tmp_path):
    write_run(tmp_path, [{"split": "train", "step": 10, "time": 5.0},
                         {"split": "test", "step": 10, "time": 8.0, "nll_nats": 3.0},
                         {"split": "train", "step": 20, "time": 2.0},  # resumed: the clock restarts
                         {"split": "test", "step": 20, "time": 4.0, "nll_nats": 2.5}])
    assert table.test_curve(tmp_path, "nll_nats") == [[8.0, 10, 3.0], [12.0, 20, 2.5]]


def test_run_records_a_real_tiny_run(tmp_path, monkeypatch):
    """One real end-to-end run through the runner: 50 VAE steps on a toy."""
    row = table.Row("tiny", "toys", "VAE", "vae.py", "--dataset 8gaussians --quick --steps 50 --eval-k 10",
                    "IWAE k = 10", "50 steps", data="8gaussians", seeds=(0,))
    monkeypatch.setattr(table, "ROOT", tmp_path)  # runs in tmp_path/runs/results, with links to the two files
    (tmp_path / "vae.py").symlink_to(ROOT / "vae.py")
    (tmp_path / "common.py").symlink_to(ROOT / "common.py")
    path = tmp_path / "measured.jsonl"
    assert table.run_rows([row], None, jobs=1, threads=1, path=path, timeout=300) == 0
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["row"] == "tiny" and record["seed"] == 0 and record["wall_source"] == "runner"
    assert record["figure"] == pytest.approx(record["extra"]["nll_nats"] - common.TOY_ENTROPY["8gaussians"])
    assert record["host"]["threads"] == "1" and record["wall_s"] > 0


def test_run_clock_sums_the_invocations_of_a_resumed_run(tmp_path):
    run = write_run(tmp_path / "r", [
        {"split": "train", "step": 10, "time": 5.0}, {"split": "test", "step": 20, "time": 12.0},
        {"split": "train", "step": 30, "time": 4.0}, {"split": "test", "step": 40, "time": 9.5},  # resumed
        {"split": "test", "step": 40, "time": 1.0},  # resumed again, evaluation only
    ])
    assert table.run_clock(run) == 12.0 + 9.5 + 1.0


def test_code_hash_follows_the_model_file_and_the_data_seed_and_unit_parts_of_common(tmp_path, monkeypatch):
    """Plumbing edits (run folders, logging) and comments or docstrings keep a figure fresh; edits to the
    model file's code, the data, the units or the optimizer make it stale."""
    monkeypatch.setattr(table, "ROOT", tmp_path)
    source = (ROOT / "common.py").read_text()
    (tmp_path / "vae.py").write_text((ROOT / "vae.py").read_text())

    def hash_with(common_text: str, vae_extra: str = "") -> str:
        (tmp_path / "common.py").write_text(common_text)
        (tmp_path / "vae.py").write_text((ROOT / "vae.py").read_text() + vae_extra)
        return table.code_hash("vae.py")

    base = hash_with(source)
    assert len(table.common_figure_parts(source)) == len(table.FIGURE_SECTIONS) + len(table.FIGURE_FUNCTIONS)
    plumbing = source.replace('def steps_bar(what: str):', 'def steps_bar(what: str):  # a comment', 1)
    assert plumbing != source and hash_with(plumbing) == base
    for old, new in [("def bits_per_dim(", "def bits_per_dim_("),  # units
                     ("TEST_BINARIZATION_SEED = 0", "TEST_BINARIZATION_SEED = 1"),  # data
                     ('"8gaussians": 2.831880406138', '"8gaussians": 2.8318804'),  # toy entropies
                     ("fused=True", "fused=False")]:  # the optimizer
        assert old in source, old
        assert hash_with(source.replace(old, new, 1)) != base, old
    assert hash_with(source, "\n# an edit\n") == base  # comments and docstrings are not code
    doc = '"""Negative log-likelihood per example in nats -> bits per dimension.'
    # a docstring in units
    assert doc in source and hash_with(source.replace(doc, doc + " Edited.", 1)) == base
    vae_doc = (ROOT / "vae.py").read_text()
    (tmp_path / "common.py").write_text(source)
    (tmp_path / "vae.py").write_text(vae_doc.replace("Expected result", "Expected results", 1))
    assert "Expected result" in vae_doc and table.code_hash("vae.py") == base
    assert hash_with(source, "\nEXTRA = 1\n") != base


def test_every_cpu_recipe_is_a_table_row():
    """A model file's "# CPU recipe" command (what --quick prints on images) is measured in the table, flag
    for flag, so the README's figure for it comes from exactly that command."""
    commands = {f"python {row.file} {row.flags}" for row in table.ROWS}
    recipes = []
    for path in sorted(ROOT.glob("*.py")):
        recipes += common.cpu_recipes(path.read_text())
    assert recipes, "no model file declares a CPU recipe"
    # a stage-two recipe names the stage-one folder by its default, the table by its run folder
    commands |= {c.replace("runs/results/vqvae-mnist-s0", "runs/vqvae-mnist") for c in commands}
    missing = [r for r in recipes if " ".join(r.split()) not in commands]
    assert not missing, missing
