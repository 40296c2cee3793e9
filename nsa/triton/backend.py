"""The Triton backend: the signatures of nsa.reference, on [B, T, heads, dim] tensors.

Layout work only: batches become packed rows with device-built offsets, then the kernel
families' custom ops.
"""
from __future__ import annotations

import torch

from ..core import compressed_cu_seqlens
from .append import decode_append, decode_store_compressed
from .banded import banded_fwd
from .decode import decode, decode_launch
from .fused import FusedNSA, nsa_after
from .gate import gate_fwd
from .rope import rotary
from .select import select_blocks as select_op
from .selected import selected_fwd
from .utils import derived, keeping, varlen

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CAPTURABLE = True   # a decode step reads no host value: it can be captured in a CUDA graph (nsa.graph)


def _packed(x):
    return x.reshape(-1, x.shape[2], x.shape[3]).contiguous()


def _setup(q, cu_seqlens, *, cmp=None, tc=None):
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16, got {q.dtype}")
    B, T, HQ, DK = q.shape
    cu, n_seq, total = varlen(cu_seqlens, B, T, q.device)
    if cmp is None:
        return cu, None
    if cu_seqlens is None:   # a batch: every sequence has tc compressed tokens
        make = lambda: torch.arange(B + 1, dtype=torch.int32, device=q.device) * tc
    else:
        make = lambda: compressed_cu_seqlens(cu, *cmp)
    return cu, derived(cu, ("compressed", *cmp), make)


def _scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else scale


def compressed_attention(q, k_cmp, v_cmp, *, cmp_block_size, cmp_stride, scale=None, cu_seqlens=None):
    B, T, HQ, _ = q.shape
    cu, cu_k = _setup(q, cu_seqlens, cmp=(cmp_block_size, cmp_stride), tc=k_cmp.shape[1])
    o, lse = banded_fwd(_packed(q), _packed(k_cmp), _packed(v_cmp), cu, cu_k, _scale(scale, q),
                            cmp_stride, cmp_block_size - 1, 0)
    return o.view(B, T, HQ, -1), lse.view(B, T, HQ)


def sliding_window_attention(q, k, v, *, window_size, scale=None, cu_seqlens=None):
    B, T, HQ, _ = q.shape
    cu, _ = _setup(q, cu_seqlens)
    o, _ = banded_fwd(_packed(q), _packed(k), _packed(v), cu, cu, _scale(scale, q), 1, 0, window_size)
    return o.view(B, T, HQ, -1)


def select_blocks(q, k_cmp, lse, *, cmp_block_size, cmp_stride, sel_block_size, sel_block_count,
                  sel_init_blocks=1, sel_local_blocks=2, scale=None, cu_seqlens=None):
    B, T, HQ, _ = q.shape
    cu, cu_k = _setup(q, cu_seqlens, cmp=(cmp_block_size, cmp_stride), tc=k_cmp.shape[1])
    idx = select_op(_packed(q.detach()), _packed(k_cmp.detach()),
                            lse.detach().float().reshape(-1, HQ).contiguous(), cu, cu_k,
                            _scale(scale, q), cmp_block_size, cmp_stride, sel_block_size,
                            sel_block_count, sel_init_blocks, sel_local_blocks)
    return idx.view(B, T, k_cmp.shape[2], sel_block_count)


def selected_attention(q, k, v, block_idx, *, sel_block_size, scale=None, cu_seqlens=None):
    B, T, HQ, _ = q.shape
    cu, _ = _setup(q, cu_seqlens)
    idx = block_idx.reshape(B * T, k.shape[2], -1).contiguous()
    o, _ = selected_fwd(_packed(q), _packed(k), _packed(v), idx, cu, _scale(scale, q), sel_block_size)
    return o.view(B, T, HQ, -1)


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale, cu_seqlens):
    """All of NSA in one autograd node (FusedNSA: a leaner backward). Eager only: under
    torch.compile nsa.api composes the custom ops, which it traces."""
    c = config
    B, T, HQ, _ = q.shape
    with keeping():   # the offsets and their tables, kept for the next step (utils.derived)
        cu, cu_k = _setup(q, cu_seqlens, cmp=(c.cmp_block_size, c.cmp_stride), tc=k_cmp.shape[1])
        o, idx = FusedNSA.apply(*(_packed(x) for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)),
                                cu, cu_k, _scale(scale, q), c)
    return o.view(B, T, HQ, -1), idx.view(B, T, k_cmp.shape[2], c.sel_block_count)


def combine(o_cmp, o_slc, o_win, gates):
    """docs/semantics.md §6 in one fused pass (forward and backward)."""
    return gate_fwd(o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous(), gates.contiguous())


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, config, scale=None,
               block_table=None, window_table=None):
    """One decoding step over a cache (nsa.nsa_decode's layout, paged or not): the four decode
    kernels."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16, got {q.dtype}")
    c = config
    run = decode if torch.compiler.is_compiling() else decode_launch
    tables = [] if block_table is None else [block_table.contiguous(), window_table.contiguous()]
    return run(*(x.contiguous() for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)),
                      lengths.to(torch.int32).contiguous(), _scale(scale, q), c.cmp_block_size,
                      c.cmp_stride, c.sel_block_size, c.sel_block_count, c.sel_init_blocks,
                      c.sel_local_blocks, c.window_size, *tables)


def nsa_extend(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, config, scale=None):
    """S queries per row after what a cache holds (nsa.nsa_extend's layout): the training
    kernels' forward with each row's queries placed after its keys (utils.seq_tile's CHUNK),
    reading the cache's buffers in place. Every span is built on the device: no host sync."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16, got {q.dtype}")
    c = config
    B, S, HQ, _ = q.shape
    Nc, N, Wt = k_cmp.shape[1], k_slc.shape[1], k_win.shape[1]
    L = lengths.to(torch.int32)
    P = L - S                                                   # each row's prefix
    rows = torch.arange(B, dtype=torch.int32, device=q.device)
    tc = torch.where(L >= c.cmp_block_size, (L - c.cmp_block_size) // c.cmp_stride + 1, 0)
    held = torch.minimum(P, P.new_tensor(Wt - S))               # window keys before the chunk
    spans = (torch.stack([P, rows * Nc, tc]), torch.stack([P, rows * N, L]),
             torch.stack([held, rows * Wt + Wt - S - held, held + S]))
    cu = torch.arange(B + 1, dtype=torch.int32, device=q.device) * S
    o, idx = nsa_after(*(_packed(x.contiguous()) for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)),
                       cu, tuple(x.contiguous() for x in spans), _scale(scale, q), c)
    return o.view(B, S, HQ, -1), idx.view(B, S, k_cmp.shape[2], c.sel_block_count)


__all__ = ["compressed_attention", "sliding_window_attention", "select_blocks", "selected_attention",
           "nsa_attention", "combine", "nsa_decode", "nsa_extend", "decode_append", "decode_store_compressed",
           "rotary", "CAPTURABLE"]
