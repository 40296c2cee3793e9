import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _poison_fresh_buffers(monkeypatch):
    """Kernels allocate outputs through nsa.triton.utils.empty: fill them with NaN so any
    element a kernel forgets to write shows up in the comparison."""
    monkeypatch.setenv("NSA_POISON_EMPTY", "1")
    yield
