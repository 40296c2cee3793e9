"""Block selection kernel: importance scores and top-n, on the fly (SPEC.md steps 2-3).

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
64k on an H100; 4.6 at 64 positions; that path was removed in session 11). SPREAD 1: the
product on tensor cores, the probabilities as three bf16 parts (8 + 8 + 8 significant bits:
fp32's 24) times the counts (exact in bf16), summed in fp32: 2.8 ms at 64 positions
(results/session8/call1). SPREAD 2: a stencil, no product: the tokens as [positions, blocks,
RP] (RP = l'/d padded to a power of two), each block's own sum and spill sum, the spill moved
one block on by a gather. Defaults and timings: tuning.select. The interpreter runs the split
with fp32 parts (its bf16 products are not exact): CI checks the counts, the GPU the bf16
split.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import band_keys, band_visible, dot_keys, load_rows2, seq_tile, tile_rows


@triton.jit
def spread_counts(r, R: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr):
    """Compressed token i starts in block i // R at offset r = i % R (R = l'/d tokens start in
    each block); since l <= l' it covers that block by min(l, l' - r*d) keys and spills
    max(0, r*d + l - l') keys into the next one. Both counts (d times SPEC.md's overlap
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
def _chunk(j0, qa, qb, k, k0, hk, t, tp, lse2, last, Tq, Tc, top, carry, scale_log2, H: tl.constexpr,
           DK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr,
           CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr, NTOP: tl.constexpr, RP: tl.constexpr,
           INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
           SPREAD: tl.constexpr, SPLIT: tl.constexpr):
    """Scores of blocks [j0, j0 + NTOP) merged into the running top list; MASKED = False when
    every row sees every compressed token of the chunk."""
    R: tl.constexpr = SEL_L // CMP_D          # compressed tokens starting in one block
    c = tl.arange(0, NTOP * RP)
    i = (j0 + c // RP) * R + c % RP                                         # [NTOP * RP] tokens
    tok = (c % RP < R) & (i < Tc)
    krow = (k0 + i).to(tl.int64) * H + hk
    qk = dot_keys(qa, qb, k, krow, tok, DK, KA, KB, PREC) * scale_log2     # [BT*GP, NTOP*RP]
    p = tl.exp2(qk - lse2[:, None])
    if MASKED:
        p = tl.where(band_visible(t[:, None], i[None, :], Tc, CMP_D, CMP_L - 1, 0), p, 0.0)
    pg = tl.sum(tl.reshape(p, [BT, GP, NTOP * RP]), axis=1)                 # [BT, NTOP*RP] group sum
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
def nsa_select_kernel(
    q, k, lse, out,             # q [Nq,HQ,DK] k [Nc,H,DK] lse [Nq,HQ] f32  out [Nq,H,N_SEL] int32
    cu_q, cu_k, tiles_q, n_seq, scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    DK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr,
    N_SEL: tl.constexpr, NTOP: tl.constexpr, RP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    PREC: tl.constexpr, SPREAD: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    if pid >= tl.load(tiles_q + n_seq):
        return
    q0, Tq, k0, Tc, t0 = seq_tile(pid, tiles_q, cu_q, cu_k, n_seq, BT)

    BC: tl.constexpr = NTOP * (SEL_L // CMP_D)   # compressed tokens per chunk
    t, head, row_ok = tile_rows(t0, Tq, hk, G, GP, BT)
    rows = (q0 + t).to(tl.int64) * HQ + head
    qa, qb = load_rows2(q, rows, row_ok, DK, KA, KB)
    lse2 = tl.load(lse + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634  # p = 0 off the tile

    tp = t0 + tl.arange(0, BT)  # the tile's positions
    last = tp // SEL_L                        # last candidate block of each position
    jj = tl.arange(0, NTOP)
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

    keep = (top >= 0) & (jj[None, :] < N_SEL)  # top is in descending order: ranks < n
    blk = tl.where(keep, 2147483647 - (top & 0xFFFFFFFF), 2147483647).to(tl.int32)
    blk = tl.sort(blk, dim=1)  # ascending, empties last
    blk = tl.where(blk == 2147483647, -1, blk)
    optr = out + ((q0 + tp).to(tl.int64) * H + hk)[:, None] * N_SEL + jj[None, :]
    tl.store(optr, blk, mask=(tp[:, None] < Tq) & (jj[None, :] < N_SEL))
