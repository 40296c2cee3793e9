"""The Triton backend against the reference in float64.

Runs the real kernels: on CPU through the Triton interpreter (CI; float32 and float16), on a GPU
natively. Outputs are allocated NaN-poisoned (conftest), so unwritten elements fail.
"""
import pytest
import torch

import nsa
from helpers import CFG, ODD, TOL, cfg_kwargs, make_inputs, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FLA = nsa.NSAConfig(cmp_block_size=16, cmp_stride=16, sel_block_size=16, sel_block_count=2,
                    sel_init_blocks=1, sel_local_blocks=1, window_size=5)

SHAPES = [  # T, HQ, H, dk, dv, cfg
    pytest.param(1, 2, 1, 8, 8, CFG, id="T1-G2"),
    pytest.param(63, 4, 4, 16, 8, CFG, id="T63-G1-dk!=dv"),
    pytest.param(111, 6, 2, 8, 12, CFG, id="T111-G3"),
    pytest.param(70, 16, 1, 8, 8, CFG, id="T70-G16"),
    pytest.param(50, 4, 2, 48, 16, ODD, id="T50-odd-sizes-dk48=32+16"),
    pytest.param(64, 2, 1, 8, 8, FLA, id="T64-l=d=l'"),
    # a window wider than a key tile plus a tile of positions: the unmasked middle of the band
    pytest.param(100, 4, 2, 8, 8, CFG.replace(window_size=40), id="T100-wide-window"),
]


def _branches(t, cfg, backend):
    q = t["q"]
    o_cmp, lse = nsa.compressed_attention(q, t["k_cmp"], t["v_cmp"], cmp_block_size=cfg.cmp_block_size,
                                          cmp_stride=cfg.cmp_stride, backend=backend)
    o_win = nsa.sliding_window_attention(q, t["k_win"], t["v_win"], window_size=cfg.window_size, backend=backend)
    return o_cmp, lse, o_win


def _as(t, dtype):
    return {k: v.detach().to(dtype).requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,HQ,H,dk,dv,cfg", SHAPES)
def test_branches_forward_and_backward(T, HQ, H, dk, dv, cfg, dtype):
    t64, _ = make_inputs(T, HQ, H, dk, dv, cfg, device=DEV, seed=T + HQ)
    tk, tr = _as(t64, dtype), _as(t64, torch.float64)
    ok_, lk, wk = _branches(tk, cfg, "triton")
    orf, lr, wr = _branches(tr, cfg, "torch")
    assert rel_err(ok_, orf) < TOL[dtype] and rel_err(wk, wr) < TOL[dtype]
    finite = torch.isfinite(lr)
    assert torch.equal(torch.isfinite(lk), finite)            # -inf exactly where nothing is visible
    assert rel_err(lk[finite], lr[finite]) < TOL[dtype]
    # selected attention on the reference's selection (selection is tested on its own below)
    idx = nsa.select_blocks(tr["q"], tr["k_cmp"], lr, **cfg_kwargs(cfg), backend="torch")
    sk = nsa.selected_attention(tk["q"], tk["k_slc"], tk["v_slc"], idx, sel_block_size=cfg.sel_block_size, backend="triton")
    sr = nsa.selected_attention(tr["q"], tr["k_slc"], tr["v_slc"], idx, sel_block_size=cfg.sel_block_size, backend="torch")
    assert rel_err(sk, sr) < TOL[dtype]
    # backward: one random cotangent per output, lse's included
    g = [torch.randn(x.shape, dtype=torch.float64, device=DEV) for x in (orf, lr, wr, sr)]
    gl = torch.where(finite, g[1], 0)
    loss_k = sum((x.double() * y).sum() for x, y in zip((ok_, lk, wk, sk), (g[0], gl, g[2], g[3])))
    loss_r = sum((x * y).sum() for x, y in zip((orf, lr, wr, sr), (g[0], gl, g[2], g[3])))
    names = ["q", "k_cmp", "v_cmp", "k_win", "v_win", "k_slc", "v_slc"]
    grads_k = torch.autograd.grad(loss_k, [tk[n] for n in names])
    grads_r = torch.autograd.grad(loss_r, [tr[n] for n in names])
    for n, a, b in zip(names, grads_k, grads_r):
        if b.numel():
            assert rel_err(a, b) < TOL[dtype], n


def _check_selection(t, lse, cfg, idx_k, cu=None):
    """Selections must agree; where rounding could flip a near-tie, the kernel's choice must
    score (in float64) within 1e-5 of the reference's best."""
    idx_r = nsa.select_blocks(t["q"], t["k_cmp"], lse, **cfg_kwargs(cfg), cu_seqlens=cu, backend="torch")
    assert idx_k.shape == idx_r.shape and idx_k.dtype == torch.int32
    diff = (idx_k != idx_r).any(-1)
    assert diff.float().mean() < 0.02, f"{int(diff.sum())} of {diff.numel()} selections differ"
    if diff.any():
        from naive import naive_nsa
        assert cu is None
        c = cfg
        ref = naive_nsa(*(t[k][0].cpu() for k in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")),
                        l=c.cmp_block_size, d=c.cmp_stride, lp=c.sel_block_size, n=c.sel_block_count,
                        init=c.sel_init_blocks, local=c.sel_local_blocks, w=c.window_size)
        for tt, hk in diff[0].nonzero().tolist():
            s = ref["score"][tt, hk]
            pick = lambda ix: float(s[ix[ix >= 0].long()].sum())
            assert abs(pick(idx_k[0, tt, hk].cpu()) - pick(idx_r[0, tt, hk].cpu())) < 1e-5 * float(s.sum())


@pytest.mark.parametrize("T,HQ,H,dk,dv,cfg", SHAPES)
def test_select_blocks(T, HQ, H, dk, dv, cfg):
    t, _ = make_inputs(T, HQ, H, dk, dv, cfg, device=DEV, dtype=torch.float32, seed=7 * T)
    _, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=cfg.cmp_block_size,
                                      cmp_stride=cfg.cmp_stride, backend="torch")
    idx = nsa.select_blocks(t["q"], t["k_cmp"], lse, **cfg_kwargs(cfg), backend="triton")
    _check_selection({k: v.double() for k, v in t.items()}, lse.double(), cfg, idx)


def test_select_many_blocks_merges_chunks():
    """More candidate blocks than n, over several chunks of the running top-n merge."""
    cfg = nsa.NSAConfig(cmp_block_size=4, cmp_stride=2, sel_block_size=4, sel_block_count=3,
                        sel_init_blocks=1, sel_local_blocks=1, window_size=4)
    t, _ = make_inputs(150, 2, 1, 8, 8, cfg, device=DEV, dtype=torch.float32, seed=3)
    t["q"] = t["q"] * 3   # sharper probabilities: well-separated scores
    _, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=4, cmp_stride=2, backend="torch")
    idx = nsa.select_blocks(t["q"], t["k_cmp"], lse, **cfg_kwargs(cfg), backend="triton")
    _check_selection({k: v.double() for k, v in t.items()}, lse.double(), cfg, idx)


# small blocks, so that 90 positions span two chunks of 16 blocks (the carry between them):
# l'/d = 2, and l'/d = 3 (not a power of two: the kernel pads each block's token slots to 4)
R2 = nsa.NSAConfig(cmp_block_size=4, cmp_stride=2, sel_block_size=4, sel_block_count=4,
                   sel_init_blocks=1, sel_local_blocks=1, window_size=9)
R3 = R2.replace(cmp_block_size=2, cmp_stride=1, sel_block_size=3)


@pytest.mark.parametrize("spread,HQ,rows,cfg", [
    (1, 2, 32, R2), (2, 2, 32, R2), (2, 2, 16, R2), (1, 1, 16, R3), (2, 1, 16, R3), (2, 4, 32, R3)],
    ids=["split-G2-16pos", "stencil-G2-16pos", "G2-8pos", "split-G1-R3", "stencil-G1-R3", "G4-R3-8pos"])
def test_select_spread_modes(spread, HQ, rows, cfg, monkeypatch):
    """Every way of spreading probabilities over blocks (select.py), at tiles of 8 and 16
    positions, l'/d a power of two or not, against the float64 reference."""
    monkeypatch.setenv("NSA_TUNE", f'{{"select": [{rows}, 4, 1, {spread}]}}')
    t, _ = make_inputs(90, HQ, 1, 8, 8, cfg, device=DEV, dtype=torch.float32, seed=5 + spread)
    t["q"] = t["q"] * 3   # sharper probabilities: well-separated scores
    _, lse = nsa.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=cfg.cmp_block_size,
                                      cmp_stride=cfg.cmp_stride, backend="torch")
    idx = nsa.select_blocks(t["q"], t["k_cmp"], lse, **cfg_kwargs(cfg), backend="triton")
    _check_selection({k: v.double() for k, v in t.items()}, lse.double(), cfg, idx)


@pytest.mark.parametrize("cfg,lens,rows,dk", [(R2, [150, 9], 16, 8), (R3, [1, 90], 32, 48)],
                         ids=["R2-chunks", "R3-padded-slots-dk48=32+16"])
def test_cmp_select_g1(cfg, lens, rows, dk, monkeypatch):
    """G = 1: the compression attention and the selection in one kernel (select.py), its top
    list rescaled as the running max grows: o and lse as the float64 reference's, the selection
    as the reference's (near ties aside), over several chunks of blocks (R2: 16 blocks of 4
    tokens a chunk, the later tiles with unmasked chunks) and with padded token slots and a
    key dim in two tiles (R3)."""
    from nsa.triton import select
    monkeypatch.setenv("NSA_TUNE", f'{{"cmp_select_launch": [{rows}, 4, 1]}}')
    t, cu = make_inputs(0, 2, 2, dk, 8, cfg, seqlens=lens, device=DEV, dtype=torch.float32, seed=3)
    t["q"] = t["q"] * 3   # sharper probabilities: well-separated scores
    P = lambda x: x.reshape(-1, x.shape[2], x.shape[3]).contiguous()
    cu_k = nsa.compressed_cu_seqlens(cu, cfg.cmp_block_size, cfg.cmp_stride).to(torch.int32)
    o, lse, idx = select.cmp_select_fwd(P(t["q"]), P(t["k_cmp"]), P(t["v_cmp"]), cu, cu_k, 0.3, *cfg_kwargs(cfg).values())
    td = {k: v.double() for k, v in t.items()}
    o_r, lse_r = nsa.compressed_attention(td["q"], td["k_cmp"], td["v_cmp"], cmp_block_size=cfg.cmp_block_size,
                                          cmp_stride=cfg.cmp_stride, scale=0.3, cu_seqlens=cu, backend="torch")
    assert rel_err(o, P(o_r)) < TOL[torch.float32]
    finite = torch.isfinite(lse_r[0])
    assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], lse_r[0][finite]) < TOL[torch.float32]
    idx_r = nsa.select_blocks(td["q"], td["k_cmp"], lse_r, **cfg_kwargs(cfg), scale=0.3, cu_seqlens=cu, backend="torch")
    assert (idx[None] != idx_r).any(-1).float().mean() < 0.02


def test_cmp_select_rescales_list_and_carry():
    """The fused G = 1 kernel's scores live under the running max: when it grows (here from 1
    to 12 at the second chunk of blocks), both the top list and the spill carried into the
    chunk's first block must be rescaled. Logits are set exactly (q = e0, k_cmp = logit * e0,
    scale 1; R2: token i starts in block i // 2, token 2j+1 spills into block j+1): chunk 0
    (blocks 0-15, tokens 0-31) has logits -1, and 1 for its last token; chunk 1 has -20 for
    block 16's own tokens, 12 and 11 for block 31's, 0 elsewhere (ties there are computed
    alike). Rows that see all of chunk 1 pick blocks 0 (forced), 31, 32 (token 63's spill) and
    their own; an unscaled carry would pick 16, an unscaled list 15."""
    from nsa.triton.select import cmp_select_fwd
    T, cfg = 150, R2
    Tc = nsa.core.num_compressed(T, cfg.cmp_block_size, cfg.cmp_stride)
    logit = torch.zeros(Tc)
    logit[:31], logit[31], logit[32:34], logit[62], logit[63] = -1.0, 1.0, -20.0, 12.0, 11.0
    q = torch.zeros(T, 1, 8)
    q[:, :, 0] = 1
    k = torch.zeros(Tc, 1, 8)
    k[:, 0, 0] = logit
    v = torch.randn(Tc, 1, 8, generator=torch.Generator().manual_seed(0))
    cu, cu_k = (torch.tensor([0, n], dtype=torch.int32) for n in (T, Tc))
    _, _, idx = cmp_select_fwd(*(x.to(DEV) for x in (q, k, v, cu, cu_k)), 1.0, *cfg_kwargs(cfg).values())
    idx = idx.cpu()
    _, lse_r = nsa.compressed_attention(q[None].double(), k[None].double(), v[None].double(), scale=1.0,
                                        cmp_block_size=cfg.cmp_block_size, cmp_stride=cfg.cmp_stride, backend="torch")
    idx_r = nsa.select_blocks(q[None].double(), k[None].double(), lse_r, **cfg_kwargs(cfg), scale=1.0, backend="torch")[0]
    assert idx_r[140, 0].tolist() == [0, 31, 32, 35]
    assert torch.equal(idx, idx_r)


@pytest.mark.parametrize("dtype,HQ", [(torch.float32, 4), (torch.float16, 4), (torch.float32, 2)], ids=["fp32", "fp16", "G1-fp32"])
def test_nsa_attention_all_gradients_packed(dtype, HQ):
    """All of nsa_attention on packed sequences, output and every input's gradient, G = 2 and
    G = 1 (the fused compression + selection kernel)."""
    lens = [1, 37, 16, 70]
    t64, cu = make_inputs(0, HQ, 2, 16, 8, CFG, seqlens=lens, device=DEV, seed=11)
    tk, tr = _as(t64, dtype), _as(t64, torch.float64)
    ok_, ik = nsa.nsa_attention(**tk, config=CFG, cu_seqlens=cu, return_block_idx=True, backend="triton")
    orf, ir = nsa.nsa_attention(**tr, config=CFG, cu_seqlens=cu, return_block_idx=True, backend="torch")
    if dtype == torch.float32:
        assert (ik != ir).any(-1).float().mean() < 0.02
    # compare gradients on the kernel's own selection (a flipped near-tie changes the function)
    orf = nsa.core.compose_branches(nsa.reference, *(tr[k] for k in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")),
                            config=CFG, scale=None, cu_seqlens=cu)[0] if not torch.equal(ik, ir) else orf
    assert rel_err(ok_, orf) < TOL[dtype]
    g = torch.randn(orf.shape, dtype=torch.float64, device=DEV)
    ga = torch.autograd.grad((ok_.double() * g).sum(), list(tk.values()))
    gr = torch.autograd.grad((orf * g).sum(), list(tr.values()))
    for n, a, b in zip(tk, ga, gr):
        assert rel_err(a, b) < TOL[dtype], n


def test_packed_equals_separate():
    lens = [5, 40, 33]
    t, cu = make_inputs(0, 4, 2, 8, 8, CFG, seqlens=lens, device=DEV, dtype=torch.float32, seed=5)
    o = nsa.nsa_attention(**t, config=CFG, cu_seqlens=cu, backend="triton")
    cc = nsa.compressed_cu_seqlens(cu, 8, 4).tolist()
    b = cu.tolist()
    for i in range(len(lens)):
        one = {k: (v[:, cc[i]:cc[i + 1]] if k in ("k_cmp", "v_cmp") else v[:, b[i]:b[i + 1]]) for k, v in t.items()}
        torch.testing.assert_close(o[:, b[i]:b[i + 1]], nsa.nsa_attention(**one, config=CFG, backend="triton"),
                                   rtol=1e-6, atol=1e-6)


def test_batch_and_noncontiguous():
    t, _ = make_inputs(40, 4, 2, 8, 8, CFG, B=3, device=DEV, dtype=torch.float32, seed=9)
    t["q"] = t["q"].transpose(0, 1).contiguous().transpose(0, 1)          # non-contiguous view
    assert not t["q"].is_contiguous()
    a = nsa.nsa_attention(**t, config=CFG, backend="triton")
    r = nsa.nsa_attention(**{k: v.double() for k, v in t.items()}, config=CFG, backend="torch")
    assert rel_err(a, r) < TOL[torch.float32]


@pytest.mark.parametrize("ranges", [1, 3, 7], ids=["one-range", "3-ranges", "7-ranges"])
def test_compressed_dkv_query_ranges_and_determinism(ranges, monkeypatch):
    """The compressed dK/dV over packed sequences, its queries cut into ranges that every key
    tile shares (some of them empty for late key tiles and short sequences): float64's
    gradients, and the same bits on a second run (partials summed in a fixed order)."""
    monkeypatch.setenv("NSA_TUNE", f'{{"banded_splits": [{ranges}]}}')
    t, cu = make_inputs(0, 4, 2, 8, 8, CFG, device=DEV, dtype=torch.float32, seed=14, requires_grad=True,
                        seqlens=[37, 5, 70, 1, 23])
    g = torch.randn(1, 136, 4, 8, device=DEV)

    def grads(backend, cast):
        x = [cast(t[k]) for k in ("q", "k_cmp", "v_cmp")]
        o, _ = nsa.compressed_attention(*x, cmp_block_size=CFG.cmp_block_size, cmp_stride=CFG.cmp_stride,
                                        cu_seqlens=cu, backend=backend)
        return torch.autograd.grad((o * cast(g)).sum(), [t["q"], t["k_cmp"], t["v_cmp"]])
    a, b = grads("triton", lambda x: x), grads("triton", lambda x: x)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, grads("torch", lambda x: x.double())):
        assert rel_err(x, y) < TOL[torch.float32]


@pytest.mark.parametrize("segment", ["2", "1000000"], ids=["many-segments", "one-segment"])
def test_selected_dkv_segments_and_determinism(segment, monkeypatch):
    """dK/dV of the selected branch: split into partial sums or not, the same result; and the
    same bits on a second run (no atomics)."""
    monkeypatch.setenv("NSA_SEL_SEGMENT", segment)
    t, _ = make_inputs(80, 4, 2, 8, 8, CFG, device=DEV, dtype=torch.float32, seed=13, requires_grad=True)
    idx = torch.stack([torch.randperm(5)[:4] for _ in range(80 * 2)]).view(1, 80, 2, 4).int().sort(-1).values
    idx = torch.minimum(idx, (torch.arange(80) // 16).view(1, 80, 1, 1).int())   # causal candidates
    idx = torch.where(idx.diff(dim=-1, prepend=idx[..., :1] - 1) == 0, -1, idx).sort(-1).values
    idx = torch.where(idx < 0, 99, idx).sort(-1).values
    idx = torch.where(idx == 99, -1, idx).to(DEV)
    g = torch.randn(1, 80, 4, 8, device=DEV)

    def grads():
        o = nsa.selected_attention(t["q"], t["k_slc"], t["v_slc"], idx, sel_block_size=16, backend="triton")
        return torch.autograd.grad((o * g).sum(), [t["q"], t["k_slc"], t["v_slc"]])
    a, b = grads(), grads()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    o = nsa.selected_attention(*(t[k].double() for k in ("q", "k_slc", "v_slc")), idx, sel_block_size=16, backend="torch")
    r = torch.autograd.grad((o * g.double()).sum(), [t["q"], t["k_slc"], t["v_slc"]])
    for x, y in zip(a, r):
        assert rel_err(x, y) < TOL[torch.float32]


@pytest.mark.parametrize("HQ,H", [(2, 2), (4, 2), (8, 2), (16, 1)], ids=["G1", "G2", "G4", "G16"])
def test_selected_layouts(HQ, H, monkeypatch):
    """Both selected-attention layouts (per query; per key block with partials merged, here over
    several row chunks and list segments; the key-centric backward also in passes of one KV
    head each) on packed sequences with empty slots: output and gradients equal the float64
    reference, and the forwards' lse (it feeds the backward) agree. Segments of 40 list positions:
    several query tiles a program at every G (the forward loads a tile's query rows one tile
    ahead), the first block's list still split."""
    monkeypatch.setenv("NSA_SEL_SEGMENT", "40")
    lens = [70, 3, 45]
    t, cu = make_inputs(0, HQ, H, 16, 8, CFG, seqlens=lens, device=DEV, dtype=torch.float32, seed=HQ,
                        requires_grad=True)
    tr = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    with torch.no_grad():
        _, lse = nsa.compressed_attention(tr["q"], tr["k_cmp"], tr["v_cmp"], cmp_block_size=CFG.cmp_block_size,
                                          cmp_stride=CFG.cmp_stride, cu_seqlens=cu, backend="torch")
        idx = nsa.select_blocks(tr["q"], tr["k_cmp"], lse, **cfg_kwargs(CFG), cu_seqlens=cu, backend="torch")
    assert (idx < 0).any()
    names = ["q", "k_slc", "v_slc"]
    run = lambda x, backend: nsa.selected_attention(*(x[n] for n in names), idx, sel_block_size=CFG.sel_block_size,
                                                    scale=0.25, cu_seqlens=cu, backend=backend)
    o_r = run(tr, "torch")
    g = torch.randn(o_r.shape, dtype=torch.float64, device=DEV)
    grads_r = torch.autograd.grad((o_r * g).sum(), [tr[n] for n in names])
    from nsa.triton import selected
    P = lambda x: x.detach().reshape(-1, x.shape[2], x.shape[3]).contiguous()
    lses = []
    # key-centric budgets: 48 rows -> row chunks; half of 120 rows of 2 heads fits one head's 118 rows -> head passes
    for kc, rows in ((0, 48), (1, 48), (1, 120)):
        assert H == 1 or (rows * H // 2 // 118 == 1) == (rows == 120)
        monkeypatch.setenv("NSA_TUNE", f'{{"selected_kc": [{kc}], "selected_kc_bwd": [{kc}], "selected_kc_rows": [{rows}]}}')
        o = run(t, "triton")
        assert rel_err(o, o_r) < TOL[torch.float32], kc
        grads = torch.autograd.grad((o.double() * g).sum(), [t[n] for n in names])
        for n, x, y in zip(names, grads, grads_r):
            assert rel_err(x, y) < TOL[torch.float32], (kc, rows, n)
        lses.append(selected.selected_fwd(P(t["q"]), P(t["k_slc"]), P(t["v_slc"]), P(idx), cu, 0.25, CFG.sel_block_size)[1])
    assert torch.isfinite(lses[0]).all()
    for x in lses[1:]:
        torch.testing.assert_close(x, lses[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("HQ,H", [(2, 2), (8, 2)], ids=["G1", "G4"])
def test_selected_any_indices(HQ, H, monkeypatch):
    """selected_attention takes any selection: forced blocks missing, blocks after the query's
    own (none of their keys is visible; past a packed sequence's end they do not exist, and the
    key-centric index once mapped them into the next sequence), empty slots. Both layouts give
    the float64 reference's output and gradients."""
    lens = [50, 3, 29]
    t, cu = make_inputs(0, HQ, H, 16, 8, CFG, seqlens=lens, device=DEV, dtype=torch.float32, seed=5,
                        requires_grad=True)
    N, n = sum(lens), 4
    g = torch.Generator().manual_seed(7)
    last = torch.cat([torch.arange(x) for x in lens])[:, None, None] // 16
    idx = torch.randint(-1, 5, (N, H, n), generator=g)
    near = last - torch.randint(0, 2, (N, H, n), generator=g)          # own or previous block
    idx = torch.where(torch.rand(N, H, n, generator=g) < 0.4, near, idx)
    idx = torch.where(idx > last + 1, -1, idx).sort(-1).values             # up to one block after
    idx = torch.where(idx.diff(dim=-1, prepend=idx[..., :1] - 1) == 0, -1, idx).int()   # unique
    past_end = idx > torch.tensor([(x - 1) // 16 for x in lens]).repeat_interleave(torch.tensor(lens))[:, None, None]
    assert past_end.any() and (idx == -1).any() and not (idx == last).any(-1).all()
    idx = idx.view(1, N, H, n).to(DEV)
    names = ["q", "k_slc", "v_slc"]
    tr = {k: t[k].detach().double().requires_grad_() for k in names}
    run = lambda x, backend: nsa.selected_attention(*(x[k] for k in names), idx, sel_block_size=16, scale=0.25,
                                                    cu_seqlens=cu, backend=backend)
    o_r = run(tr, "torch")
    gr = torch.randn(o_r.shape, dtype=torch.float64, generator=g).to(DEV)
    grads_r = torch.autograd.grad((o_r * gr).sum(), [tr[k] for k in names])
    for kc in (0, 1):
        monkeypatch.setenv("NSA_TUNE", f'{{"selected_kc": [{kc}], "selected_kc_bwd": [{kc}]}}')
        o = run(t, "triton")
        assert rel_err(o, o_r) < TOL[torch.float32], kc
        grads = torch.autograd.grad((o.double() * gr).sum(), [t[k] for k in names])
        for k, x, y in zip(names, grads, grads_r):
            assert rel_err(x, y) < TOL[torch.float32], (kc, k)


@pytest.mark.parametrize("HQ", [4, 2], ids=["G2", "G1"])
def test_fused_backward_frees_branch_outputs(HQ):
    """The eager nsa_attention is one autograd node that keeps its three branch outputs until
    the backward has read them, then drops them; a second backward through the graph
    recomputes them and gives the same gradients, bit for bit (G = 1: the recompute runs the
    fused compression + selection kernel and keeps the first selection)."""
    t, _ = make_inputs(40, HQ, 2, 8, 8, CFG, device=DEV, dtype=torch.float32, seed=19, requires_grad=True)
    o = nsa.nsa_attention(**t, config=CFG, backend="triton")
    node = o.grad_fn
    while not hasattr(node, "branch_out"):   # past the reshape back to [B, T, HQ, dv]
        node = node.next_functions[0][0]
    assert len(node.branch_out) == 3 and all(x.shape == (40, HQ, 8) for x in node.branch_out)
    g = torch.randn(o.shape, device=DEV)
    first = torch.autograd.grad(o, list(t.values()), g, retain_graph=True)
    assert node.branch_out is None
    second = torch.autograd.grad(o, list(t.values()), g)
    for n, a, b in zip(t, first, second):
        assert torch.equal(a, b), n


def test_torch_compile_fullgraph():
    """The kernels are custom ops with fake implementations: torch.compile traces the whole
    NSA call (forward and backward) without a graph break. The compiled graph composes the
    custom ops; eager runs the fused node: both give the same output and gradients."""
    t, _ = make_inputs(40, 4, 2, 8, 8, CFG, device=DEV, dtype=torch.float32, seed=17, requires_grad=True)
    f = lambda *xs: nsa.nsa_attention(*xs, config=CFG, backend="triton")
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = list(t.values())
    a, b = f(*xs), cf(*xs)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.sum(), xs)
    gb = torch.autograd.grad(b.sum(), xs)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_float64_is_refused():
    t, _ = make_inputs(20, 2, 1, 8, 8, CFG, device=DEV)
    with pytest.raises(TypeError, match="backend='triton' supports float32/float16/bfloat16"):
        nsa.nsa_attention(**t, config=CFG, backend="triton")


@pytest.mark.parametrize("N,chunk,wide", [(300, 300, False), (4000, 48, False), (300, 100, True)],
                         ids=["int16-keys", "int32-keys", "int64-keys"])
def test_inverse_index(N, chunk, wide, monkeypatch):
    """The inverse index against a direct construction: every kept (row, head, slot) entry sits
    in its (chunk, head, block) list at a position of its own, lists in row order, pos_of
    pointing back at it, left-out slots (empty, or a block after the row's own) at -1; for
    bucket counts that need 16-bit and 32-bit sort keys, and with 64-bit keys forced (> 2^31
    buckets: too many rows for a test)."""
    from nsa.triton import index
    if wide:
        monkeypatch.setattr(index, "sort_key_dtype", lambda n: torch.int64)
    H, n, L = 2, 4, 16
    lens = [N - N // 3, N // 3]
    cu = torch.tensor([0, lens[0], N], dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(N)
    pos = torch.cat([torch.arange(x) for x in lens])
    idx = torch.randint(-1, 1 + max(lens) // L, (N, H, n), generator=g).int()
    ii = index.inverse_index(idx.to(DEV), cu, L, seg=8, chunk=chunk, keep_empty=False)
    C, NB1 = -(-N // chunk), H * ii.nbu + 1
    assert (C * NB1 < 2 ** 15) == (N == 300)
    if not wide:   # the key type the bucket count asks for (forced to int64 above otherwise)
        assert index.sort_key_dtype(C * NB1) == (torch.int16 if N == 300 else torch.int32)
    seq = (torch.arange(N) >= lens[0]).long()
    first_block = torch.tensor([0, -(-lens[0] // L)])[seq]
    kept = (idx >= 0) & (idx <= (pos // L)[:, None, None])
    q_list, pos_of, list_cu = ii.q_list.cpu(), ii.pos_of.cpu(), ii.list_cu.cpu().long()
    assert torch.equal(pos_of < 0, ~kept)
    rows, heads, slots = kept.nonzero(as_tuple=True)
    p = pos_of[rows, heads, slots].long()
    assert torch.equal(q_list[p].long(), rows) and p.unique().numel() == p.numel()   # a position each
    bucket = (rows // chunk) * NB1 + heads * ii.nbu + first_block[rows] + idx[rows, heads, slots].long()
    assert ((list_cu[bucket] <= p) & (p < list_cu[bucket + 1])).all()
    assert int(list_cu[-1]) == N * H * n
    for b in bucket.unique()[:50]:   # each list in row order
        lst = q_list[list_cu[b]:list_cu[b + 1]]
        assert (lst[1:] >= lst[:-1]).all()
    counts = (list_cu[1:] - list_cu[:-1]).view(C, NB1)[:, :-1]
    for keep in (False, True):   # segments of 8 entries per bucket, at least one in chunk 0 with keep_empty
        jj = index.inverse_index(idx.to(DEV), cu, L, seg=8, chunk=chunk, keep_empty=True) if keep else ii
        nseg = (counts + 7) // 8
        if keep:
            nseg[0] = nseg[0].clamp(min=1)
        zero = torch.zeros(C, 1, dtype=torch.long)
        assert torch.equal(jj.seg_cu.cpu().long(), torch.cat([zero, nseg.cumsum(1)], 1))
        assert torch.equal(jj.part_cu.cpu().long(), torch.cat([zero, torch.where(nseg > 1, nseg, 0).cumsum(1)], 1))


def test_banded_launch_shapes_fit_shared_memory(monkeypatch):
    """The GPU launch shapes of the banded kernels fit an H100/H200 block's shared memory at every
    supported head dim (64 to 256, dk != dv) and element size: dk = dv = 256 asked for 256 KB in
    the forward and 320 KB in dQ, which fails at launch. banded_smem is the compiled kernels' size
    for the forward and dQ (benchmarks/ptxas_report.py); measured shapes are kept where they fit."""
    from nsa.triton import tuning
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.delenv("NSA_TUNE", raising=False)
    assert tuning.banded("fwd", 192, 128, 16) == (128, 64, 8, 3)   # the paper shape's, unchanged
    assert tuning.banded("dq", 192, 128, 16) == (128, 64, 8, 3)
    assert tuning.banded("dq", 256, 256, 16) != (128, 64, 8, 3)
    for kind in ("fwd", "dq", "dkv"):
        for dk in (64, 128, 192, 256):
            for dv in (64, 128, 256):
                for gp in (1, 4, 16):
                    for win in (0, 512):
                        for esize in (2, 4):
                            rows, bn, warps, stages = tuning.banded(kind, dk, dv, gp, win, esize)
                            assert tuning.banded_smem(kind, rows, bn, stages, dk, dv, esize) <= tuning.SMEM_LIMIT
                            assert stages >= 1 and warps in (4, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_kernel_equals_reference(dtype):
    """nsa.triton.rope on strided views (a projection's q and k slices, heads of different
    counts, rotated in one launch), positions restarting as packed sequences do, against
    nsa.layer.rotary in float64: forward, and the backward (the kernel at the opposite angle)
    against autograd's, for each tensor, within twice the error of PyTorch's rotary in the same
    dtype (positions up to 131k: the fp32 angle's rounding)."""
    from nsa.layer import rope_freqs, rotary
    from nsa.triton.rope import rotary as rotary_kernel
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 37, 4 * 16 + 3 * 26, generator=g, dtype=torch.float64)   # [B, T, q | k,v heads]
    pos = torch.cat([torch.arange(20), torch.arange(17)]).expand(2, -1) + torch.tensor([[0], [131000]])
    views = lambda t: (t[..., :64].view(2, 37, 4, 16), t[..., 64:].view(2, 37, 3, 26)[..., :16])
    xs64 = [v.requires_grad_() for v in views(y.clone())]
    want = [rotary(x, pos, 500.0) for x in xs64]
    dws = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    want_dx = torch.autograd.grad(sum((w * d).sum() for w, d in zip(want, dws)), xs64)
    yd = y.to(dtype).requires_grad_()
    xs = views(yd)
    # PyTorch's rotary in this dtype: the error the kernel is judged against (the GPU check's rule;
    # at position 131000 an fp32 angle alone is off by ~1e-2 rad)
    same = [rotary(x, pos, 500.0) for x in xs]
    same_dx = torch.autograd.grad(sum((w * d.to(dtype)).sum() for w, d in zip(same, dws)), xs)
    for n in (1, 2):   # one tensor, and two in one launch
        got = rotary_kernel(xs[:n], pos, rope_freqs(16, 500.0, "cpu", torch.float32))
        assert all(o.is_contiguous() and o.dtype == dtype for o in got)
        got_dx = torch.autograd.grad(sum((o * d.to(dtype)).sum() for o, d in zip(got, dws)), xs[:n])
        for a, b, eager in zip((*got, *got_dx), (*want[:n], *want_dx[:n]), (*same[:n], *same_dx[:n])):
            err = lambda y: ((y.double() - b).norm() / b.norm()).item()
            assert err(a) <= 2 * err(eager) + 1e-6, (err(a), err(eager))
