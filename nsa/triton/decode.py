"""Decode kernels: one NSA step over a KV cache, flash-decoding style, in four launches.

Each row b of the batch has its own length L_b; its query sits at position L_b - 1. A program
owns one (row, KV head) and all G query heads of its group (group-centric: each K/V tile is
loaded once for the group). Work is split over the keys for occupancy; every split writes a
partial (max, sum, acc) and a merge kernel combines them by log-sum-exp:

1. cmp_win: grid (B*H, S_C + S_W). Splits 0..S_C-1 attend slices of the compressed tokens and
   keep their logits (fp32, in a scratch the size of G compressed rows: far fewer bytes than the
   keys) for scoring; splits S_C.. attend slices of the window (a ring buffer).
2. select: grid (B*H,). Merges the compression splits' (max, sum) into the lse, turns the stored
   logits into probabilities, sums them over the group, spreads them over selection blocks by
   overlap, BCH blocks at a time: each chunk is sorted once and its best n merged into a
   running top-n (packed keys as in the training selection kernel).
3. selected: grid (B*H, S_S). Splits of the n selected blocks, token by token.
4. merge: grid (B*H,). Combines each branch's partials and applies the gates.

Shapes are fixed by the cache and the launch: lengths are read on the device, so the step has
no host sync and can be captured in a CUDA graph.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .select import _merge_top


@triton.jit
def _attend_range(qt, k_row0, v_row0, lo, hi, ring, m_i, l_i, acc, scale_log2, logit_ptr, NC,
                  H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
                  STORE: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax attention of the group's queries qt [GP, BK] over the key positions
    [lo, hi); position p lives in row p % ring of k_row0/v_row0 (pointers to the (row, head)'s
    first token; consecutive tokens are H*D apart). STORE: also write the log2-scaled logits
    to logit_ptr[g * NC + p]."""
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    g = tl.arange(0, GP)
    for p0 in range(lo, hi, BN):
        p = p0 + tl.arange(0, BN)
        ok = p < hi
        r = (p % ring).to(tl.int64)
        kt = tl.load(k_row0 + r[None, :] * (H * DK) + dk[:, None], mask=ok[None, :] & (dk[:, None] < DK), other=0.0)
        s = tl.dot(qt, kt, input_precision=PREC) * scale_log2                         # [GP, BN]
        s = tl.where(ok[None, :], s, float("-inf"))
        if STORE:
            tl.store(logit_ptr + g[:, None] * NC + p[None, :], s, mask=(g[:, None] < G) & ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        pr = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(pr, 1)
        vt = tl.load(v_row0 + r[:, None] * (H * DV) + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
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
def _split(n, s, S: tl.constexpr, BN: tl.constexpr):
    """Split s of S over n items, in whole tiles of BN: its [lo, hi)."""
    per = tl.cdiv(tl.cdiv(n, S), BN) * BN
    lo = s * per
    return lo, tl.minimum(n, lo + per)


@triton.jit
def nsa_decode_cmp_win_kernel(
    q, k_cmp, v_cmp, k_win, v_win, lengths, logits, pm, pl, pacc,
    NC, W, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, WIN: tl.constexpr,
    S_C: tl.constexpr, S_W: tl.constexpr, S_ALL: tl.constexpr, PREC: tl.constexpr,
):
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
        nc = tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)
        lo, hi = _split(nc, s, S_C, BN)
        row0 = (b.to(tl.int64) * NC) * H + hk
        m_i, l_i, acc = _attend_range(qt, k_cmp + row0 * DK, v_cmp + row0 * DV, lo, hi, NC, m_i, l_i,
                                      acc, scale_log2, logits + bh.to(tl.int64) * G * NC, NC,
                                      H, G, GP, DK, DV, BK, BV, BN, True, PREC)
    else:
        first = tl.maximum(L - WIN, 0)
        lo, hi = _split(L - first, s - S_C, S_W, BN)
        row0 = (b.to(tl.int64) * W) * H + hk
        m_i, l_i, acc = _attend_range(qt, k_win + row0 * DK, v_win + row0 * DV, first + lo, first + hi,
                                      W, m_i, l_i, acc, scale_log2, logits, NC,
                                      H, G, GP, DK, DV, BK, BV, BN, False, PREC)
    _store_partial(pm, pl, pacc, s, m_i, l_i, acc, S_ALL, G, GP, DV, BV)


@triton.jit
def nsa_decode_select_kernel(
    lengths, logits, pm, pl, out, NC,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, S_C: tl.constexpr, S_ALL: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr, N_SEL: tl.constexpr,
    NTOP: tl.constexpr, BCH: tl.constexpr, RP: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr,
):
    bh = tl.program_id(0)
    L = tl.load(lengths + bh // H)
    t = L - 1
    nc = tl.where(L >= CMP_L, (L - CMP_L) // CMP_D + 1, 0)
    g = tl.arange(0, GP)
    # lse (log2) of the compression branch from its splits
    m = tl.full([GP], float("-inf"), tl.float32)
    for s in range(S_C):
        ms = tl.load(pm + (bh.to(tl.int64) * S_ALL + s) * G + g, mask=g < G, other=float("-inf"))
        m = tl.maximum(m, ms)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([GP], tl.float32)
    for s in range(S_C):
        base = (bh.to(tl.int64) * S_ALL + s) * G + g
        ms = tl.load(pm + base, mask=g < G, other=float("-inf"))
        l_sum += tl.load(pl + base, mask=g < G, other=0.0) * tl.exp2(ms - m_use)
    lse2 = m_use + tl.log2(tl.where(l_sum > 0, l_sum, 1.0))

    # Block scores, BCH blocks at a time. Compressed token i starts in block i // R at offset
    # r = i % R (R = l'/d tokens start in each block); since l <= l' it covers that block by
    # min(l, l' - r*d) keys and spills max(0, r*d + l - l') keys into the next one.
    R: tl.constexpr = SEL_L // CMP_D
    r = tl.arange(0, RP)
    w_in = tl.where(r < R, tl.minimum(CMP_L, SEL_L - r * CMP_D).to(tl.float32) / CMP_D, 0.0)
    w_spill = tl.where(r < R, tl.maximum(r * CMP_D + CMP_L - SEL_L, 0).to(tl.float32) / CMP_D, 0.0)
    jj = tl.arange(0, BCH)
    last = t // SEL_L                         # last candidate block
    top = tl.full([1, NTOP], -1, tl.int64)
    lg_row = logits + bh.to(tl.int64) * G * NC
    for j0 in range(0, last + 1, BCH):
        j = j0 + jj                                                        # [BCH]
        score = tl.zeros([BCH], tl.float32)
        for shift in tl.static_range(2):   # tokens starting in block j, then in block j - 1
            i = (j[:, None] - shift) * R + r[None, :]                      # [BCH, RP]
            ok = (i >= 0) & (i < nc) & (r[None, :] < R)
            lg = tl.load(lg_row + g[:, None, None] * NC + i[None, :, :],
                         mask=ok[None, :, :] & (g[:, None, None] < G), other=float("-inf"))
            pg = tl.sum(tl.exp2(lg - lse2[:, None, None]), axis=0)          # [BCH, RP] group sum
            w = w_in if shift == 0 else w_spill
            score += tl.sum(pg * w[None, :], axis=1)
        cand = j <= last
        forced = cand & ((j < INIT) | (j > last - LOCAL))
        score = tl.where(forced, float("inf"), score)
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(cand, (bits << 32) | (2147483647 - j).to(tl.int64), -1)
        key = tl.sort(key[None, :], dim=1, descending=True)
        # sorted descending, so column c of the first row is the max of column c of every row
        best = tl.max(tl.reshape(key, [BCH // NTOP, NTOP]), axis=0)
        top = _merge_top(top, best[None, :], 1, NTOP)
    nn = tl.arange(0, NTOP)
    keep = (top >= 0) & (nn[None, :] < N_SEL)
    blk = tl.where(keep, 2147483647 - (top & 0xFFFFFFFF), 2147483647).to(tl.int32)
    blk = tl.sort(blk, dim=1)
    blk = tl.where(blk == 2147483647, -1, blk)
    tl.store(out + bh.to(tl.int64) * N_SEL + nn[None, :], blk, mask=nn[None, :] < N_SEL)


@triton.jit
def nsa_decode_selected_kernel(
    q, k_slc, v_slc, lengths, idx, pm, pl, pacc, N, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
    SEL_L: tl.constexpr, N_SEL: tl.constexpr, PER: tl.constexpr,
    S_FIRST: tl.constexpr, S_ALL: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // H
    hk = bh % H
    L = tl.load(lengths + b)
    qt = _load_group(q, b, hk, HQ, G, GP, DK, BK)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BV], tl.float32)
    row0 = (b.to(tl.int64) * N) * H + hk
    for slot in range(s * PER, tl.minimum(s * PER + PER, N_SEL)):
        j = tl.load(idx + bh.to(tl.int64) * N_SEL + slot)
        lo = tl.where(j >= 0, j * SEL_L, 0)
        hi = tl.where(j >= 0, tl.minimum(lo + SEL_L, L), 0)
        m_i, l_i, acc = _attend_range(qt, k_slc + row0 * DK, v_slc + row0 * DV, lo, hi, N, m_i, l_i,
                                      acc, scale_log2, pm, N, H, G, GP, DK, DV, BK, BV, BN, False, PREC)
    _store_partial(pm, pl, pacc, S_FIRST + s, m_i, l_i, acc, S_ALL, G, GP, DV, BV)


@triton.jit
def _merge_slots(pm, pl, pacc, s0, s1, S_ALL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                 DV: tl.constexpr, BV: tl.constexpr):
    """Softmax-normalised output of the partials in slots [s0, s1); 0 where nothing was seen."""
    g = tl.arange(0, GP)
    dv = tl.arange(0, BV)
    bh = tl.program_id(0).to(tl.int64)
    m = tl.full([GP], float("-inf"), tl.float32)
    for s in range(s0, s1):
        m = tl.maximum(m, tl.load(pm + (bh * S_ALL + s) * G + g, mask=g < G, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BV], tl.float32)
    for s in range(s0, s1):
        base = (bh * S_ALL + s) * G + g
        c = tl.exp2(tl.load(pm + base, mask=g < G, other=float("-inf")) - m_use)
        l_sum += tl.load(pl + base, mask=g < G, other=0.0) * c
        a = tl.load(pacc + base[:, None] * DV + dv[None, :], mask=(g[:, None] < G) & (dv[None, :] < DV), other=0.0)
        acc += a * c[:, None]
    return acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]


@triton.jit
def nsa_decode_merge_kernel(
    pm, pl, pacc, gates, out,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DV: tl.constexpr, BV: tl.constexpr, S_C: tl.constexpr, S_W: tl.constexpr, S_ALL: tl.constexpr,
):
    bh = tl.program_id(0)
    g = tl.arange(0, GP)
    dv = tl.arange(0, BV)
    rows = (bh // H).to(tl.int64) * HQ + (bh % H) * G + g
    ok = g < G
    o_cmp = _merge_slots(pm, pl, pacc, 0, S_C, S_ALL, G, GP, DV, BV)
    o_win = _merge_slots(pm, pl, pacc, S_C, S_C + S_W, S_ALL, G, GP, DV, BV)
    o_slc = _merge_slots(pm, pl, pacc, S_C + S_W, S_ALL, S_ALL, G, GP, DV, BV)
    g_cmp = tl.load(gates + rows * 3, mask=ok, other=0.0).to(tl.float32)
    g_slc = tl.load(gates + rows * 3 + 1, mask=ok, other=0.0).to(tl.float32)
    g_win = tl.load(gates + rows * 3 + 2, mask=ok, other=0.0).to(tl.float32)
    o = g_cmp[:, None] * o_cmp + g_slc[:, None] * o_slc + g_win[:, None] * o_win
    tl.store(out + rows[:, None] * DV + dv[None, :], o.to(out.dtype.element_ty), mask=ok[:, None] & (dv[None, :] < DV))
