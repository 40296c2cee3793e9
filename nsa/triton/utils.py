"""Shared pieces of the Triton backend: buffer allocation, varlen bookkeeping, jit helpers."""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

LOG2E = 1.4426950408889634


def empty(*shape, dtype, device):
    """torch.empty, filled with NaN when NSA_POISON_EMPTY=1 (tests), so unwritten memory shows."""
    x = torch.empty(*shape, dtype=dtype, device=device)
    if os.environ.get("NSA_POISON_EMPTY") == "1":
        x.fill_(float("nan") if x.is_floating_point() else -7)
    return x


def pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(1, n)))


_KEEP = threading.local()


@contextlib.contextmanager
def keeping():
    """Within this block (the eager layer step: backend.nsa_attention and FusedNSA's backward)
    derived and varlen keep what they make for later calls. Outside it nothing is kept, the
    custom ops above all: torch.compile's CUDA graphs (mode reduce-overhead) run them in a
    warm-up whose allocations belong to the graphs' memory pool, where a kept table is memory
    that the pool does not know is in use and hands out again."""
    was = getattr(_KEEP, "on", False)
    _KEEP.on = True
    try:
        yield
    finally:
        _KEEP.on = was


def _memo_ok():
    """Whether values derived from shapes may be kept between calls: only inside keeping(), and
    not while a CUDA graph is being captured (a kernel recorded there has not run: what it writes
    would be read unset outside the graph), nor while torch.compile traces, nor under
    inference_mode (its tensors cannot be saved for a later backward)."""
    return getattr(_KEEP, "on", False) and not (
        torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
        or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


_REGULAR: dict = {}                 # (batch, seqlen, device) -> the packed offsets of a batch
_DERIVED = WeakIdKeyDictionary()    # cu tensor -> (its version, {key: value derived from it})


def derived(cu, key, make):
    """make(), kept with the offsets tensor cu for later calls with the same key: what the
    launchers derive from offsets alone (tile tables, each row's sequence). The layers of one
    step share one cu, so each value is made once a step, or once for all steps of a batch
    shape (varlen). An in-place change of cu makes them again; a CUDA graph captured with cu
    reads the values of then (capture after the offsets are final). Values are made on the
    current stream, for use on it."""
    if not _memo_ok() or cu.is_inference():
        return make()
    ver, got = _DERIVED.get(cu, (None, None))
    if ver != cu._version:
        got = {}
        _DERIVED[cu] = (cu._version, got)
    if key not in got:
        got[key] = make()
    return got[key]


def varlen(cu_seqlens, batch, seqlen, device):
    """(cu [N+1] int32, N, total): the packed view of a batch, built on the device (no sync) and
    kept per batch shape."""
    if cu_seqlens is not None:
        return cu_seqlens, cu_seqlens.numel() - 1, seqlen
    key = (batch, seqlen, torch.device(device))
    cu = _REGULAR.get(key)
    if cu is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        if _memo_ok() and len(_REGULAR) < 256:   # never evicted: a captured graph may read one
            _REGULAR[key] = cu
    return cu, batch, batch * seqlen


def tile_cu(cu, tile):
    """Prefix sums of per-sequence tile counts: tile i of the grid belongs to the sequence s
    with out[s] <= i < out[s+1]. The grid is launched with an upper bound (no host sync)."""
    def make():
        lens = (cu[1:] - cu[:-1]).long()
        return torch.cat([lens.new_zeros(1), ((lens + tile - 1) // tile).cumsum(0)]).to(torch.int32)
    return derived(cu, ("tiles", tile), make)


def tile_grid_bound(total, nseq, tile):
    return triton.cdiv(total, tile) + nseq


@triton.jit
def find_segment(cu_ptr, nseg, x):
    """Largest s in [0, nseg) with cu[s] <= x (cu non-decreasing): a branch-free binary search."""
    lo = tl.full([], 0, tl.int32)            # tensors, not constants: loop-carried values
    hi = tl.full([], 0, tl.int32) + nseg - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go = tl.load(cu_ptr + mid) <= x
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def band_visible(t, s, Tk, STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr):
    """Key s (of Tk) is visible to query t: 0 <= t - (s * STRIDE + OFFSET) (< WIN when WIN > 0).
    The compressed keys are the band with STRIDE = d, OFFSET = l - 1, WIN = 0 (banded.py)."""
    rel = t - (s * STRIDE + OFFSET)
    vis = (rel >= 0) & (s < Tk)
    if WIN > 0:
        vis = vis & (rel < WIN)
    return vis


@triton.jit
def band_keys(t_first, t_last, Tk, STRIDE: tl.constexpr, OFFSET: tl.constexpr, WIN: tl.constexpr):
    """Keys [s_lo, s_hi) that any query in [t_first, t_last] may see (integer division in
    Triton truncates toward zero, hence the explicit sign cases)."""
    s_hi = tl.where(t_last >= OFFSET, (t_last - OFFSET) // STRIDE + 1, 0)
    s_hi = tl.minimum(s_hi, Tk)
    s_lo = 0
    if WIN > 0:
        x = t_first - OFFSET - WIN
        s_lo = tl.where(x >= 0, x // STRIDE + 1, 0)
    return s_lo, s_hi


@triton.jit
def tile_rows(t0, Tq, hk, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr):
    """Rows of a (positions x heads) tile: local position t, query head, validity. Row r is
    position t0 + r // GP, head hk*G + r % GP (GP = G rounded up to a power of two)."""
    r = tl.arange(0, BT * GP)
    t = t0 + r // GP
    g = r % GP
    return t, hk * G + g, (t < Tq) & (g < G)


@triton.jit
def seq_tile(pid, tiles, cu_q, cu_k, n_seq, TILE: tl.constexpr, spans, CHUNK: tl.constexpr):
    """Tile `pid` of a packed launch -> (q0, Tq, k0, Tk, first position of the tile): the
    sequence's first query row and length, its first key row and key count.

    CHUNK: each sequence's queries are its last ones, after keys already held (a chunk after a
    cached prefix): spans [3, n_seq] int32 gives per sequence the position of its first query in
    its keys' frame (p0), its first key row and its key count. The returned q0 and Tq are then
    those of a virtual sequence of p0 + Tq rows whose rows t >= p0 are the queries, so that a
    query's row index is also its position and every kernel's masks hold as they are."""
    seq = find_segment(tiles, n_seq, pid)
    q0 = tl.load(cu_q + seq)
    Tq = tl.load(cu_q + seq + 1) - q0
    t0 = (pid - tl.load(tiles + seq)) * TILE
    if CHUNK:
        p0 = tl.load(spans + seq)
        k0 = tl.load(spans + n_seq + seq)
        Tk = tl.load(spans + 2 * n_seq + seq)
    else:
        p0 = 0
        k0 = tl.load(cu_k + seq)
        Tk = tl.load(cu_k + seq + 1) - k0
    return q0 - p0, Tq + p0, k0, Tk, t0 + p0


@triton.jit
def load_rows(base, rows, ok, cols, D: tl.constexpr):
    """Tile [rows, cols] of a row-major [*, D] tensor (rows int64), zero where masked."""
    return tl.load(base + rows[:, None] * D + cols[None, :], mask=ok[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def load_rows2(base, rows, ok, D: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """load_rows of a row-major [*, D] tensor as two column tiles [rows, KA] and [rows, KB]
    (KB = 0: one tile, returned twice), so that D = 192 runs as 128 + 64, not padded to 256."""
    a = load_rows(base, rows, ok, tl.arange(0, KA), D)
    if KB > 0:
        b = load_rows(base, rows, ok, KA + tl.arange(0, KB), D)
    else:
        b = a
    return a, b


@triton.jit
def load_keys_t(k, krow, kmask, D: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """Key rows krow [N] of a row-major [*, D] tensor, transposed, as tiles [KA, N] and [KB, N]
    (KB = 0: one tile, returned twice); zeros outside kmask."""
    ca = tl.arange(0, KA)
    a = tl.load(k + krow[None, :] * D + ca[:, None], mask=kmask[None, :] & (ca[:, None] < D), other=0.0)
    if KB > 0:
        cb = KA + tl.arange(0, KB)
        b = tl.load(k + krow[None, :] * D + cb[:, None], mask=kmask[None, :] & (cb[:, None] < D), other=0.0)
    else:
        b = a
    return a, b


@triton.jit
def dot2(xa, xb, ya, yb, KB: tl.constexpr, PREC: tl.constexpr):
    """xa @ ya + xb @ yb (fp32): a product over a dim held as two tiles (KB = 0: one)."""
    acc = tl.dot(xa, ya, input_precision=PREC)
    if KB > 0:
        acc = tl.dot(xb, yb, acc, input_precision=PREC)
    return acc


@triton.jit
def dot_keys(qa, qb, k, krow, kmask, D: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
             PREC: tl.constexpr):
    """Logits [M, N] (fp32) of query tiles qa, qb (load_rows2) against the key rows krow [N] of a
    row-major [*, D] tensor; keys outside kmask read as zeros."""
    ka, kb = load_keys_t(k, krow, kmask, D, KA, KB)
    return dot2(qa, qb, ka, kb, KB, PREC)


@triton.jit
def zeros2(M: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """fp32 accumulators [M, KA] and [M, KB] for a dim held as two tiles (KB = 0: one, twice)."""
    a = tl.zeros([M, KA], tl.float32)
    if KB > 0:
        b = tl.zeros([M, KB], tl.float32)
    else:
        b = a
    return a, b


@triton.jit
def store_rows2(base, rows, ok, D: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, va, vb):
    """store_rows of a [rows, D] value held as two column tiles."""
    store_rows(base, rows, ok, tl.arange(0, KA), D, va)
    if KB > 0:
        store_rows(base, rows, ok, KA + tl.arange(0, KB), D, vb)


@triton.jit
def store_rows2_add(base, rows, ok, D: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, va, vb,
                    ADD: tl.constexpr):
    """store_rows2, adding (in fp32) to what base holds when ADD: a gradient that several
    launches accumulate in place (dQ over the three branches)."""
    if ADD:
        ha, hb = load_rows2(base, rows, ok, D, KA, KB)
        va += ha.to(tl.float32)
        if KB > 0:
            vb += hb.to(tl.float32)
    store_rows2(base, rows, ok, D, KA, KB, va, vb)


@triton.jit
def store_rows(base, rows, ok, cols, D: tl.constexpr, val):
    tl.store(base + rows[:, None] * D + cols[None, :], val.to(base.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < D))


@triton.jit
def running_max(m_i, m_cand):
    """A running log2 max m_i [M] meets new values' max m_cand [M]: (the new max, the max to
    subtract (0 while still -inf, so that exp2 sees no -inf - -inf), the factor that rescales
    what was summed under m_i)."""
    m_new = tl.maximum(m_i, m_cand)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_use, tl.exp2(m_i - m_use)


@triton.jit
def softmax_probs(qk, m_i):
    """The first half of softmax_step: (new running max, alpha, p = exp2(qk - max) [M, N], 0
    where qk = -inf), alpha [M] the factor that rescales what was summed under m_i."""
    m_new, m_use, alpha = running_max(m_i, tl.max(qk, 1))
    return m_new, alpha, tl.exp2(qk - m_use[:, None])


@triton.jit
def softmax_accumulate(p, alpha, vt, l_i, acc, PREC: tl.constexpr):
    """The second half of softmax_step: (l_i, acc) rescaled by alpha, plus p's sums and p @ vt."""
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def softmax_step(qk, vt, m_i, l_i, acc, PREC: tl.constexpr):
    """One flash-attention step: log2-scaled logits qk [M, N] (-inf where masked) and values
    vt [N, V] update the running max m_i [M], sum l_i [M] and accumulator acc [M, V]. A row that
    has seen nothing keeps m = -inf, l = 0, acc = 0."""
    m_new, alpha, p = softmax_probs(qk, m_i)
    l_i, acc = softmax_accumulate(p, alpha, vt, l_i, acc, PREC)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """(normalised output, natural-log lse): 0 and -inf for a row that saw nothing."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
