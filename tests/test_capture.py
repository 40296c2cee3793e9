"""What CUDA-graph capture needs of the NSA ops, checked where a CPU can: the layer's forward and
backward through the Triton backend (interpreter) read no tensor value on the host, so a
captured step replays without waiting (benchmarks/bench_layer.py captures it on a GPU)."""
import os
import sys

import pytest
import torch

import nsa

NSA_DIR = os.path.dirname(nsa.__file__) + os.sep
READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@pytest.fixture
def no_host_reads(monkeypatch):
    """Tensor methods that copy a value to the host raise when nsa's own code calls them
    (the interpreter, which runs the kernels on the CPU, may)."""
    calls = []

    def guard(name, orig):
        def f(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(NSA_DIR):
                calls.append(f"Tensor.{name} from {os.path.relpath(caller, NSA_DIR)}:{sys._getframe(1).f_lineno}")
            return orig(self, *a, **k)
        return f
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    return calls


CFG = nsa.NSAConfig(cmp_block_size=16, cmp_stride=8, sel_block_size=32, sel_block_count=3, window_size=64)


def test_layer_step_reads_no_value_on_the_host(no_host_reads):
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(64, 4, 2, 16, 16, config=CFG, backend="triton")
    x = torch.randn(1, 150, 64, requires_grad=True)   # 150: blocks, window and a partial tail (~40 s)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not no_host_reads, no_host_reads


def test_the_guard_sees_a_host_read(no_host_reads):
    """The check can fail: packed sequences read their lengths on the host (block_starts)."""
    layer = nsa.NativeSparseAttention(64, 4, 2, 16, 16, config=CFG, backend="torch")
    cu = torch.tensor([0, 100, 200], dtype=torch.int32)
    layer(torch.randn(1, 200, 64), cu_seqlens=cu)
    assert any("tolist" in c for c in no_host_reads)


def test_tables_from_offsets_are_kept_remade_and_never_kept_from_a_capture(monkeypatch):
    """Inside keeping() (the eager layer step) launchers keep what they derive from offsets alone
    (tile tables, a batch's offsets) for later calls; an in-place change of the offsets makes it
    again; during a CUDA-graph capture nothing is kept (a kernel recorded there has not run: its
    output is unset outside the graph); outside keeping() nothing is kept."""
    from nsa.triton import utils
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with utils.keeping():
        tiles = utils.tile_cu(cu, 4)
        assert tiles.tolist() == [0, 2, 4] and utils.tile_cu(cu, 4) is tiles
        cu[2] = 20
        assert utils.tile_cu(cu, 4).tolist() == [0, 2, 6]
        batch = utils.varlen(None, 3, 7, "cpu")[0]
        assert batch.tolist() == [0, 7, 14, 21] and utils.varlen(None, 3, 7, "cpu")[0] is batch
    other = torch.tensor([0, 3], dtype=torch.int32)
    assert utils.tile_cu(other, 4) is not utils.tile_cu(other, 4)
    assert utils.varlen(None, 4, 6, "cpu")[0] is not utils.varlen(None, 4, 6, "cpu")[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fresh = torch.tensor([0, 9], dtype=torch.int32)
    with utils.keeping():
        assert utils.tile_cu(fresh, 4) is not utils.tile_cu(fresh, 4)
        assert utils.varlen(None, 2, 5, "cpu")[0] is not utils.varlen(None, 2, 5, "cpu")[0]


def test_custom_ops_keep_nothing_and_the_eager_step_keeps_its_tables(monkeypatch):
    """torch.compile's CUDA graphs run the custom ops in a warm-up whose allocations belong to the
    graphs' pool: a table kept from there is memory the pool hands out again (cudagraph trees
    failed its memory check when the shapes changed). Through the custom ops nothing is kept;
    the eager layer step (FusedNSA) keeps its offsets' tables, made once for both passes."""
    from nsa.triton import backend, utils
    monkeypatch.setattr(utils, "_REGULAR", {})
    monkeypatch.setattr(utils, "_DERIVED", utils.WeakIdKeyDictionary())
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 2, 16) for _ in range(3))
    backend.sliding_window_attention(q, k, v, window_size=16)   # custom op nsa::banded_fwd
    assert not utils._REGULAR and not len(utils._DERIVED)
    layer = nsa.NativeSparseAttention(64, 4, 2, 16, 16, config=CFG, backend="triton")
    layer(torch.randn(2, 40, 64, requires_grad=True)).sum().backward()
    assert list(utils._REGULAR) == [(2, 40, torch.device("cpu"))]
    kept = utils._DERIVED.get(utils._REGULAR[(2, 40, torch.device("cpu"))])[1]   # of the batch's offsets
    assert ("compressed", 16, 8) in kept and any(k[0] == "tiles" for k in kept)


def test_a_forward_under_inference_mode_leaves_training_working():
    """Nothing made under torch.inference_mode is kept (offsets, tile tables, rotary
    frequencies): inference tensors cannot be saved for a later step's backward."""
    torch.manual_seed(0)
    layer = nsa.NativeSparseAttention(64, 4, 2, 16, 16, config=CFG, backend="triton")
    x = torch.randn(1, 70, 64)
    with torch.inference_mode():
        want = layer(x)
    xg = x.clone().requires_grad_()
    got = layer(xg)
    got.sum().backward()
    assert torch.equal(got.detach(), want) and torch.isfinite(xg.grad).all()
