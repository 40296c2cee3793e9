import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Without a GPU the Triton kernels run in the interpreter; Triton reads this when kernels are
# defined, so it must be set before nsa.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _poison_fresh_buffers(monkeypatch):
    """Kernels allocate outputs through nsa.triton.utils.empty: fill them with NaN so any
    element a kernel forgets to write shows up in the comparison."""
    monkeypatch.setenv("NSA_POISON_EMPTY", "1")
    yield
