"""Gated merge of the three branches (docs/semantics.md §6) in one pass each way.

Forward:  o = g0*o_cmp + g1*o_slc + g2*o_win.
Backward: dO_i = g_i * dO and dg_i = rowsum(dO * o_i), reading dO and each o_i once. Rows are
(token, query head) pairs; gates are [rows, 3]. The fused backward (ops.FusedNSA) instead takes
dg_i and each branch's softmax correction rowsum(o_i * dO_i) in one pass, so that the branch
outputs can be freed before the branches' backward runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from .utils import empty, pow2


@triton.jit
def _rows(pid, n_rows, BR: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    r = pid * BR + tl.arange(0, BR)
    c = tl.arange(0, BV)
    ok = r < n_rows
    return r, ok, r.to(tl.int64)[:, None] * DV + c[None, :], ok[:, None] & (c[None, :] < DV)


@triton.jit
def nsa_gate_fwd_kernel(oc, osl, ow, g, o, n_rows, DV: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr):
    r, ok, off, m = _rows(tl.program_id(0), n_rows, BR, DV, BV)
    gp = g + r.to(tl.int64) * 3
    g0 = tl.load(gp, mask=ok, other=0.0).to(tl.float32)[:, None]
    g1 = tl.load(gp + 1, mask=ok, other=0.0).to(tl.float32)[:, None]
    g2 = tl.load(gp + 2, mask=ok, other=0.0).to(tl.float32)[:, None]
    acc = g0 * tl.load(oc + off, mask=m, other=0.0).to(tl.float32)
    acc += g1 * tl.load(osl + off, mask=m, other=0.0).to(tl.float32)
    acc += g2 * tl.load(ow + off, mask=m, other=0.0).to(tl.float32)
    tl.store(o + off, acc.to(o.dtype.element_ty), mask=m)


@triton.jit
def nsa_gate_bwd_kernel(oc, osl, ow, g, do, doc, dosl, dow, dg, n_rows,
                        DV: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr):
    r, ok, off, m = _rows(tl.program_id(0), n_rows, BR, DV, BV)
    gp = g + r.to(tl.int64) * 3
    dgp = dg + r.to(tl.int64) * 3
    d = tl.load(do + off, mask=m, other=0.0).to(tl.float32)
    _gate_branch_bwd(oc, doc, gp, dgp, 0, d, ok, off, m)
    _gate_branch_bwd(osl, dosl, gp, dgp, 1, d, ok, off, m)
    _gate_branch_bwd(ow, dow, gp, dgp, 2, d, ok, off, m)


@triton.jit
def _gate_branch_bwd(o_i, do_i, gp, dgp, i: tl.constexpr, d, ok, off, m):
    gi = tl.load(gp + i, mask=ok, other=0.0).to(tl.float32)
    oi = tl.load(o_i + off, mask=m, other=0.0).to(tl.float32)
    tl.store(dgp + i, tl.sum(d * oi, 1).to(dgp.dtype.element_ty), mask=ok)
    tl.store(do_i + off, (gi[:, None] * d).to(do_i.dtype.element_ty), mask=m)


@triton.jit
def nsa_gate_delta_kernel(oc, osl, ow, g, do, dg, delta, n_rows,
                          DV: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr):
    """dg_i = rowsum(dO * o_i) and delta_i = rowsum(o_i * dO_i) (delta [3, rows] fp32), with
    dO_i = g_i * dO rounded to dO's dtype, as the branch kernels will read it."""
    r, ok, off, m = _rows(tl.program_id(0), n_rows, BR, DV, BV)
    gp = g + r.to(tl.int64) * 3
    dgp = dg + r.to(tl.int64) * 3
    d = tl.load(do + off, mask=m, other=0.0)
    _gate_branch_delta(oc, gp, dgp, delta, 0, d, r, ok, off, m, n_rows)
    _gate_branch_delta(osl, gp, dgp, delta, 1, d, r, ok, off, m, n_rows)
    _gate_branch_delta(ow, gp, dgp, delta, 2, d, r, ok, off, m, n_rows)


@triton.jit
def _gate_branch_delta(o_i, gp, dgp, delta, i: tl.constexpr, d, r, ok, off, m, n_rows):
    gi = tl.load(gp + i, mask=ok, other=0.0).to(tl.float32)
    oi = tl.load(o_i + off, mask=m, other=0.0).to(tl.float32)
    df = d.to(tl.float32)
    tl.store(dgp + i, tl.sum(df * oi, 1).to(dgp.dtype.element_ty), mask=ok)
    do_i = (gi[:, None] * df).to(d.dtype).to(tl.float32)
    tl.store(delta + i * n_rows + r.to(tl.int64), tl.sum(oi * do_i, 1), mask=ok)


# ----------------------------------------------------------------------------- launchers, custom ops
def gate_launch(n_rows, dv):
    BV = pow2(dv, 16)
    BR = max(1, 4096 // BV)      # ~4k elements per program: a few vectors per thread
    return BV, BR, (triton.cdiv(n_rows, BR),)


def gate_fwd_launch(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    n_rows, dv = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
    o = empty(*o_cmp.shape, dtype=o_cmp.dtype, device=o_cmp.device)
    BV, BR, grid = gate_launch(n_rows, dv)
    if n_rows:
        nsa_gate_fwd_kernel[grid](o_cmp, o_slc, o_win, gates, o, n_rows, DV=dv, BV=BV, BR=BR)
    return o


gate_fwd = custom_op("nsa::gate_fwd", mutates_args=())(gate_fwd_launch)


@gate_fwd.register_fake
def _(o_cmp, o_slc, o_win, gates):
    return torch.empty_like(o_cmp)


@custom_op("nsa::gate_bwd", mutates_args=())
def gate_bwd(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor,
             do: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n_rows, dv = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
    grads = [empty(*x.shape, dtype=x.dtype, device=x.device) for x in (o_cmp, o_slc, o_win, gates)]
    BV, BR, grid = gate_launch(n_rows, dv)
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
