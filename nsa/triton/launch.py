"""What every launcher derives from its packed inputs: head counts and dims, matmul precision,
the q/k column tiles. Tensors here are packed: [N, heads, dim] rows of all sequences."""
from __future__ import annotations

import functools
import os

import torch

from . import tuning
from .utils import pow2


def head_dims(q, v):
    N, HQ, DK = q.shape
    H, DV = v.shape[1], v.shape[2]
    G = HQ // H
    return N, HQ, H, G, pow2(G), DK, DV, pow2(DK, 16), pow2(DV, 16)


def precision(q):
    """fp32 inputs get true fp32 products (not TF32): asking for fp32 means fp32 accuracy."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def grad_or_zeros(g, like):
    return torch.zeros_like(like) if g is None else g.contiguous()


def key_dims(meta):
    """A kernel's meta with the padded BK replaced by the two column tiles KA + KB."""
    KA, KB = tuning.key_tiles(meta["DK"])
    return {**{k: v for k, v in meta.items() if k != "BK"}, "KA": KA, "KB": KB}


_TUNING_ENV = ("NSA_TUNE", "NSA_SEL_SEGMENT", "TRITON_INTERPRET")


def shape_memo(fn):
    """A launcher's constexprs fn(*args) -> dict, made once per tensor shape past the row axis
    (heads, dims) and dtype, the other arguments and the tuning environment, instead of at every
    call (an eager step launches ~25 kernels a layer). Each call gets its own copy."""
    memo = {}

    def key_of(a):
        return (tuple(a.shape[1:]), a.dtype) if isinstance(a, torch.Tensor) else a

    @functools.wraps(fn)
    def kept(*args):
        key = (tuple(key_of(a) for a in args), tuple(os.environ.get(e) for e in _TUNING_ENV))
        got = memo.get(key)
        if got is None:
            if len(memo) >= 1024:
                memo.clear()
            got = memo[key] = fn(*args)
        return dict(got)
    return kept
