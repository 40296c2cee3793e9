"""Public functional API (docs/semantics.md): checks inputs once, then dispatches to a backend.

Backends: "torch" (nsa.reference, the spec) and "triton" (nsa.triton, the kernels). "auto" picks
Triton for CUDA tensors and the reference otherwise. An explicit backend never falls back.
"""
from __future__ import annotations

import functools
import os

import torch

from . import reference
from .config import NSAConfig, check_compression, check_int, resolve_config
from .core import compose_branches, compressed_cu_seqlens, num_compressed, selection_kwargs

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------- validation
def _tensor(name, x, rank=4):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    return x


def _floats(ref_name, ref, **others):
    if ref.dtype not in _FLOATS:
        raise TypeError(f"{ref_name} must be float64/float32/float16/bfloat16, got {ref.dtype}")
    for name, x in others.items():
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device ({ref.device}), got {x.device}")


def _dims(name, x, expected: dict):
    """expected: {axis: (what, value)}; raises naming the first mismatch."""
    for axis, (what, value) in expected.items():
        if x.shape[axis] != value:
            raise ValueError(f"{name}.shape[{axis}] ({what}) must be {value}, got {x.shape[axis]} "
                             f"(shape {tuple(x.shape)})")


def _heads(q, kv_name, kv):
    hq, h = q.shape[2], kv.shape[2]
    if h < 1 or hq % h:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of {kv_name} heads ({h})")


def _scale(scale):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    return float(scale)


def _cu_seqlens(cu, q):
    """Checks packing; values only on CPU tensors (checking CUDA values would sync the host)."""
    if cu is None:
        return None
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device ({q.device}), got {cu.device}")
    if q.shape[0] != 1:
        raise ValueError(f"packed input (cu_seqlens given) needs batch size 1, got {q.shape[0]}")
    if cu.device.type == "cpu":
        v = cu.tolist()
        if v[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {v[0]} (cu_seqlens {v})")
        down = next((i for i in range(1, len(v)) if v[i] < v[i - 1]), None)
        if down is not None:
            raise ValueError(f"cu_seqlens must be non-decreasing, got {v[down - 1]} then {v[down]} at "
                             f"index {down} (cu_seqlens {v})")
        if v[-1] != q.shape[1]:
            raise ValueError(f"cu_seqlens must end at the packed length q.shape[1] = {q.shape[1]}, "
                             f"got {v[-1]} (cu_seqlens {v})")
    return cu


def _compressed_len(k_name, k_cmp, q, cu, l, d):
    if cu is None:
        _dims(k_name, k_cmp, {1: ("compressed length Tc(T)", num_compressed(q.shape[1], l, d))})
    elif cu.device.type == "cpu":
        total = int(compressed_cu_seqlens(cu, l, d)[-1])
        _dims(k_name, k_cmp, {1: ("total compressed length of the packed sequences", total)})


def backend_module(backend, x):
    """The module that runs `backend` ("auto", "torch", "triton") for tensors like x:
    nsa.reference or nsa.triton.backend (errors as every op's)."""
    return _backend(backend, x)


def _backend(backend, x):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        return reference
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                         f"interpreter), got tensors on {x.device}")
    from .triton import backend as triton_backend
    return triton_backend


def _check_qkv(q, k, v, k_name="k", v_name="v", cu_seqlens=None):
    _tensor("q", q), _tensor(k_name, k), _tensor(v_name, v)
    _floats("q", q, **{k_name: k, v_name: v})
    B, T, HQ, dk = q.shape
    _dims(k_name, k, {0: ("batch", B), 3: ("key dim, q.shape[3]", dk)})
    _dims(v_name, v, {0: ("batch", B), 1: (f"length, {k_name}.shape[1]", k.shape[1]),
                      2: (f"kv heads, {k_name}.shape[2]", k.shape[2])})
    _heads(q, k_name, k)
    return _cu_seqlens(cu_seqlens, q)


def _check_raw_len(q, k_name, k):
    _dims(k_name, k, {1: ("sequence length, q.shape[1]", q.shape[1])})


# ----------------------------------------------------------------------------- public API
def compressed_attention(q, k_cmp, v_cmp, *, cmp_block_size, cmp_stride, scale=None,
                         cu_seqlens=None, backend="auto"):
    """Attention of each query over the compressed tokens it can see.

    q [B,T,HQ,dk], k_cmp [B,Tc,H,dk], v_cmp [B,Tc,H,dv]; compressed token i summarises keys
    [i*d, i*d+l) and is visible to query t iff i*d + l - 1 <= t. Returns (o [B,T,HQ,dv],
    lse [B,T,HQ] float32; float64 for float64 inputs); a query that sees nothing gets o = 0,
    lse = -inf. Semantics: docs/semantics.md §1, §8.
    """
    check_compression(cmp_block_size, cmp_stride)
    cu = _check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp", cu_seqlens)
    _compressed_len("k_cmp", k_cmp, q, cu, cmp_block_size, cmp_stride)
    return _backend(backend, q).compressed_attention(
        q, k_cmp, v_cmp, cmp_block_size=cmp_block_size, cmp_stride=cmp_stride,
        scale=_scale(scale), cu_seqlens=cu)


def select_blocks(q, k_cmp, lse, *, cmp_block_size, cmp_stride, sel_block_size, sel_block_count,
                  sel_init_blocks=1, sel_local_blocks=2, scale=None, cu_seqlens=None,
                  backend="auto"):
    """Indices of the selected blocks, [B,T,H,n] int32, ascending, padded with -1.

    Block scores are the compression probabilities exp(scale*q.k_cmp - lse) spread over the
    selection blocks by overlap and summed over each GQA group; the first `sel_init_blocks`
    blocks and the last `sel_local_blocks` candidates are always kept; ties go to the lower
    block. Not differentiable. Semantics: docs/semantics.md §2, §3, §7.
    """
    cfg = resolve_config(None, cmp_block_size=cmp_block_size, cmp_stride=cmp_stride,
                         sel_block_size=sel_block_size, sel_block_count=sel_block_count,
                         sel_init_blocks=sel_init_blocks, sel_local_blocks=sel_local_blocks)
    cu = _check_qkv(q, k_cmp, k_cmp, "k_cmp", "k_cmp", cu_seqlens)
    _compressed_len("k_cmp", k_cmp, q, cu, cfg.cmp_block_size, cfg.cmp_stride)
    _tensor("lse", lse, rank=3)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape {tuple(q.shape[:3])} (q's [B,T,HQ]), got {tuple(lse.shape)}")
    if not lse.is_floating_point() or lse.device != q.device:
        raise TypeError(f"lse must be a floating tensor on {q.device}, got {lse.dtype} on {lse.device}")
    return _backend(backend, q).select_blocks(
        q, k_cmp, lse, scale=_scale(scale), cu_seqlens=cu, **selection_kwargs(cfg))


def _check_block_idx(block_idx, k, q):
    """Shape, dtype, device; values (on CPU tensors only: a check would sync the GPU) must be -1
    (an empty slot) or a block index >= 0 (a block after the query's own, even past its sequence's
    end, contributes nothing: docs/semantics.md §4)."""
    _tensor("block_idx", block_idx)
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_idx must be int32 (or int64), got {block_idx.dtype}")
    if block_idx.device != q.device:
        raise ValueError(f"block_idx must be on q's device ({q.device}), got {block_idx.device}")
    _dims("block_idx", block_idx, {0: ("batch", q.shape[0]), 1: ("length", q.shape[1]),
                                   2: ("kv heads", k.shape[2])})
    if block_idx.device.type == "cpu" and bool((block_idx < -1).any()):
        b, t, h, s = (int(x) for x in (block_idx < -1).nonzero()[0])
        raise ValueError(f"block_idx must hold -1 (an empty slot) or block indices >= 0, got "
                         f"{int(block_idx[b, t, h, s])} at [{b}, {t}, {h}, {s}]")
    return block_idx.to(torch.int32)


def selected_attention(q, k, v, block_idx, *, sel_block_size, scale=None, cu_seqlens=None,
                       backend="auto"):
    """Each query attends, token by token, the keys <= t of the blocks its KV head selected.

    q [B,T,HQ,dk], k [B,T,H,dk], v [B,T,H,dv], block_idx [B,T,H,n] (block j = keys
    [j*l', (j+1)*l'); -1 = empty slot). Returns o [B,T,HQ,dv]. Semantics: docs/semantics.md §4.
    """
    check_int("sel_block_size", sel_block_size, 1)
    cu = _check_qkv(q, k, v, "k", "v", cu_seqlens)
    _check_raw_len(q, "k", k)
    block_idx = _check_block_idx(block_idx, k, q)
    return _backend(backend, q).selected_attention(
        q, k, v, block_idx, sel_block_size=sel_block_size, scale=_scale(scale), cu_seqlens=cu)


def sliding_window_attention(q, k, v, *, window_size, scale=None, cu_seqlens=None, backend="auto"):
    """Each query t attends keys [max(0, t-w+1), t]. Returns o [B,T,HQ,dv] (docs/semantics.md §5)."""
    check_int("window_size", window_size, 1)
    cu = _check_qkv(q, k, v, "k", "v", cu_seqlens)
    _check_raw_len(q, "k", k)
    return _backend(backend, q).sliding_window_attention(
        q, k, v, window_size=window_size, scale=_scale(scale), cu_seqlens=cu)


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, config=None,
                  cmp_block_size=None, cmp_stride=None, sel_block_size=None, sel_block_count=None,
                  sel_init_blocks=None, sel_local_blocks=None, window_size=None, scale=None,
                  cu_seqlens=None, return_block_idx=False, backend="auto"):
    """Native Sparse Attention: o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win.

    q [B,T,HQ,dk]; k_cmp/v_cmp [B,Tc,H,dk|dv] (compressed); k_slc/v_slc and k_win/v_win
    [B,T,H,dk|dv] (each branch its own); gates [B,T,HQ,3] in (cmp, slc, win) order.
    Hyper-parameters come from `config` (an NSAConfig) and/or keywords; paper defaults otherwise.
    Semantics: docs/semantics.md (all sections; packed input §9).
    """
    cfg = resolve_config(config, cmp_block_size=cmp_block_size, cmp_stride=cmp_stride,
                         sel_block_size=sel_block_size, sel_block_count=sel_block_count,
                         sel_init_blocks=sel_init_blocks, sel_local_blocks=sel_local_blocks,
                         window_size=window_size)
    cu = _check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp", cu_seqlens)
    _compressed_len("k_cmp", k_cmp, q, cu, cfg.cmp_block_size, cfg.cmp_stride)
    for kn, k, vn, v in (("k_slc", k_slc, "v_slc", v_slc), ("k_win", k_win, "v_win", v_win)):
        _check_qkv(q, k, v, kn, vn)
        _check_raw_len(q, kn, k)
        _dims(kn, k, {2: ("kv heads, k_cmp.shape[2]", k_cmp.shape[2])})
        _dims(vn, v, {3: ("value dim, v_cmp.shape[3]", v_cmp.shape[3])})
    _tensor("gates", gates)
    _floats("q", q, gates=gates)
    if gates.shape != (*q.shape[:3], 3):
        raise ValueError(f"gates must have shape {(*q.shape[:3], 3)} ([B,T,HQ,3]), got {tuple(gates.shape)}")
    impl = _backend(backend, q)
    # a backend may fuse the branches into one autograd node (eager only: compiled graphs
    # trace the composed custom ops)
    run = getattr(impl, "nsa_attention", None)
    if run is None or torch.compiler.is_compiling():
        run = functools.partial(compose_branches, impl)
    o, idx = run(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates,
                 config=cfg, scale=_scale(scale), cu_seqlens=cu)
    return (o, idx) if return_block_idx else o


def _check_cache_step(cfg, q, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, lengths, new):
    """Shapes, dtypes and devices of a step over a cache (nsa_decode: new = 1 query per row with
    no token axis; nsa_extend: new = S); lengths' values on CPU tensors only."""
    rank = 3 if new is None else 4
    for name, x, r in (("q", q, rank), ("gates", gates, rank), ("k_cmp", k_cmp, 4), ("v_cmp", v_cmp, 4),
                       ("k_slc", k_slc, 4), ("v_slc", v_slc, 4), ("k_win", k_win, 4),
                       ("v_win", v_win, 4), ("lengths", lengths, 1)):
        _tensor(name, x, r)
    _floats("q", q, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp, k_slc=k_slc, v_slc=v_slc, k_win=k_win,
            v_win=v_win)
    B, HQ, dk = q.shape[0], q.shape[-2], q.shape[-1]
    S = 1 if new is None else q.shape[1]
    H, dv, N = k_cmp.shape[2], v_cmp.shape[3], k_slc.shape[1]
    if H < 1 or HQ % H:
        raise ValueError(f"query heads ({HQ}) must be a positive multiple of k_cmp heads ({H})")
    _dims("gates", gates, {0: ("batch", B), **({} if new is None else {1: ("new tokens, q.shape[1]", S)}),
                           rank - 2: ("query heads", HQ), rank - 1: ("gates", 3)})
    for name, x, d in (("k_cmp", k_cmp, dk), ("v_cmp", v_cmp, dv), ("k_slc", k_slc, dk),
                       ("v_slc", v_slc, dv), ("k_win", k_win, dk), ("v_win", v_win, dv)):
        _dims(name, x, {0: ("batch", B), 2: ("kv heads", H), 3: ("head dim", d)})
    _dims("v_cmp", v_cmp, {1: ("length, k_cmp.shape[1]", k_cmp.shape[1])})
    _dims("v_slc", v_slc, {1: ("length, k_slc.shape[1]", N)})
    _dims("v_win", v_win, {1: ("length, k_win.shape[1]", k_win.shape[1])})
    if k_cmp.shape[1] < cfg.num_compressed(N):
        raise ValueError(f"k_cmp holds {k_cmp.shape[1]} compressed tokens, a cache of {N} tokens "
                         f"needs {cfg.num_compressed(N)}")
    if new is None and k_win.shape[1] < min(cfg.window_size, N):
        raise ValueError(f"the window ring k_win holds {k_win.shape[1]} tokens, it needs "
                         f"min(window_size, capacity) = {min(cfg.window_size, N)}")
    if new is not None and k_win.shape[1] < S + min(cfg.window_size - 1, N - S):
        raise ValueError(f"k_win holds {k_win.shape[1]} tokens; the {S} new ones and the "
                         f"min(window_size - 1, capacity - {S}) = {min(cfg.window_size - 1, N - S)} "
                         f"before them are needed")
    _check_lengths(lengths, q, B, S, N, "the new tokens, the cache capacity")


def _check_lengths(lengths, q, B, lo, hi, what):
    """lengths [B] int32/int64 on q's device, its values (CPU tensors only) in [lo, hi]."""
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.device != q.device:
        raise TypeError(f"lengths must be int32/int64 on {q.device}, got {lengths.dtype} on {lengths.device}")
    _dims("lengths", lengths, {0: ("batch", B)})
    if lengths.device.type == "cpu" and B and not bool(((lengths >= lo) & (lengths <= hi)).all()):
        raise ValueError(f"lengths must be in [{lo}, {hi}] ({what}), got {lengths.tolist()}")


def _check_paged(cfg, q, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, lengths, block_table,
                 window_table):
    """nsa_decode's paged layout (nsa.PagedNSACache): page pools and [B, max_pages] tables."""
    for name, x, r in (("q", q, 3), ("gates", gates, 3), ("k_cmp", k_cmp, 4), ("v_cmp", v_cmp, 4),
                       ("k_slc", k_slc, 4), ("v_slc", v_slc, 4), ("k_win", k_win, 4), ("v_win", v_win, 4),
                       ("lengths", lengths, 1), ("block_table", block_table, 2), ("window_table", window_table, 2)):
        _tensor(name, x, r)
    _floats("q", q, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp, k_slc=k_slc, v_slc=v_slc, k_win=k_win, v_win=v_win)
    B, HQ, dk = q.shape
    P, page, H = k_slc.shape[0], k_slc.shape[1], k_slc.shape[2]
    dv = v_slc.shape[3]
    if page % cfg.sel_block_size or page % cfg.cmp_stride:
        raise ValueError(f"the page size (k_slc.shape[1] = {page}) must be a multiple of sel_block_size "
                         f"({cfg.sel_block_size}) and of cmp_stride ({cfg.cmp_stride})")
    if H < 1 or HQ % H:
        raise ValueError(f"query heads ({HQ}) must be a positive multiple of k_slc heads ({H})")
    _dims("gates", gates, {0: ("batch", B), 1: ("query heads", HQ), 2: ("gates", 3)})
    for name, x, n, d in (("v_slc", v_slc, page, dv), ("k_cmp", k_cmp, page // cfg.cmp_stride, dk),
                          ("v_cmp", v_cmp, page // cfg.cmp_stride, dv)):
        _dims(name, x, {0: ("pages, k_slc.shape[0]", P), 1: ("rows a page", n), 2: ("kv heads", H), 3: ("head dim", d)})
    _dims("k_slc", k_slc, {3: ("head dim", dk)})
    for name, x, d in (("k_win", k_win, dk), ("v_win", v_win, dv)):
        _dims(name, x, {0: ("window pages, k_win.shape[0]", k_win.shape[0]), 1: ("page size", page),
                        2: ("kv heads", H), 3: ("head dim", d)})
    for name, t in (("block_table", block_table), ("window_table", window_table)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise TypeError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
        _dims(name, t, {0: ("batch", B), 1: ("pages a row, block_table.shape[1]", block_table.shape[1])})
    _check_lengths(lengths, q, B, 1, block_table.shape[1] * page, "pages a row x page size")


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, config=None,
               scale=None, return_block_idx=False, backend="auto", block_table=None, window_table=None):
    """One decoding step of NSA over a KV cache, for rows of different lengths.

    Row b holds lengths[b] tokens (the newest one's keys included); its query q[b] sits at
    position lengths[b] - 1. q [B,HQ,dk], gates [B,HQ,3]; k_cmp/v_cmp [B,Nc,H,dk|dv] the
    compressed tokens (the first Tc(lengths[b]) are read); k_slc/v_slc [B,N,H,dk|dv] the
    selection branch's keys of positions 0..lengths[b]-1; k_win/v_win [B,W,H,dk|dv] the window
    branch's ring buffer (position p in slot p % W, W >= min(window_size, N)); lengths [B]
    int32/int64 in [1, N] (values checked for CPU tensors only: a check would sync the GPU).
    Returns o [B,HQ,dv] (and block_idx [B,H,n] int32 with return_block_idx). Equal to
    nsa_attention's output at those positions. No autograd (inference). Semantics:
    docs/semantics.md §10.

    Paged (block_table and window_table [B, max_pages] int32, nsa.PagedNSACache's layout):
    k_slc/v_slc are a pool of pages [P, page, H, *] (page a multiple of sel_block_size and
    cmp_stride) holding positions [j*page, (j+1)*page) of row b in page block_table[b, j];
    k_cmp/v_cmp [P, page/d, H, *] the compressed tokens whose blocks start in that page;
    k_win/v_win [P_w, page, H, *] the window branch's keys, in pages window_table[b, j] (only
    the pages of the last window_size positions are read); lengths in [1, max_pages * page].
    """
    cfg = resolve_config(config)
    if (block_table is None) != (window_table is None):
        raise ValueError("a paged cache needs both block_table and window_table")
    if block_table is None:
        _check_cache_step(cfg, q, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, lengths, None)
        tables = {}
    else:
        _check_paged(cfg, q, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, lengths, block_table, window_table)
        tables = dict(block_table=block_table, window_table=window_table)
    o, idx = _backend(backend, q).nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates,
                                             lengths, config=cfg, scale=_scale(scale), **tables)
    return (o, idx) if return_block_idx else o


def nsa_extend(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, config=None,
               scale=None, return_block_idx=False, backend="auto"):
    """S new tokens per row after what a cache holds: a chunk of a prompt after its first part,
    the next turn of a chat. nsa_decode for S queries.

    Row b holds lengths[b] tokens, the S new ones' keys included; its queries q[b] sit at
    positions lengths[b] - S .. lengths[b] - 1. q [B,S,HQ,dk], gates [B,S,HQ,3]; k_cmp/v_cmp
    [B,Nc,H,*] the compressed tokens (the first Tc(lengths[b]) are read, those the new tokens
    complete included); k_slc/v_slc [B,N,H,*] the selection branch's keys of positions
    0..lengths[b]-1; k_win/v_win [B,Wt,H,*] the window branch's keys of positions
    lengths[b] - Wt .. lengths[b] - 1 in order (entries before position 0 are not read;
    Wt >= S + min(window_size - 1, N - S)); lengths [B] in [S, N]. Returns o [B,S,HQ,dv] (and
    block_idx [B,S,H,n]). Equal to nsa_attention's rows at those positions. No autograd
    (inference). Semantics: docs/semantics.md §10.
    """
    cfg = resolve_config(config)
    _check_cache_step(cfg, q, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, lengths, True)
    o, idx = _backend(backend, q).nsa_extend(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates,
                                             lengths, config=cfg, scale=_scale(scale))
    return (o, idx) if return_block_idx else o


__all__ = ["compressed_attention", "select_blocks", "selected_attention",
           "sliding_window_attention", "nsa_attention", "nsa_decode", "nsa_extend", "compressed_cu_seqlens", "NSAConfig"]
