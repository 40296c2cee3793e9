"""Launchers, custom ops (fake shapes for torch.compile) and registered autograd.

Tensors here are packed: [N, heads, dim] rows of all sequences, with cu_seqlens offsets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from . import tuning
from .gate import nsa_gate_bwd_kernel, nsa_gate_delta_kernel, nsa_gate_fwd_kernel
from .decode import (nsa_decode_cmp_win_kernel, nsa_decode_merge_kernel,
                     nsa_decode_score_kernel, nsa_decode_selected_kernel)
from .banded import nsa_banded_bwd_dkv_kernel, nsa_banded_bwd_dq_kernel, nsa_banded_fwd_kernel
from .select import nsa_cmp_select_kernel, nsa_select_kernel
from .selected import (nsa_selected_bwd_dkv_kernel, nsa_selected_bwd_dq_kernel,
                       nsa_selected_bwd_reduce_kernel, nsa_selected_fwd_kc_kernel,
                       nsa_selected_dq_sum_kernel, nsa_selected_fwd_kernel, nsa_selected_merge_kernel,
                       nsa_index_keys_kernel, nsa_index_lists_kernel, nsa_row_dot_kernel)
from .utils import LOG2E, empty, pow2, tile_cu, tile_grid_bound


def _dims(q, v, k=None):
    N, HQ, DK = q.shape
    H, DV = v.shape[1], v.shape[2]
    G = HQ // H
    return N, HQ, H, G, pow2(G), DK, DV, pow2(DK, 16), pow2(DV, 16)


def _prec(q):
    """fp32 inputs get true fp32 products (not TF32): asking for fp32 means fp32 accuracy."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _grad_or_zeros(g, like):
    return torch.zeros_like(like) if g is None else g.contiguous()


# ----------------------------------------------------------------------------- banded
def _key_dims(meta):
    """A kernel's meta with the padded BK replaced by the two column tiles KA + KB."""
    KA, KB = tuning.key_tiles(meta["DK"])
    return {**{k: v for k, v in meta.items() if k != "BK"}, "KA": KA, "KB": KB}


def _banded_meta(kind, q, v, stride, offset, win):
    N, HQ, H, G, GP, DK, DV, BK, BV = _dims(q, v)
    meta = _key_dims(dict(HQ=HQ, H=H, G=G, GP=GP, DK=DK, DV=DV, BK=BK, BV=BV, STRIDE=stride, OFFSET=offset,
                          WIN=win, PREC=_prec(q)))
    rows, BN, warps, stages = tuning.banded(kind, meta["KA"] + meta["KB"], BV, GP, win, q.element_size())
    return dict(meta, BT=max(1, rows // GP), BN=BN, num_warps=warps, num_stages=stages,
                UNMASKED=tuning.banded_unmasked(win))


@custom_op("nsa::banded_fwd", mutates_args=())
def banded_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
               stride: int, offset: int, win: int) -> tuple[Tensor, Tensor]:
    meta = _banded_meta("fwd", q, v, stride, offset, win)
    N, HQ, H, n_seq = q.shape[0], q.shape[1], v.shape[1], cu_q.numel() - 1
    o = empty(N, HQ, v.shape[2], dtype=q.dtype, device=q.device)
    lse = empty(N, HQ, dtype=torch.float32, device=q.device)
    tiles = tile_cu(cu_q, meta["BT"])
    grid = (tile_grid_bound(N, n_seq, meta["BT"]), H)
    nsa_banded_fwd_kernel[grid](q, k, v, o, lse, cu_q, cu_k, tiles, n_seq, scale * LOG2E, **meta)
    return o, lse


@banded_fwd.register_fake
def _(q, k, v, cu_q, cu_k, scale, stride, offset, win):
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
    nsplit = tuning.banded_query_splits(N, triton.cdiv(Nk, meta["BN"]) * H, win, q.device)
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
    q, k, v, cu_q, cu_k, scale, stride, offset, win = inputs
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k)
    ctx.consts = (scale, stride, offset, win)


def _banded_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = banded_bwd(q, k, v, o, lse, _grad_or_zeros(do, o), _grad_or_zeros(dlse, lse),
                            cu_q, cu_k, *ctx.consts)
    return dq, dk, dv, None, None, None, None, None, None


banded_fwd.register_autograd(_banded_backward, setup_context=_banded_setup)


# ----------------------------------------------------------------------------- selection
def _ntop(n, slots_per_block):
    """Running top-list width: n rounded up to a power of two, >= 16 (an MMA dimension of the
    score product when 16+ positions share a tile), and wide enough that a chunk of NTOP blocks
    holds >= 16 token slots (l'/d padded to a power of two per block: the K of the smallest
    tl.dot). Ranks >= n are dropped at the end."""
    return max(pow2(n, 16), pow2(-(-16 // slots_per_block)))


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
                NTOP=_ntop(sel_block_count, RP), RP=RP, PREC=_prec(q), SPREAD=spread,
                SPLIT=tl.float32 if tuning.interpreting() else tl.bfloat16)


@custom_op("nsa::select_blocks", mutates_args=())
def select_blocks(q: Tensor, k: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
                  cmp_block_size: int, cmp_stride: int, sel_block_size: int, sel_block_count: int,
                  sel_init_blocks: int, sel_local_blocks: int) -> Tensor:
    N, HQ, H, G, GP, DK, DV, BK, BV = _dims(q, k)
    n_seq = cu_q.numel() - 1
    rows, warps, stages, spread = tuning.select(DK, GP)
    BT = max(1, rows // GP)
    out = empty(N, H, sel_block_count, dtype=torch.int32, device=q.device)
    tiles = tile_cu(cu_q, BT)
    nsa_select_kernel[(tile_grid_bound(N, n_seq, BT), H)](
        q, k, lse, out, cu_q, cu_k, tiles, n_seq, scale * LOG2E, HQ=HQ, H=H, G=G, GP=GP,
        **_select_meta(q, cmp_block_size, cmp_stride, sel_block_size, sel_block_count, sel_init_blocks,
                       sel_local_blocks, BT, spread), num_warps=warps, num_stages=stages)
    return out


def cmp_select_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
                   cmp_block_size: int, cmp_stride: int, sel_block_size: int, sel_block_count: int,
                   sel_init_blocks: int, sel_local_blocks: int):
    """G = 1 only: (o, lse) of the compression branch and the selection, in one kernel
    (select.py, nsa_cmp_select_kernel). What compressed_attention and select_blocks return."""
    N, HQ, H, G, GP, DK, DV, BK, BV = _dims(q, v)
    assert G == 1, "the fused compression + selection kernel serves one query head per KV head"
    n_seq = cu_q.numel() - 1
    rows, warps, stages = tuning.cmp_select_launch()
    spread = tuning.select(DK, GP)[3]
    o = empty(N, H, DV, dtype=q.dtype, device=q.device)
    lse = empty(N, H, dtype=torch.float32, device=q.device)
    out = empty(N, H, sel_block_count, dtype=torch.int32, device=q.device)
    tiles = tile_cu(cu_q, rows)
    nsa_cmp_select_kernel[(tile_grid_bound(N, n_seq, rows), H)](
        q, k, v, o, lse, out, cu_q, cu_k, tiles, n_seq, scale * LOG2E, H=H, DV=DV, BV=BV,
        **_select_meta(q, cmp_block_size, cmp_stride, sel_block_size, sel_block_count, sel_init_blocks,
                       sel_local_blocks, rows, spread), num_warps=warps, num_stages=stages)
    return o, lse, out


@select_blocks.register_fake
def _(q, k, lse, cu_q, cu_k, scale, cmp_block_size, cmp_stride, sel_block_size, sel_block_count,
      sel_init_blocks, sel_local_blocks):
    return q.new_empty(q.shape[0], k.shape[1], sel_block_count, dtype=torch.int32)


# ----------------------------------------------------------------------------- selected attention
def _selected_meta(kind, q, v, idx, sel_block_size):
    N, HQ, H, G, GP, DK, DV, BK, BV = _dims(q, v)
    meta = _key_dims(dict(HQ=HQ, H=H, G=G, BM=max(16, GP), DK=DK, DV=DV, BK=BK, BV=BV, BS=pow2(sel_block_size, 16),
                          SEL_L=sel_block_size, N_SEL=idx.shape[-1], NP=pow2(idx.shape[-1]), PREC=_prec(q)))
    warps, stages = tuning.selected(kind, meta["KA"] + meta["KB"], BV)
    return dict(meta, num_warps=warps, num_stages=stages)


@custom_op("nsa::selected_fwd", mutates_args=())
def selected_fwd(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cu_q: Tensor, scale: float,
                 sel_block_size: int) -> tuple[Tensor, Tensor]:
    meta = _selected_meta("fwd", q, v, idx, sel_block_size)
    N, HQ, H = q.shape[0], q.shape[1], v.shape[1]
    o = empty(N, HQ, v.shape[2], dtype=q.dtype, device=q.device)
    lse = empty(N, HQ, dtype=torch.float32, device=q.device)
    if N and tuning.selected_key_centric(meta["G"], "fwd"):
        _selected_fwd_key_centric(q, k, v, idx, o, lse, cu_q, scale, sel_block_size, meta)
    elif N:
        nsa_selected_fwd_kernel[(N, H)](q, k, v, idx, o, lse, cu_q, cu_q.numel() - 1,
                                        scale * LOG2E, **meta)
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


@selected_fwd.register_fake
def _(q, k, v, idx, cu_q, scale, sel_block_size):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[:2], dtype=torch.float32)


class InverseIndex(NamedTuple):
    """Per chunk of `chunk` rows and (KV head, block) bucket, the query rows that selected it.
    Chunk c's lists are q_list[c*chunk*H*n : (c+1)*chunk*H*n] (every row has H*n entries; a
    chunk's last bucket holds its left-out slots: empty ones, blocks after the row's own)."""
    q_list: Tensor          # [N*H*n] query rows, by (chunk, bucket), in row order within one
    pos_of: Tensor | None   # [N, H, n] the list position of each (row, head, slot); -1 for
                            # the slots left out (empty, or a block after the row's own)
    list_cu: Tensor         # [C * (buckets + 1) + 1] where each (chunk, bucket) list starts
    seg_cu: Tensor          # [C, buckets + 1] per chunk: where each bucket's segments start
    part_cu: Tensor         # [C, buckets + 1] per chunk: first fp32 partial slot of buckets
                            # with several segments
    blk_cu: Tensor          # [n_seq + 1] first global block of each sequence
    n_buckets: int          # H * nbu
    nbu: int                # blocks per head, an upper bound (no host sync)
    seg: int                # queries per segment

    def lists(self, c: int) -> Tensor:
        """list_cu of chunk c (absolute list positions), as the kernels index it."""
        return self.list_cu[c * (self.n_buckets + 1):]

    def bounds(self, entries: int, buckets: int):
        """(fp32 partial slots, segments) bounds of a pass over `buckets` buckets holding
        `entries` list entries: buckets of several segments hold > seg entries each, and every
        bucket has at most entries / seg + 1 segments. The segment bound is the launch size."""
        return 2 * entries // self.seg + 1, buckets + entries // self.seg + 1


def sort_key_dtype(n_keys: int) -> torch.dtype:
    """The narrowest integer type for sort keys 0..n_keys-1: a radix sort of 16-bit keys takes
    two passes, of 32-bit four."""
    return next(t for t in (torch.int16, torch.int32, torch.int64) if n_keys < torch.iinfo(t).max)


def inverse_index(idx, cu_q, sel_block_size, seg, chunk=None, keep_empty=True, with_pos=True):
    """The inverse index of the selections idx [N, H, n], for row chunks of `chunk` rows (all
    rows by default), built by one stable sort and without a host sync: the number of blocks is
    bounded by nbu = N // l' + n_seq (>= the real count). With keep_empty, every bucket of the
    first chunk gets a segment (a program that writes its keys' zero gradients); other buckets
    no row selected get none. pos_of (the key-centric merges' map) is None unless with_pos.
    Left out, as empty slots are: blocks after the row's own block (no key of them is visible;
    past a packed sequence's end the bucket would be the next sequence's block)."""
    N, H, n = idx.shape
    chunk = N if chunk is None else max(1, chunk)
    C = -(-N // chunk)
    n_seq = cu_q.numel() - 1
    blk_cu = tile_cu(cu_q, sel_block_size)                                   # blocks per sequence
    nbu = N // sel_block_size + n_seq
    NB1 = H * nbu + 1                                                        # + the left-out bucket
    E = N * H * n
    seq = torch.searchsorted(cu_q[1:], torch.arange(N, dtype=cu_q.dtype, device=idx.device), right=True)
    key = torch.empty(E, dtype=sort_key_dtype(C * NB1), device=idx.device)
    BE = 1024
    grid = (triton.cdiv(E, BE),)
    if E:
        nsa_index_keys_kernel[grid](idx, cu_q[seq].contiguous(), blk_cu[seq].contiguous(), key, E, nbu, chunk,
                                    NB1, H=H, N_SEL=n, SEL_L=sel_block_size, BE=BE)
    keys, order = torch.sort(key, stable=True)
    q_list = empty(E, dtype=torch.int32, device=idx.device)
    pos_of = empty(E, dtype=torch.int32, device=idx.device) if with_pos else None
    if E:
        nsa_index_lists_kernel[grid](order, keys, q_list, q_list if pos_of is None else pos_of, E, NB1,
                                     HN=H * n, WITH_POS=with_pos, BE=BE)
    pos_of = pos_of.view(N, H, n) if with_pos else None
    # each (chunk, bucket) list starts at the first sorted key >= it (no scatter of counts)
    list_cu = torch.searchsorted(keys, torch.arange(C * NB1 + 1, dtype=keys.dtype, device=idx.device)).to(torch.int32)
    counts = (list_cu[1:] - list_cu[:-1]).long()
    nseg = (counts.view(C, NB1)[:, :-1] + seg - 1) // seg
    if keep_empty:
        nseg[0] = nseg[0].clamp(min=1)
    zero = nseg.new_zeros(C, 1)
    seg_cu = torch.cat([zero, nseg.cumsum(1)], 1).to(torch.int32)
    part_cu = torch.cat([zero, torch.where(nseg > 1, nseg, 0).cumsum(1)], 1).to(torch.int32)
    return InverseIndex(q_list, pos_of, list_cu, seg_cu, part_cu, blk_cu, H * nbu, nbu, seg)


def selected_bwd_launch(q, k, v, idx, o, lse, do, cu_q, scale, sel_block_size, delta=None, dq=None):
    """(dq, dk, dv) of selected attention. dK/dV key-centric (inverse index, no atomics). dQ
    either group-centric (its own kernel, which also writes delta = rowsum(o * dO)) or, for
    small groups, key-centric: the dK/dV kernel writes one dQ partial per (query, slot) and a
    second kernel sums them. The key-centric passes bound the partials: whole KV heads when one
    head's partials fit (dK/dV written once), else row chunks (dK/dV summed over them in fp32).
    delta given: precomputed (o is then not read); dq given: dQ is added to it."""
    meta = _selected_meta("dq", q, v, idx, sel_block_size)
    N, HQ, H, G, GP, DK, DV, BK, BV = _dims(q, v)
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
    q, k, v, idx, cu_q, scale, sel_block_size = inputs
    ctx.save_for_backward(q, k, v, idx, output[0], output[1], cu_q)
    ctx.consts = (scale, sel_block_size)


def _selected_backward(ctx, do, dlse):
    q, k, v, idx, o, lse, cu_q = ctx.saved_tensors
    dq, dk, dv = selected_bwd(q, k, v, idx, o, lse, _grad_or_zeros(do, o), cu_q, *ctx.consts)
    return dq, dk, dv, None, None, None, None


selected_fwd.register_autograd(_selected_backward, setup_context=_selected_setup)


# ----------------------------------------------------------------------------- gated merge
def _gate_launch(n_rows, dv):
    BV = pow2(dv, 16)
    BR = max(1, 4096 // BV)      # ~4k elements per program: a few vectors per thread
    return BV, BR, (triton.cdiv(n_rows, BR),)


@custom_op("nsa::gate_fwd", mutates_args=())
def gate_fwd(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    n_rows, dv = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
    o = empty(*o_cmp.shape, dtype=o_cmp.dtype, device=o_cmp.device)
    BV, BR, grid = _gate_launch(n_rows, dv)
    if n_rows:
        nsa_gate_fwd_kernel[grid](o_cmp, o_slc, o_win, gates, o, n_rows, DV=dv, BV=BV, BR=BR)
    return o


@gate_fwd.register_fake
def _(o_cmp, o_slc, o_win, gates):
    return torch.empty_like(o_cmp)


@custom_op("nsa::gate_bwd", mutates_args=())
def gate_bwd(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor,
             do: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n_rows, dv = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
    grads = [empty(*x.shape, dtype=x.dtype, device=x.device) for x in (o_cmp, o_slc, o_win, gates)]
    BV, BR, grid = _gate_launch(n_rows, dv)
    if n_rows:
        nsa_gate_bwd_kernel[grid](o_cmp, o_slc, o_win, gates, do, *grads, n_rows, DV=dv, BV=BV, BR=BR)
    return tuple(grads)


@gate_bwd.register_fake
def _(o_cmp, o_slc, o_win, gates, do):
    return tuple(torch.empty_like(x) for x in (o_cmp, o_slc, o_win, gates))


def _gate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gate_backward(ctx, do):
    return gate_bwd(*ctx.saved_tensors, do.contiguous())


gate_fwd.register_autograd(_gate_backward, setup_context=_gate_setup)


# ----------------------------------------------------------------------------- fused (eager)
class FusedNSA(torch.autograd.Function):
    """nsa_attention on packed rows, eager mode: the three branches and the gate in one
    autograd node whose backward holds as little as it can at once (at 64k and G = 1 the
    composed ops peaked at 2.3x FlashAttention-2's memory). The branch outputs are kept on the
    node, not saved, and freed as soon as one pass has read them for the gate gradients and the
    branches' softmax corrections; each branch's dO = g * dO is made only while that branch
    runs; one dQ is written by the first branch and added to by the others; the compression
    branch goes first, as its fp32 split partials are the largest buffers. A second backward
    through one graph (retain_graph) recomputes the branch outputs from the kept selection.
    torch.compile takes the composed custom ops instead (nsa.api.nsa_attention)."""

    @staticmethod
    def _branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, cu, cu_k, scale, c, idx=None):
        """([o_cmp, o_slc, o_win], [their lse], idx): the three branches; the selection is made
        from the compression branch unless given (a recompute)."""
        sel = (c.cmp_block_size, c.cmp_stride, c.sel_block_size, c.sel_block_count, c.sel_init_blocks,
               c.sel_local_blocks)
        if tuning.cmp_select(pow2(q.shape[1] // v_cmp.shape[1]), pow2(v_cmp.shape[2], 16)):
            # G = 1: one kernel; a recompute gets the same o_cmp from it and keeps the given idx
            o_cmp, lse_cmp, new_idx = cmp_select_fwd(q, k_cmp, v_cmp, cu, cu_k, scale, *sel)
            idx = new_idx if idx is None else idx
        else:
            o_cmp, lse_cmp = banded_fwd(q, k_cmp, v_cmp, cu, cu_k, scale, c.cmp_stride, c.cmp_block_size - 1, 0)
            if idx is None:
                idx = select_blocks(q, k_cmp, lse_cmp, cu, cu_k, scale, *sel)
        o_slc, lse_slc = selected_fwd(q, k_slc, v_slc, idx, cu, scale, c.sel_block_size)
        o_win, lse_win = banded_fwd(q, k_win, v_win, cu, cu, scale, 1, 0, c.window_size)
        return [o_cmp, o_slc, o_win], [lse_cmp, lse_slc, lse_win], idx

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cu, cu_k, scale, c):
        outs, (lse_cmp, lse_slc, lse_win), idx = FusedNSA._branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win,
                                                                    cu, cu_k, scale, c)
        o = gate_fwd(*outs, gates)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, idx, lse_cmp, lse_slc,
                              lse_win, cu, cu_k)
        ctx.branch_out = outs
        ctx.consts = (scale, c)
        ctx.mark_non_differentiable(idx)
        return o, idx

    @staticmethod
    def backward(ctx, do, _didx):
        q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, idx, lse_cmp, lse_slc, lse_win, cu, cu_k = ctx.saved_tensors
        scale, c = ctx.consts
        outs, ctx.branch_out = ctx.branch_out, None
        if outs is None:   # freed by an earlier backward through this graph: recompute them
            outs = FusedNSA._branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, cu, cu_k, scale, c, idx)[0]
        do = do.contiguous()
        n_rows, dv = do.numel() // do.shape[-1], do.shape[-1]
        dgates = empty(*gates.shape, dtype=gates.dtype, device=gates.device)
        delta = empty(3, *do.shape[:-1], dtype=torch.float32, device=do.device)
        BV, BR, grid = _gate_launch(n_rows, dv)
        if n_rows:
            nsa_gate_delta_kernel[grid](*outs, gates, do, dgates, delta, n_rows, DV=dv, BV=BV, BR=BR)
        del outs   # the branch outputs go here
        g = lambda i: do * gates[..., i:i + 1]
        dq, dk_cmp, dv_cmp = banded_bwd_launch(q, k_cmp, v_cmp, None, lse_cmp, g(0), None, cu, cu_k, scale,
                                               c.cmp_stride, c.cmp_block_size - 1, 0, delta=delta[0])
        _, dk_slc, dv_slc = selected_bwd_launch(q, k_slc, v_slc, idx, None, lse_slc, g(1), cu, scale,
                                                c.sel_block_size, delta=delta[1], dq=dq)
        _, dk_win, dv_win = banded_bwd_launch(q, k_win, v_win, None, lse_win, g(2), None, cu, cu, scale, 1, 0,
                                              c.window_size, delta=delta[2], dq=dq)
        return dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dgates, None, None, None, None


# ----------------------------------------------------------------------------- decoding
def decode_launch(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor,
           v_win: Tensor, gates: Tensor, lengths: Tensor, scale: float, cmp_block_size: int,
           cmp_stride: int, sel_block_size: int, sel_block_count: int, sel_init_blocks: int,
           sel_local_blocks: int, window_size: int) -> tuple[Tensor, Tensor]:
    """One decode step (layout of nsa.nsa_decode): four launches, no host sync."""
    B, HQ, DK = q.shape
    NC, H, DV = max(k_cmp.shape[1], 1), k_cmp.shape[2], v_cmp.shape[3]
    N, W = k_slc.shape[1], k_win.shape[1]
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
    sl2, prec, warps = scale * LOG2E, _prec(q), t["warps"]
    sel = dict(SEL_L=sel_block_size)
    nsa_decode_cmp_win_kernel[(B * H, S_C + S_W)](
        q, k_cmp, v_cmp, k_win, v_win, lengths, logits, pm, pl, pacc, NC, W, sl2,
        CMP_L=cmp_block_size, CMP_D=cmp_stride, WIN=window_size, S_C=S_C, S_W=S_W, S_ALL=S_ALL,
        PREC=prec, num_warps=warps, **dims)
    nsa_decode_score_kernel[(B * H, S_B)](
        lengths, logits, pm, pl, scores, NC, NB, H=H, G=G, GP=GP, S_C=S_C, S_B=S_B, S_ALL=S_ALL,
        CMP_L=cmp_block_size, CMP_D=cmp_stride, BCH=t["BCH"], RP=pow2(sel_block_size // cmp_stride),
        num_warps=4, **sel)
    nsa_decode_selected_kernel[(B * H, S_S)](
        q, k_slc, v_slc, lengths, scores, idx, pm, pl, pacc, N, NB, sl2, N_SEL=sel_block_count,
        NTOP=pow2(sel_block_count), CHK=min(t["CHK"], pow2(NB)), INIT=sel_init_blocks,
        LOCAL=sel_local_blocks, PER=PER, S_FIRST=S_C + S_W, S_ALL=S_ALL, PREC=prec,
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
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, scale, *config):
    B, HQ, _ = q.shape
    return (q.new_empty(B, HQ, v_cmp.shape[3]),
            q.new_empty(B, k_cmp.shape[2], config[3], dtype=torch.int32))
