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

import triton
import triton.language as tl

from .utils import (dot2, dot_keys, find_segment, load_keys_t, load_rows2, load_rows, running_max, softmax_finish,
                    softmax_step, store_rows, store_rows2, store_rows2_add, tile_rows, zeros2)


@triton.jit
def _query_group(pid_t, hk, cu_q, n_seq, HQ: tl.constexpr, G: tl.constexpr, BM: tl.constexpr):
    """Packed query row pid_t, KV head hk -> (first row of its sequence, its position, the
    rows of the group's G heads padded to BM, their validity)."""
    q0 = tl.load(cu_q + find_segment(cu_q, n_seq, pid_t))
    r = tl.arange(0, BM)
    return q0, pid_t - q0, pid_t.to(tl.int64) * HQ + hk * G + r, r < G


@triton.jit
def _slot_keys(blocks, slots, slot, t, q0, lane, hk, H: tl.constexpr, SEL_L: tl.constexpr):
    """Key rows and mask of one selected block (its keys <= t); an empty slot (-1) masks all."""
    j = tl.sum(tl.where(slots == slot, blocks, 0))   # the slot's block, with no dependent load
    s = j * SEL_L + lane
    return (q0 + s).to(tl.int64) * H + hk, (s <= t) & (s >= 0) & (lane < SEL_L)


@triton.jit
def nsa_selected_fwd_kernel(
    q, k, v, idx, o, lse,       # q [N,HQ,DK] k [N,H,DK] v [N,H,DV] idx [N,H,N_SEL] o [N,HQ,DV] lse [N,HQ]
    cu_q, n_seq, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BS: tl.constexpr, SEL_L: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    hk = tl.program_id(1)
    q0, t, rows, row_ok = _query_group(pid_t, hk, cu_q, n_seq, HQ, G, BM)
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
    q0, t, rows, row_ok = _query_group(pid_t, hk, cu_q, n_seq, HQ, G, BM)
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


# ----------------------------------------------------------------------------- inverse index
# Built by ops.inverse_index: one kernel writes every (row, head, slot) entry's sort key, torch
# sorts them (stable), a second kernel writes the lists and the entries' list positions.

@triton.jit
def nsa_index_keys_kernel(
    idx, seq_q0, seq_b0, key,   # idx [E] (= [N, H, N_SEL]) seq_q0/seq_b0 [N]: each row's sequence's
    n_entries, nbu, chunk, NB1,  # first row and first global block; key [E] int16/32/64
    H: tl.constexpr, N_SEL: tl.constexpr, SEL_L: tl.constexpr, BE: tl.constexpr,
):
    """key = row chunk * NB1 + bucket, bucket = head * nbu + global block, or H * nbu (the
    chunk's last bucket) for slots left out: empty ones and blocks after the row's own (no key
    of them is visible; past a packed sequence's end the bucket would be the next sequence's
    block)."""
    e = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)
    ok = e < n_entries
    row = e // (H * N_SEL)
    j = tl.load(idx + e, mask=ok, other=-1)
    q0 = tl.load(seq_q0 + row, mask=ok, other=0)
    keep = (j >= 0) & (j <= (row - q0) // SEL_L)
    bucket = tl.where(keep, (e // N_SEL) % H * nbu + tl.load(seq_b0 + row, mask=ok, other=0) + j, H * nbu)
    tl.store(key + e, ((row // chunk) * NB1 + bucket).to(key.dtype.element_ty), mask=ok)


@triton.jit
def nsa_index_lists_kernel(
    order, keys, q_list, pos_of,   # order [E] (entries by sorted key) keys [E] sorted; out: int32
    n_entries, NB1, HN: tl.constexpr, WITH_POS: tl.constexpr, BE: tl.constexpr,
):
    """q_list[p] = the row of the p-th sorted entry; pos_of[entry] = p, or -1 for entries left
    out (the last bucket of their chunk)."""
    p = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)
    ok = p < n_entries
    e = tl.load(order + p, mask=ok, other=0)
    tl.store(q_list + p, (e // HN).to(tl.int32), mask=ok)
    if WITH_POS:
        kept = tl.load(keys + p, mask=ok, other=0) % NB1 != NB1 - 1
        tl.store(pos_of + e, tl.where(kept, p, -1).to(tl.int32), mask=ok)


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
