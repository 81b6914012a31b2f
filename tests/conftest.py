import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest
import torch


@pytest.fixture
def float64_one_thread():
    """Closed-form comparisons in double precision, on one thread (small tensors lose to a thread pool when
    the CPUs are shared); both restored after the test. Test files opt in with `pytestmark`."""
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old_dtype)
    torch.set_num_threads(old_threads)
