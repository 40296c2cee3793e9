"""nsa_decode (one step over a KV cache) == nsa_attention at the same position.

The torch backend is checked against the parallel forward in float64 (exact up to rounding);
the Triton decode kernels (interpreter on CPU, natively on a GPU) against float64 in
float32/float16, with NaN-poisoned outputs and scratch (conftest).
"""
import pytest
import torch

import nsa
from helpers import CFG, ODD, TOL, make_inputs, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LONG = nsa.NSAConfig(cmp_block_size=16, cmp_stride=8, sel_block_size=32, sel_block_count=3,
                     sel_init_blocks=1, sel_local_blocks=1, window_size=24)   # l' > a key tile


def as_cache(t, lengths, cfg, capacity, ring):
    """Cache tensors holding each row's first lengths[b] tokens of the full-sequence inputs t,
    the window in a ring of `ring` slots (position p in slot p % ring), the rest garbage."""
    B = t["q"].shape[0]
    g = torch.Generator().manual_seed(7)
    junk = lambda like, n: torch.randn(B, n, *like.shape[2:], generator=g, dtype=torch.float64).to(like)
    c = {"k_cmp": junk(t["k_cmp"], cfg.num_compressed(capacity)), "v_cmp": junk(t["v_cmp"], cfg.num_compressed(capacity)),
         "k_slc": junk(t["k_slc"], capacity), "v_slc": junk(t["v_slc"], capacity),
         "k_win": junk(t["k_win"], ring), "v_win": junk(t["v_win"], ring)}
    for b, L in enumerate(lengths):
        nc = cfg.num_compressed(L)
        for n in ("k_cmp", "v_cmp"):
            c[n][b, :nc] = t[n][b, :nc]
        for n in ("k_slc", "v_slc"):
            c[n][b, :L] = t[n][b, :L]
        for p in range(max(0, L - ring), L):
            for n in ("k_win", "v_win"):
                c[n][b, p % ring] = t[n][b, p]
    rows = torch.arange(B)
    last = torch.tensor(lengths) - 1
    return c, t["q"][rows, last], t["gates"][rows, last]


def _case(T, HQ, H, dk, dv, cfg, lengths, dtype, ring=None, seed=0, dev=DEV):
    B = len(lengths)
    t, _ = make_inputs(T, HQ, H, dk, dv, cfg, B=B, seed=seed)
    full, idx_full = nsa.nsa_attention(**t, config=cfg, return_block_idx=True, backend="torch")
    ring = ring or min(cfg.window_size, T)
    c, q, gates = as_cache(t, lengths, cfg, T, ring)
    rows, last = torch.arange(B), torch.tensor(lengths) - 1
    want, want_idx = full[rows, last], idx_full[rows, last]
    args = {k: v.to(dev, dtype) for k, v in c.items()}
    return (q.to(dev, dtype), args, gates.to(dev, dtype),
            torch.tensor(lengths, dtype=torch.int32, device=dev), want, want_idx)


CASES = [  # T, HQ, H, dk, dv, cfg, lengths, ring
    pytest.param(70, 4, 2, 8, 8, CFG, [70, 1, 33, 7, 16, 64], None, id="G2-mixed-lengths"),
    pytest.param(90, 16, 1, 16, 8, CFG, [90, 17, 48], 24, id="G16-ring-larger-than-window"),
    pytest.param(40, 3, 3, 8, 12, CFG, [40, 9], 40, id="G1-ring=capacity-dk!=dv"),
    pytest.param(50, 4, 2, 24, 16, ODD.replace(window_size=5), [50, 6, 5, 31], None, id="odd-sizes"),
    pytest.param(150, 8, 2, 16, 16, LONG, [150, 33, 64, 1, 97], None, id="long-blocks"),
]


@pytest.mark.parametrize("T,HQ,H,dk,dv,cfg,lengths,ring", CASES)
def test_reference_decode_equals_parallel(T, HQ, H, dk, dv, cfg, lengths, ring):
    q, c, gates, lens, want, want_idx = _case(T, HQ, H, dk, dv, cfg, lengths, torch.float64, ring, dev="cpu")
    o, idx = nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=cfg, return_block_idx=True,
                            backend="torch")
    torch.testing.assert_close(o, want, rtol=0, atol=1e-12)
    assert torch.equal(idx, want_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,HQ,H,dk,dv,cfg,lengths,ring", CASES)
def test_triton_decode(T, HQ, H, dk, dv, cfg, lengths, ring, dtype):
    q, c, gates, lens, want, want_idx = _case(T, HQ, H, dk, dv, cfg, lengths, dtype, ring, seed=T)
    o, idx = nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=cfg, return_block_idx=True,
                            backend="triton")
    assert torch.equal(idx.cpu(), want_idx)   # selection matches float64's exactly
    assert rel_err(o.cpu(), want) < TOL[dtype]


def test_decode_errors():
    q, c, gates, lens, _, _ = _case(40, 4, 2, 8, 8, CFG, [40, 3], torch.float64, dev="cpu")
    run = lambda **kw: nsa.nsa_decode(**{**dict(q=q, gates=gates, lengths=lens, config=CFG, **c), **kw})
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 40\]"):
        run(lengths=torch.tensor([41, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths must be in"):
        run(lengths=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="window ring"):
        run(k_win=c["k_win"][:, :8], v_win=c["v_win"][:, :8])
    with pytest.raises(ValueError, match="compressed tokens"):
        run(k_cmp=c["k_cmp"][:, :2], v_cmp=c["v_cmp"][:, :2])
    with pytest.raises(TypeError, match="k_slc must have the dtype"):
        run(k_slc=c["k_slc"].float())
    with pytest.raises(ValueError, match=r"gates.shape\[0\]"):
        run(gates=gates[:1])
    with pytest.raises(ValueError, match="rank 3"):
        run(q=q[:, None])
    with pytest.raises(TypeError, match="lengths must be int32"):
        run(lengths=lens.float())


# ----------------------------------------------------------------------------- nsa_extend
def _extend_case(T, HQ, H, dk, dv, cfg, lengths, S, dtype, extra=0, seed=0, dev=DEV):
    """Rows holding lengths[b] tokens whose last S are new; the window tensor holds positions
    lengths[b] - Wt .. lengths[b] - 1 (Wt = S + window_size - 1 + extra, garbage below 0)."""
    B = len(lengths)
    t, _ = make_inputs(T, HQ, H, dk, dv, cfg, B=B, seed=seed)
    full, idx_full = nsa.nsa_attention(**t, config=cfg, return_block_idx=True, backend="torch")
    c, _, _ = as_cache(t, lengths, cfg, T, min(cfg.window_size, T))
    Wt = S + min(cfg.window_size - 1, T - S) + extra
    g = torch.Generator().manual_seed(3)
    for n in ("k_win", "v_win"):
        win = torch.randn(B, Wt, *t[n].shape[2:], generator=g, dtype=torch.float64)
        for b, L in enumerate(lengths):
            for j in range(Wt):
                if L - Wt + j >= 0:
                    win[b, j] = t[n][b, L - Wt + j]
        c[n] = win
    pos = torch.stack([torch.arange(L - S, L) for L in lengths])
    rows = torch.arange(B)[:, None]
    q, gates = t["q"][rows, pos], t["gates"][rows, pos]
    args = {k: v.to(dev, dtype) for k, v in c.items()}
    return (q.to(dev, dtype), args, gates.to(dev, dtype), torch.tensor(lengths, dtype=torch.int32, device=dev),
            full[rows, pos], idx_full[rows, pos])


EXTEND = [  # T, HQ, H, dk, dv, cfg, lengths, S, extra window slots
    pytest.param(90, 4, 2, 8, 8, CFG, [90, 13, 40, 64], 13, 0, id="G2-mid-block-mid-window"),
    pytest.param(96, 16, 1, 16, 8, CFG, [96, 50, 21], 21, 5, id="G16-odd-chunk-empty-prefix"),
    pytest.param(60, 3, 3, 8, 12, CFG, [60, 7, 31], 7, 0, id="G1-dk!=dv"),
    pytest.param(150, 8, 2, 16, 16, LONG, [150, 70, 41], 41, 0, id="long-blocks"),
    pytest.param(50, 4, 2, 24, 16, ODD.replace(window_size=5), [50, 9, 33], 9, 2, id="odd-sizes"),
]


@pytest.mark.parametrize("T,HQ,H,dk,dv,cfg,lengths,S,extra", EXTEND)
def test_reference_extend_equals_parallel(T, HQ, H, dk, dv, cfg, lengths, S, extra):
    q, c, gates, lens, want, want_idx = _extend_case(T, HQ, H, dk, dv, cfg, lengths, S, torch.float64, extra,
                                                     dev="cpu")
    o, idx = nsa.nsa_extend(q, **c, gates=gates, lengths=lens, config=cfg, return_block_idx=True, backend="torch")
    torch.testing.assert_close(o, want, rtol=0, atol=1e-12)
    assert torch.equal(idx, want_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,HQ,H,dk,dv,cfg,lengths,S,extra", EXTEND)
def test_triton_extend(T, HQ, H, dk, dv, cfg, lengths, S, extra, dtype):
    q, c, gates, lens, want, want_idx = _extend_case(T, HQ, H, dk, dv, cfg, lengths, S, dtype, extra, seed=T)
    o, idx = nsa.nsa_extend(q, **c, gates=gates, lengths=lens, config=cfg, return_block_idx=True,
                            backend="triton")
    assert torch.equal(idx.cpu(), want_idx)   # selection matches float64's exactly
    assert rel_err(o.cpu(), want) < TOL[dtype]


def test_extend_errors():
    q, c, gates, lens, _, _ = _extend_case(40, 4, 2, 8, 8, CFG, [40, 9], 5, torch.float64, dev="cpu")
    run = lambda **kw: nsa.nsa_extend(**{**dict(q=q, gates=gates, lengths=lens, config=CFG, **c), **kw})
    with pytest.raises(ValueError, match=r"lengths must be in \[5, 40\]"):
        run(lengths=torch.tensor([40, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k_win holds 12 tokens; the 5 new ones"):
        run(k_win=c["k_win"][:, -12:], v_win=c["v_win"][:, -12:])
    with pytest.raises(ValueError, match=r"gates.shape\[1\] \(new tokens"):
        run(gates=gates[:, :4])
    with pytest.raises(ValueError, match="rank 4"):
        run(q=q[:, 0])
