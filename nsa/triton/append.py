"""A decode step's cache bookkeeping in two launches (NSACache or PagedNSACache, one token a row).

The PyTorch form of the same step (nsa.layer NativeSparseAttention._append) is ~60 small
kernels a layer: rotary embeddings, ring slots, scatters, the candidate block's gather and the
position embedding, the conditional write of a compressed token. Inside a CUDA graph each costs
~3 us, so a 14-layer model spent ~3 ms a token on them. Here:

1. append: grid (B, H). Rotates the group's queries and the selection / window keys at the
   row's position P, stores the selection K/V at P, the window K/V in ring slot P % W, the raw
   compression K/V in slot P % R, and writes the candidate block for phi: the raw keys of
   positions P - l + 1 .. P (the new one from registers) plus the intra-block position
   embedding.
2. compressed: grid (B, H). After phi (the layer's BlockCompressor, in PyTorch), rotates the
   compressed key at P (its block's last position) and stores it at index (P + 1 - l) / d when
   the new token completes a block (P + 1 >= l, (P + 1 - l) % d == 0); otherwise nothing.
Positions are read from the cache's seqlens on the device: no host value decides anything.
A paged cache (PAGED) places a position through its block / window table instead of a ring slot
(nsa/paged.py; a position without a page goes to the scratch page, as PagedNSACache.write does).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import empty, pow2


@triton.jit
def _rotate(base, n_rows, cos, sin, HALF: tl.constexpr, BH: tl.constexpr, NP: tl.constexpr):
    """Rows [0, n_rows) of a row-major [*, 2 * HALF] tensor at base, rotate-half rotary: the
    halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) in fp32. Returns both halves [NP, BH]."""
    r = tl.arange(0, NP)
    c = tl.arange(0, BH)
    m = (r[:, None] < n_rows) & (c[None, :] < HALF)
    ptr = base + r[:, None] * (2 * HALF) + c[None, :]
    x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=m, other=0.0).to(tl.float32)
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :], r, c, m


@triton.jit
def _store_halves(base, r, c, m, a, b, HALF: tl.constexpr):
    ptr = base + r[:, None] * (2 * HALF) + c[None, :]
    tl.store(ptr, a.to(base.dtype.element_ty), mask=m)
    tl.store(ptr + HALF, b.to(base.dtype.element_ty), mask=m)


@triton.jit
def _copy_row(src, dst, D: tl.constexpr, BD: tl.constexpr):
    d = tl.arange(0, BD)
    tl.store(dst + d, tl.load(src + d, mask=d < D).to(dst.dtype.element_ty), mask=d < D)


@triton.jit
def _program_row():
    """(batch entry, KV head) of this program."""
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _cos_sin(inv_freq, P, HALF: tl.constexpr, BH: tl.constexpr):
    c = tl.arange(0, BH)
    ang = P.to(tl.float32) * tl.load(inv_freq + c, mask=c < HALF, other=0.0)
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _at(table, row, pos, RING, MP, scratch, PAGED: tl.constexpr, PS: tl.constexpr):
    """The buffer row (int64, before heads) holding position pos of cache row `row`: slot
    pos % RING of the row's ring (contiguous; RING = capacity for the selection K/V), or the
    position's page in the row's table (PAGED; the scratch page where it has none)."""
    if PAGED:
        page = tl.load(table + row.to(tl.int64) * MP + pos // PS)
        return tl.where(page >= 0, page, scratch).to(tl.int64) * PS + pos % PS
    else:
        return row.to(tl.int64) * RING + pos % RING


@triton.jit
def _candidate(ring, table, new_row, pe, out, row, h, P, R, MP, scratch, H: tl.constexpr, D: tl.constexpr,
               BD: tl.constexpr, CMP_L: tl.constexpr, BL: tl.constexpr, PAGED: tl.constexpr, PS: tl.constexpr):
    """out [l, D] = the raw ring's positions P - l + 1 .. P - 1 then the new row, plus the
    position embedding pe [l, D] (added in the cache dtype, as BlockCompressor does)."""
    j = tl.arange(0, BL)
    d = tl.arange(0, BD)
    t = P + 1 - CMP_L + j
    old = (j < CMP_L - 1) & (t >= 0)
    at = _at(table, row, tl.where(old, t, P), R, MP, scratch, PAGED, PS)
    live = (j[:, None] < CMP_L) & (d[None, :] < D)
    vals = tl.load(ring + (at[:, None] * H + h) * D + d[None, :],
                   mask=old[:, None] & (d[None, :] < D), other=0.0)
    new = tl.load(new_row + d, mask=d < D, other=0.0)
    vals = tl.where((j == CMP_L - 1)[:, None], new[None, :], vals)
    pos = tl.load(pe + j[:, None] * D + d[None, :], mask=live, other=0.0).to(vals.dtype)
    blk = (vals.to(tl.float32) + pos.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + j[:, None] * D + d[None, :], blk, mask=live)


@triton.jit
def nsa_decode_append_kernel(
    q, k_s, v_s, k_w, v_w, k_c, v_c,     # this step's projections [B, HQ|H, d], before rotary
    inv_freq, seqlens, rows, q_out,      # inv_freq [DK/2] f32, seqlens [B_cache] int32, rows [B] int64
    slc_k, slc_v, win_k, win_v, raw_k, raw_v, blk_k, blk_v, pe_k, pe_v,
    N, W, R,
    main_tab, win_tab, MP, scratch, win_scratch,   # PAGED: the tables [B_cache, MP], the scratch pages
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CMP_L: tl.constexpr,
    BL: tl.constexpr, HAS_CMP: tl.constexpr, PAGED: tl.constexpr, PS: tl.constexpr,
):
    b, h = _program_row()
    row = tl.load(rows + b)
    P = tl.load(seqlens + row)                 # the new token's position
    HALF: tl.constexpr = DK // 2
    cos, sin = _cos_sin(inv_freq, P, HALF, BH)
    # the group's queries
    qa, qb, r, c, m = _rotate(q + (b * HQ + h * G).to(tl.int64) * DK, G, cos, sin, HALF, BH, GP)
    _store_halves(q_out + (b * HQ + h * G).to(tl.int64) * DK, r, c, m, qa, qb, HALF)
    # selection K/V at P, window K/V in slot P % W, raw K/V in slot P % R
    src = (b * H + h).to(tl.int64)
    at_s = _at(main_tab, row, P, N, MP, scratch, PAGED, PS) * H + h
    at_w = _at(win_tab, row, P, W, MP, win_scratch, PAGED, PS) * H + h
    at_r = _at(win_tab, row, P, R, MP, win_scratch, PAGED, PS) * H + h
    ka, kb, r, c, m = _rotate(k_s + src * DK, 1, cos, sin, HALF, BH, 1)
    _store_halves(slc_k + at_s * DK, r, c, m, ka, kb, HALF)
    _copy_row(v_s + src * DV, slc_v + at_s * DV, DV, BV)
    ka, kb, r, c, m = _rotate(k_w + src * DK, 1, cos, sin, HALF, BH, 1)
    _store_halves(win_k + at_w * DK, r, c, m, ka, kb, HALF)
    _copy_row(v_w + src * DV, win_v + at_w * DV, DV, BV)
    _copy_row(k_c + src * DK, raw_k + at_r * DK, DK, BK)
    _copy_row(v_c + src * DV, raw_v + at_r * DV, DV, BV)
    if HAS_CMP:   # the candidate block of positions P - l + 1 .. P
        _candidate(raw_k, win_tab, k_c + src * DK, pe_k, blk_k + src * CMP_L * DK, row, h, P, R, MP, win_scratch,
                   H, DK, BK, CMP_L, BL, PAGED, PS)
        _candidate(raw_v, win_tab, v_c + src * DV, pe_v, blk_v + src * CMP_L * DV, row, h, P, R, MP, win_scratch,
                   H, DV, BV, CMP_L, BL, PAGED, PS)


@triton.jit
def nsa_decode_compressed_kernel(
    kc, vc, inv_freq, seqlens, rows, cmp_k, cmp_v, NC, main_tab, MP, scratch,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, PAGED: tl.constexpr, PS: tl.constexpr,
):
    b, h = _program_row()
    P = tl.load(seqlens + tl.load(rows + b))
    e = P + 1 - CMP_L                          # the first position of the block P would complete
    if (e >= 0) & (e % CMP_D == 0):
        HALF: tl.constexpr = DK // 2
        cos, sin = _cos_sin(inv_freq, P, HALF, BH)
        src = (b * H + h).to(tl.int64)
        # index e / d: slot e / d of the row (contiguous), or of the page holding position e
        at = _at(main_tab, tl.load(rows + b), e, NC * CMP_D, MP, scratch, PAGED, PS) // CMP_D
        dst = at * H + h
        ka, kb, r, c, m = _rotate(kc + src * DK, 1, cos, sin, HALF, BH, 1)
        _store_halves(cmp_k + dst * DK, r, c, m, ka, kb, HALF)
        _copy_row(vc + src * DV, cmp_v + dst * DV, DV, BV)


def _layout(cache):
    """The kernels' placement arguments: (tables, pages a row, scratch pages) and PAGED / PS for
    a PagedNSACache (it has a block_table); placeholders that nothing reads for an NSACache."""
    if getattr(cache, "block_table", None) is None:
        return (cache.seqlens, cache.seqlens, 1, 0, 0), dict(PAGED=False, PS=1)
    return ((cache.block_table, cache.window_table, cache.block_table.shape[1], cache.scratch, cache.win_scratch),
            dict(PAGED=True, PS=cache.page_size))


def decode_append(cache, rows_t, q, k_s, v_s, k_w, v_w, k_c, v_c, freqs, pe_k, pe_v):
    """Launch 1 (module docstring): q [B, HQ, dk] and the projections [B, H, d] of one token
    per row rows_t of `cache` (an NSACache or a PagedNSACache, whose pages reserve() took).
    Returns (rotated q, candidate blocks k [B, H, l, dk], v [B, H, l, dv]; None when the cache
    never completes a block)."""
    B, HQ, DK = q.shape
    H, DV = k_s.shape[1], v_s.shape[2]
    c = cache.config
    l, has_cmp = c.cmp_block_size, c.num_compressed(cache.capacity) > 0
    q_out = empty(B, HQ, DK, dtype=q.dtype, device=q.device)
    blk_k = empty(B, H, l, DK, dtype=cache.dtype, device=q.device)
    blk_v = empty(B, H, l, DV, dtype=cache.dtype, device=q.device)
    G = HQ // H
    args = [x.contiguous() for x in (q, k_s, v_s, k_w, v_w, k_c, v_c)]
    place, paged = _layout(cache)
    nsa_decode_append_kernel[(B, H)](
        *args, freqs, cache.seqlens, rows_t, q_out, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win,
        cache.k_raw, cache.v_raw, blk_k, blk_v, pe_k.contiguous(), pe_v.contiguous(),
        cache.capacity, cache.k_win.shape[1], cache.k_raw.shape[1], *place, HQ=HQ, H=H, G=G, GP=pow2(G),
        DK=DK, DV=DV, BH=pow2(DK // 2), BK=pow2(DK), BV=pow2(DV), CMP_L=l, BL=pow2(l), HAS_CMP=has_cmp,
        num_warps=1, **paged)
    return q_out, (blk_k if has_cmp else None), (blk_v if has_cmp else None)


def decode_store_compressed(cache, rows_t, kc, vc, freqs):
    """Launch 2: the compressed k/v [B, H, d] phi made of the candidate blocks, stored where
    the new token completed a block."""
    B, H, DK = kc.shape
    DV = vc.shape[2]
    c = cache.config
    (main_tab, _, mp, scratch, _), paged = _layout(cache)
    nsa_decode_compressed_kernel[(B, H)](
        kc.contiguous(), vc.contiguous(), freqs, cache.seqlens, rows_t, cache.k_cmp, cache.v_cmp,
        cache.k_cmp.shape[1], main_tab, mp, scratch, H=H, DK=DK, DV=DV, BH=pow2(DK // 2), BV=pow2(DV),
        CMP_L=c.cmp_block_size, CMP_D=c.cmp_stride, num_warps=1, **paged)
