"""nsa_attention on packed rows in eager mode: the three branches and the gate in one autograd
node (FusedNSA), with a backward that holds as little memory as it can at once. It calls the
launchers themselves, not their torch.library custom ops (whose dispatch only torch.compile
needs)."""
from __future__ import annotations

import torch

from . import tuning
from .banded import banded_bwd_launch, banded_fwd_launch as banded_fwd
from .gate import gate_fwd_launch as gate_fwd, gate_launch, nsa_gate_delta_kernel
from .select import cmp_select_fwd, select_blocks_launch as select_blocks
from .selected import selected_bwd_launch, selected_fwd_launch as selected_fwd
from .utils import empty, keeping, pow2


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
    def _branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, cu, cu_k, scale, c, idx=None,
                  spans=(None, None, None)):
        """([o_cmp, o_slc, o_win], [their lse], idx): the three branches; the selection is made
        from the compression branch unless given (a recompute). spans: per branch (compressed,
        selected, window), queries after held keys (utils.seq_tile's CHUNK; a chunk after a
        cached prefix, forward only)."""
        sel = (c.cmp_block_size, c.cmp_stride, c.sel_block_size, c.sel_block_count, c.sel_init_blocks,
               c.sel_local_blocks)
        sp_cmp, sp_slc, sp_win = spans
        if tuning.cmp_select(pow2(q.shape[1] // v_cmp.shape[1]), pow2(v_cmp.shape[2], 16)):
            # G = 1: one kernel; a recompute gets the same o_cmp from it and keeps the given idx
            o_cmp, lse_cmp, new_idx = cmp_select_fwd(q, k_cmp, v_cmp, cu, cu_k, scale, *sel, spans=sp_cmp)
            idx = new_idx if idx is None else idx
        else:
            o_cmp, lse_cmp = banded_fwd(q, k_cmp, v_cmp, cu, cu_k, scale, c.cmp_stride, c.cmp_block_size - 1, 0,
                                        spans=sp_cmp)
            if idx is None:
                idx = select_blocks(q, k_cmp, lse_cmp, cu, cu_k, scale, *sel, spans=sp_cmp)
        o_slc, lse_slc = selected_fwd(q, k_slc, v_slc, idx, cu, scale, c.sel_block_size, spans=sp_slc)
        o_win, lse_win = banded_fwd(q, k_win, v_win, cu, cu, scale, 1, 0, c.window_size, spans=sp_win)
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
    @keeping()   # tables of the offsets, as in the forward (backend.nsa_attention)
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
        BV, BR, grid = gate_launch(n_rows, dv)
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


def nsa_after(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cu, spans, scale, c):
    """Forward of a chunk of queries after held keys (FusedNSA._branches' spans) and the gate:
    (o, idx). Inference: no autograd node."""
    outs, _, idx = FusedNSA._branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, cu, cu, scale, c,
                                      spans=spans)
    return gate_fwd(*outs, gates), idx
