"""Banded attention kernels: the compression branch and the sliding-window branch.

Both are "each query sees a contiguous band of keys": key s is visible to query t iff
    0 <= t - (s * STRIDE + OFFSET) < WIN        (WIN = 0: no upper limit)
  sliding window:  STRIDE = 1, OFFSET = 0,     WIN = w
  compression:     STRIDE = d, OFFSET = l - 1, WIN = 0   (token i ends at key i*d + l - 1)
so one forward and one backward serve both (and full causal attention, 1/0/0).

Group-centric tiles: a program owns BT query positions x the G query heads of one KV head, a
tile of BM = BT * GP rows (GP = G rounded up to a power of two), so every K/V tile it loads
serves all heads of the group, and a small group (G = 1, 2, 4) fills the MMA with more
positions instead of padding. Sequences are packed (cu_seqlens); tile -> sequence mapping is a
binary search over device prefix sums, so nothing syncs with the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from . import tuning
from .launch import grad_or_zeros, head_dims, key_dims, precision, shape_memo

from .utils import (LOG2E, band_keys, band_visible, dot2, dot_keys, load_keys_t, load_rows, load_rows2, seq_tile,
                    softmax_finish, softmax_step, store_rows, store_rows2, store_rows2_add, tile_cu, tile_grid_bound, tile_rows, zeros2, empty)


@triton.jit
def _delta_rows(o, dlse, do_tile, rows, row_ok, dv, DV: tl.constexpr):
    """delta = rowsum(o * dO) - dlse: the softmax backward's correction, with lse's own
    gradient folded in. Computed by the dQ kernel (it runs first) and stored for dK/dV."""
    ot = load_rows(o, rows, row_ok, dv, DV)
    d = tl.sum(ot.to(tl.float32) * do_tile.to(tl.float32), 1)
    return d - tl.load(dlse + rows, mask=row_ok, other=0.0)


@triton.jit
def _key_walk(t0, t_last, Tk, BN: tl.constexpr, STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr,
              UNMASKED: tl.constexpr):
    """The key tiles of the queries [t0, t_last], walked from s_lo in steps of BN up to s_hi:
    (s_lo, a, b, s_hi) with [a, b) the tiles every one of those queries sees (no mask there; the
    band's edges [s_lo, a) and [b, s_hi) keep it); a = b = s_lo when not UNMASKED."""
    s_lo, s_hi = band_keys(t0, t_last, Tk, STRIDE, OFFSET, WIN)
    a = s_lo
    b = s_lo
    if UNMASKED:
        a = tl.minimum(s_lo + tl.cdiv(tl.maximum(band_keys(t_last, t_last, Tk, STRIDE, OFFSET, WIN)[0] - s_lo, 0), BN) * BN, s_hi)
        b = a + tl.maximum(band_keys(t0, t0, Tk, STRIDE, OFFSET, WIN)[1] - a, 0) // BN * BN
    return s_lo, a, b, s_hi


@triton.jit
def _fwd_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, m_i, l_i, acc, scale_log2, H: tl.constexpr,
              DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
              BN: tl.constexpr, STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr,
              PREC: tl.constexpr, MASKED: tl.constexpr):
    """One key tile [s0, s0 + BN) of the forward; MASKED = False where every row sees every key."""
    s = s0 + tl.arange(0, BN)
    krow = (k0 + s).to(tl.int64) * H + hk                                   # [BN]
    qk = dot_keys(qa, qb, k, krow, s < s_hi, DK, KA, KB, PREC) * scale_log2  # [BM, BN]
    if MASKED:
        qk = tl.where(band_visible(t[:, None], s[None, :], s_hi, STRIDE, OFFSET, WIN), qk, float("-inf"))
    dv = tl.arange(0, BV)
    vt = tl.load(v + krow[:, None] * DV + dv[None, :], mask=(s[:, None] < s_hi) & (dv[None, :] < DV), other=0.0)
    return softmax_step(qk, vt, m_i, l_i, acc, PREC)


@triton.jit
def nsa_banded_fwd_kernel(
    q, k, v, o, lse,            # q [Nq,HQ,DK] k [Nk,H,DK] v [Nk,H,DV] o [Nq,HQ,DV] lse [Nq,HQ] f32
    cu_q, cu_k, tiles_q, n_seq, scale_log2, spans,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr,
    STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr,
    PREC: tl.constexpr, UNMASKED: tl.constexpr, CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    if pid >= tl.load(tiles_q + n_seq):
        return
    q0, Tq, k0, Tk, t0 = seq_tile(pid, tiles_q, cu_q, cu_k, n_seq, BT, spans, CHUNK)
    t, head, row_ok = tile_rows(t0, Tq, hk, G, GP, BT)
    rows = (q0 + t).to(tl.int64) * HQ + head                               # [BM]
    dv = tl.arange(0, BV)
    qa, qb = load_rows2(q, rows, row_ok, DK, KA, KB)

    BM: tl.constexpr = BT * GP
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BV], tl.float32)
    s_lo, a, b, s_hi = _key_walk(t0, tl.minimum(t0 + BT, Tq) - 1, Tk, BN, STRIDE, OFFSET, WIN, UNMASKED)
    for s0 in range(s_lo, a, BN):
        m_i, l_i, acc = _fwd_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, m_i, l_i, acc, scale_log2, H, DK, DV,
                                  KA, KB, BV, BN, STRIDE, OFFSET, WIN, PREC, True)
    for s0 in range(a, b, BN):
        m_i, l_i, acc = _fwd_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, m_i, l_i, acc, scale_log2, H, DK, DV,
                                  KA, KB, BV, BN, STRIDE, OFFSET, WIN, PREC, False)
    for s0 in range(b, s_hi, BN):
        m_i, l_i, acc = _fwd_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, m_i, l_i, acc, scale_log2, H, DK, DV,
                                  KA, KB, BV, BN, STRIDE, OFFSET, WIN, PREC, True)
    out, lse_val = softmax_finish(m_i, l_i, acc)
    store_rows(o, rows, row_ok, dv, DV, out)
    tl.store(lse + rows, lse_val, mask=row_ok)


@triton.jit
def _query_tile(q, do, lse, q0, t0, Tq, hk, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """What the backward needs of the query tile [t0, t0 + BT) x G heads: its positions, row
    offsets and validity, q (two column tiles), dO and lse * log2(e); zeros off the tile."""
    t, head, row_ok = tile_rows(t0, Tq, hk, G, GP, BT)
    rows = (q0 + t).to(tl.int64) * HQ + head
    qa, qb = load_rows2(q, rows, row_ok, DK, KA, KB)
    do_tile = load_rows(do, rows, row_ok, tl.arange(0, BV), DV)
    lse2 = tl.load(lse + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    return t, rows, row_ok, qa, qb, do_tile, lse2


@triton.jit
def _dq_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, row_ok, do_tile, lse2, dlt, acc_a, acc_b, scale_log2,
             H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
             BV: tl.constexpr, BN: tl.constexpr, STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr,
             PREC: tl.constexpr, MASKED: tl.constexpr):
    """dQ of one key tile [s0, s0 + BN). Unmasked (every row sees every key), rows off the tile
    load q = dO = 0, so their p = 1 but dS = p * (dO.v - delta) = 0: nothing to mask."""
    s = s0 + tl.arange(0, BN)
    dv = tl.arange(0, BV)
    krow = (k0 + s).to(tl.int64) * H + hk
    ka, kb = load_keys_t(k, krow, s < s_hi, DK, KA, KB)
    vt = tl.load(v + krow[None, :] * DV + dv[:, None], mask=(s[None, :] < s_hi) & (dv[:, None] < DV), other=0.0)
    qk = dot2(qa, qb, ka, kb, KB, PREC) * scale_log2
    p = tl.exp2(qk - lse2[:, None])
    if MASKED:
        p = tl.where(band_visible(t[:, None], s[None, :], s_hi, STRIDE, OFFSET, WIN) & row_ok[:, None], p, 0.0)
    dp = tl.dot(do_tile, vt, input_precision=PREC)  # [BM, BN]
    ds = p * (dp - dlt[:, None])
    acc_a = tl.dot(ds.to(ka.dtype), tl.trans(ka), acc_a, input_precision=PREC)
    if KB > 0:
        acc_b = tl.dot(ds.to(kb.dtype), tl.trans(kb), acc_b, input_precision=PREC)
    return acc_a, acc_b


@triton.jit
def nsa_banded_bwd_dq_kernel(
    q, k, v, o, do, lse, dlse, delta, dq,
    cu_q, cu_k, tiles_q, n_seq, scale, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr,
    STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr,
    PREC: tl.constexpr, UNMASKED: tl.constexpr, DELTA_IN: tl.constexpr, DQ_ADD: tl.constexpr,
):
    """DELTA_IN: delta is given (o and dlse unused); else computed here and stored for dK/dV.
    DQ_ADD: dQ is added to what dq holds."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    if pid >= tl.load(tiles_q + n_seq):
        return
    q0, Tq, k0, Tk, t0 = seq_tile(pid, tiles_q, cu_q, cu_k, n_seq, BT, cu_q, False)
    t, rows, row_ok, qa, qb, dot_, lse2 = _query_tile(q, do, lse, q0, t0, Tq, hk, HQ, G, GP, DK, DV, KA, KB, BV, BT)
    if DELTA_IN:
        dlt = tl.load(delta + rows, mask=row_ok, other=0.0)
    else:
        dlt = _delta_rows(o, dlse, dot_, rows, row_ok, tl.arange(0, BV), DV)
        tl.store(delta + rows, dlt, mask=row_ok)

    BM: tl.constexpr = BT * GP
    acc_a, acc_b = zeros2(BM, KA, KB)
    s_lo, a, b, s_hi = _key_walk(t0, tl.minimum(t0 + BT, Tq) - 1, Tk, BN, STRIDE, OFFSET, WIN, UNMASKED)
    for s0 in range(s_lo, a, BN):
        acc_a, acc_b = _dq_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, row_ok, dot_, lse2, dlt, acc_a, acc_b, scale_log2,
                                H, DK, DV, KA, KB, BV, BN, STRIDE, OFFSET, WIN, PREC, True)
    for s0 in range(a, b, BN):
        acc_a, acc_b = _dq_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, row_ok, dot_, lse2, dlt, acc_a, acc_b, scale_log2,
                                H, DK, DV, KA, KB, BV, BN, STRIDE, OFFSET, WIN, PREC, False)
    for s0 in range(b, s_hi, BN):
        acc_a, acc_b = _dq_tile(qa, qb, k, v, k0, s0, s_hi, t, hk, row_ok, dot_, lse2, dlt, acc_a, acc_b, scale_log2,
                                H, DK, DV, KA, KB, BV, BN, STRIDE, OFFSET, WIN, PREC, True)
    store_rows2_add(dq, rows, row_ok, DK, KA, KB, acc_a * scale, acc_b * scale, DQ_ADD)


@triton.jit
def _dkv_tile(tq, t_hi, q, do, lse, delta, q0, hk, s, Tk, ka, kb, vv, dk_a, dk_b, dv_acc, scale_log2,
              HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, STRIDE: tl.constexpr,
              OFFSET: tl.constexpr, WIN: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr):
    """dK/dV of the key tile s from the query tile [tq, tq + BT). Unmasked (every query sees
    every key), rows off the tile load q = dO = lse = delta = 0: p = 1 there, but it meets
    dO = 0 and dS = p * (v.dO - delta) = 0, so they add nothing."""
    t, rows, row_ok, qa, qb, dot_, lse2 = _query_tile(q, do, lse, q0, tq, t_hi, hk, HQ, G, GP, DK, DV, KA, KB, BV, BT)
    dlt = tl.load(delta + rows, mask=row_ok, other=0.0)
    st = dot2(ka, kb, tl.trans(qa), tl.trans(qb), KB, PREC) * scale_log2    # [BN, BM]
    pt = tl.exp2(st - lse2[None, :])
    if MASKED:
        pt = tl.where(band_visible(t[None, :], s[:, None], Tk, STRIDE, OFFSET, WIN) & row_ok[None, :], pt, 0.0)
    dv_acc += tl.dot(pt.to(dot_.dtype), dot_, input_precision=PREC)
    dpt = tl.dot(vv, tl.trans(dot_), input_precision=PREC)  # [BN, BM]
    dst = pt * (dpt - dlt[None, :])
    dk_a = tl.dot(dst.to(qa.dtype), qa, dk_a, input_precision=PREC)
    if KB > 0:
        dk_b = tl.dot(dst.to(qb.dtype), qb, dk_b, input_precision=PREC)
    return dk_a, dk_b, dv_acc


@triton.jit
def nsa_banded_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk_out, dv_out,   # with NSPLIT > 1, dk_out/dv_out are fp32 [NSPLIT, Nk, H, D]
    cu_q, cu_k, tiles_k, n_seq, scale, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr,
    STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr, NSPLIT: tl.constexpr,
    PREC: tl.constexpr, UNMASKED: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    if pid >= tl.load(tiles_k + n_seq):
        return
    q0, Tq, k0, Tk, s0 = seq_tile(pid, tiles_k, cu_q, cu_k, n_seq, BN, cu_q, False)
    s = s0 + tl.arange(0, BN)
    kmask = s < Tk
    krow = (k0 + s).to(tl.int64) * H + hk
    dv = tl.arange(0, BV)
    ka, kb = load_rows2(k, krow, kmask, DK, KA, KB)   # key rows as two column tiles
    vv = load_rows(v, krow, kmask, dv, DV)

    s_last = tl.minimum(s0 + BN, Tk) - 1
    t_lo = s0 * STRIDE + OFFSET
    t_hi = Tq
    if WIN > 0:
        t_hi = tl.minimum(Tq, s_last * STRIDE + OFFSET + WIN)
    if NSPLIT > 1:
        # Few keys, many queries (compression): the sequence's queries are cut into NSPLIT ranges,
        # the same ranges for every key tile, so the key tiles of one range walk the same query
        # tiles side by side and read them through L2; the partials are summed later.
        part = tl.cdiv(tl.cdiv(Tq, BT), NSPLIT) * BT
        t_lo = tl.maximum(t_lo, split * part)
        t_hi = tl.maximum(tl.minimum(t_hi, (split + 1) * part), t_lo)
        krow = krow + split.to(tl.int64) * tl.load(cu_k + n_seq) * H
    dk_a, dk_b = zeros2(BN, KA, KB)
    dv_acc = tl.zeros([BN, BV], tl.float32)
    # query tiles in [a, b) see every key of the tile: no mask there
    a = t_lo
    b = t_lo
    if UNMASKED:
        a = tl.minimum(t_lo + tl.cdiv(tl.maximum(s_last * STRIDE + OFFSET - t_lo, 0), BT) * BT, t_hi)
        end = t_hi
        if WIN > 0:
            end = tl.minimum(t_hi, s0 * STRIDE + OFFSET + WIN)
        b = a + tl.maximum(end - a, 0) // BT * BT
    for tq in range(t_lo, a, BT):
        dk_a, dk_b, dv_acc = _dkv_tile(tq, t_hi, q, do, lse, delta, q0, hk, s, Tk, ka, kb, vv, dk_a, dk_b, dv_acc,
                                       scale_log2, HQ, G, GP, DK, DV, KA, KB, BV, BT, STRIDE, OFFSET, WIN, PREC, True)
    for tq in range(a, b, BT):
        dk_a, dk_b, dv_acc = _dkv_tile(tq, t_hi, q, do, lse, delta, q0, hk, s, Tk, ka, kb, vv, dk_a, dk_b, dv_acc,
                                       scale_log2, HQ, G, GP, DK, DV, KA, KB, BV, BT, STRIDE, OFFSET, WIN, PREC, False)
    for tq in range(b, t_hi, BT):
        dk_a, dk_b, dv_acc = _dkv_tile(tq, t_hi, q, do, lse, delta, q0, hk, s, Tk, ka, kb, vv, dk_a, dk_b, dv_acc,
                                       scale_log2, HQ, G, GP, DK, DV, KA, KB, BV, BT, STRIDE, OFFSET, WIN, PREC, True)
    store_rows2(dk_out, krow, kmask, DK, KA, KB, dk_a * scale, dk_b * scale)
    store_rows(dv_out, krow, kmask, dv, DV, dv_acc)


# ----------------------------------------------------------------------------- launchers, custom ops
@shape_memo
def _banded_meta(kind, q, v, stride, offset, win):
    N, HQ, H, G, GP, DK, DV, BK, BV = head_dims(q, v)
    meta = key_dims(dict(HQ=HQ, H=H, G=G, GP=GP, DK=DK, DV=DV, BK=BK, BV=BV, STRIDE=stride, OFFSET=offset,
                          WIN=win, PREC=precision(q)))
    rows, BN, warps, stages = tuning.banded(kind, meta["KA"] + meta["KB"], BV, GP, win, q.element_size())
    return dict(meta, BT=max(1, rows // GP), BN=BN, num_warps=warps, num_stages=stages,
                UNMASKED=tuning.banded_unmasked(win))


def banded_fwd_launch(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
               stride: int, offset: int, win: int, spans: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """spans given: queries after held keys (utils.seq_tile's CHUNK; cu_k is then not read)."""
    meta = _banded_meta("fwd", q, v, stride, offset, win)
    N, HQ, H, n_seq = q.shape[0], q.shape[1], v.shape[1], cu_q.numel() - 1
    o = empty(N, HQ, v.shape[2], dtype=q.dtype, device=q.device)
    lse = empty(N, HQ, dtype=torch.float32, device=q.device)
    tiles = tile_cu(cu_q, meta["BT"])
    grid = (tile_grid_bound(N, n_seq, meta["BT"]), H)
    nsa_banded_fwd_kernel[grid](q, k, v, o, lse, cu_q, cu_k, tiles, n_seq, scale * LOG2E,
                                cu_q if spans is None else spans, CHUNK=spans is not None, **meta)
    return o, lse


banded_fwd = custom_op("nsa::banded_fwd", mutates_args=())(banded_fwd_launch)


@banded_fwd.register_fake
def _(q, k, v, cu_q, cu_k, scale, stride, offset, win, spans=None):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[:2], dtype=torch.float32)


def banded_bwd_launch(q, k, v, o, lse, do, dlse, cu_q, cu_k, scale, stride, offset, win, delta=None, dq=None):
    """(dq, dk, dv) of a banded attention. delta given: rowsum(o * dO) - dlse, precomputed (o
    and dlse are then not read); dq given: dQ is added to it (the fused backward's one dQ)."""
    N, Nk, H, n_seq = q.shape[0], k.shape[0], k.shape[1], cu_q.numel() - 1
    delta_in, dq_add = delta is not None, dq is not None
    if not delta_in:
        delta = empty(N, q.shape[1], dtype=torch.float32, device=q.device)
    if not dq_add:
        dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    args = (scale, scale * LOG2E)
    meta = _banded_meta("dq", q, v, stride, offset, win)
    tq = tile_cu(cu_q, meta["BT"])
    nsa_banded_bwd_dq_kernel[(tile_grid_bound(N, n_seq, meta["BT"]), H)](
        q, k, v, do if delta_in else o, do, lse, delta if delta_in else dlse, delta, dq, cu_q, cu_k, tq, n_seq,
        *args, DELTA_IN=delta_in, DQ_ADD=dq_add, **meta)
    meta = _banded_meta("dkv", q, v, stride, offset, win)
    nsplit = tuning.banded_query_splits(triton.cdiv(Nk, meta["BN"]) * H, win, q.device)
    if nsplit == 1:
        dk, dv = (empty(*x.shape, dtype=x.dtype, device=x.device) for x in (k, v))
    else:
        dk, dv = (empty(nsplit, *x.shape, dtype=torch.float32, device=x.device) for x in (k, v))
    tk = tile_cu(cu_k, meta["BN"])
    nsa_banded_bwd_dkv_kernel[(tile_grid_bound(Nk, n_seq, meta["BN"]), H, nsplit)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, tk, n_seq, *args, NSPLIT=nsplit, **meta)
    if nsplit > 1:   # fixed-order sum over the splits: deterministic
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    return dq, dk, dv


@custom_op("nsa::banded_bwd", mutates_args=())
def banded_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, dlse: Tensor,
               cu_q: Tensor, cu_k: Tensor, scale: float, stride: int, offset: int,
               win: int) -> tuple[Tensor, Tensor, Tensor]:
    return banded_bwd_launch(q, k, v, o, lse, do, dlse, cu_q, cu_k, scale, stride, offset, win)


@banded_bwd.register_fake
def _(q, k, v, o, lse, do, dlse, cu_q, cu_k, scale, stride, offset, win):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _banded_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, scale, stride, offset, win, spans = inputs
    if spans is not None:
        raise NotImplementedError("queries after held keys (spans) are for inference: no backward")
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k)
    ctx.consts = (scale, stride, offset, win)


def _banded_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = banded_bwd(q, k, v, o, lse, grad_or_zeros(do, o), grad_or_zeros(dlse, lse),
                            cu_q, cu_k, *ctx.consts)
    return dq, dk, dv, None, None, None, None, None, None, None


banded_fwd.register_autograd(_banded_backward, setup_context=_banded_setup)
