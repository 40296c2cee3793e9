"""NSA arithmetic every part of the library shares: compressed-token counts and offsets, and the
gated composition of the three branches (docs/semantics.md §1, §6, §9). Imports nothing of nsa."""
from __future__ import annotations

import torch


def num_compressed(seqlen: int, cmp_block_size: int, cmp_stride: int) -> int:
    """Tc(T): compressed tokens of a sequence of T keys (token i summarises keys [i*d, i*d + l))."""
    return 0 if seqlen < cmp_block_size else (seqlen - cmp_block_size) // cmp_stride + 1


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, cmp_block_size: int, cmp_stride: int) -> torch.Tensor:
    """Offsets of each packed sequence's compressed tokens in a packed compressed tensor: the
    compressed twin of cu_seqlens (int32, [N+1]), computed on cu_seqlens' device
    (docs/semantics.md §9)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tc = torch.where(lens < cmp_block_size, 0, (lens - cmp_block_size) // cmp_stride + 1)
    return torch.cat([tc.new_zeros(1), tc.cumsum(0)]).to(torch.int32)


def combine(o_cmp, o_slc, o_win, gates):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, gates [..., 3] in that order."""
    g = gates.unsqueeze(-1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win


def compose_branches(impl, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config, scale,
                     cu_seqlens):
    """NSA from one backend's four branch functions (`impl`: nsa.reference or the Triton
    backend): compression, selection from its lse (no gradient), selected attention, window,
    then the gates (the backend's own fused `combine` where it has one). Returns (o, block_idx)."""
    c = config
    o_cmp, lse = impl.compressed_attention(q, k_cmp, v_cmp, cmp_block_size=c.cmp_block_size,
                                           cmp_stride=c.cmp_stride, scale=scale, cu_seqlens=cu_seqlens)
    idx = impl.select_blocks(q.detach(), k_cmp.detach(), lse.detach(), scale=scale, cu_seqlens=cu_seqlens,
                             **selection_kwargs(c))
    o_slc = impl.selected_attention(q, k_slc, v_slc, idx, sel_block_size=c.sel_block_size, scale=scale,
                                    cu_seqlens=cu_seqlens)
    o_win = impl.sliding_window_attention(q, k_win, v_win, window_size=c.window_size, scale=scale,
                                          cu_seqlens=cu_seqlens)
    return getattr(impl, "combine", combine)(o_cmp, o_slc, o_win, gates), idx


def selection_kwargs(config) -> dict:
    """The selection's keyword arguments (select_blocks) of an NSAConfig."""
    c = config
    return dict(cmp_block_size=c.cmp_block_size, cmp_stride=c.cmp_stride, sel_block_size=c.sel_block_size,
                sel_block_count=c.sel_block_count, sel_init_blocks=c.sel_init_blocks,
                sel_local_blocks=c.sel_local_blocks)
