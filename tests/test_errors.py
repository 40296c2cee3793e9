"""Every documented misuse raises a ValueError/TypeError that names what was expected."""
import pytest
import torch

import nsa
from helpers import make_inputs

CFG = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=16, sel_block_count=4, window_size=16)


@pytest.fixture
def t():
    return make_inputs(40, 4, 2, 8, 8, CFG, dtype=torch.float32)[0]


def _nsa(t, **kw):
    return nsa.nsa_attention(**{**t, **kw.pop("over", {})}, config=CFG, **kw)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cmp_block_size=0), ValueError, "cmp_block_size must be >= 1"),
    (dict(cmp_stride=3), ValueError, "cmp_stride .3. must divide cmp_block_size"),
    (dict(sel_block_size=24, cmp_stride=16), ValueError, "must divide sel_block_size"),
    (dict(cmp_block_size=128), ValueError, "cmp_block_size .128. must be <= sel_block_size"),
    (dict(sel_block_count=2), ValueError, r"sel_block_count \(2\) must be >= sel_init_blocks"),
    (dict(window_size=0), ValueError, "window_size must be >= 1"),
    (dict(window_size=2.5), TypeError, "window_size must be an int"),
    (dict(sel_init_blocks=True), TypeError, "sel_init_blocks must be an int"),
])
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nsa.NSAConfig(**kwargs)


def test_window_one_is_valid():
    assert nsa.NSAConfig(window_size=1).window_size == 1


def test_config_and_kwargs_conflict(t):
    with pytest.raises(ValueError, match="contradict config"):
        nsa.nsa_attention(**t, config=CFG, window_size=8)
    o = nsa.nsa_attention(**t, config=CFG, window_size=16)   # agreeing kwargs are fine
    assert o.shape == t["q"].shape[:3] + (8,)


def test_kwargs_alone(t):
    kw = dict(cmp_block_size=8, cmp_stride=4, sel_block_size=16, sel_block_count=4, window_size=16)
    torch.testing.assert_close(nsa.nsa_attention(**t, **kw), _nsa(t))


@pytest.mark.parametrize("name,bad,exc,match", [
    ("q", lambda x: x[0], ValueError, "q must have rank 4"),
    ("q", lambda x: x.tolist(), TypeError, "q must be a torch.Tensor"),
    ("q", lambda x: x.int(), TypeError, "q must be float64/float32/float16/bfloat16"),
    ("k_slc", lambda x: x.double(), TypeError, "k_slc must have the dtype of q"),
    ("q", lambda x: x[..., :6], ValueError, r"k_cmp.shape\[3\] \(key dim"),
    ("q", lambda x: torch.cat([x, x[:, :, :1]], 2), ValueError, r"query heads \(5\) must be a positive multiple"),
    ("k_cmp", lambda x: x[:, :-1], ValueError, r"v_cmp.shape\[1\] \(length, k_cmp.shape\[1\]\) must be 8"),
    ("v_cmp", lambda x: x[:, :, :1], ValueError, r"v_cmp.shape\[2\]"),
    ("k_win", lambda x: x[:, :-1], ValueError, r"v_win.shape\[1\] \(length, k_win.shape\[1\]\) must be 39"),
    ("v_slc", lambda x: x[..., :4], ValueError, r"v_slc.shape\[3\] \(value dim"),
    ("gates", lambda x: x[..., :2], ValueError, r"gates must have shape \(1, 40, 4, 3\)"),
    ("k_slc", lambda x: x.repeat(2, 1, 1, 1), ValueError, r"k_slc.shape\[0\] \(batch\) must be 1"),
])
def test_bad_tensors(t, name, bad, exc, match):
    with pytest.raises(exc, match=match):
        _nsa(t, over={name: bad(t[name])})


def test_raw_length_checked(t):
    with pytest.raises(ValueError, match=r"k_win.shape\[1\] \(sequence length, q.shape\[1\]\) must be 40, got 39"):
        _nsa(t, over=dict(k_win=t["k_win"][:, :-1], v_win=t["v_win"][:, :-1]))


def test_compressed_length_checked(t):
    over = dict(k_cmp=t["k_cmp"][:, :-1], v_cmp=t["v_cmp"][:, :-1])
    with pytest.raises(ValueError, match=r"k_cmp.shape\[1\] \(compressed length Tc\(T\)\) must be 9, got 8"):
        _nsa(t, over=over)


@pytest.mark.parametrize("cu,exc,match", [
    ([0, 10, 40], None, None),
    ([0, 10, 39], ValueError, r"must end at the packed length q.shape\[1\] = 40, got 39"),
    ([1, 10, 40], ValueError, "must start at 0, got 1"),
    ([0, 30, 20, 40], ValueError, "must be non-decreasing, got 30 then 20 at index 2"),
    ([40], ValueError, "N\\+1 >= 2 entries"),
])
def test_bad_cu_seqlens(t, cu, exc, match):
    cu_t = torch.tensor(cu, dtype=torch.int32)
    # compressed tensors must match the packed layout: rebuild them for each case
    tc = int(nsa.compressed_cu_seqlens(cu_t, 8, 4)[-1]) if len(cu) > 1 and cu[0] == 0 else 0
    over = dict(k_cmp=t["k_cmp"][:, :1].expand(-1, tc, -1, -1), v_cmp=t["v_cmp"][:, :1].expand(-1, tc, -1, -1))
    if exc is None:
        _nsa(t, over=over, cu_seqlens=cu_t)
    else:
        with pytest.raises(exc, match=match):
            _nsa(t, over=over, cu_seqlens=cu_t)


def test_cu_seqlens_dtype_and_batch(t):
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        _nsa(t, cu_seqlens=torch.tensor([0, 40]))
    two = {k: v.repeat(2, 1, 1, 1) for k, v in t.items()}
    with pytest.raises(ValueError, match="needs batch size 1, got 2"):
        nsa.nsa_attention(**two, config=CFG, cu_seqlens=torch.tensor([0, 40], dtype=torch.int32))


def test_bad_backend_and_scale(t):
    with pytest.raises(ValueError, match="backend must be one of"):
        _nsa(t, backend="cuda")
    with pytest.raises(ValueError, match="scale must be a positive float"):
        _nsa(t, scale=-1.0)


def test_triton_on_cpu_without_interpreter_is_an_error(t, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        _nsa(t, backend="triton")


def test_select_and_selected_checks(t):
    _, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=8, cmp_stride=4)
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 40, 4\)"):
        nsa.select_blocks(t["q"], t["k_cmp"], lse[:, :-1], cmp_block_size=8, cmp_stride=4,
                          sel_block_size=16, sel_block_count=4)
    idx = torch.zeros(1, 40, 2, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="block_idx must be int32"):
        nsa.selected_attention(t["q"], t["k_slc"], t["v_slc"], idx.float(), sel_block_size=16)
    with pytest.raises(ValueError, match=r"block_idx.shape\[2\] \(kv heads\) must be 2"):
        nsa.selected_attention(t["q"], t["k_slc"], t["v_slc"], idx[:, :, :1], sel_block_size=16)
    # a block past the sequence's end selects nothing (it was an IndexError inside the reference)
    past = idx.clone()
    past[0, 5, 1, 2] = 1000
    same = idx.clone()
    same[0, 5, 1, 2] = -1
    run = lambda i: nsa.selected_attention(t["q"], t["k_slc"], t["v_slc"], i, sel_block_size=16)
    assert torch.equal(run(past), run(same))
    past[0, 5, 1, 2] = -2
    with pytest.raises(ValueError, match=r"block_idx must hold -1 \(an empty slot\) or block indices >= 0, "
                                         r"got -2 at \[0, 5, 1, 2\]"):
        run(past)


def test_layer_errors():
    with pytest.raises(ValueError, match="num_heads .6. must be a multiple of num_kv_heads .4."):
        nsa.NativeSparseAttention(64, 6, 4, 16, 16)
    with pytest.raises(ValueError, match="head_dim_qk must be even"):
        nsa.NativeSparseAttention(64, 4, 2, 15, 16)
    with pytest.raises(TypeError, match="config must be an NSAConfig"):
        nsa.NativeSparseAttention(64, 4, 2, 16, 16, config={"window_size": 8})
    m = nsa.NativeSparseAttention(64, 4, 2, 16, 16, config=CFG)
    with pytest.raises(ValueError, match=r"x must be \[B, T, 64\]"):
        m(torch.randn(1, 10, 32))
