"""nn.Modules: NativeSparseAttention (the NSA layer) and FullAttention (its baseline twin).

Both take x [B, T, hidden] (and optional cu_seqlens for packed sequences) and return
[B, T, hidden]. NSA gives each branch its own keys and values (paper, Section 3.3.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .api import nsa_attention, nsa_decode
from .cache import NSACache
from .config import NSAConfig, check_int


def positions(batch, seqlen, cu_seqlens, device):
    """Token positions, restarting at 0 for every packed sequence. [B, T] (or [1, total])."""
    t = torch.arange(seqlen, device=device)
    if cu_seqlens is None:
        return t.expand(batch, seqlen)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    return (t - cu_seqlens.long()[seq]).unsqueeze(0)


def rotary(x, pos, theta):
    """Rotary embedding (rotate-half form) of x [B, T, H, D] at positions pos [B, T]."""
    d = x.shape[-1]
    cdt = reference.compute_dtype(x.dtype)                                # float64 stays float64
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=cdt) / d)
    ang = pos.to(cdt)[..., None, None] * inv                           # [B, T, 1, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.to(cdt).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def block_starts(batch, seqlen, cu_seqlens, cfg: NSAConfig, device):
    """For every compressed token: (row of its first key, its position in its sequence).
    Packed input needs the sequence lengths on the host (one sync per call)."""
    d = cfg.cmp_stride
    if cu_seqlens is None:
        pos = torch.arange(cfg.num_compressed(seqlen), device=device) * d
        return pos, pos
    cu = cu_seqlens.tolist()
    rows, pos = [], []
    for t0, t1 in zip(cu[:-1], cu[1:]):
        p = torch.arange(cfg.num_compressed(t1 - t0), device=device) * d
        rows.append(p + t0)
        pos.append(p)
    return torch.cat(rows), torch.cat(pos)


class BlockCompressor(nn.Module):
    """phi: maps each block of l keys (or values) to one compressed token.

    phi(block) = mean(block + pe) + MLP(flatten(block + pe)), pe a learned intra-block position
    embedding. The MLP's last layer starts at zero, so phi starts as mean pooling: a stable
    starting point that training moves away from.
    """

    def __init__(self, block_size: int, dim: int):
        super().__init__()
        self.block_size = block_size
        self.pos_emb = nn.Parameter(torch.zeros(block_size, dim))
        self.mlp = nn.Sequential(nn.Linear(block_size * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x, rows):
        """x [B, T, H, D], rows [Tc] first key row of each block -> [B, Tc, H, D]."""
        idx = rows[:, None] + torch.arange(self.block_size, device=x.device)   # [Tc, l]
        blocks = x[:, idx] + self.pos_emb[:, None, :].to(x.dtype)              # [B, Tc, l, H, D]
        blocks = blocks.transpose(2, 3)                                        # [B, Tc, H, l, D]
        return blocks.mean(-2) + self.mlp(blocks.flatten(-2))


class _AttentionBase(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim_qk, head_dim_v, rope_theta,
                 qkv_bias=False, o_bias=False):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim_qk", head_dim_qk),
                        ("head_dim_v", head_dim_v)):
            check_int(name, v, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim_qk % 2:
            raise ValueError(f"head_dim_qk must be even for rotary embeddings, got {head_dim_qk}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim_qk, self.head_dim_v, self.rope_theta = head_dim_qk, head_dim_v, rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim_qk, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim_v, hidden_size, bias=o_bias)

    def _init_linears(self):
        for m in self.modules():
            if isinstance(m, nn.Linear) and not getattr(m, "_keep_init", False):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_input(self, x, cu_seqlens):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if cu_seqlens is not None and x.shape[0] != 1:
            raise ValueError(f"packed input (cu_seqlens given) needs batch size 1, got {x.shape[0]}")

    def _qkv(self, x, cu_seqlens):
        """q and k with rotary embeddings, v: one k/v projection (FullAttention, WindowAttention)."""
        B, T, _ = x.shape
        pos = positions(B, T, cu_seqlens, x.device)
        q = rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim_qk), pos, self.rope_theta)
        k, v = self._kv(self.kv_proj, x)
        return q, rotary(k, pos, self.rope_theta), v

    def _kv(self, proj, x):
        B, T, _ = x.shape
        H, dk, dv = self.num_kv_heads, self.head_dim_qk, self.head_dim_v
        k, v = proj(x).view(B, T, H, dk + dv).split([dk, dv], -1)
        return k, v


class NativeSparseAttention(_AttentionBase):
    """NSA layer: q projection, independent k/v per branch, RoPE, learned compression, gates.
    qkv_bias gives the q and every branch's k/v projection a bias (Qwen2-style), o_bias the
    output projection."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim_qk, head_dim_v,
                 config: NSAConfig = NSAConfig(), rope_theta: float = 10000.0, backend="auto",
                 qkv_bias: bool = False, o_bias: bool = False):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim_qk, head_dim_v, rope_theta,
                         qkv_bias, o_bias)
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
        self.config, self.backend = config, backend
        kv = num_kv_heads * (head_dim_qk + head_dim_v)
        self.cmp_proj = nn.Linear(hidden_size, kv, bias=qkv_bias)
        self.slc_proj = nn.Linear(hidden_size, kv, bias=qkv_bias)
        self.win_proj = nn.Linear(hidden_size, kv, bias=qkv_bias)
        self.compress_k = BlockCompressor(config.cmp_block_size, head_dim_qk)
        self.compress_v = BlockCompressor(config.cmp_block_size, head_dim_v)
        self.gate_proj = nn.Linear(hidden_size, num_heads * 3)
        for c in (self.compress_k, self.compress_v):
            c.mlp[0]._keep_init = c.mlp[2]._keep_init = True
        self._init_linears()   # gate bias 0: every branch starts at weight 0.5

    def _project(self, x, pos):
        """Per-token projections at positions pos [B, T]: q, the compression branch's raw k/v,
        the rotated selection/window keys with their values, and the gates."""
        B, T, _ = x.shape
        q = rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim_qk), pos, self.rope_theta)
        k_c, v_c = self._kv(self.cmp_proj, x)
        k_s, v_s = self._kv(self.slc_proj, x)
        k_w, v_w = self._kv(self.win_proj, x)
        gates = torch.sigmoid(self.gate_proj(x)).view(B, T, self.num_heads, 3).to(q.dtype)
        return (q, k_c, v_c, rotary(k_s, pos, self.rope_theta), v_s, rotary(k_w, pos, self.rope_theta),
                v_w, gates)

    def _compress(self, k_c, v_c, rows, starts):
        """Compressed tokens of the blocks whose first key is row rows[i] of k_c/v_c [B, *, H, d]
        and sits at position starts[:, i] ([B|1, Tc]); a compressed key is rotated at its
        block's last position, the first query that can see it."""
        cpos = (starts + self.config.cmp_block_size - 1).expand(k_c.shape[0], -1)
        return rotary(self.compress_k(k_c, rows), cpos, self.rope_theta), self.compress_v(v_c, rows)

    def branch_inputs(self, x, cu_seqlens=None):
        """Everything nsa_attention takes, from x: (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)."""
        B, T, _ = x.shape
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = self._project(x, positions(B, T, cu_seqlens, x.device))
        rows, starts = block_starts(B, T, cu_seqlens, self.config, x.device)
        k_cmp, v_cmp = self._compress(k_c, v_c, rows, starts[None])
        return q, k_cmp.to(q.dtype), v_cmp.to(q.dtype), k_s, v_s, k_w, v_w, gates

    def new_cache(self, batch_size, capacity, dtype=None, device=None):
        """An empty NSACache sized for this layer."""
        p = self.q_proj.weight
        return NSACache(batch_size, capacity, self.num_kv_heads, self.head_dim_qk, self.head_dim_v,
                        self.config, dtype=dtype or p.dtype, device=device or p.device)

    def forward(self, x, cu_seqlens=None, return_block_idx=False, cache=None, rows=None):
        """x [B, T, hidden] -> [B, T, hidden]. With `cache` (an NSACache), x's tokens are appended
        to the cache rows `rows` (default: all) after what they hold, and attend to it: prefill
        (many tokens) or decoding (one a step). The cached path is for inference: call it under
        torch.no_grad()."""
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("cache and cu_seqlens cannot be combined: one row per sequence")
            return self._forward_cached(x, cache, rows, return_block_idx)
        self._check_input(x, cu_seqlens)
        B, T, _ = x.shape
        o, idx = nsa_attention(*self.branch_inputs(x, cu_seqlens), config=self.config,
                               cu_seqlens=cu_seqlens, return_block_idx=True, backend=self.backend)
        out = self.o_proj(o.reshape(B, T, -1))
        return (out, idx) if return_block_idx else out


    def _forward_cached(self, x, cache, rows, return_block_idx):
        """Append x's tokens to the cache rows and attend: one token per row goes through
        nsa_decode (the decode kernels on GPU); a prompt into empty rows through nsa_attention
        (the training kernels); more tokens after a non-empty prefix through the reference."""
        all_rows = rows is None
        rows = list(range(x.shape[0])) if all_rows else [int(r) for r in rows]
        cache.check(x, rows, self.hidden_size)
        all_rows = all_rows or rows == list(range(cache.batch_size))
        B, S, _ = x.shape
        rows_t = torch.tensor(rows, dtype=torch.long, device=x.device)
        pos = cache.seqlens[rows_t].long()[:, None] + torch.arange(S, device=x.device)   # [B, S]
        new = self._project(x, pos)
        lengths = [cache.lengths[r] for r in rows]
        if S == 1:
            o, idx = self._decode_step(cache, rows_t, lengths, pos, new, all_rows)
        elif not any(lengths):
            o, idx = self._prefill(cache, rows_t, pos, new)
        else:
            o, idx = self._extend(cache, rows, rows_t, pos, new)
        cache.advance(rows, rows_t, S)
        out = self.o_proj(o.reshape(B, S, -1))
        return (out, idx) if return_block_idx else out

    def _decode_step(self, cache, rows_t, lengths, pos, new, all_rows):
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = new
        c, dt = self.config, cache.dtype
        cache.write(rows_t, pos, k_s, v_s, k_w, v_w, k_c, v_c)
        done = [i for i, L in enumerate(lengths) if c.num_compressed(L + 1) > c.num_compressed(L)]
        if done:   # rows whose newest token completes a block: phi on that block alone
            ci = torch.tensor([c.num_compressed(lengths[i] + 1) - 1 for i in done], device=q.device)
            rr, starts = rows_t[done], ci * c.cmp_stride
            slots = (starts[:, None] + torch.arange(c.cmp_block_size, device=q.device)) % cache.k_raw.shape[1]
            k_new, v_new = self._compress(cache.k_raw[rr[:, None], slots], cache.v_raw[rr[:, None], slots],
                                          starts.new_zeros(1), starts[:, None])
            cache.k_cmp[rr, ci], cache.v_cmp[rr, ci] = k_new[:, 0].to(dt), v_new[:, 0].to(dt)
        bufs = (cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win)
        if not all_rows:
            bufs = tuple(b[rows_t] for b in bufs)
        o, idx = nsa_decode(q[:, 0], *bufs, gates[:, 0], pos[:, 0] + 1, config=c,
                            return_block_idx=True, backend=self.backend)
        return o[:, None], idx[:, None]

    def _prefill(self, cache, rows_t, pos, new):
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = new
        c, S = self.config, q.shape[1]
        cache.write(rows_t, pos, k_s, v_s, k_w, v_w, k_c, v_c)
        starts = torch.arange(c.num_compressed(S), device=q.device) * c.cmp_stride
        k_cmp, v_cmp = (z.to(q.dtype) for z in self._compress(k_c, v_c, starts, starts[None]))
        ci = torch.arange(starts.numel(), device=q.device)
        cache.k_cmp[rows_t[:, None], ci], cache.v_cmp[rows_t[:, None], ci] = k_cmp, v_cmp
        return nsa_attention(q, k_cmp, v_cmp, k_s, v_s, k_w, v_w, gates, config=c,
                             return_block_idx=True, backend=self.backend)

    def _extend(self, cache, rows, rows_t, pos, new):
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = new
        c, S = self.config, q.shape[1]
        # the rings' old tokens, before the new ones overwrite them
        old = [[reference.ring_order(buf[r], cache.lengths[r]) for buf in
                (cache.k_win, cache.v_win, cache.k_raw, cache.v_raw)] for r in rows]
        cache.write(rows_t, pos, k_s, v_s, k_w, v_w, k_c, v_c)
        outs, idxs = [], []
        for i, r in enumerate(rows):
            (kw, w0), (vw, _), (kr, r0), (vr, _) = old[i]
            L, E = cache.lengths[r], cache.lengths[r] + S
            c0, c1 = c.num_compressed(L), c.num_compressed(E)
            if c1 > c0:   # blocks completed by these tokens: phi on them alone
                starts = torch.arange(c0, c1, device=q.device) * c.cmp_stride
                kc, vc = self._compress(torch.cat([kr, k_c[i]])[None], torch.cat([vr, v_c[i]])[None],
                                        starts - r0, starts[None])
                cache.k_cmp[r, c0:c1], cache.v_cmp[r, c0:c1] = kc[0].to(q.dtype), vc[0].to(q.dtype)
            o, idx = reference.nsa_at_positions(
                q[i], cache.k_cmp[r, :c1], cache.v_cmp[r, :c1], cache.k_slc[r, :E], cache.v_slc[r, :E],
                torch.cat([kw, k_w[i]]), torch.cat([vw, v_w[i]]), gates[i], pos[i], config=c,
                win_start=w0)
            outs.append(o)
            idxs.append(idx)
        return torch.stack(outs), torch.stack(idxs)


class FullAttention(_AttentionBase):
    """Causal full attention with the same constructor and projection shapes (the baseline)."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim_qk, head_dim_v,
                 config: NSAConfig = NSAConfig(), rope_theta: float = 10000.0, backend="auto"):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim_qk, head_dim_v, rope_theta)
        self.config = config
        self.kv_proj = nn.Linear(hidden_size, num_kv_heads * (head_dim_qk + head_dim_v), bias=False)
        self._init_linears()

    def forward(self, x, cu_seqlens=None):
        self._check_input(x, cu_seqlens)
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cu_seqlens)
        bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
        outs = []
        for t0, t1 in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (z[:, t0:t1].transpose(1, 2) for z in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                        .transpose(1, 2))
        o = torch.cat(outs, 1)
        return self.o_proj(o.reshape(B, T, -1))
