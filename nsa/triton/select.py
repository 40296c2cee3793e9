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

The spread over blocks is a product [positions, tokens] x [tokens, blocks] of overlap weights.
In fp32 on CUDA cores it holds many registers: with one head per position (G = 1) and 128
positions a tile, ptxas spilled ~2.9 KB a thread (9.4 ms at 64k on an H100; 4.6 at 64
positions). With SPLIT_TC it runs on tensor cores instead: the probabilities as three bf16 parts
(8 + 8 + 8 significant bits: fp32's 24) times the integer overlap counts (exact in bf16), summed
in fp32: 2.8 ms at 64 positions (benchmarks/results/session8/call1). Larger groups have few
positions a tile and gain nothing from it (tuning.select). The interpreter takes the same path
with fp32 parts (its bf16 products are not exact): CI checks the counts, the GPU the bf16 split.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import band_keys, band_visible, dot_keys, load_rows2, seq_tile, tile_rows


@triton.jit
def _overlap(i, j, CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr):
    """Tokens that compressed token i and selection block j share: an integer count, d times
    SPEC.md's overlap weight (scores here are d times SPEC's; the top-n is the same)."""
    lo = tl.maximum(i * CMP_D, j * SEL_L)
    hi = tl.minimum(i * CMP_D + CMP_L, (j + 1) * SEL_L)
    return tl.maximum(hi - lo, 0)


@triton.jit
def _merge_top(top, key):
    """The NTOP largest of top [BT, NTOP] (descending) and key [BT, NTOP] (any order), in
    descending order: with key sorted ascending, the elementwise max holds the NTOP largest of
    both as a bitonic sequence, which one bitonic merge sorts (half the work of sorting all
    2 * NTOP keys)."""
    return tl.bitonic_merge(tl.maximum(top, tl.sort(key, dim=1)), dim=1, descending=True)


@triton.jit
def _chunk(j0, qa, qb, k, k0, hk, t, tp, lse2, last, Tq, Tc, top, carry, scale_log2, H: tl.constexpr,
           DK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr,
           CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr, NTOP: tl.constexpr,
           INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
           SPLIT_TC: tl.constexpr, SPLIT: tl.constexpr):
    """Scores of blocks [j0, j0 + NTOP) merged into the running top list; MASKED = False when
    every row sees every compressed token of the chunk."""
    R: tl.constexpr = SEL_L // CMP_D          # compressed tokens starting in one block
    BC: tl.constexpr = NTOP * R
    i = j0 * R + tl.arange(0, BC)                                           # [BC]
    krow = (k0 + i).to(tl.int64) * H + hk
    qk = dot_keys(qa, qb, k, krow, i < Tc, DK, KA, KB, PREC) * scale_log2  # [BT*GP, BC]
    p = tl.exp2(qk - lse2[:, None])
    if MASKED:
        p = tl.where(band_visible(t[:, None], i[None, :], Tc, CMP_D, CMP_L - 1, 0), p, 0.0)
    pg = tl.sum(tl.reshape(p, [BT, GP, BC]), axis=1)                        # [BT, BC] group sum
    jj = tl.arange(0, NTOP)
    wc = _overlap(i[:, None], j0 + jj[None, :], CMP_L, CMP_D, SEL_L)        # [BC, NTOP] counts
    w_next = _overlap(i, j0 + NTOP, CMP_L, CMP_D, SEL_L).to(tl.float32)    # [BC]
    if SPLIT_TC:   # on tensor cores: pg as three parts of SPLIT times the integer counts
        wc = wc.to(SPLIT)               # counts <= min(l, l') <= 256: exact in bf16
        hi = pg.to(SPLIT)
        r = pg - hi.to(tl.float32)
        mid = r.to(SPLIT)
        lo = (r - mid.to(tl.float32)).to(SPLIT)
        score = tl.dot(hi, wc, input_precision="ieee")
        score = tl.dot(mid, wc, score, input_precision="ieee")
        score = tl.dot(lo, wc, score, input_precision="ieee")
    elif BT >= 16:
        score = tl.dot(pg, wc.to(tl.float32), input_precision="ieee")       # [BT, NTOP]
    else:   # tl.dot needs 16 rows; a sum of products is exact and cheap at this size
        score = tl.sum(pg[:, :, None] * wc.to(tl.float32)[None, :, :], axis=1)
    score += tl.where(jj[None, :] == 0, carry[:, None], 0.0)
    carry = tl.sum(pg * w_next[None, :], axis=1)

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
    N_SEL: tl.constexpr, NTOP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    PREC: tl.constexpr, SPLIT_TC: tl.constexpr, SPLIT: tl.constexpr,
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
                            H, DK, KA, KB, BT, GP, CMP_L, CMP_D, SEL_L, NTOP, INIT, LOCAL, PREC, False, SPLIT_TC, SPLIT)
    for j0 in range(n_full, n_blocks, NTOP):
        top, carry = _chunk(j0, qa, qb, k, k0, hk, t, tp, lse2, last, Tq, Tc, top, carry, scale_log2,
                            H, DK, KA, KB, BT, GP, CMP_L, CMP_D, SEL_L, NTOP, INIT, LOCAL, PREC, True, SPLIT_TC, SPLIT)

    keep = (top >= 0) & (jj[None, :] < N_SEL)  # top is in descending order: ranks < n
    blk = tl.where(keep, 2147483647 - (top & 0xFFFFFFFF), 2147483647).to(tl.int32)
    blk = tl.sort(blk, dim=1)  # ascending, empties last
    blk = tl.where(blk == 2147483647, -1, blk)
    optr = out + ((q0 + tp).to(tl.int64) * H + hk)[:, None] * N_SEL + jj[None, :]
    tl.store(optr, blk, mask=(tp[:, None] < Tq) & (jj[None, :] < N_SEL))
