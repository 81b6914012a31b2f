"""results/bench.py: every model file has a row, the command-line options, and the tiny configurations run on
a CPU and print a markdown table of the advertised shape (peers skipped with a note when not installed). No
timing is asserted: the figures depend on the machine and its load."""
import os
import re
import subprocess
import sys

from helpers import ROOT

from results import bench

MODEL_FILES = sorted(p.stem for p in ROOT.glob("*.py") if p.name != "common.py")
HEADER = "| model | config | ours | peer | ratio (ours / peer time) |"


def run_bench(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "results.bench", *flags], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, check=False)


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of the table's body rows, after checking the header and the separator line."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert lines[0] == HEADER and lines[1] == "| --- | --- | --- | --- | --- |", lines[:2]
    rows = [[cell.strip() for cell in ln.strip("|").split(" | ")] for ln in lines[2:]]
    assert all(len(r) == 5 for r in rows), rows
    return rows


def test_every_model_file_has_a_row():
    assert MODEL_FILES
    assert set(MODEL_FILES) <= {key.split("-")[0] for key in bench.ROWS}


def test_help_lists_the_options_with_defaults():
    result = run_bench("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for text in ("--device", "--threads", "--only", "--repeats", "--gpu-ddpm", "--tiny", "--compile",
                 "--against", "(default: cpu)", "(default: 5)"):
        assert text in result.stdout, text


def test_an_unknown_row_is_refused():
    result = run_bench("--only", "nosuchmodel", "--tiny", timeout=60)
    assert result.returncode == 2 and "error: --only nosuchmodel matches no row" in result.stderr


def check_peer_cells(stdout: str, rows: list[list[str]], package: str) -> None:
    """Either every row has a peer and a ratio, or the bench said the peer is missing and printed dashes."""
    if f"{package} is not installed" in stdout:
        assert all(r[3] == "–" and r[4] == "–" for r in rows)
    else:
        assert all(r[3] != "–" and float(r[4]) > 0 for r in rows), rows


def test_tiny_table_has_one_line_per_row_and_its_header():
    result = run_bench("--only", "vae,flows-realnvp", "--tiny", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "threads: 1" in result.stdout and "torch " in result.stdout and "load average" in result.stdout
    rows = table_rows(result.stdout)
    assert [r[0] for r in rows] == ["vae.py VAE", "flows.py RealNVP"]
    assert rows[0][2].endswith("img/s") and rows[0][3] == "–" and rows[1][2].endswith("pt/s")
    check_peer_cells(result.stdout, rows[1:], "normflows")


def test_gpu_ddpm_tiny_runs_on_a_cpu():
    result = run_bench("--gpu-ddpm", "--tiny", "--device", "cpu", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "device: cpu" in result.stdout
    rows = table_rows(result.stdout)
    assert [r[0] for r in rows] == ["ddpm.py U-Net training step, NHWC", "ddpm.py U-Net training step, NCHW",
                                    "ddpm.py sampling, NCHW"]
    assert all("img/s" in r[2] for r in rows[:2]) and "samples/s at 1000 steps" in rows[2][2]
    check_peer_cells(result.stdout, rows, "denoising-diffusion-pytorch")


def test_a_missing_peer_gets_a_note_and_dashes(tmp_path):
    # found before the real one
    (tmp_path / "normflows.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "results.bench", "--only", "flows-realnvp", "--tiny",
                             "--repeats", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "note: flows-realnvp: normflows is not installed" in result.stdout
    assert table_rows(result.stdout)[0][3:] == ["–", "–"]


def test_against_times_the_other_copy_of_the_model_file_as_the_peer(tmp_path):
    copy = ((ROOT / "vae.py").read_text()
            + "\nimport sys\nprint('the other copy was imported', file=sys.stderr)\n")
    (tmp_path / "vae.py").write_text(copy)
    result = run_bench("--only", "vae", "--tiny", "--repeats", "1", "--against", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "the other copy was imported" in result.stderr
    [row] = table_rows(result.stdout)
    assert row[3].startswith(f"{tmp_path.name}/vae.py: ") and row[3].endswith("img/s") and float(row[4]) > 0


def test_against_refuses_a_folder_without_the_model_file(tmp_path):
    result = run_bench("--only", "vae", "--tiny", "--against", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "no vae.py there" in result.stderr
    result = run_bench("--against", str(tmp_path / "missing"), timeout=60)
    assert result.returncode == 2 and "not a folder" in result.stderr


def test_memory_reports_a_peak_for_each_side_from_a_fresh_process():
    result = run_bench("--only", "flows-realnvp", "--tiny", "--repeats", "1", "--memory")
    assert result.returncode == 0, result.stderr
    [line] = [ln for ln in result.stdout.splitlines()
              if ln.startswith("peak memory of one step, flows-realnvp: ours ")]
    sizes = [float(v.replace(",", "")) for v in re.findall(r"([\d,]+) MiB", line)]
    assert len(sizes) == (1 if "normflows is not installed" in result.stdout else 2), line
    assert all(50 < size < 20_000 for size in sizes), line  # a python process with torch, not a parent's size
