"""Decode kernels: one NSA step over a KV cache, flash-decoding style, in four launches.

Each row b of the batch has its own length L_b; its query sits at position L_b - 1. A program
owns one (row, KV head) and all G query heads of its group (group-centric: each K/V tile is
loaded once for the group). Work is split over the keys for occupancy; every split writes a
partial (max, sum, acc) and a merge kernel combines them by log-sum-exp:

1. cmp_win: grid (B*H, S_C + S_W). Splits 0..S_C-1 attend slices of the compressed tokens and
   keep their logits (fp32, in a scratch the size of G compressed rows: far fewer bytes than the
   keys) for scoring; splits S_C.. attend slices of the window (a ring buffer).
2. score: grid (B*H, S_B). Merges the compression splits' (max, sum) into the lse, turns the
   stored logits into probabilities, sums them over the group and spreads them over the
   selection blocks by overlap: one fp32 score per block (a split owns a range of blocks).
3. selected: grid (B*H, S_S). Every split picks the top-n blocks from the scores (n rounds of
   max-and-remove over packed (score, block) keys: no sort on the critical path) and attends
   its share of them, token by token.
4. merge: grid (B*H, G). Combines each branch's partials for one query head; applies the gates.

Shapes are fixed by the cache and the launch: lengths are read on the device, so the step has
no host sync and can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from . import tuning
from .launch import precision

from .select import _merge_top, spread_counts
from .utils import LOG2E, empty, pow2, softmax_step


@triton.jit
def _rows(p, ok, ring, table, PPG: tl.constexpr):
    """Buffer rows of positions p: row p % ring of the row's own buffer or, paged (PPG > 0),
    row p % PPG of page table[p // PPG] (table: the row's entries of the page table)."""
    if PPG > 0:
        r = tl.load(table + p // PPG, mask=ok, other=0).to(tl.int64) * PPG + p % PPG
    else:
        r = (p % ring).to(tl.int64)
    return r


@triton.jit
def _attend_tile(qt, k_row0, v_row0, p, ok, ring, table, m_i, l_i, acc, scale_log2,
                 H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, PREC: tl.constexpr, PPG: tl.constexpr):
    """One online-softmax step of the group's queries qt [GP, BK] over key positions p [BN]
    (valid where ok); position p lives in row _rows(p) of k_row0/v_row0 (pointers to the
    head's first token of the row's buffer, or of the page pool; consecutive rows are H*D
    apart). Returns the log2-scaled logits too."""
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    r = _rows(p, ok, ring, table, PPG)
    kt = tl.load(k_row0 + r[None, :] * (H * DK) + dk[:, None], mask=ok[None, :] & (dk[:, None] < DK), other=0.0)
    s = tl.where(ok[None, :], tl.dot(qt, kt, input_precision=PREC) * scale_log2, float("-inf"))  # [GP, BN]
    vt = tl.load(v_row0 + r[:, None] * (H * DV) + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    m_i, l_i, acc = softmax_step(s, vt, m_i, l_i, acc, PREC)
    return m_i, l_i, acc, s


@triton.jit
def _attend_range(qt, k_row0, v_row0, lo, hi, ring, table, m_i, l_i, acc, scale_log2, logit_ptr, NC,
                  H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
                  STORE: tl.constexpr, PREC: tl.constexpr, PPG: tl.constexpr):
    """_attend_tile over the positions [lo, hi). STORE: also write the logits to
    logit_ptr[g * NC + p]."""
    g = tl.arange(0, GP)
    for p0 in range(lo, hi, BN):
        p = p0 + tl.arange(0, BN)
        ok = p < hi
        m_i, l_i, acc, s = _attend_tile(qt, k_row0, v_row0, p, ok, ring, table, m_i, l_i, acc, scale_log2,
                                        H, DK, DV, BK, BV, PREC, PPG)
        if STORE:
            tl.store(logit_ptr + g[:, None] * NC + p[None, :], s, mask=(g[:, None] < G) & ok[None, :])
    return m_i, l_i, acc


@triton.jit
def _store_partial(pm, pl, pacc, slot, m_i, l_i, acc, S_ALL: tl.constexpr, G: tl.constexpr,
                   GP: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    g = tl.arange(0, GP)
    dv = tl.arange(0, BV)
    base = (tl.program_id(0).to(tl.int64) * S_ALL + slot) * G
    tl.store(pm + base + g, m_i, mask=g < G)
    tl.store(pl + base + g, l_i, mask=g < G)
    tl.store(pacc + (base + g[:, None]) * DV + dv[None, :], acc, mask=(g[:, None] < G) & (dv[None, :] < DV))


@triton.jit
def _load_group(q, b, hk, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr,
                BK: tl.constexpr):
    g = tl.arange(0, GP)
    dk = tl.arange(0, BK)
    rows = b.to(tl.int64) * HQ + hk * G + g
    return tl.load(q + rows[:, None] * DK + dk[None, :], mask=(g[:, None] < G) & (dk[None, :] < DK), other=0.0)


@triton.jit
def _num_compressed(L, CMP_L: tl.constexpr, CMP_D: tl.constexpr):
    """Tc(L): compressed tokens of a row of L tokens (nsa.core.num_compressed, on the device)."""
    return tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)


@triton.jit
def _split(n, s, S: tl.constexpr, BN: tl.constexpr):
    """Split s of S over n items, in whole tiles of BN: its [lo, hi)."""
    per = tl.cdiv(tl.cdiv(n, S), BN) * BN
    lo = s * per
    return lo, tl.minimum(n, lo + per)


@triton.jit
def nsa_decode_cmp_win_kernel(
    q, k_cmp, v_cmp, k_win, v_win, lengths, logits, pm, pl, pacc,
    NC, W, scale_log2, slc_table, win_table, MP,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, WIN: tl.constexpr,
    S_C: tl.constexpr, S_W: tl.constexpr, S_ALL: tl.constexpr, PREC: tl.constexpr,
    PAGE: tl.constexpr,
):
    """PAGE > 0: paged cache (positions a page; MP entries a table row): the compressed tokens
    through slc_table (PAGE // CMP_D of them a page), the window through win_table."""
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // H
    hk = bh % H
    L = tl.load(lengths + b)
    qt = _load_group(q, b, hk, HQ, G, GP, DK, BK)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BV], tl.float32)
    if s < S_C:
        nc = _num_compressed(L, CMP_L, CMP_D)
        lo, hi = _split(nc, s, S_C, BN)
        row0 = hk if PAGE > 0 else (b.to(tl.int64) * NC) * H + hk
        m_i, l_i, acc = _attend_range(qt, k_cmp + row0 * DK, v_cmp + row0 * DV, lo, hi, NC,
                                      slc_table + b.to(tl.int64) * MP, m_i, l_i, acc, scale_log2,
                                      logits + bh.to(tl.int64) * G * NC, NC, H, G, GP, DK, DV, BK, BV, BN,
                                      True, PREC, PAGE // CMP_D)
    else:
        first = tl.maximum(L - WIN, 0)
        lo, hi = _split(L - first, s - S_C, S_W, BN)
        row0 = hk if PAGE > 0 else (b.to(tl.int64) * W) * H + hk
        m_i, l_i, acc = _attend_range(qt, k_win + row0 * DK, v_win + row0 * DV, first + lo, first + hi,
                                      W, win_table + b.to(tl.int64) * MP, m_i, l_i, acc, scale_log2, logits, NC,
                                      H, G, GP, DK, DV, BK, BV, BN, False, PREC, PAGE)
    _store_partial(pm, pl, pacc, s, m_i, l_i, acc, S_ALL, G, GP, DV, BV)


@triton.jit
def nsa_decode_score_kernel(
    lengths, logits, pm, pl, scores, NC, NB,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, S_C: tl.constexpr, S_B: tl.constexpr,
    S_ALL: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
    BCH: tl.constexpr, RP: tl.constexpr,
):
    bh = tl.program_id(0)
    L = tl.load(lengths + bh // H)
    nc = _num_compressed(L, CMP_L, CMP_D)
    g = tl.arange(0, GP)
    # lse (log2) of the compression branch from its splits
    m = tl.full([GP], float("-inf"), tl.float32)
    for s in range(S_C):
        m = tl.maximum(m, tl.load(pm + (bh.to(tl.int64) * S_ALL + s) * G + g, mask=g < G, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([GP], tl.float32)
    for s in range(S_C):
        base = (bh.to(tl.int64) * S_ALL + s) * G + g
        ms = tl.load(pm + base, mask=g < G, other=float("-inf"))
        l_sum += tl.load(pl + base, mask=g < G, other=0.0) * tl.exp2(ms - m_use)
    lse2 = m_use + tl.log2(tl.where(l_sum > 0, l_sum, 1.0))

    R: tl.constexpr = SEL_L // CMP_D
    r = tl.arange(0, RP)
    w_in, w_spill = spread_counts(r, R, CMP_L, CMP_D, SEL_L)   # d times the weights of docs/semantics.md §2
    lo, hi = _split((L - 1) // SEL_L + 1, tl.program_id(1), S_B, BCH)
    lg_row = logits + bh.to(tl.int64) * G * NC
    for j0 in range(lo, hi, BCH):
        j = j0 + tl.arange(0, BCH)
        i = j[:, None] * R + r[None, :]                                    # [BCH, RP]
        ok = (i < nc) & (r[None, :] < R)
        lg = tl.load(lg_row + g[:, None, None] * NC + i[None, :, :],
                     mask=ok[None, :, :] & (g[:, None, None] < G), other=float("-inf"))
        pg = tl.sum(tl.exp2(lg - lse2[:, None, None]), axis=0)              # [BCH, RP] group sum
        row = scores + bh.to(tl.int64) * 2 * NB
        tl.store(row + j, tl.sum(pg * w_in[None, :], axis=1), mask=j < hi)
        tl.store(row + NB + j, tl.sum(pg * w_spill[None, :], axis=1), mask=j < hi)


@triton.jit
def _top_blocks(scores, NB, L, SEL_L: tl.constexpr, N_SEL: tl.constexpr, NTOP: tl.constexpr,
                CHK: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """The selected blocks of one (row, KV head), ascending, padded with 2**31-1: the forced
    ones, then the best-scoring candidates (ties: the lower block). A block's score is its
    own tokens' part plus what the previous block's tokens spill into it. Keys pack (score
    bits, ~block) into int64: n rounds of max-and-remove per chunk of CHK blocks, merged
    into a running top-NTOP."""
    last = (L - 1) // SEL_L
    nn = tl.arange(0, NTOP)
    top = tl.full([1, NTOP], -1, tl.int64)
    for c0 in range(0, last + 1, CHK):
        j = c0 + tl.arange(0, CHK)
        cand = j <= last
        sc = tl.load(scores + j, mask=cand, other=0.0) + tl.load(scores + NB + j - 1, mask=cand & (j > 0), other=0.0)
        sc = tl.where(cand & ((j < INIT) | (j > last - LOCAL)), float("inf"), sc)
        key = tl.where(cand, (sc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - j).to(tl.int64), -1)
        best = tl.full([NTOP], -1, tl.int64)
        for it in tl.static_range(N_SEL):
            mx = tl.max(key, 0)
            best = tl.where(nn == it, mx, best)
            key = tl.where(key == mx, -1, key)
        top = _merge_top(top, best[None, :])
    keep = (top >= 0) & (nn[None, :] < N_SEL)
    blk = tl.where(keep, 2147483647 - (top & 0xFFFFFFFF), 2147483647).to(tl.int32)
    return tl.sort(blk, dim=1)


@triton.jit
def nsa_decode_selected_kernel(
    q, k_slc, v_slc, lengths, scores, idx, pm, pl, pacc, N, NB, scale_log2, slc_table, MP,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
    SEL_L: tl.constexpr, N_SEL: tl.constexpr, NTOP: tl.constexpr, CHK: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, PER: tl.constexpr,
    S_FIRST: tl.constexpr, S_ALL: tl.constexpr, PREC: tl.constexpr, PAGE: tl.constexpr,
):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // H
    hk = bh % H
    L = tl.load(lengths + b)
    # every split picks the same blocks (same scores, same rule); split 0 reports them
    blk = _top_blocks(scores + bh.to(tl.int64) * 2 * NB, NB, L, SEL_L, N_SEL, NTOP, CHK, INIT, LOCAL)
    nn = tl.arange(0, NTOP)
    if s == 0:
        tl.store(idx + bh.to(tl.int64) * N_SEL + nn[None, :], tl.where(blk == 2147483647, -1, blk),
                 mask=nn[None, :] < N_SEL)
    qt = _load_group(q, b, hk, HQ, G, GP, DK, BK)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BV], tl.float32)
    row0 = hk if PAGE > 0 else (b.to(tl.int64) * N) * H + hk
    table = slc_table + b.to(tl.int64) * MP
    TPB: tl.constexpr = (SEL_L + BN - 1) // BN     # key tiles per block
    lane = tl.arange(0, BN)
    for it in range(s * PER * TPB, tl.minimum(s * PER + PER, N_SEL) * TPB):
        j = tl.sum(tl.where(nn[None, :] == it // TPB, blk, 0))   # from registers: no dependent load
        off = (it % TPB) * BN + lane
        p = j * SEL_L + off
        ok = (off * 0 + j < 2147483647) & (off < SEL_L) & (p < L)   # vector conditions only
        m_i, l_i, acc, _ = _attend_tile(qt, k_slc + row0 * DK, v_slc + row0 * DV, tl.where(ok, p, 0), ok, N,
                                        table, m_i, l_i, acc, scale_log2, H, DK, DV, BK, BV, PREC, PAGE)
    _store_partial(pm, pl, pacc, S_FIRST + s, m_i, l_i, acc, S_ALL, G, GP, DV, BV)


@triton.jit
def _merge_slots(pm, pl, pacc, bh, g, s0, S: tl.constexpr, SP: tl.constexpr, S_ALL: tl.constexpr,
                 G: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """Softmax-normalised output of query head g of (row, KV head) bh from its partials in
    slots [s0, s0 + S); 0 where nothing was seen."""
    sl = tl.arange(0, SP)
    dv = tl.arange(0, BV)
    ok = sl < S
    base = (bh.to(tl.int64) * S_ALL + s0 + sl) * G + g
    m = tl.load(pm + base, mask=ok, other=float("-inf"))
    mx = tl.max(m, 0)
    c = tl.exp2(m - tl.where(mx == float("-inf"), 0.0, mx))
    l_sum = tl.sum(tl.load(pl + base, mask=ok, other=0.0) * c, 0)
    acc = tl.load(pacc + base[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    return tl.sum(acc * c[:, None], 0) / tl.where(l_sum > 0, l_sum, 1.0)


@triton.jit
def nsa_decode_merge_kernel(
    pm, pl, pacc, gates, out,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    S_C: tl.constexpr, S_W: tl.constexpr, S_S: tl.constexpr, SP_C: tl.constexpr,
    SP_W: tl.constexpr, SP_S: tl.constexpr, S_ALL: tl.constexpr,
):
    bh = tl.program_id(0)
    g = tl.program_id(1)
    row = (bh // H).to(tl.int64) * HQ + (bh % H) * G + g
    dv = tl.arange(0, BV)
    o_cmp = _merge_slots(pm, pl, pacc, bh, g, 0, S_C, SP_C, S_ALL, G, DV, BV)
    o_win = _merge_slots(pm, pl, pacc, bh, g, S_C, S_W, SP_W, S_ALL, G, DV, BV)
    o_slc = _merge_slots(pm, pl, pacc, bh, g, S_C + S_W, S_S, SP_S, S_ALL, G, DV, BV)
    g_cmp = tl.load(gates + row * 3).to(tl.float32)
    g_slc = tl.load(gates + row * 3 + 1).to(tl.float32)
    g_win = tl.load(gates + row * 3 + 2).to(tl.float32)
    o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win
    tl.store(out + row * DV + dv, o.to(out.dtype.element_ty), mask=dv < DV)


# ----------------------------------------------------------------------------- launchers, custom ops
def decode_launch(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor,
           v_win: Tensor, gates: Tensor, lengths: Tensor, scale: float, cmp_block_size: int,
           cmp_stride: int, sel_block_size: int, sel_block_count: int, sel_init_blocks: int,
           sel_local_blocks: int, window_size: int, block_table: Optional[Tensor] = None,
           window_table: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One decode step (layout of nsa.nsa_decode): four launches, no host sync. With the page
    tables, k_slc/v_slc/k_cmp/v_cmp and k_win/v_win are page pools (nsa.PagedNSACache)."""
    B, HQ, DK = q.shape
    H, DV = k_cmp.shape[2], v_cmp.shape[3]
    paged = block_table is not None
    if paged:
        MP, page = block_table.shape[1], k_slc.shape[1]
        N = W = MP * page                      # positions a row can hold; the window is not a ring
        NC = max(MP * (page // cmp_stride), 1)
    else:
        MP, page, block_table = 0, 0, lengths
        window_table = lengths
        NC, N, W = max(k_cmp.shape[1], 1), k_slc.shape[1], k_win.shape[1]
    NB = triton.cdiv(N, sel_block_size)
    G = HQ // H
    GP, BK, BV = pow2(G, 16), pow2(DK, 16), pow2(DV, 16)
    t = tuning.decode(B * H, NC, min(W, window_size), sel_block_count * sel_block_size, NB, q.device)
    S_C, S_W, S_B = t["S_C"], t["S_W"], t["S_B"]
    PER = -(-sel_block_count // min(t["S_S"], sel_block_count))
    S_S = -(-sel_block_count // PER)
    S_ALL = S_C + S_W + S_S
    dev, f32 = q.device, torch.float32
    logits = empty(B * H, G, NC, dtype=f32, device=dev)
    scores = empty(B * H, 2, NB, dtype=f32, device=dev)
    pm, pl = (empty(B * H, S_ALL, G, dtype=f32, device=dev) for _ in range(2))
    pacc = empty(B * H, S_ALL, G, DV, dtype=f32, device=dev)
    idx = empty(B, H, sel_block_count, dtype=torch.int32, device=dev)
    o = empty(B, HQ, DV, dtype=q.dtype, device=dev)
    if B == 0:
        return o, idx
    dims = dict(HQ=HQ, H=H, G=G, GP=GP, DK=DK, DV=DV, BK=BK, BV=BV, BN=t["BN"])
    sl2, prec, warps = scale * LOG2E, precision(q), t["warps"]
    sel = dict(SEL_L=sel_block_size)
    nsa_decode_cmp_win_kernel[(B * H, S_C + S_W)](
        q, k_cmp, v_cmp, k_win, v_win, lengths, logits, pm, pl, pacc, NC, W, sl2, block_table, window_table, MP,
        CMP_L=cmp_block_size, CMP_D=cmp_stride, WIN=window_size, S_C=S_C, S_W=S_W, S_ALL=S_ALL,
        PREC=prec, PAGE=page, num_warps=warps, **dims)
    nsa_decode_score_kernel[(B * H, S_B)](
        lengths, logits, pm, pl, scores, NC, NB, H=H, G=G, GP=GP, S_C=S_C, S_B=S_B, S_ALL=S_ALL,
        CMP_L=cmp_block_size, CMP_D=cmp_stride, BCH=t["BCH"], RP=pow2(sel_block_size // cmp_stride),
        num_warps=4, **sel)
    nsa_decode_selected_kernel[(B * H, S_S)](
        q, k_slc, v_slc, lengths, scores, idx, pm, pl, pacc, N, NB, sl2, block_table, MP, N_SEL=sel_block_count,
        NTOP=pow2(sel_block_count), CHK=min(t["CHK"], pow2(NB)), INIT=sel_init_blocks,
        LOCAL=sel_local_blocks, PER=PER, S_FIRST=S_C + S_W, S_ALL=S_ALL, PREC=prec, PAGE=page,
        num_warps=warps, num_stages=t["stages"], **sel, **dims)
    nsa_decode_merge_kernel[(B * H, G)](
        pm, pl, pacc, gates, o, HQ=HQ, H=H, G=G, DV=DV, BV=BV, S_C=S_C, S_W=S_W, S_S=S_S,
        SP_C=pow2(S_C), SP_W=pow2(S_W), SP_S=pow2(S_S), S_ALL=S_ALL, num_warps=t["merge_warps"])
    return o, idx


# The custom op is what torch.compile sees; eager calls go to decode_launch directly: the op's
# dispatch costs ~0.2 ms of host time per step (bench_decode.py host_overhead), as much as the
# four launches themselves.
decode = custom_op("nsa::decode", mutates_args=())(decode_launch)


@decode.register_fake
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, scale, cmp_block_size, cmp_stride,
      sel_block_size, sel_block_count, *rest):
    B, HQ, _ = q.shape
    return (q.new_empty(B, HQ, v_cmp.shape[3]),
            q.new_empty(B, k_cmp.shape[2], sel_block_count, dtype=torch.int32))
