"""The PyTorch reference (backend="torch") against the naive per-query transcription of docs/semantics.md."""
import math

import pytest
import torch

import nsa
from helpers import cfg_kwargs, make_inputs
from naive import naive_nsa

SMALL = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=16, sel_block_count=4,
                      sel_init_blocks=1, sel_local_blocks=2, window_size=16)
ODD = nsa.NSAConfig(cmp_block_size=6, cmp_stride=3, sel_block_size=9, sel_block_count=3,
                    sel_init_blocks=0, sel_local_blocks=1, window_size=1)

CASES = [  # (T, HQ, H, dk, dv, cfg)
    pytest.param(1, 2, 1, 8, 8, SMALL, id="T1"),
    pytest.param(7, 2, 2, 8, 4, SMALL, id="T7-shorter-than-l"),
    pytest.param(63, 4, 1, 8, 12, SMALL, id="T63-G4-dk!=dv"),
    pytest.param(111, 6, 2, 16, 8, SMALL, id="T111-G3"),
    pytest.param(50, 2, 2, 8, 8, ODD, id="T50-odd-sizes-window1"),
]


def _naive(t, cfg, scale=None):
    c = cfg
    return naive_nsa(*(t[k][0] for k in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")),
                     l=c.cmp_block_size, d=c.cmp_stride, lp=c.sel_block_size, n=c.sel_block_count,
                     init=c.sel_init_blocks, local=c.sel_local_blocks, w=c.window_size, scale=scale)


@pytest.mark.parametrize("T,HQ,H,dk,dv,cfg", CASES)
def test_every_branch_matches_naive(T, HQ, H, dk, dv, cfg):
    t, _ = make_inputs(T, HQ, H, dk, dv, cfg)
    ref = _naive(t, cfg)
    kw = dict(backend="torch")
    o_cmp, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=cfg.cmp_block_size,
                                          cmp_stride=cfg.cmp_stride, **kw)
    torch.testing.assert_close(o_cmp[0], ref["o_cmp"], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(lse[0], ref["lse"], rtol=1e-7, atol=1e-7)
    idx = nsa.select_blocks(t["q"], t["k_cmp"], lse, **cfg_kwargs(cfg), **kw)
    assert torch.equal(idx[0], ref["block_idx"])
    o_slc = nsa.selected_attention(t["q"], t["k_slc"], t["v_slc"], idx, sel_block_size=cfg.sel_block_size, **kw)
    torch.testing.assert_close(o_slc[0], ref["o_slc"], rtol=1e-7, atol=1e-7)
    o_win = nsa.sliding_window_attention(t["q"], t["k_win"], t["v_win"], window_size=cfg.window_size, **kw)
    torch.testing.assert_close(o_win[0], ref["o_win"], rtol=1e-7, atol=1e-7)
    o, idx2 = nsa.nsa_attention(**t, config=cfg, return_block_idx=True, **kw)
    torch.testing.assert_close(o[0], ref["o"], rtol=1e-7, atol=1e-7)
    assert torch.equal(idx2, idx)


def test_custom_scale_and_batch():
    cfg = SMALL
    t, _ = make_inputs(40, 4, 2, 8, 8, cfg, B=3)
    o = nsa.nsa_attention(**t, config=cfg, scale=0.3, backend="torch")
    for b in range(3):
        one = {k: v[b:b + 1] for k, v in t.items()}
        torch.testing.assert_close(o[b], _naive(one, cfg, scale=0.3)["o"], rtol=1e-7, atol=1e-7)


def test_no_visible_compressed_token_gives_zero_and_minus_inf():
    t, _ = make_inputs(20, 2, 1, 8, 8, SMALL)
    o, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=8, cmp_stride=4)
    assert torch.all(o[0, :7] == 0) and torch.all(lse[0, :7] == -math.inf)
    assert torch.isfinite(lse[0, 7:]).all()
    tiny, _ = make_inputs(5, 2, 1, 8, 8, SMALL)   # T < l: no compressed token at all
    o, lse = nsa.compressed_attention(tiny["q"], tiny["k_cmp"], tiny["v_cmp"], cmp_block_size=8, cmp_stride=4)
    assert tiny["k_cmp"].shape[1] == 0 and torch.all(o == 0) and torch.all(lse == -math.inf)


# ------------------------------------------------------------------ selection rule, by hand
def _pick(score_rows, t, **kw):
    from nsa.reference import pick_blocks
    score = torch.tensor(score_rows, dtype=torch.float64)[:, None, :]
    return pick_blocks(score, torch.tensor(t), **kw)[:, 0].tolist()


def test_selection_forced_blocks_ties_and_padding():
    kw = dict(sel_block_size=4, sel_block_count=4, sel_init_blocks=1, sel_local_blocks=2)
    # t=31 -> candidates 0..7; forced 0, 6, 7; one free slot: highest of 1..5 = block 3
    assert _pick([[0, 1, 2, 9, 3, 4, 0, 0]], [31], **kw) == [[0, 3, 6, 7]]
    # tie between blocks 2 and 4: the lower index wins
    assert _pick([[0, 1, 5, 0, 5, 0, 0, 0]], [31], **kw) == [[0, 2, 6, 7]]
    # forced blocks win even with score 0 against high scores
    assert _pick([[0, 9, 9, 9, 9, 9, 0, 0]], [31], **kw) == [[0, 1, 6, 7]]
    # fewer candidates than slots: every candidate, padded with -1
    assert _pick([[1, 2, 0, 0, 0, 0, 0, 0]], [5], **kw) == [[0, 1, -1, -1]]
    assert _pick([[1, 2, 0, 0, 0, 0, 0, 0]], [0], **kw) == [[0, -1, -1, -1]]
    # blocks beyond t never selected, whatever their score
    assert _pick([[0, 0, 0, 0, 0, 0, 0, 99]], [15], **kw) == [[0, 1, 2, 3]]


def test_selection_no_forced_blocks():
    kw = dict(sel_block_size=4, sel_block_count=2, sel_init_blocks=0, sel_local_blocks=0)
    assert _pick([[1, 3, 2, 0]], [15], **kw) == [[1, 2]]


def test_group_scores_are_summed():
    """Heads of one group share one selection: shuffling heads within the group changes nothing."""
    cfg = SMALL
    t, _ = make_inputs(64, 4, 1, 8, 8, cfg)
    _, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=8, cmp_stride=4)
    a = nsa.select_blocks(t["q"], t["k_cmp"], lse, **cfg_kwargs(cfg))
    perm = torch.tensor([2, 0, 3, 1])
    b = nsa.select_blocks(t["q"][:, :, perm], t["k_cmp"], lse[:, :, perm], **cfg_kwargs(cfg))
    assert torch.equal(a, b)


# ------------------------------------------------------------------ gradients
def test_gradcheck_every_input():
    cfg = SMALL
    t, _ = make_inputs(21, 2, 1, 4, 6, cfg, requires_grad=True)
    names = list(t)

    def f(*xs):
        return nsa.nsa_attention(*xs, config=cfg, backend="torch")
    # fast mode: the analytical and numerical Jacobians compared along random directions (a
    # wrong gradient of any input fails it), not column by column (149 s on 2 cores, CI)
    assert torch.autograd.gradcheck(f, tuple(t[k] for k in names), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("branch", ["cmp", "win", "slc"])
def test_gradcheck_branches(branch):
    cfg = SMALL
    t, _ = make_inputs(29, 2, 1, 4, 4, cfg, requires_grad=True)
    if branch == "cmp":
        f = lambda q, k, v: nsa.compressed_attention(q, k, v, cmp_block_size=8, cmp_stride=4)[0]
        args = (t["q"], t["k_cmp"], t["v_cmp"])
    elif branch == "win":
        f = lambda q, k, v: nsa.sliding_window_attention(q, k, v, window_size=5)
        args = (t["q"], t["k_win"], t["v_win"])
    else:
        idx = torch.randint(-1, 2, (1, 29, 1, 3), dtype=torch.int32)
        f = lambda q, k, v: nsa.selected_attention(q, k, v, idx, sel_block_size=16)
        args = (t["q"], t["k_slc"], t["v_slc"])
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------ packing and causality
def test_packed_equals_separate():
    cfg = SMALL
    lens = [1, 40, 7, 33]
    t, cu = make_inputs(0, 4, 2, 8, 4, cfg, seqlens=lens)
    o, idx = nsa.nsa_attention(**t, config=cfg, cu_seqlens=cu, return_block_idx=True)
    cc = nsa.compressed_cu_seqlens(cu, 8, 4).tolist()
    for i, (a, b) in enumerate(zip(cu.tolist()[:-1], cu.tolist()[1:])):
        one = {k: (v[:, cc[i]:cc[i + 1]] if k in ("k_cmp", "v_cmp") else v[:, a:b]) for k, v in t.items()}
        o1, idx1 = nsa.nsa_attention(**one, config=cfg, return_block_idx=True)
        torch.testing.assert_close(o[:, a:b], o1, rtol=0, atol=1e-12)
        assert torch.equal(idx[:, a:b], idx1)


def test_compressed_cu_seqlens():
    cu = torch.tensor([0, 5, 37, 37, 100], dtype=torch.int32)
    assert nsa.compressed_cu_seqlens(cu, 32, 16).tolist() == [0, 0, 1, 1, 3]


def test_causality():
    cfg = SMALL
    t, _ = make_inputs(70, 4, 2, 8, 8, cfg)
    o = nsa.nsa_attention(**t, config=cfg)
    cut = 45
    t2 = {k: v.clone() for k, v in t.items()}
    for k in ("q", "k_slc", "v_slc", "k_win", "v_win", "gates"):
        t2[k][:, cut:] = torch.randn_like(t2[k][:, cut:])
    first_hidden = (cut - cfg.cmp_block_size) // cfg.cmp_stride + 1   # first compressed token reaching `cut`
    t2["k_cmp"][:, first_hidden:] += 5.0
    t2["v_cmp"][:, first_hidden:] -= 5.0
    o2 = nsa.nsa_attention(**t2, config=cfg)
    torch.testing.assert_close(o[:, :cut], o2[:, :cut], rtol=0, atol=0)
    assert not torch.allclose(o[:, cut:], o2[:, cut:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_runs_close_to_float64(dtype):
    cfg = SMALL
    t, _ = make_inputs(80, 4, 2, 16, 8, cfg)
    ref, idx = nsa.nsa_attention(**t, config=cfg, return_block_idx=True)
    low = {k: v.to(dtype) for k, v in t.items()}
    o = nsa.selected_attention(low["q"], low["k_slc"], low["v_slc"], idx, sel_block_size=16)
    assert o.dtype == dtype
    exp = nsa.selected_attention(t["q"], t["k_slc"], t["v_slc"], idx, sel_block_size=16)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert (o.double() - exp).norm() / exp.norm() < tol


def test_long_sequence_memory_is_bounded():
    """T = 32768 forward with realistic heads stays within a few GB thanks to query chunking."""
    import resource
    cfg = nsa.NSAConfig()
    t, _ = make_inputs(32768, 4, 1, 32, 32, cfg, dtype=torch.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        o_cmp, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=32, cmp_stride=16)
        o = nsa.sliding_window_attention(t["q"], t["k_win"], t["v_win"], window_size=512)
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20
    assert torch.isfinite(o).all() and torch.isfinite(o_cmp).all()
    assert grown_gb < 3.0, f"peak RSS grew by {grown_gb:.2f} GB"
