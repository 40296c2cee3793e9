"""Rotary embeddings of a training step in one launch per pass (eager).

nsa.layer.rotary in PyTorch is ~12 small kernels forward and as many backward (casts, cos, sin,
the halves' products, a concatenation), and the layer rotates q, the selection and window keys
and the compressed keys: an eager layer step spent ~100 launches on it. Here one kernel rotates
up to three tensors of one shape [B, T, heads, D] (heads may differ) at the same positions: it
reads each through its strides (a view of a projection's output), rotates each row's halves in
fp32 (the reference's compute dtype for half inputs) and writes contiguous tensors, the layout
the attention kernels read. The backward is the same kernel at the opposite angle:
(x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotate_rows(x, sxb, sxt, sxh, out, h, b, t, r, c, m, cos, sin, HEADS: tl.constexpr, HALF: tl.constexpr):
    """Rows r = (b, t) of head h of x (strided) rotated into out (contiguous [*, HEADS, 2 HALF])."""
    src = x + (b * sxb + t * sxt + h * sxh)[:, None] + c[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    dst = out + (r.to(tl.int64) * HEADS + h)[:, None] * (2 * HALF) + c[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out.dtype.element_ty), mask=m)


@triton.jit
def nsa_rotary_kernel(x0, x1, x2, o0, o1, o2, s0b, s0t, s0h, s1b, s1t, s1h, s2b, s2t, s2h,
                      pos, inv_freq, n_rows, T, spb, spt,
                      H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, HALF: tl.constexpr,
                      BH: tl.constexpr, BR: tl.constexpr, SIGN: tl.constexpr):
    """Grid (row tiles, H0 + H1 + H2): BR rows of one head of tensor 0, 1 or 2."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    h = tl.program_id(1)
    c = tl.arange(0, BH)
    ok = r < n_rows
    m = ok[:, None] & (c[None, :] < HALF)
    b, t = (r // T).to(tl.int64), (r % T).to(tl.int64)
    p = tl.load(pos + b * spb + t * spt, mask=ok, other=0).to(tl.float32)
    ang = p[:, None] * tl.load(inv_freq + c, mask=c < HALF, other=0.0)[None, :]
    cos, sin = tl.cos(ang), tl.sin(ang) * SIGN
    if h < H0:
        _rotate_rows(x0, s0b, s0t, s0h, o0, h, b, t, r, c, m, cos, sin, H0, HALF)
    elif h < H0 + H1:
        _rotate_rows(x1, s1b, s1t, s1h, o1, h - H0, b, t, r, c, m, cos, sin, H1, HALF)
    else:
        _rotate_rows(x2, s2b, s2t, s2h, o2, h - H0 - H1, b, t, r, c, m, cos, sin, H2, HALF)


def rotary_launch(xs, pos, inv_freq, sign=1):
    """xs: 1 to 3 tensors [B, T, heads, D] (last dim contiguous; heads may differ) rotated at
    pos [B, T] (any strides) by angles pos * inv_freq [D / 2] (fp32): new contiguous tensors of
    their dtypes and shapes, in one launch."""
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs]
    B, T, _, D = xs[0].shape
    heads = [x.shape[2] for x in xs] + [0] * (3 - len(xs))
    pad = lambda seq: list(seq) + [seq[0]] * (3 - len(seq))   # unused slots: never read
    strides = [s for x in pad(xs) for s in x.stride()[:3]]
    n_rows = B * T
    BH = triton.next_power_of_2(max(1, D // 2))
    BR = max(1, min(64, 2048 // BH))
    if n_rows and sum(heads):
        nsa_rotary_kernel[(triton.cdiv(n_rows, BR), sum(heads))](
            *pad(xs), *pad(outs), *strides, pos, inv_freq, n_rows, T, pos.stride(0), pos.stride(1),
            H0=heads[0], H1=heads[1], H2=heads[2], HALF=D // 2, BH=BH, BR=BR, SIGN=sign)
    return outs


class Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos, inv_freq, *xs):
        ctx.save_for_backward(pos, inv_freq)
        return tuple(rotary_launch(xs, pos, inv_freq))

    @staticmethod
    @once_differentiable
    def backward(ctx, *gs):
        pos, inv_freq = ctx.saved_tensors
        return None, None, *rotary_launch(gs, pos, inv_freq, -1)


def rotary(xs, pos, inv_freq):
    """nsa.layer.rotary(x, pos, theta) of each x in xs (1 to 3 tensors [B, T, heads, D] of one
    B, T, D and dtype) for inv_freq = rope_freqs(D, theta) in fp32, differentiable in each x: one
    kernel forward, one backward. Returns a tuple."""
    xs = tuple(xs)
    if not 1 <= len(xs) <= 3:
        raise ValueError(f"rotary takes 1 to 3 tensors, got {len(xs)}")
    x = xs[0]
    if x.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16, got {x.dtype}")
    if x.shape[-1] % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {x.shape[-1]}")
    for y in xs[1:]:
        if y.dtype != x.dtype or y.shape[:2] != x.shape[:2] or y.shape[3] != x.shape[3]:
            raise ValueError(f"rotary: tensors of one dtype and shape [B, T, *, D] expected, got "
                             f"{x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")
    return Rotary.apply(pos, inv_freq, *xs)
