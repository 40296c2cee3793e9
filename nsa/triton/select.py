"""Block selection kernel: importance scores and top-n, on the fly (docs/semantics.md §2-3).

A program owns BT query positions x the G heads of one KV head. It walks the selection blocks
NTOP at a time (NTOP = n rounded up to a power of two); for each chunk it recomputes the
compression probabilities p = exp(q.k_cmp*scale - lse) of the compressed tokens that start in
those blocks, sums them over the group's heads, spreads them over blocks by overlap weight
(a token overlaps its start block and, when it crosses a boundary, the next one: that part is
carried into the next chunk), and merges the chunk into a running top-NTOP per position (a sort
of the chunk, then a bitonic merge) of packed int64 keys (score bits << 32 | ~block): descending
order puts higher scores first and, among equal scores, the lower block. Scores never leave
registers.

Spreading the probabilities over blocks (SPREAD): a compressed token starting at offset r of a
block covers it by spread_counts' own(r) keys and spills spill(r) keys into the next block.
As a product [positions, tokens] x [tokens, blocks] of those counts in fp32 on CUDA cores it
held many registers (G = 1, 128 positions a tile: ptxas spilled ~2.9 KB a thread, 9.4 ms at
64k on an H100; 4.6 at 64 positions), so it is not used. SPREAD 1: the
product on tensor cores, the probabilities as three bf16 parts (8 + 8 + 8 significant bits:
fp32's 24) times the counts (exact in bf16), summed in fp32: 2.8 ms at 64 positions.
SPREAD 2: a stencil, no product: the tokens as [positions, blocks,
RP] (RP = l'/d padded to a power of two), each block's own sum and spill sum, the spill moved
one block on by a gather. Defaults and timings: tuning.select. The interpreter runs the split
with fp32 parts (its bf16 products are not exact): CI checks the counts, the GPU the bf16
split.

nsa_cmp_select_kernel (G = 1 only) is the compression attention and the selection in one pass:
the chunk loop above, with the online softmax's probabilities ranked in place of
exp(q.k_cmp - lse) (one head per group: a common factor per position does not change its
ranking), the top list and carry rescaled as the running max grows.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from . import tuning
from .launch import head_dims, precision, shape_memo

from .utils import (LOG2E, band_keys, empty, pow2, tile_cu, tile_grid_bound, band_visible, dot_keys, load_rows, load_rows2, seq_tile, softmax_accumulate, softmax_finish,
                    softmax_probs, store_rows, tile_rows)


@triton.jit
def spread_counts(r, R: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr):
    """Compressed token i starts in block i // R at offset r = i % R (R = l'/d tokens start in
    each block); since l <= l' it covers that block by min(l, l' - r*d) keys and spills
    max(0, r*d + l - l') keys into the next one. Both counts (d times docs/semantics.md §2's overlap
    weights; fp32, exact) for r of arange(RP), zero for padding r >= R."""
    own = tl.where(r < R, tl.minimum(CMP_L, SEL_L - r * CMP_D), 0).to(tl.float32)
    spill = tl.where(r < R, tl.maximum(r * CMP_D + CMP_L - SEL_L, 0), 0).to(tl.float32)
    return own, spill


@triton.jit
def _merge_top(top, key):
    """The NTOP largest of top [BT, NTOP] (descending) and key [BT, NTOP] (any order), in
    descending order: with key sorted ascending, the elementwise max holds the NTOP largest of
    both as a bitonic sequence, which one bitonic merge sorts (half the work of sorting all
    2 * NTOP keys)."""
    return tl.bitonic_merge(tl.maximum(top, tl.sort(key, dim=1)), dim=1, descending=True)


@triton.jit
def _spread(pg, jj, carry, BT: tl.constexpr, NTOP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
            CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr, SPREAD: tl.constexpr,
            SPLIT: tl.constexpr):
    """Block scores [BT, NTOP] of the chunk's group-summed probabilities pg [BT, NTOP * RP]
    (token slot c: chunk block c // RP, offset c % RP), plus the carry from the previous chunk's
    spill; and the spill of this chunk's last block (the next carry). SPREAD (select.py doc):
    1 the product on tensor cores as three parts of SPLIT, 2 the stencil."""
    if SPREAD == 2:
        own, spill = spread_counts(tl.arange(0, RP), R, CMP_L, CMP_D, SEL_L)
        p3 = tl.reshape(pg, [BT, NTOP, RP])
        score = tl.sum(p3 * own[None, None, :], axis=2)                      # [BT, NTOP]
        nxt = tl.sum(p3 * spill[None, None, :], axis=2)                      # into block + 1
        prev = tl.gather(nxt, tl.broadcast_to(tl.maximum(jj - 1, 0)[None, :], [BT, NTOP]), axis=1)
        score += tl.where(jj[None, :] == 0, carry[:, None], prev)
        return score, tl.sum(tl.where(jj[None, :] == NTOP - 1, nxt, 0.0), axis=1)
    c = tl.arange(0, NTOP * RP)
    own, spill = spread_counts(c % RP, R, CMP_L, CMP_D, SEL_L)
    jc = (c // RP)[:, None]
    wc = tl.where(jc == jj[None, :], own[:, None], tl.where(jc + 1 == jj[None, :], spill[:, None], 0.0))
    wc = wc.to(SPLIT)    # counts <= min(l, l') <= 256: exact in bf16
    hi = pg.to(SPLIT)
    r = pg - hi.to(tl.float32)
    mid = r.to(SPLIT)
    lo = (r - mid.to(tl.float32)).to(SPLIT)
    score = tl.dot(hi, wc, input_precision="ieee")                           # [BT, NTOP]
    score = tl.dot(mid, wc, score, input_precision="ieee")
    score = tl.dot(lo, wc, score, input_precision="ieee")
    score += tl.where(jj[None, :] == 0, carry[:, None], 0.0)
    return score, tl.sum(pg * tl.where(c // RP == NTOP - 1, spill, 0.0)[None, :], axis=1)


@triton.jit
def _chunk_tokens(j0, k0, hk, Tc, H: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, NTOP: tl.constexpr):
    """The compressed tokens of blocks [j0, j0 + NTOP): slot c holds token (j0 + c // RP) * R + c % RP
    (R = l'/d start in each block, RP its power-of-two padding). (tokens, valid slots, key rows)."""
    c = tl.arange(0, NTOP * RP)
    i = (j0 + c // RP) * R + c % RP                                         # [NTOP * RP] tokens
    tok = (c % RP < R) & (i < Tc)
    return i, tok, (k0 + i).to(tl.int64) * H + hk


@triton.jit
def _rank(pg, j0, top, carry, last, tp, Tq, BT: tl.constexpr, NTOP: tl.constexpr, R: tl.constexpr,
          RP: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr, INIT: tl.constexpr,
          LOCAL: tl.constexpr, SPREAD: tl.constexpr, SPLIT: tl.constexpr):
    """Blocks [j0, j0 + NTOP) scored from the chunk's group-summed probabilities pg [BT, NTOP * RP]
    (plus the carry), the forced ones at +inf, merged into the running top list: (top, carry)."""
    jj = tl.arange(0, NTOP)
    score, carry = _spread(pg, jj, carry, BT, NTOP, R, RP, CMP_L, CMP_D, SEL_L, SPREAD, SPLIT)
    j = j0 + jj[None, :]
    cand = (j <= last[:, None]) & (tp[:, None] < Tq)
    forced = cand & ((j < INIT) | (j > last[:, None] - LOCAL))
    score = tl.where(forced, float("inf"), score)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(cand, (bits << 32) | (2147483647 - j).to(tl.int64), -1)
    return _merge_top(top, key), carry


@triton.jit
def _chunk(j0, qa, qb, k, k0, hk, t, tp, lse2, last, Tq, Tc, top, carry, scale_log2, H: tl.constexpr,
           DK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr,
           CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr, NTOP: tl.constexpr, RP: tl.constexpr,
           INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
           SPREAD: tl.constexpr, SPLIT: tl.constexpr):
    """Scores of blocks [j0, j0 + NTOP) merged into the running top list; MASKED = False when
    every row sees every compressed token of the chunk (padding slots need no mask: their
    overlap counts are 0)."""
    R: tl.constexpr = SEL_L // CMP_D          # compressed tokens starting in one block
    i, tok, krow = _chunk_tokens(j0, k0, hk, Tc, H, R, RP, NTOP)
    qk = dot_keys(qa, qb, k, krow, tok, DK, KA, KB, PREC) * scale_log2     # [BT*GP, NTOP*RP]
    p = tl.exp2(qk - lse2[:, None])
    if MASKED:
        p = tl.where(band_visible(t[:, None], i[None, :], Tc, CMP_D, CMP_L - 1, 0), p, 0.0)
    pg = tl.sum(tl.reshape(p, [BT, GP, NTOP * RP]), axis=1)                 # [BT, NTOP*RP] group sum
    return _rank(pg, j0, top, carry, last, tp, Tq, BT, NTOP, R, RP, CMP_L, CMP_D, SEL_L, INIT, LOCAL, SPREAD, SPLIT)


@triton.jit
def _store_selection(top, out, q0, tp, Tq, hk, H: tl.constexpr, N_SEL: tl.constexpr, NTOP: tl.constexpr):
    """The first N_SEL blocks of the descending top list [BT, NTOP], in ascending block order with
    -1 for empty slots, to out [N, H, N_SEL]."""
    jj = tl.arange(0, NTOP)
    keep = (top >= 0) & (jj[None, :] < N_SEL)  # top is in descending order: ranks < n
    blk = tl.where(keep, 2147483647 - (top & 0xFFFFFFFF), 2147483647).to(tl.int32)
    blk = tl.sort(blk, dim=1)  # ascending, empties last
    blk = tl.where(blk == 2147483647, -1, blk)
    optr = out + ((q0 + tp).to(tl.int64) * H + hk)[:, None] * N_SEL + jj[None, :]
    tl.store(optr, blk, mask=(tp[:, None] < Tq) & (jj[None, :] < N_SEL))


@triton.jit
def nsa_select_kernel(
    q, k, lse, out,             # q [Nq,HQ,DK] k [Nc,H,DK] lse [Nq,HQ] f32  out [Nq,H,N_SEL] int32
    cu_q, cu_k, tiles_q, n_seq, scale_log2, spans,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
    N_SEL: tl.constexpr, NTOP: tl.constexpr, RP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    PREC: tl.constexpr, SPREAD: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    if pid >= tl.load(tiles_q + n_seq):
        return
    q0, Tq, k0, Tc, t0 = seq_tile(pid, tiles_q, cu_q, cu_k, n_seq, BT, spans, CHUNK)

    BC: tl.constexpr = NTOP * (SEL_L // CMP_D)   # compressed tokens per chunk
    t, head, row_ok = tile_rows(t0, Tq, hk, G, GP, BT)
    rows = (q0 + t).to(tl.int64) * HQ + head
    qa, qb = load_rows2(q, rows, row_ok, DK, KA, KB)
    lse2 = tl.load(lse + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634  # p = 0 off the tile

    tp = t0 + tl.arange(0, BT)  # the tile's positions
    last = tp // SEL_L                        # last candidate block of each position
    top = tl.full([BT, NTOP], -1, tl.int64)
    carry = tl.zeros([BT], tl.float32)
    n_blocks = (tl.minimum(t0 + BT, Tq) - 1) // SEL_L + 1
    # chunks whose compressed tokens every row sees (their last token ends by t0): no mask
    n_full = band_keys(t0, t0, Tc, CMP_D, CMP_L - 1, 0)[1] // BC * NTOP
    for j0 in range(0, n_full, NTOP):
        top, carry = _chunk(j0, qa, qb, k, k0, hk, t, tp, lse2, last, Tq, Tc, top, carry, scale_log2,
                            H, DK, KA, KB, BT, GP, CMP_L, CMP_D, SEL_L, NTOP, RP, INIT, LOCAL, PREC, False, SPREAD, SPLIT)
    for j0 in range(n_full, n_blocks, NTOP):
        top, carry = _chunk(j0, qa, qb, k, k0, hk, t, tp, lse2, last, Tq, Tc, top, carry, scale_log2,
                            H, DK, KA, KB, BT, GP, CMP_L, CMP_D, SEL_L, NTOP, RP, INIT, LOCAL, PREC, True, SPREAD, SPLIT)
    _store_selection(top, out, q0, tp, Tq, hk, H, N_SEL, NTOP)


@triton.jit
def _rescale_top(top, alpha):
    """The running top list's scores times alpha [BT] (<= 1: their order holds), the forced
    (+inf) and empty (-1) entries as they are."""
    s = (top >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    s = tl.where(s == float("inf"), s, s * alpha[:, None])
    scaled = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (top & 0xFFFFFFFF)
    return tl.where(top >= 0, scaled, top)


@triton.jit
def _cmp_chunk(j0, qa, qb, k, v, k0, hk, t, last, Tq, Tc, m_i, l_i, acc, top, carry, scale_log2,
               H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
               BV: tl.constexpr, BT: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
               NTOP: tl.constexpr, RP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr,
               MASKED: tl.constexpr, SPREAD: tl.constexpr, SPLIT: tl.constexpr):
    """One chunk of nsa_cmp_select_kernel: the compression attention's step over the chunk's
    tokens, then its probabilities (under the new running max) ranked, the list rescaled first."""
    R: tl.constexpr = SEL_L // CMP_D
    i, tok, krow = _chunk_tokens(j0, k0, hk, Tc, H, R, RP, NTOP)
    qk = dot_keys(qa, qb, k, krow, tok, DK, KA, KB, PREC) * scale_log2     # [BT, NTOP*RP]
    if MASKED:
        qk = tl.where(band_visible(t[:, None], i[None, :], Tc, CMP_D, CMP_L - 1, 0) & tok[None, :], qk, float("-inf"))
    elif RP != R:
        qk = tl.where(tok[None, :], qk, float("-inf"))
    m_i, alpha, p = softmax_probs(qk, m_i)
    vt = load_rows(v, krow, tok, tl.arange(0, BV), DV)
    l_i, acc = softmax_accumulate(p, alpha, vt, l_i, acc, PREC)
    top, carry = _rank(p, j0, _rescale_top(top, alpha), carry * alpha, last, t, Tq, BT, NTOP, R, RP,
                       CMP_L, CMP_D, SEL_L, INIT, LOCAL, SPREAD, SPLIT)
    return m_i, l_i, acc, top, carry


@triton.jit
def nsa_cmp_select_kernel(
    q, k, v, o, lse, out,       # q [Nq,H,DK] k [Nc,H,DK] v [Nc,H,DV] o [Nq,H,DV] lse [Nq,H] f32 out [Nq,H,N_SEL]
    cu_q, cu_k, tiles_q, n_seq, scale_log2, spans,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
    N_SEL: tl.constexpr, NTOP: tl.constexpr, RP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    PREC: tl.constexpr, SPREAD: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr,
):
    """G = 1: the compression branch's attention (o, lse) and the block selection in one pass
    over the compressed keys, q.k_cmp computed once for both. With one head per group a
    position ranks blocks as it ranks their unnormalised probabilities exp2(qk - m) under any
    common m, so the lse is not needed first: the running max's rescaling (alpha) is applied to
    the top list's scores as to the accumulator."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    if pid >= tl.load(tiles_q + n_seq):
        return
    q0, Tq, k0, Tc, t0 = seq_tile(pid, tiles_q, cu_q, cu_k, n_seq, BT, spans, CHUNK)
    BC: tl.constexpr = NTOP * (SEL_L // CMP_D)
    t, head, row_ok = tile_rows(t0, Tq, hk, 1, 1, BT)
    rows = (q0 + t).to(tl.int64) * H + head
    qa, qb = load_rows2(q, rows, row_ok, DK, KA, KB)
    last = t // SEL_L
    m_i = tl.full([BT], float("-inf"), tl.float32)
    l_i = tl.zeros([BT], tl.float32)
    acc = tl.zeros([BT, BV], tl.float32)
    top = tl.full([BT, NTOP], -1, tl.int64)
    carry = tl.zeros([BT], tl.float32)
    n_blocks = (tl.minimum(t0 + BT, Tq) - 1) // SEL_L + 1
    n_full = band_keys(t0, t0, Tc, CMP_D, CMP_L - 1, 0)[1] // BC * NTOP
    for j0 in range(0, n_full, NTOP):
        m_i, l_i, acc, top, carry = _cmp_chunk(
            j0, qa, qb, k, v, k0, hk, t, last, Tq, Tc, m_i, l_i, acc, top, carry, scale_log2, H, DK, DV, KA, KB,
            BV, BT, CMP_L, CMP_D, SEL_L, NTOP, RP, INIT, LOCAL, PREC, False, SPREAD, SPLIT)
    for j0 in range(n_full, n_blocks, NTOP):
        m_i, l_i, acc, top, carry = _cmp_chunk(
            j0, qa, qb, k, v, k0, hk, t, last, Tq, Tc, m_i, l_i, acc, top, carry, scale_log2, H, DK, DV, KA, KB,
            BV, BT, CMP_L, CMP_D, SEL_L, NTOP, RP, INIT, LOCAL, PREC, True, SPREAD, SPLIT)
    res, lse_val = softmax_finish(m_i, l_i, acc)
    store_rows(o, rows, row_ok, tl.arange(0, BV), DV, res)
    tl.store(lse + rows, lse_val, mask=row_ok)
    _store_selection(top, out, q0, t, Tq, hk, H, N_SEL, NTOP)


# ----------------------------------------------------------------------------- launchers, custom ops
def _ntop(n, slots_per_block):
    """Running top-list width: n rounded up to a power of two, >= 16 (an MMA dimension of the
    score product when 16+ positions share a tile), and wide enough that a chunk of NTOP blocks
    holds >= 16 token slots (l'/d padded to a power of two per block: the K of the smallest
    tl.dot). Ranks >= n are dropped at the end."""
    return max(pow2(n, 16), pow2(-(-16 // slots_per_block)))


@shape_memo
def _select_meta(q, cmp_block_size, cmp_stride, sel_block_size, sel_block_count, sel_init_blocks,
                 sel_local_blocks, BT, spread):
    """The constexprs the selection kernels share (select.py)."""
    RP = pow2(sel_block_size // cmp_stride)
    # tensor-core overlap product: needs 16 rows for tl.dot and counts exact in bf16
    if not (BT >= 16 and min(cmp_block_size, sel_block_size) <= 256):
        spread = 2
    KA, KB = tuning.key_tiles(q.shape[2])
    return dict(DK=q.shape[2], KA=KA, KB=KB, BT=BT, CMP_L=cmp_block_size, CMP_D=cmp_stride,
                SEL_L=sel_block_size, N_SEL=sel_block_count, INIT=sel_init_blocks, LOCAL=sel_local_blocks,
                NTOP=_ntop(sel_block_count, RP), RP=RP, PREC=precision(q), SPREAD=spread,
                SPLIT=tl.float32 if tuning.interpreting() else tl.bfloat16)


def select_blocks_launch(q: Tensor, k: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
                  cmp_block_size: int, cmp_stride: int, sel_block_size: int, sel_block_count: int,
                  sel_init_blocks: int, sel_local_blocks: int, spans: Optional[Tensor] = None) -> Tensor:
    """spans given: queries after held keys (utils.seq_tile's CHUNK; cu_k is then not read)."""
    N, HQ, H, G, GP, DK, DV, BK, BV = head_dims(q, k)
    n_seq = cu_q.numel() - 1
    rows, warps, stages, spread = tuning.select(DK, GP)
    BT = max(1, rows // GP)
    out = empty(N, H, sel_block_count, dtype=torch.int32, device=q.device)
    tiles = tile_cu(cu_q, BT)
    nsa_select_kernel[(tile_grid_bound(N, n_seq, BT), H)](
        q, k, lse, out, cu_q, cu_k, tiles, n_seq, scale * LOG2E, cu_q if spans is None else spans,
        CHUNK=spans is not None, HQ=HQ, H=H, G=G, GP=GP,
        **_select_meta(q, cmp_block_size, cmp_stride, sel_block_size, sel_block_count, sel_init_blocks,
                       sel_local_blocks, BT, spread), num_warps=warps, num_stages=stages)
    return out


def cmp_select_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
                   cmp_block_size: int, cmp_stride: int, sel_block_size: int, sel_block_count: int,
                   sel_init_blocks: int, sel_local_blocks: int, spans: Optional[Tensor] = None):
    """G = 1 only: (o, lse) of the compression branch and the selection, in one kernel
    (select.py, nsa_cmp_select_kernel). What compressed_attention and select_blocks return.
    spans: as select_blocks'."""
    N, HQ, H, G, GP, DK, DV, BK, BV = head_dims(q, v)
    assert G == 1, "the fused compression + selection kernel serves one query head per KV head"
    n_seq = cu_q.numel() - 1
    rows, warps, stages = tuning.cmp_select_launch()
    spread = tuning.select(DK, GP)[3]
    o = empty(N, H, DV, dtype=q.dtype, device=q.device)
    lse = empty(N, H, dtype=torch.float32, device=q.device)
    out = empty(N, H, sel_block_count, dtype=torch.int32, device=q.device)
    tiles = tile_cu(cu_q, rows)
    nsa_cmp_select_kernel[(tile_grid_bound(N, n_seq, rows), H)](
        q, k, v, o, lse, out, cu_q, cu_k, tiles, n_seq, scale * LOG2E, cu_q if spans is None else spans,
        CHUNK=spans is not None, H=H, DV=DV, BV=BV,
        **_select_meta(q, cmp_block_size, cmp_stride, sel_block_size, sel_block_count, sel_init_blocks,
                       sel_local_blocks, rows, spread), num_warps=warps, num_stages=stages)
    return o, lse, out


select_blocks = custom_op("nsa::select_blocks", mutates_args=())(select_blocks_launch)


@select_blocks.register_fake
def _(q, k, lse, cu_q, cu_k, scale, cmp_block_size, cmp_stride, sel_block_size, sel_block_count,
      sel_init_blocks, sel_local_blocks, spans=None):
    return q.new_empty(q.shape[0], k.shape[1], sel_block_count, dtype=torch.int32)
