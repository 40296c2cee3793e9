"""The inverse index of a selection: for every (KV head, selection block), the query rows that
selected it, built on the device by one stable sort (deterministic, no host sync). The selected
dK/dV kernels and the small-group forward walk these lists (selected.py)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import derived, empty, tile_cu


# Built by inverse_index (below): one kernel writes every (row, head, slot) entry's sort key, torch
# sorts them (stable), a second kernel writes the lists and the entries' list positions, a
# binary search finds where each list starts and a third kernel counts each bucket's segments.

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


@triton.jit
def nsa_index_segments_kernel(list_cu, seg_cu, part_cu, NB1, seg, KEEP_EMPTY: tl.constexpr, BB: tl.constexpr):
    """Grid (chunks,). From where each list starts (list_cu [C * NB1 + 1]), per chunk c and
    bucket b < NB1 - 1: segments nseg = ceil(count / seg) (at least 1 in chunk 0 with
    KEEP_EMPTY); seg_cu[c] = [0, cumsum(nseg)], part_cu[c] = [0, cumsum(nseg if nseg > 1 else 0)]
    ([C, NB1] int32; the left-out bucket NB1 - 1 gets none)."""
    c = tl.program_id(0)
    base = c.to(tl.int64) * NB1
    tl.store(seg_cu + base, 0)
    tl.store(part_cu + base, 0)
    carry_s = tl.full([], 0, tl.int32)
    carry_p = tl.full([], 0, tl.int32)
    for b0 in range(0, NB1 - 1, BB):
        b = b0 + tl.arange(0, BB)
        ok = b < NB1 - 1
        lo = tl.load(list_cu + base + b, mask=ok, other=0)
        hi = tl.load(list_cu + base + b + 1, mask=ok, other=0)
        ns = (hi - lo + seg - 1) // seg
        if KEEP_EMPTY:
            ns = tl.where(c == 0, tl.maximum(ns, 1), ns)
        ns = tl.where(ok, ns, 0)
        pp = tl.where(ns > 1, ns, 0)
        tl.store(seg_cu + base + b + 1, carry_s + tl.cumsum(ns, 0), mask=ok)
        tl.store(part_cu + base + b + 1, carry_p + tl.cumsum(pp, 0), mask=ok)
        carry_s += tl.sum(ns, 0)
        carry_p += tl.sum(pp, 0)


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
    def row_starts():   # each row's sequence: its first row and its first block
        seq = torch.searchsorted(cu_q[1:], torch.arange(N, dtype=cu_q.dtype, device=idx.device), right=True)
        return cu_q[seq].contiguous(), blk_cu[seq].contiguous()
    q_first, blk_first = derived(cu_q, ("row_starts", sel_block_size, N), row_starts)
    key = torch.empty(E, dtype=sort_key_dtype(C * NB1), device=idx.device)
    BE = 1024
    grid = (triton.cdiv(E, BE),)
    if E:
        nsa_index_keys_kernel[grid](idx, q_first, blk_first, key, E, nbu, chunk,
                                    NB1, H=H, N_SEL=n, SEL_L=sel_block_size, BE=BE)
    keys, order = torch.sort(key, stable=True)
    q_list = empty(E, dtype=torch.int32, device=idx.device)
    pos_of = empty(E, dtype=torch.int32, device=idx.device) if with_pos else None
    if E:
        nsa_index_lists_kernel[grid](order, keys, q_list, q_list if pos_of is None else pos_of, E, NB1,
                                     HN=H * n, WITH_POS=with_pos, BE=BE)
    pos_of = pos_of.view(N, H, n) if with_pos else None
    # each (chunk, bucket) list starts at the first sorted key >= it (no scatter of counts)
    buckets = derived(cu_q, ("buckets", C * NB1, keys.dtype),
                      lambda: torch.arange(C * NB1 + 1, dtype=keys.dtype, device=idx.device))
    list_cu = torch.searchsorted(keys, buckets, out_int32=True)
    seg_cu = empty(C, NB1, dtype=torch.int32, device=idx.device)
    part_cu = empty(C, NB1, dtype=torch.int32, device=idx.device)
    nsa_index_segments_kernel[(C,)](list_cu, seg_cu, part_cu, NB1, seg, KEEP_EMPTY=keep_empty, BB=1024)
    return InverseIndex(q_list, pos_of, list_cu, seg_cu, part_cu, blk_cu, H * nbu, nbu, seg)
