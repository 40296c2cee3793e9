"""Selected-block attention: forward, dQ, and dK/dV through an inverse index.

Forward and dQ are group-centric: one program per (query position, KV head) loads each selected
K/V block once for all G query heads of the group (rows padded to the 16-row MMA minimum).

dK/dV are key-centric without atomics: for every (KV head, block) the list of queries that
selected it (built on the device by a stable sort, so deterministic). Long lists (the first
block is selected by every query) are cut into segments of SEG queries so that no program runs
for long; a bucket with several segments writes fp32 partial sums that a second kernel adds in
a fixed order. Every key row belongs to exactly one bucket, so dK/dV are written whole.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from . import tuning
from .index import inverse_index
from .launch import grad_or_zeros, head_dims, key_dims, precision, shape_memo

from .utils import (LOG2E, empty, pow2, dot2, dot_keys, find_segment, load_keys_t, load_rows2, load_rows, running_max, softmax_finish,
                    softmax_step, store_rows, store_rows2, store_rows2_add, tile_rows, zeros2)


@triton.jit
def _query_group(pid_t, hk, cu_q, n_seq, spans, HQ: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                 CHUNK: tl.constexpr):
    """Packed query row pid_t, KV head hk -> (first key row of its sequence, its position, the
    rows of the group's G heads padded to BM, their validity). Keys share the queries' rows,
    unless CHUNK: the queries come after held keys (spans as in utils.seq_tile)."""
    seq = find_segment(cu_q, n_seq, pid_t)
    q0 = tl.load(cu_q + seq)
    r = tl.arange(0, BM)
    t = pid_t - q0
    k0 = q0
    if CHUNK:
        t += tl.load(spans + seq)
        k0 = tl.load(spans + n_seq + seq)
    return k0, t, pid_t.to(tl.int64) * HQ + hk * G + r, r < G


@triton.jit
def _slot_keys(blocks, slots, slot, t, q0, lane, hk, H: tl.constexpr, SEL_L: tl.constexpr):
    """Key rows and mask of one selected block (its keys <= t); an empty slot (-1) masks all."""
    j = tl.sum(tl.where(slots == slot, blocks, 0))   # the slot's block, with no dependent load
    s = j * SEL_L + lane
    return (q0 + s).to(tl.int64) * H + hk, (s <= t) & (s >= 0) & (lane < SEL_L)


@triton.jit
def nsa_selected_fwd_kernel(
    q, k, v, idx, o, lse,       # q [N,HQ,DK] k [N,H,DK] v [N,H,DV] idx [N,H,N_SEL] o [N,HQ,DV] lse [N,HQ]
    cu_q, n_seq, scale_log2, spans,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BS: tl.constexpr, SEL_L: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
    PREC: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    hk = tl.program_id(1)
    q0, t, rows, row_ok = _query_group(pid_t, hk, cu_q, n_seq, spans, HQ, G, BM, CHUNK)
    dv = tl.arange(0, BV)
    lane = tl.arange(0, BS)
    qa, qb = load_rows2(q, rows, row_ok, DK, KA, KB)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BV], tl.float32)
    slots = tl.arange(0, NP)
    blocks = tl.load(idx + (pid_t.to(tl.int64) * H + hk) * N_SEL + slots, mask=slots < N_SEL, other=-1)
    for slot in range(N_SEL):
        krow, kmask = _slot_keys(blocks, slots, slot, t, q0, lane, hk, H, SEL_L)
        qk = dot_keys(qa, qb, k, krow, kmask, DK, KA, KB, PREC)
        qk = tl.where(kmask[None, :], qk * scale_log2, float("-inf"))
        vt = load_rows(v, krow, kmask, dv, DV)
        m_i, l_i, acc = softmax_step(qk, vt, m_i, l_i, acc, PREC)
    out, lse_val = softmax_finish(m_i, l_i, acc)
    store_rows(o, rows, row_ok, dv, DV, out)
    tl.store(lse + rows, lse_val, mask=row_ok)


@triton.jit
def nsa_selected_bwd_dq_kernel(
    q, k, v, idx, o, do, lse, delta, dq,
    cu_q, n_seq, scale, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BS: tl.constexpr, SEL_L: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
    PREC: tl.constexpr, DELTA_IN: tl.constexpr, DQ_ADD: tl.constexpr,
):
    """DELTA_IN: delta is given (o unused); else rowsum(o * dO), stored for dK/dV. DQ_ADD: dQ
    is added to what dq holds."""
    pid_t = tl.program_id(0)
    hk = tl.program_id(1)
    q0, t, rows, row_ok = _query_group(pid_t, hk, cu_q, n_seq, cu_q, HQ, G, BM, False)
    dv = tl.arange(0, BV)
    lane = tl.arange(0, BS)
    qa, qb = load_rows2(q, rows, row_ok, DK, KA, KB)
    dot_ = load_rows(do, rows, row_ok, dv, DV)
    lse2 = tl.load(lse + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    if DELTA_IN:
        dlt = tl.load(delta + rows, mask=row_ok, other=0.0)
    else:
        ot = load_rows(o, rows, row_ok, dv, DV)
        dlt = tl.sum(ot.to(tl.float32) * dot_.to(tl.float32), 1)
        tl.store(delta + rows, dlt, mask=row_ok)
    acc_a, acc_b = zeros2(BM, KA, KB)
    slots = tl.arange(0, NP)
    blocks = tl.load(idx + (pid_t.to(tl.int64) * H + hk) * N_SEL + slots, mask=slots < N_SEL, other=-1)
    for slot in range(N_SEL):
        krow, kmask = _slot_keys(blocks, slots, slot, t, q0, lane, hk, H, SEL_L)
        ka, kb = load_keys_t(k, krow, kmask, DK, KA, KB)
        vt = tl.load(v + krow[None, :] * DV + dv[:, None], mask=kmask[None, :] & (dv[:, None] < DV), other=0.0)
        qk = dot2(qa, qb, ka, kb, KB, PREC) * scale_log2
        p = tl.where(kmask[None, :] & row_ok[:, None], tl.exp2(qk - lse2[:, None]), 0.0)
        ds = p * (tl.dot(dot_, vt, input_precision=PREC) - dlt[:, None])
        acc_a = tl.dot(ds.to(ka.dtype), tl.trans(ka), acc_a, input_precision=PREC)
        if KB > 0:
            acc_b = tl.dot(ds.to(kb.dtype), tl.trans(kb), acc_b, input_precision=PREC)
    store_rows2_add(dq, rows, row_ok, DK, KA, KB, acc_a * scale, acc_b * scale, DQ_ADD)


@triton.jit
def _bucket_keys(b, nbu, blk_cu, cu_q, n_seq, H: tl.constexpr, BS: tl.constexpr, SEL_L: tl.constexpr):
    """Bucket b = hk * nbu + global block (a real block) -> (hk, the sequence's first row q0, the
    block's key positions s in it, their mask, their key rows)."""
    hk = b // nbu
    gb = b % nbu
    sq = find_segment(blk_cu, n_seq, gb)
    q0 = tl.load(cu_q + sq)
    lane = tl.arange(0, BS)
    s = (gb - tl.load(blk_cu + sq)) * SEL_L + lane
    kmask = (lane < SEL_L) & (s < tl.load(cu_q + sq + 1) - q0)
    return hk, q0, s, kmask, (q0 + s).to(tl.int64) * H + hk


@triton.jit
def _list_rows(q_list, p0, hi, GP: tl.constexpr, BQ: tl.constexpr):
    """The query rows at list positions p0 .. p0 + BQ (< hi), each repeated for the GP heads of
    a tile row (0 past hi)."""
    pos = p0 + tl.arange(0, BQ * GP) // GP
    return tl.load(q_list + pos, mask=pos < hi, other=0)


@triton.jit
def _list_tile(q, qrow, p0, hi, hk, base, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
               BQ: tl.constexpr, DK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """Rows of list positions p0 .. p0 + BQ (< hi) x G heads, their query rows qrow
    (_list_rows): (their validity, the packed q rows, their partial rows (list position - base)
    * G + head, q as two tiles)."""
    r = tl.arange(0, BQ * GP)
    pos = p0 + r // GP
    ok = (pos < hi) & (r % GP < G)
    rows = qrow.to(tl.int64) * HQ + hk * G + r % GP
    qa, qb = load_rows2(q, rows, ok, DK, KA, KB)
    return ok, rows, (pos - base).to(tl.int64) * G + r % GP, qa, qb


@triton.jit
def nsa_selected_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk_out, dv_out, dk_part, dv_part, dq_part,
    q_list, list_cu, seg_cu, part_cu, blk_cu, cu_q, n_seq, b0, n_b, nbu, scale, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BS: tl.constexpr, SEL_L: tl.constexpr, BQ: tl.constexpr, SEG: tl.constexpr,
    PREC: tl.constexpr, DQ_PART: tl.constexpr, ACCUM: tl.constexpr,
):
    """The buckets [b0, b0 + n_b) of one row chunk's lists (a pass: a row chunk, all buckets;
    or all rows, the buckets of some KV heads). DQ_PART: also the key-centric dQ, one unscaled
    partial [G, DK] per list position minus the pass's first (summed by
    nsa_selected_dq_sum_kernel). ACCUM: dk_out/dv_out are fp32 sums over row chunks, added to."""
    pid = tl.program_id(0) + tl.load(seg_cu + b0)
    if pid >= tl.load(seg_cu + b0 + n_b):
        return
    b = b0 + find_segment(seg_cu + b0, n_b, pid)  # bucket = hk * nbu + global block
    seg = pid - tl.load(seg_cu + b)
    nseg = tl.load(seg_cu + b + 1) - tl.load(seg_cu + b)
    if b % nbu >= tl.load(blk_cu + n_seq):            # beyond the last real block
        return
    base = tl.load(list_cu + b0)
    hk, q0, s, kmask, krow = _bucket_keys(b, nbu, blk_cu, cu_q, n_seq, H, BS, SEL_L)
    lane = tl.arange(0, BS)
    dv = tl.arange(0, BV)
    ka, kb = load_rows2(k, krow, kmask, DK, KA, KB)   # key rows as two column tiles
    vv = load_rows(v, krow, kmask, dv, DV)

    lo = tl.load(list_cu + b) + seg * SEG
    hi = tl.minimum(tl.load(list_cu + b + 1), lo + SEG)
    dk_a, dk_b = zeros2(BS, KA, KB)
    dv_acc = tl.zeros([BS, BV], tl.float32)
    nxt = _list_rows(q_list, lo, hi, GP, BQ)
    for p0 in range(lo, hi, BQ):
        qrow = nxt   # a tile ahead, as in the forward
        nxt = _list_rows(q_list, p0 + BQ, hi, GP, BQ)
        ok, rows, prow, qa, qb = _list_tile(q, qrow, p0, hi, hk, base, HQ, G, GP, BQ, DK, KA, KB)
        dot_ = load_rows(do, rows, ok, dv, DV)
        lse2 = tl.load(lse + rows, mask=ok, other=0.0) * 1.4426950408889634
        dlt = tl.load(delta + rows, mask=ok, other=0.0)
        st = dot2(ka, kb, tl.trans(qa), tl.trans(qb), KB, PREC) * scale_log2    # [BS, BM]
        vis = (s[:, None] <= (qrow - q0)[None, :]) & kmask[:, None] & ok[None, :]
        pt = tl.where(vis, tl.exp2(st - lse2[None, :]), 0.0)
        dv_acc += tl.dot(pt.to(dot_.dtype), dot_, input_precision=PREC)
        dst = pt * (tl.dot(vv, tl.trans(dot_), input_precision=PREC) - dlt[None, :])
        dk_a = tl.dot(dst.to(qa.dtype), qa, dk_a, input_precision=PREC)
        if KB > 0:
            dk_b = tl.dot(dst.to(qb.dtype), qb, dk_b, input_precision=PREC)
        if DQ_PART:
            ds_q = tl.trans(dst).to(ka.dtype)                                    # [BM, BS]
            store_rows2(dq_part, prow, ok, DK, KA, KB, tl.dot(ds_q, ka, input_precision=PREC),
                        tl.dot(ds_q, kb, input_precision=PREC))
    dk_a, dk_b = dk_a * scale, dk_b * scale
    if nseg == 1:
        if ACCUM:
            dk_a += load_rows(dk_out, krow, kmask, tl.arange(0, KA), DK)
            dv_acc += load_rows(dv_out, krow, kmask, dv, DV)
            if KB > 0:
                dk_b += load_rows(dk_out, krow, kmask, KA + tl.arange(0, KB), DK)
        store_rows2(dk_out, krow, kmask, DK, KA, KB, dk_a, dk_b)
        store_rows(dv_out, krow, kmask, dv, DV, dv_acc)
    else:   # fp32 partials [slot, BS, D], numbered from the pass's first
        slot = (tl.load(part_cu + b) - tl.load(part_cu + b0) + seg).to(tl.int64)
        prow = slot * BS + lane
        store_rows2(dk_part, prow, lane >= 0, DK, KA, KB, dk_a, dk_b)
        store_rows(dv_part, prow, lane >= 0, dv, DV, dv_acc)


@triton.jit
def nsa_selected_bwd_reduce_kernel(
    dk_out, dv_out, dk_part, dv_part, seg_cu, part_cu, blk_cu, cu_q, n_seq, b0, nbu,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BS: tl.constexpr, SEL_L: tl.constexpr, ACCUM: tl.constexpr,
):
    """Adds, in segment order, the partial dK/dV of bucket b0 + program_id that had several
    segments (ACCUM: to what dk_out/dv_out hold)."""
    b = b0 + tl.program_id(0)
    nseg = tl.load(seg_cu + b + 1) - tl.load(seg_cu + b)
    if (nseg > 1) & (b % nbu < tl.load(blk_cu + n_seq)):
        hk, q0, s, kmask, krow = _bucket_keys(b, nbu, blk_cu, cu_q, n_seq, H, BS, SEL_L)
        lane = tl.arange(0, BS)
        dk = tl.arange(0, BK)
        dv = tl.arange(0, BV)
        dk_acc = tl.zeros([BS, BK], tl.float32)
        dv_acc = tl.zeros([BS, BV], tl.float32)
        if ACCUM:
            dk_acc = load_rows(dk_out, krow, kmask, dk, DK)
            dv_acc = load_rows(dv_out, krow, kmask, dv, DV)
        first = (tl.load(part_cu + b) - tl.load(part_cu + b0)).to(tl.int64)
        for i in range(nseg):
            slot = first + i
            dk_acc += tl.load(dk_part + (slot * BS + lane[:, None]) * DK + dk[None, :], mask=dk[None, :] < DK, other=0.0)
            dv_acc += tl.load(dv_part + (slot * BS + lane[:, None]) * DV + dv[None, :], mask=dv[None, :] < DV, other=0.0)
        store_rows(dk_out, krow, kmask, dk, DK, dk_acc)
        store_rows(dv_out, krow, kmask, dv, DV, dv_acc)


# ----------------------------------------------------------------------------- small groups
# With G < 16 query heads per KV head, the group-centric forward pads each query's G rows to the
# 16-row MMA minimum and loads every selected block once per query. Key-centric instead: one
# program per (KV head, block) segment loads the block once and runs the queries that selected
# it (inverse index) in dense tiles of BQ queries x G heads, writing for every (query, slot) a
# normalised partial output and its lse; a merge kernel then combines each query's n partials.

@triton.jit
def nsa_selected_fwd_kc_kernel(
    q, k, v, o_part, lse_part,   # o_part [L, G, DV] lse_part [L, G]: one entry per list position
    q_list, list_cu, seg_cu, blk_cu, cu_q, n_seq, n_buckets, nbu, base, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BS: tl.constexpr, SEL_L: tl.constexpr, BQ: tl.constexpr, SEG: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid >= tl.load(seg_cu + n_buckets):
        return
    b = find_segment(seg_cu, n_buckets, pid)
    seg = pid - tl.load(seg_cu + b)
    if b % nbu >= tl.load(blk_cu + n_seq):
        return
    hk, q0, s, kmask, krow = _bucket_keys(b, nbu, blk_cu, cu_q, n_seq, H, BS, SEL_L)
    dv = tl.arange(0, BV)
    ka, kb = load_keys_t(k, krow, kmask, DK, KA, KB)
    vv = load_rows(v, krow, kmask, dv, DV)
    lo = tl.load(list_cu + b) + seg * SEG
    hi = tl.minimum(tl.load(list_cu + b + 1), lo + SEG)
    nxt = _list_rows(q_list, lo, hi, GP, BQ)
    for p0 in range(lo, hi, BQ):
        # the next tile's query rows are loaded a tile ahead: the q rows' addresses are then
        # known when the tile starts (the pipeliner does not prefetch this dependent load at 2 stages)
        qrow = nxt
        nxt = _list_rows(q_list, p0 + BQ, hi, GP, BQ)
        ok, rows, prow, qa, qb = _list_tile(q, qrow, p0, hi, hk, base, HQ, G, GP, BQ, DK, KA, KB)
        qk = dot2(qa, qb, ka, kb, KB, PREC) * scale_log2                        # [BM, BS]
        vis = (s[None, :] <= (qrow - q0)[:, None]) & kmask[None, :] & ok[:, None]
        m, l, acc = softmax_step(tl.where(vis, qk, float("-inf")), vv, tl.full([BQ * GP], float("-inf"), tl.float32),
                                 tl.zeros([BQ * GP], tl.float32), tl.zeros([BQ * GP, BV], tl.float32), PREC)
        out, lse_val = softmax_finish(m, l, acc)                                # lse: natural log
        store_rows(o_part, prow, ok, dv, DV, out)
        tl.store(lse_part + prow, lse_val, mask=ok)


@triton.jit
def _merge_rows(row0, n_rows, hk, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, H: tl.constexpr,
                HQ: tl.constexpr, N_SEL: tl.constexpr):
    """A merge program's rows: BT positions of the chunk x G heads -> (their head within the
    group, validity, offset of their selections in idx / pos_of, output rows)."""
    t, head, ok = tile_rows(tl.program_id(0) * BT, n_rows, hk, G, GP, BT)
    return head - hk * G, ok, ((row0 + t).to(tl.int64) * H + hk) * N_SEL, (row0 + t).to(tl.int64) * HQ + head


@triton.jit
def _slot_partial(pos_of, sel, slot, ok, g, base, G: tl.constexpr):
    """The partial row (list position - base) * G + g of each row's selection `slot`, and
    whether it has one (pos_of is -1 for the slots the index left out)."""
    pos = tl.load(pos_of + sel + slot, mask=ok, other=-1)
    return (pos - base).to(tl.int64) * G + g, pos >= 0


@triton.jit
def nsa_selected_merge_kernel(
    pos_of, o_part, lse_part, o, lse, row0, n_rows,   # rows row0 .. row0 + n_rows of pos_of/o/lse
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, BT: tl.constexpr, N_SEL: tl.constexpr,
):
    """o, lse of BT positions x G heads of the chunk from their n partials (natural-log lse;
    list positions pos_of [N, H, n]; the chunk's partials start at list position row0 * H * n),
    in slot order: deterministic."""
    hk = tl.program_id(1)
    g, ok, sel, rows = _merge_rows(row0, n_rows, hk, G, GP, BT, H, HQ, N_SEL)
    dv = tl.arange(0, BV)
    m_i = tl.full([BT * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BT * GP], tl.float32)
    acc = tl.zeros([BT * GP, BV], tl.float32)
    for slot in range(N_SEL):
        prow, valid = _slot_partial(pos_of, sel, slot, ok, g, row0 * H * N_SEL, G)
        lj = tl.load(lse_part + prow, mask=valid, other=float("-inf")) * 1.4426950408889634
        oj = load_rows(o_part, prow, valid, dv, DV).to(tl.float32)
        m_new, m_use, alpha = running_max(m_i, lj)
        w = tl.exp2(lj - m_use)
        acc = acc * alpha[:, None] + w[:, None] * oj
        l_i = l_i * alpha + w
        m_i = m_new
    out, lse_val = softmax_finish(m_i, l_i, acc)
    store_rows(o, rows, ok, dv, DV, out)
    tl.store(lse + rows, lse_val, mask=ok)


@triton.jit
def nsa_selected_dq_sum_kernel(
    pos_of, dq_part, dq, first, row0, n_rows, hk0, scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, N_SEL: tl.constexpr, DQ_ADD: tl.constexpr,
):
    """dQ of BT positions x G heads of KV head hk0 + program_id(1): the sum of their n partials
    (list positions minus the pass's first, loaded from `first`), in slot order
    (deterministic). DQ_ADD: added to what dq holds."""
    hk = hk0 + tl.program_id(1)
    g, ok, sel, rows = _merge_rows(row0, n_rows, hk, G, GP, BT, H, HQ, N_SEL)
    base = tl.load(first)
    acc_a, acc_b = zeros2(BT * GP, KA, KB)
    for slot in range(N_SEL):
        prow, valid = _slot_partial(pos_of, sel, slot, ok, g, base, G)
        pa, pb = load_rows2(dq_part, prow, valid, DK, KA, KB)
        acc_a += pa.to(tl.float32)
        if KB > 0:
            acc_b += pb.to(tl.float32)
    store_rows2_add(dq, rows, ok, DK, KA, KB, acc_a * scale, acc_b * scale, DQ_ADD)


@triton.jit
def nsa_row_dot_kernel(x, y, out, n_rows, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """out[i] = sum_j x[i, j] * y[i, j] in fp32 (delta = rowsum(o * dO) of the backward)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < n_rows
    c = tl.arange(0, BD)
    a = load_rows(x, rows.to(tl.int64), ok, c, D).to(tl.float32)
    b = load_rows(y, rows.to(tl.int64), ok, c, D).to(tl.float32)
    tl.store(out + rows, tl.sum(a * b, 1), mask=ok)


# ----------------------------------------------------------------------------- launchers, custom ops
@shape_memo
def _selected_meta(kind, q, v, idx, sel_block_size):
    N, HQ, H, G, GP, DK, DV, BK, BV = head_dims(q, v)
    meta = key_dims(dict(HQ=HQ, H=H, G=G, BM=max(16, GP), DK=DK, DV=DV, BK=BK, BV=BV, BS=pow2(sel_block_size, 16),
                          SEL_L=sel_block_size, N_SEL=idx.shape[-1], NP=pow2(idx.shape[-1]), PREC=precision(q)))
    warps, stages = tuning.selected(kind, meta["KA"] + meta["KB"], BV)
    return dict(meta, num_warps=warps, num_stages=stages)


def selected_fwd_launch(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cu_q: Tensor, scale: float,
                 sel_block_size: int, spans: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """spans given: queries after held keys (utils.seq_tile's CHUNK), always group-centric
    (the inverse index of the key-centric path maps keys to the queries' own rows)."""
    meta = _selected_meta("fwd", q, v, idx, sel_block_size)
    N, HQ, H = q.shape[0], q.shape[1], v.shape[1]
    o = empty(N, HQ, v.shape[2], dtype=q.dtype, device=q.device)
    lse = empty(N, HQ, dtype=torch.float32, device=q.device)
    if N and spans is None and tuning.selected_key_centric(meta["G"], "fwd"):
        _selected_fwd_key_centric(q, k, v, idx, o, lse, cu_q, scale, sel_block_size, meta)
    elif N:
        nsa_selected_fwd_kernel[(N, H)](q, k, v, idx, o, lse, cu_q, cu_q.numel() - 1, scale * LOG2E,
                                        cu_q if spans is None else spans, CHUNK=spans is not None, **meta)
    return o, lse


def _selected_fwd_key_centric(q, k, v, idx, o, lse, cu_q, scale, sel_block_size, meta):
    """The small-group forward (selected.py): one inverse index for all row chunks, then per
    chunk the key-centric kernel writing per-(query, slot) partials in q's dtype, and their
    merge. The chunks bound the partial buffer (tuning.selected_key_centric_rows)."""
    N, H, n = idx.shape
    HQ, G, GP, DV = meta["HQ"], meta["G"], pow2(meta["G"]), meta["DV"]
    rows, SEG, _, warps, stages = tuning.selected_key_centric_shape(GP)
    BT, m_warps, m_stages = tuning.selected_merge_launch(GP)
    chunk = min(N, tuning.selected_key_centric_rows(H, n, G, DV, q.element_size(), lse=True))
    n_seq = cu_q.numel() - 1
    ii = inverse_index(idx, cu_q, sel_block_size, SEG, chunk=chunk, keep_empty=False)
    o_part = empty(chunk * H * n, G, DV, dtype=q.dtype, device=q.device)
    lse_part = empty(chunk * H * n, G, dtype=torch.float32, device=q.device)
    grid = ii.bounds(chunk * H * n, ii.n_buckets)[1]
    for c, row0 in enumerate(range(0, N, chunk)):
        R = min(chunk, N - row0)
        nsa_selected_fwd_kc_kernel[(grid,)](
            q, k, v, o_part, lse_part, ii.q_list, ii.lists(c), ii.seg_cu[c], ii.blk_cu, cu_q, n_seq,
            ii.n_buckets, ii.nbu, row0 * H * n, scale * LOG2E, HQ=HQ, H=H, G=G, GP=GP, DK=meta["DK"],
            DV=DV, KA=meta["KA"], KB=meta["KB"], BV=meta["BV"], BS=meta["BS"], SEL_L=sel_block_size,
            BQ=max(1, rows // GP), SEG=SEG, PREC=meta["PREC"], num_warps=warps, num_stages=stages)
        nsa_selected_merge_kernel[(triton.cdiv(R, BT), H)](
            ii.pos_of, o_part, lse_part, o, lse, row0, R, HQ=HQ, H=H, G=G, GP=GP, DV=DV,
            BV=meta["BV"], BT=BT, N_SEL=n, num_warps=m_warps, num_stages=m_stages)


selected_fwd = custom_op("nsa::selected_fwd", mutates_args=())(selected_fwd_launch)


@selected_fwd.register_fake
def _(q, k, v, idx, cu_q, scale, sel_block_size, spans=None):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[:2], dtype=torch.float32)


def selected_bwd_launch(q, k, v, idx, o, lse, do, cu_q, scale, sel_block_size, delta=None, dq=None):
    """(dq, dk, dv) of selected attention. dK/dV key-centric (inverse index, no atomics). dQ
    either group-centric (its own kernel, which also writes delta = rowsum(o * dO)) or, for
    small groups, key-centric: the dK/dV kernel writes one dQ partial per (query, slot) and a
    second kernel sums them. The key-centric passes bound the partials: whole KV heads when one
    head's partials fit (dK/dV written once), else row chunks (dK/dV summed over them in fp32).
    delta given: precomputed (o is then not read); dq given: dQ is added to it."""
    meta = _selected_meta("dq", q, v, idx, sel_block_size)
    N, HQ, H, G, GP, DK, DV, BK, BV = head_dims(q, v)
    n = idx.shape[-1]
    n_seq = cu_q.numel() - 1
    delta_in, dq_add = delta is not None, dq is not None
    if not delta_in:
        delta = empty(N, HQ, dtype=torch.float32, device=q.device)
    if not dq_add:
        dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    dk, dv = (empty(*x.shape, dtype=x.dtype, device=x.device) for x in (k, v))
    if N == 0:
        return dq, dk, dv
    args = (scale, scale * LOG2E)
    kc = tuning.selected_key_centric(G, "bwd")
    heads = 0
    if kc:
        if not delta_in:
            BR = max(1, 4096 // BV)
            nsa_row_dot_kernel[(triton.cdiv(N * HQ, BR),)](o, do, delta, N * HQ, D=DV, BD=BV, BR=BR)
        chunk = min(N, tuning.selected_key_centric_rows(H, n, G, DK, q.element_size()))
        heads = tuning.selected_key_centric_heads(N, H, chunk)
        chunk = N if heads else chunk
    else:
        nsa_selected_bwd_dq_kernel[(N, H)](q, k, v, idx, do if delta_in else o, do, lse, delta, dq, cu_q, n_seq,
                                           *args, DELTA_IN=delta_in, DQ_ADD=dq_add, **meta)
        chunk = N
    rows, SEG, warps, stages = tuning.selected_bwd_queries(GP, meta["KA"] + meta["KB"], BV)
    BQ = max(1, rows // GP)
    BS = meta["BS"]
    common = dict(H=H, DK=DK, DV=DV, BV=BV, BS=BS, SEL_L=sel_block_size)
    accum = chunk < N
    dk_sum, dv_sum = (empty(*x.shape, dtype=torch.float32, device=x.device) for x in (k, v)) if accum else (dk, dv)
    # chunks after the first add to dk/dv, so their unselected keys need no program
    ii = inverse_index(idx, cu_q, sel_block_size, SEG, chunk=chunk, keep_empty=True, with_pos=kc)
    # passes (row chunk, first KV head, heads): whole heads, or row chunks of all heads
    passes = ([(0, h0, min(heads, H - h0)) for h0 in range(0, H, heads)] if heads
              else [(c, 0, H) for c in range(-(-N // chunk))])
    n_part, grid = ii.bounds(chunk * passes[0][2] * n, passes[0][2] * ii.nbu)
    dk_part = torch.empty(n_part, BS, DK, dtype=torch.float32, device=q.device)
    dv_part = torch.empty(n_part, BS, DV, dtype=torch.float32, device=q.device)
    dq_part = empty(chunk * passes[0][2] * n * G, DK, dtype=q.dtype, device=q.device) if kc else dq
    BT = tuning.selected_key_centric_shape(GP)[2]   # positions per dQ-sum program
    for c, h0, hn in passes:
        row0 = c * chunk
        R = min(chunk, N - row0)
        b0, n_b, add = h0 * ii.nbu, hn * ii.nbu, c > 0
        nsa_selected_bwd_dkv_kernel[(grid,)](
            q, k, v, do, lse, delta, dk_sum, dv_sum, dk_part, dv_part, dq_part, ii.q_list, ii.lists(c),
            ii.seg_cu[c], ii.part_cu[c], ii.blk_cu, cu_q, n_seq, b0, n_b, ii.nbu, *args,
            HQ=HQ, G=G, GP=GP, BQ=BQ, SEG=SEG, KA=meta["KA"], KB=meta["KB"], PREC=meta["PREC"], DQ_PART=kc,
            ACCUM=add, num_warps=warps, num_stages=stages, **common)
        nsa_selected_bwd_reduce_kernel[(n_b,)](
            dk_sum, dv_sum, dk_part, dv_part, ii.seg_cu[c], ii.part_cu[c], ii.blk_cu, cu_q, n_seq, b0, ii.nbu,
            BK=BK, ACCUM=add, num_warps=warps, **common)   # the dK/dV kernel's: 8 at 256/256, where 4 spill
        if kc:
            nsa_selected_dq_sum_kernel[(triton.cdiv(R, BT), hn)](
                ii.pos_of, dq_part, dq, ii.lists(c)[b0:], row0, R, h0, scale, HQ=HQ, H=H, G=G, GP=GP,
                DK=DK, KA=meta["KA"], KB=meta["KB"], BT=BT, N_SEL=n, DQ_ADD=dq_add, num_warps=4)
    if accum:
        dk.copy_(dk_sum)
        dv.copy_(dv_sum)
    return dq, dk, dv


@custom_op("nsa::selected_bwd", mutates_args=())
def selected_bwd(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                 cu_q: Tensor, scale: float, sel_block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    return selected_bwd_launch(q, k, v, idx, o, lse, do, cu_q, scale, sel_block_size)


@selected_bwd.register_fake
def _(q, k, v, idx, o, lse, do, cu_q, scale, sel_block_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _selected_setup(ctx, inputs, output):
    q, k, v, idx, cu_q, scale, sel_block_size, spans = inputs
    if spans is not None:
        raise NotImplementedError("queries after held keys (spans) are for inference: no backward")
    ctx.save_for_backward(q, k, v, idx, output[0], output[1], cu_q)
    ctx.consts = (scale, sel_block_size)


def _selected_backward(ctx, do, dlse):
    q, k, v, idx, o, lse, cu_q = ctx.saved_tensors
    dq, dk, dv = selected_bwd(q, k, v, idx, o, lse, grad_or_zeros(do, o), cu_q, *ctx.consts)
    return dq, dk, dv, None, None, None, None, None


selected_fwd.register_autograd(_selected_backward, setup_context=_selected_setup)
