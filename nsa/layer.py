"""nn.Modules: NativeSparseAttention (the NSA layer) and FullAttention (its baseline twin).

Both take x [B, T, hidden] (and optional cu_seqlens for packed sequences) and return
[B, T, hidden]. NSA gives each branch its own keys and values (paper, Section 3.3.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .api import backend_module, nsa_attention, nsa_decode, nsa_extend
from .cache import NSACache
from .config import NSAConfig, check_int


def positions(batch, seqlen, cu_seqlens, device):
    """Token positions, restarting at 0 for every packed sequence. [B, T] (or [1, total])."""
    t = torch.arange(seqlen, device=device)
    if cu_seqlens is None:
        return t.expand(batch, seqlen)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    return (t - cu_seqlens.long()[seq]).unsqueeze(0)


def rope_freqs(d, theta, device, dtype):
    """Rotary frequencies theta ** (-2i / d), i < d / 2."""
    return theta ** (-torch.arange(0, d, 2, device=device, dtype=dtype) / d)


def rotary(x, pos, theta):
    """Rotary embedding (rotate-half form) of x [B, T, H, D] at positions pos [B, T]."""
    cdt = reference.compute_dtype(x.dtype)                                # float64 stays float64
    ang = pos.to(cdt)[..., None, None] * rope_freqs(x.shape[-1], theta, x.device, cdt)   # [B, T, 1, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.to(cdt).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 for half inputs (float64 stays float64)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(reference.compute_dtype(x.dtype))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def token_shift(h, weight, cu_seqlens=None, cache=None, rows=None):
    """h + weight * (h one position back) [B, T, D]: a sequence's first position sees zeros
    (packed sequences restart at cu_seqlens) or, with a cache, the row's last input of the
    previous call (cache.last_input, updated in place so that a captured decode step replays
    it); rows: the cache rows of x's batch entries (default all)."""
    prev = F.pad(h, (0, 0, 1, 0))[:, :-1]
    if cu_seqlens is not None:
        prev[0, cu_seqlens[:-1].long()] = 0
    if cache is not None:
        idx = slice(None) if rows is None else torch.tensor(rows, device=h.device)
        if cache.last_input is None:
            cache.last_input = h.new_zeros(cache.batch_size, h.shape[-1])
        prev[:, 0] = cache.last_input[idx]
        cache.last_input[idx] = h[:, -1]
    return h + weight.to(h.dtype) * prev


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
        """x [B, T, H, D], rows [Tc] (or [B, Tc], per batch row) first key row of each block
        -> [B, Tc, H, D]."""
        idx = rows[..., None] + torch.arange(self.block_size, device=x.device)  # [(B,) Tc, l]
        if idx.dim() == 2:
            blocks = x[:, idx]
        else:
            blocks = x[torch.arange(x.shape[0], device=x.device)[:, None, None], idx]
        blocks = blocks + self.pos_emb[:, None, :].to(x.dtype)                  # [B, Tc, l, H, D]
        return self.phi(blocks.transpose(2, 3))                                # [B, Tc, H, l, D]

    def regular(self, x, stride):
        """forward for the blocks starting at 0, stride, 2 stride, ... of every row of x
        [B, T, H, D], read as a strided view: no index tensors, and a gradient of one pass
        instead of a scatter-add -> [B, Tc, H, D]."""
        B, T, H, D = x.shape
        if T < self.block_size:   # no block: an empty result, still a function of x and the weights
            blocks = x[:, :0, :, None, :].expand(B, 0, H, self.block_size, D)
        else:
            blocks = x.unfold(1, self.block_size, stride).transpose(-1, -2)      # [B, Tc, H, l, D]
        return self.phi(blocks + self.pos_emb.to(x.dtype))

    def phi(self, blocks):
        """blocks [..., l, D], the position embedding added -> [..., D]."""
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
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = self._project_fused(x, keep=False)
        q, k_s, k_w = self._rotate(pos, q, k_s, k_w)
        return q, k_c, v_c, k_s, v_s, k_w, v_w, gates.to(q.dtype)

    def _compress(self, k_c, v_c, rows, starts):
        """Compressed tokens of the blocks whose first key is row rows[i] of k_c/v_c [B, *, H, d]
        (rows [Tc], or [B, Tc] per batch row; None: the blocks at 0, d, 2d, ... of every row) and
        sits at position starts[:, i] ([B|1, Tc]); a compressed key is rotated at its block's
        last position, the first query that can see it."""
        cpos = (starts + self.config.cmp_block_size - 1).expand(k_c.shape[0], -1)
        if rows is None:
            d = self.config.cmp_stride
            k, v = self.compress_k.regular(k_c, d), self.compress_v.regular(v_c, d)
        else:
            k, v = self.compress_k(k_c, rows), self.compress_v(v_c, rows)
        return self._rotate(cpos, k)[0], v

    def _rotate(self, pos, *xs):
        """rotary(x, pos, theta) of each x (one B, T, dtype), through the backend's kernel where
        it has one (eager: one launch a pass for all of them instead of ~12 small ops each;
        compiled code fuses the PyTorch form itself)."""
        impl = backend_module(self.backend, xs[0])
        if hasattr(impl, "rotary") and not torch.compiler.is_compiling():
            return impl.rotary(xs, pos, self._freqs(xs[0].device))
        return tuple(rotary(x, pos, self.rope_theta) for x in xs)

    def branch_inputs(self, x, cu_seqlens=None):
        """Everything nsa_attention takes, from x: (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)."""
        B, T, _ = x.shape
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = self._project(x, positions(B, T, cu_seqlens, x.device))
        rows, starts = block_starts(B, T, cu_seqlens, self.config, x.device)
        k_cmp, v_cmp = self._compress(k_c, v_c, None if cu_seqlens is None else rows, starts[None])
        return q, k_cmp.to(q.dtype), v_cmp.to(q.dtype), k_s, v_s, k_w, v_w, gates

    def decode_capturable(self, x) -> bool:
        """Whether this layer's decode step for tensors like x can be captured in a CUDA graph:
        on CUDA with the Triton backend (the reference reads lengths on the host)."""
        return x.is_cuda and getattr(backend_module(self.backend, x), "CAPTURABLE", False)

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
        """Append x's tokens to the cache rows and attend: a prompt into empty rows through
        nsa_attention (the training kernels); one token per row (nsa_decode) or a chunk after a
        non-empty prefix (nsa_extend) through the cache's buffers. Appending all rows of a cache
        reads no host value and syncs nothing: a decode step can be captured in a CUDA graph
        (the caller then advances cache.lengths itself on every replay, NSACache.advance_host)."""
        all_rows = rows is None
        rows = list(range(x.shape[0])) if all_rows else [int(r) for r in rows]
        cache.check(x, rows, self.hidden_size)   # and makes room (a paged cache takes pages)
        all_rows = all_rows or rows == list(range(cache.batch_size))
        B, S, _ = x.shape
        rows_t = cache.row_ids if all_rows else torch.tensor(rows, dtype=torch.long, device=x.device)
        impl = backend_module(self.backend, x)
        if S == 1 and hasattr(impl, "decode_append"):
            o, idx = self._decode_fused(impl, cache, rows_t, all_rows, self._project_fused(x))
        else:
            pos = cache.seqlens[rows_t].long()[:, None] + torch.arange(S, device=x.device)   # [B, S]
            new = self._project(x, pos)
            if S > 1 and not any(cache.lengths[r] for r in rows):
                o, idx = self._prefill(cache, rows_t, pos, new)
            else:
                o, idx = self._append(cache, rows_t, all_rows, pos, new, max(cache.lengths[r] for r in rows) + S)
        cache.advance(rows, rows_t, S)
        out = self.o_proj(o.reshape(B, S, -1))
        return (out, idx) if return_block_idx else out

    def _prefill(self, cache, rows_t, pos, new):
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = new
        c, S = self.config, q.shape[1]
        cache.write(rows_t, pos, k_s, v_s, k_w, v_w, k_c, v_c)
        starts = torch.arange(c.num_compressed(S), device=q.device) * c.cmp_stride
        k_cmp, v_cmp = (z.to(q.dtype) for z in self._compress(k_c, v_c, None, starts[None]))
        ci = torch.arange(starts.numel(), device=q.device).expand(rows_t.numel(), -1)
        cache.write_compressed(rows_t, ci, k_cmp, v_cmp)
        return nsa_attention(q, k_cmp, v_cmp, k_s, v_s, k_w, v_w, gates, config=c,
                             return_block_idx=True, backend=self.backend)

    def _append(self, cache, rows_t, all_rows, pos, new, upto):
        """S >= 1 tokens per row after what the rows hold (possibly nothing); `upto`: the most
        tokens a row holds after them."""
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = new
        S, P = q.shape[1], pos[:, 0]
        # the rings' last tokens, oldest first, before the new ones overwrite them
        raw_k, raw_v = (torch.cat([old, n], 1) for old, n in zip(cache.tail("raw", rows_t, P), (k_c, v_c)))
        if S > 1:
            win_k, win_v = (torch.cat([old, n], 1) for old, n in zip(cache.tail("win", rows_t, P), (k_w, v_w)))
        cache.write(rows_t, pos, k_s, v_s, k_w, v_w, k_c, v_c)
        self._append_compressed(cache, rows_t, P, S, raw_k, raw_v)
        if S == 1:
            bufs, tables = cache.decode_inputs(rows_t, all_rows)
            o, idx = nsa_decode(q[:, 0], *bufs, gates[:, 0], P + 1, config=self.config,
                                return_block_idx=True, backend=self.backend, **tables)
            return o[:, None], idx[:, None]
        return nsa_extend(q, *cache.extend_inputs(rows_t, all_rows, upto), win_k, win_v, gates, P + S,
                          config=self.config, return_block_idx=True, backend=self.backend)

    def _decode_fused(self, impl, cache, rows_t, all_rows, new):
        """_append for one token a row, its bookkeeping in two kernels (nsa/triton/append.py,
        contiguous or paged cache); phi stays this module's."""
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = (z[:, 0] for z in new)
        freqs = self._freqs(q.device)
        q, blk_k, blk_v = impl.decode_append(cache, rows_t, q, k_s, v_s, k_w, v_w, k_c, v_c, freqs,
                                             self.compress_k.pos_emb, self.compress_v.pos_emb)
        if blk_k is not None:
            impl.decode_store_compressed(cache, rows_t, self.compress_k.phi(blk_k), self.compress_v.phi(blk_v), freqs)
        bufs, tables = cache.decode_inputs(rows_t, all_rows)
        seen = cache.seqlens if all_rows else cache.seqlens[rows_t]
        o, idx = nsa_decode(q, *bufs, gates, seen + 1, config=self.config,
                            return_block_idx=True, backend=self.backend, **tables)
        return o[:, None], idx[:, None]

    def _project_fused(self, x, keep=True):
        """_project's outputs, nothing rotated, as one matrix product: q, the three branches' k/v
        and the gates share x (one product forward and two backward instead of five and ten).
        keep (the fused decode step): the concatenated weights are kept until a parameter changes
        through autograd's version counter (not through .data), where none needs a gradient;
        otherwise they are concatenated at each call."""
        mods = (self.q_proj, self.cmp_proj, self.slc_proj, self.win_proj, self.gate_proj)
        biased = self.q_proj.bias is not None   # qkv_bias: all of them; else only the gate's

        def cat():
            w = torch.cat([m.weight for m in mods])
            return w, (torch.cat([m.bias for m in mods]) if biased else None)

        if (not keep or torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
                or (torch.is_grad_enabled() and any(p.requires_grad for m in mods for p in m.parameters()))):
            w, b = cat()
        else:
            key = tuple((p.data_ptr(), p._version) for m in mods for p in m.parameters())
            if getattr(self, "_fused_key", None) != key:
                with torch.no_grad():
                    w, b = cat()
                if x.is_cuda and torch.cuda.is_current_stream_capturing():   # not run until replayed: not kept
                    key = None
                self._fused_key, self._fused_w = key, (w, b)
            w, b = self._fused_w
        B, T, _ = x.shape
        H, dk, dv, HQ = self.num_kv_heads, self.head_dim_qk, self.head_dim_v, self.num_heads
        kv = H * (dk + dv)
        q, c, sl, wi, g = F.linear(x, w, b).split([HQ * dk, kv, kv, kv, HQ * 3], -1)
        if not biased:
            g = g + self.gate_proj.bias.to(g.dtype)
        split = lambda y: y.view(B, T, H, dk + dv).split([dk, dv], -1)
        (k_c, v_c), (k_s, v_s), (k_w, v_w) = split(c), split(sl), split(wi)
        gates = torch.sigmoid(g).view(B, T, HQ, 3)
        return q.view(B, T, HQ, dk), k_c, v_c, k_s, v_s, k_w, v_w, gates

    def _freqs(self, device):
        """rotary's frequencies for head_dim_qk in float32, kept per device."""
        f = getattr(self, "_freq_cache", None)
        if f is None or f.device != device:
            f = rope_freqs(self.head_dim_qk, self.rope_theta, device, torch.float32)
            # not kept from a capture (not run until replayed) nor from inference_mode (a later
            # training step's rotary saves it for its backward)
            if not (torch.is_inference_mode_enabled() or (f.is_cuda and torch.cuda.is_current_stream_capturing())):
                self._freq_cache = f
        return f

    def _append_compressed(self, cache, rows_t, P, S, raw_k, raw_v):
        """phi on the blocks that the S new tokens of each row complete, from raw_k/raw_v
        [B, R + S, H, d] (the R positions before the new tokens, then theirs), written to the
        rows' next compressed slots. Every row computes S // d + 1 candidates; those that are
        not blocks go to the cache's spare slot: no host value decides anything."""
        c = self.config
        l, d, R = c.cmp_block_size, c.cmp_stride, cache.raw_span
        if c.num_compressed(cache.capacity) == 0:   # no block ever completes
            return
        tc = lambda L: torch.where(L >= l, torch.div(L - l, d, rounding_mode="floor") + 1, 0)
        i = tc(P)[:, None] + torch.arange(S // d + 1, device=P.device)          # [B, M] candidates
        starts = i * d                                                        # their first positions
        first = (starts - (P[:, None] - R)).clamp(0, R + S - l)               # their rows in raw_k
        k_new, v_new = self._compress(raw_k, raw_v, first, starts)
        cache.write_compressed(rows_t, i, k_new, v_new, valid=i < tc(P + S)[:, None])


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
