"""What the test files share: the repository root, the MNIST files when present, and running a script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> str | None:
    """The data folder holding the MNIST files ($DATA_DIR, then ./data), or None when they are absent."""
    for candidate in (os.environ.get("DATA_DIR"), str(ROOT / "data")):
        if candidate and (Path(candidate) / "mnist" / "t10k-labels-idx1-ubyte.gz").exists():
            return candidate
    return None


needs_mnist = pytest.mark.skipif(data_dir() is None, reason="MNIST files not found under $DATA_DIR or ./data")


def run_script(script: str, *flags: str, timeout: float = 300, one_thread: bool = True):
    """Run `python script flags...` from the repository root. One thread by default: the small test models
    gain nothing from a thread pool and lose a lot to one when the CPUs are shared."""
    command = [sys.executable, str(ROOT / script), "--data-dir", data_dir() or "data", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else None
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
