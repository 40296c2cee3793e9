"""The semantics (docs/semantics.md) in PyTorch: one function per branch, readable before fast.

Every function takes the public layout ([B, T, heads, dim], optional cu_seqlens), works one
sequence at a time, and computes in float32 (float64 for float64 inputs). Queries are processed
in chunks; under autograd each chunk is recomputed in the backward (activation checkpointing),
so memory stays O(chunk * keys) instead of O(T^2). This module never imports a kernel.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .core import combine, num_compressed

_CHUNK_ELEMS = 1 << 24  # score elements per chunk: 64 MiB in float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segments(batch, seqlen, cu_seqlens, cmp_block_size=None, cmp_stride=None):
    """Yield (b, t0, t1, c0, c1): each independent sequence's rows in the raw and compressed
    tensors. c0/c1 are only meaningful when the compressed sizes are given."""
    if cu_seqlens is None:
        tc = num_compressed(seqlen, cmp_block_size, cmp_stride) if cmp_block_size else 0
        for b in range(batch):
            yield b, 0, seqlen, 0, tc
        return
    cu = cu_seqlens.tolist()
    c = 0
    for t0, t1 in zip(cu[:-1], cu[1:]):
        tc = num_compressed(t1 - t0, cmp_block_size, cmp_stride) if cmp_block_size else 0
        yield 0, t0, t1, c, c + tc
        c += tc


def _gather(pieces, batch, cu_seqlens):
    """Inverse of `segments`: per-sequence outputs back to the [B, T, ...] layout."""
    if cu_seqlens is None:
        return torch.stack(pieces, 0)
    return torch.cat(pieces, 0).unsqueeze(0)


def _attend(q, k, v, mask, scale):
    """Masked softmax attention. q [C,H,G,dk], k [S,H,dk], v [S,H,dv], mask [C,H|1,S] bool.
    Rows with no visible key give o = 0 and lse = -inf, with finite gradients."""
    m = mask[:, :, None, :]                                        # [C, H|1, 1, S]
    s = torch.einsum("chgd,shd->chgs", q, k) * scale               # [C, H, G, S]
    seen = m.any(-1, keepdim=True)                                 # [C, H|1, 1, 1]
    s = s.masked_fill(~m, float("-inf")).masked_fill(~seen, 0.0)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse) * seen
    o = torch.einsum("chgs,shv->chgv", p, v)
    lse = lse.squeeze(-1).masked_fill(~seen.squeeze(-1), float("-inf"))
    return o, lse


def _attend_chunked(q, k, v, scale, visible):
    """q [T,H,G,dk], k [S,H,dk], v [S,H,dv]; visible(t0, t1) -> (s0, s1, mask [C,H|1,s1-s0])."""
    T, H, G, _ = q.shape
    chunk = max(16, _CHUNK_ELEMS // max(1, H * G * max(1, k.shape[0])))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs, lses = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s0, s1, mask = visible(t0, t1)
        args = (q[t0:t1], k[s0:s1], v[s0:s1], mask, scale)
        o, lse = checkpoint(_attend, *args, use_reentrant=False) if grad else _attend(*args)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(0, H, G, v.shape[-1]), q.new_zeros(0, H, G)
    return torch.cat(outs, 0), torch.cat(lses, 0)


def _positions(t0, t1, device):
    return torch.arange(t0, t1, device=device)


def _cmp_last_visible(t, cmp_block_size, cmp_stride):
    """Index of the last compressed token visible to query t (-1 if none): i*d + l - 1 <= t."""
    return torch.where(t >= cmp_block_size - 1, (t - cmp_block_size + 1) // cmp_stride, -1)


def _split_heads(x, num_kv_heads):
    """[T, HQ, D] -> [T, H, G, D]."""
    return x.unflatten(1, (num_kv_heads, x.shape[1] // num_kv_heads))


def _run_branch(q, k, v, scale, cu_seqlens, visible_for, cmp=None):
    """Shared driver: per sequence, attend with `visible_for(seq_info)` and restore layout."""
    B, T, HQ, dk = q.shape
    H = k.shape[2]
    scale = dk ** -0.5 if scale is None else scale
    cdt = compute_dtype(q.dtype)
    outs, lses = [], []
    for b, t0, t1, c0, c1 in segments(B, T, cu_seqlens, *(cmp or (None, None))):
        k0, k1 = (c0, c1) if cmp else (t0, t1)
        qs = _split_heads(q[b, t0:t1].to(cdt), H)
        o, lse = _attend_chunked(qs, k[b, k0:k1].to(cdt), v[b, k0:k1].to(cdt), scale,
                                 visible_for(b, t0, t1, q.device))
        outs.append(o.flatten(1, 2))
        lses.append(lse.flatten(1, 2))
    o = _gather(outs, B, cu_seqlens).to(q.dtype)
    lse = _gather(lses, B, cu_seqlens)
    return o, lse.to(torch.float64 if cdt == torch.float64 else torch.float32)


def compressed_attention(q, k_cmp, v_cmp, *, cmp_block_size, cmp_stride, scale=None,
                         cu_seqlens=None):
    """Branch 1: attention over the compressed tokens visible to each query."""
    def visible_for(b, t0, t1, device):
        def visible(c0, c1):
            last = _cmp_last_visible(_positions(c0, c1, device), cmp_block_size, cmp_stride)
            s1 = int(last[-1].item()) + 1 if c1 > c0 else 0
            i = torch.arange(s1, device=device)
            return 0, s1, (i[None, :] <= last[:, None])[:, None, :]
        return visible
    return _run_branch(q, k_cmp, v_cmp, scale, cu_seqlens, visible_for,
                       cmp=(cmp_block_size, cmp_stride))


def sliding_window_attention(q, k, v, *, window_size, scale=None, cu_seqlens=None):
    """Branch 3: each query attends keys [t - w + 1, t]."""
    def visible_for(b, t0, t1, device):
        def visible(c0, c1):
            s0 = max(0, c0 - window_size + 1)
            t = _positions(c0, c1, device)[:, None]
            s = _positions(s0, c1, device)[None, :]
            return s0, c1, ((s <= t) & (s > t - window_size))[:, None, :]
        return visible
    return _run_branch(q, k, v, scale, cu_seqlens, visible_for)[0]


def block_mask(block_idx, num_blocks):
    """[C, H, n] indices (-1 = none) -> [C, H, num_blocks] bool membership; indices past the
    last block (no key of theirs exists) select nothing."""
    idx = torch.where((block_idx >= 0) & (block_idx < num_blocks), block_idx.long(), num_blocks)
    bm = torch.zeros(*block_idx.shape[:-1], num_blocks + 1, dtype=torch.bool, device=idx.device)
    return bm.scatter_(-1, idx, True)[..., :num_blocks]


def selected_attention(q, k, v, block_idx, *, sel_block_size, scale=None, cu_seqlens=None):
    """Branch 2b: each query attends the keys <= t of its selected blocks (per KV head)."""
    def visible_for(b, t0, t1, device):
        idx = block_idx[b, t0:t1]
        nb = -(-(t1 - t0) // sel_block_size)

        def visible(c0, c1):
            bm = block_mask(idx[c0:c1], nb)                        # [C, H, NB]
            t = _positions(c0, c1, device)
            s = _positions(0, c1, device)
            causal = (s[None, :] <= t[:, None])[:, None, :]
            return 0, c1, bm[:, :, s // sel_block_size] & causal
        return visible
    return _run_branch(q, k, v, scale, cu_seqlens, visible_for)[0]


def overlap_weights(num_cmp, num_blocks, cmp_block_size, cmp_stride, sel_block_size,
                    dtype=torch.float32, device=None):
    """W[i, j] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d  (docs/semantics.md §2)."""
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    lo = torch.maximum(i * cmp_stride, j * sel_block_size)
    hi = torch.minimum(i * cmp_stride + cmp_block_size, (j + 1) * sel_block_size)
    return (hi - lo).clamp(min=0).to(dtype) / cmp_stride


def pick_blocks(score, t, *, sel_block_size, sel_block_count, sel_init_blocks, sel_local_blocks):
    """Top-n with forced blocks (docs/semantics.md §3). score [C, H, NB] (>= 0), t [C] positions.
    Returns [C, H, n] int32, ascending, padded with -1."""
    C, H, NB = score.shape
    n = sel_block_count
    if NB < n:
        score = torch.cat([score, score.new_zeros(C, H, n - NB)], -1)
    j = torch.arange(score.shape[-1], device=score.device)[None, :]
    last = (t // sel_block_size)[:, None]
    cand = j <= last
    forced = cand & ((j < sel_init_blocks) | (j > last - sel_local_blocks))
    key = score.masked_fill(forced[:, None], float("inf")).masked_fill(~cand[:, None], float("-inf"))
    key, order = torch.sort(key, dim=-1, descending=True, stable=True)   # ties: lower index first
    idx = torch.where(key[..., :n] == float("-inf"), -1, order[..., :n])
    idx = torch.where(idx < 0, torch.iinfo(torch.int32).max, idx).sort(-1).values
    return torch.where(idx == torch.iinfo(torch.int32).max, -1, idx).to(torch.int32)


def block_scores(q, k_cmp, lse, t, w, scale, cmp_block_size, cmp_stride):
    """docs/semantics.md §2 for queries at positions t: q [C,H,G,dk], k_cmp [Tc,H,dk], lse [C,H,G],
    w the overlap weights [Tc, NB] -> group-summed block scores [C, H, NB]."""
    vis = torch.arange(k_cmp.shape[0], device=q.device)[None, :] <= \
        _cmp_last_visible(t, cmp_block_size, cmp_stride)[:, None]
    logits = torch.einsum("chgd,ihd->chgi", q, k_cmp) * scale
    p = torch.where(vis[:, None, None, :], torch.exp(logits - lse[..., None]), 0.0)
    return torch.einsum("chgi,ij->chj", p, w)


@torch.no_grad()
def select_blocks(q, k_cmp, lse, *, cmp_block_size, cmp_stride, sel_block_size, sel_block_count,
                  sel_init_blocks=1, sel_local_blocks=2, scale=None, cu_seqlens=None):
    """Branch 2a: importance scores from the compression probabilities, summed over the GQA
    group, then top-n blocks with forced first/local blocks. Not differentiable."""
    B, T, HQ, dk = q.shape
    H = k_cmp.shape[2]
    scale = dk ** -0.5 if scale is None else scale
    cdt = compute_dtype(q.dtype)
    pick = dict(sel_block_size=sel_block_size, sel_block_count=sel_block_count,
                sel_init_blocks=sel_init_blocks, sel_local_blocks=sel_local_blocks)
    outs = []
    for b, t0, t1, c0, c1 in segments(B, T, cu_seqlens, cmp_block_size, cmp_stride):
        qs = _split_heads(q[b, t0:t1].to(cdt), H)                   # [T, H, G, dk]
        ks = k_cmp[b, c0:c1].to(cdt)                                # [Tc, H, dk]
        ls = _split_heads(lse[b, t0:t1].to(cdt).unsqueeze(-1), H).squeeze(-1)  # [T, H, G]
        nb = -(-(t1 - t0) // sel_block_size)
        w = overlap_weights(c1 - c0, nb, cmp_block_size, cmp_stride, sel_block_size, cdt, q.device)
        chunk = max(16, _CHUNK_ELEMS // max(1, HQ * max(1, c1 - c0)))
        idx = []
        for s0 in range(0, t1 - t0, chunk):
            s1 = min(t1 - t0, s0 + chunk)
            t = _positions(s0, s1, q.device)
            score = block_scores(qs[s0:s1], ks, ls[s0:s1], t, w, scale, cmp_block_size, cmp_stride)
            idx.append(pick_blocks(score, t, **pick))
        outs.append(torch.cat(idx, 0) if idx else q.new_zeros(0, H, sel_block_count, dtype=torch.int32))
    return _gather(outs, B, cu_seqlens)




def nsa_at_positions(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, pos, *, config, scale=None,
                     win_start=0):
    """NSA for queries of ONE sequence at absolute positions `pos` [S] (increasing), its keys
    given from position 0 up to at least pos[-1]: q [S,HQ,dk], k_cmp/v_cmp [Tc,H,*] (the
    compressed tokens complete so far), k_slc/v_slc [E,H,*], gates [S,HQ,3]; k_win/v_win hold
    positions win_start, win_start+1, ... (at least the window of pos[0]). Used by the cached
    (incremental) path; the same function as nsa_attention restricted to these queries."""
    c = config
    H, dk = k_slc.shape[1], q.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    cdt = compute_dtype(q.dtype)
    qs = _split_heads(q.to(cdt), H)
    k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = (x.to(cdt) for x in (k_cmp, v_cmp, k_slc, v_slc, k_win, v_win))
    last = _cmp_last_visible(pos, c.cmp_block_size, c.cmp_stride)
    cmask = (torch.arange(k_cmp.shape[0], device=q.device)[None, :] <= last[:, None])[:, None, :]
    o_cmp, lse = _attend(qs, k_cmp, v_cmp, cmask, scale)
    nb = int(pos[-1]) // c.sel_block_size + 1
    w = overlap_weights(k_cmp.shape[0], nb, c.cmp_block_size, c.cmp_stride, c.sel_block_size, cdt, q.device)
    score = block_scores(qs, k_cmp, lse, pos, w, scale, c.cmp_block_size, c.cmp_stride)
    idx = pick_blocks(score, pos, sel_block_size=c.sel_block_size, sel_block_count=c.sel_block_count,
                      sel_init_blocks=c.sel_init_blocks, sel_local_blocks=c.sel_local_blocks)
    s = torch.arange(k_slc.shape[0], device=q.device)
    causal = s[None, :] <= pos[:, None]
    smask = block_mask(idx, nb)[:, :, s // c.sel_block_size] & causal[:, None, :]
    o_slc, _ = _attend(qs, k_slc, v_slc, smask, scale)
    sw = win_start + torch.arange(k_win.shape[0], device=q.device)
    wmask = ((sw[None, :] <= pos[:, None]) & (sw[None, :] > pos[:, None] - c.window_size))[:, None, :]
    o_win, _ = _attend(qs, k_win, v_win, wmask, scale)
    o = combine(*(x.flatten(1, 2) for x in (o_cmp, o_slc, o_win)), gates.to(cdt))
    return o.to(q.dtype), idx


def ring_order(buf, length):
    """The positions max(0, length - W) .. length-1 of a ring buffer buf [W, ...] (position p in
    slot p % W), oldest first, and the first of them."""
    W = buf.shape[0]
    start = max(0, length - W)
    slots = torch.arange(start, length, device=buf.device) % W
    return buf[slots], start


def from_pages(pool, table, positions):
    """Items at positions [B, K] of each row, read from pool [P, n, ...] through the row's
    page table [B, max_pages] (item p in row p % n of page table[b, p // n]): [B, K, ...].
    Positions past the table or in unassigned pages (< 0) read page 0: callers mask them."""
    n = pool.shape[1]
    j = (positions // n).clamp(0, table.shape[1] - 1)
    page = table.long().gather(1, j).clamp_min(0)
    return pool[page, positions % n]


def unpage(k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, lengths, block_table, window_table, config):
    """nsa_decode's paged layout -> its contiguous one: every position the tables map, and the
    window as a ring of min(w, capacity) slots holding each row's last positions."""
    B, MP, page = block_table.shape[0], block_table.shape[1], k_slc.shape[1]
    N, dev = MP * page, k_slc.device
    pos = torch.arange(N, device=dev).expand(B, N)
    cpos = torch.arange(MP * k_cmp.shape[1], device=dev).expand(B, -1)
    W = min(config.window_size, N)
    j = torch.arange(W, device=dev)
    last = lengths.long()[:, None] - 1                          # slot j holds the latest p <= last, p % W == j
    wpos = (j + W * torch.div(last - j, W, rounding_mode="floor")).clamp_min(0)
    return (from_pages(k_cmp, block_table, cpos), from_pages(v_cmp, block_table, cpos),
            from_pages(k_slc, block_table, pos), from_pages(v_slc, block_table, pos),
            from_pages(k_win, window_table, wpos), from_pages(v_win, window_table, wpos))


@torch.no_grad()
def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, config, scale=None,
               block_table=None, window_table=None):
    """One decoding step over a cache (the layout of nsa.nsa_decode): row b's query sits at
    position lengths[b] - 1. Returns (o [B,HQ,dv], block_idx [B,H,n]). A paged cache is read
    into the contiguous layout first (unpage)."""
    if block_table is not None:
        k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = unpage(k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, lengths,
                                                          block_table, window_table, config)
    outs, idxs = [], []
    for b, L in enumerate(lengths.tolist()):
        kw, start = ring_order(k_win[b], L)
        vw, _ = ring_order(v_win[b], L)
        pos, nc = torch.tensor([L - 1], device=q.device), config.num_compressed(L)
        o, idx = nsa_at_positions(q[b:b + 1], k_cmp[b, :nc], v_cmp[b, :nc], k_slc[b, :L], v_slc[b, :L],
                                  kw, vw, gates[b:b + 1], pos, config=config, scale=scale,
                                  win_start=start)
        outs.append(o[0])
        idxs.append(idx[0])
    return torch.stack(outs), torch.stack(idxs)


@torch.no_grad()
def nsa_extend(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, config, scale=None):
    """S queries per row after what a cache holds (the layout of nsa.nsa_extend): row b's
    queries sit at positions lengths[b] - S .. lengths[b] - 1; k_win[b] holds positions
    lengths[b] - k_win.shape[1] .. lengths[b] - 1 (those below 0 unused). Returns
    (o [B,S,HQ,dv], block_idx [B,S,H,n])."""
    S, Wt = q.shape[1], k_win.shape[1]
    outs, idxs = [], []
    for b, L in enumerate(lengths.tolist()):
        j0 = max(0, Wt - L)                              # window slots before position 0
        pos, nc = torch.arange(L - S, L, device=q.device), config.num_compressed(L)
        o, idx = nsa_at_positions(q[b], k_cmp[b, :nc], v_cmp[b, :nc], k_slc[b, :L], v_slc[b, :L],
                                  k_win[b, j0:], v_win[b, j0:], gates[b], pos, config=config, scale=scale,
                                  win_start=L - Wt + j0)
        outs.append(o)
        idxs.append(idx)
    return torch.stack(outs), torch.stack(idxs)


__all__ = ["compressed_attention", "select_blocks", "selected_attention",
           "sliding_window_attention", "overlap_weights", "pick_blocks", "block_mask",
           "block_scores", "nsa_at_positions", "nsa_decode", "nsa_extend", "from_pages", "unpage", "ring_order", "num_compressed", "segments"]
