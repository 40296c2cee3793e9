"""NSACache: what one NSA layer keeps between calls when generating.

Per batch row: the selection and window branches' rotated keys and values, the compression
branch's raw (pre-compression) keys and values, and the compressed keys and values, which grow
by one token each time a block of l raw keys completes (phi runs on that block only, never over
the prefix). Rows may hold different lengths. Buffers have a fixed capacity.

This first version keeps every branch's raw k/v for the whole capacity (the window branch
needs only its last w tokens: a ring buffer is the planned refinement) and attends with the
reference implementation; the GPU decode kernel is not written yet.
"""
from __future__ import annotations

import torch

from .config import NSAConfig


class NSACache:
    def __init__(self, batch_size: int, capacity: int, num_kv_heads: int, head_dim_qk: int,
                 head_dim_v: int, config: NSAConfig = NSAConfig(), dtype=torch.float32, device="cpu"):
        for name, v in (("batch_size", batch_size), ("capacity", capacity)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.config, self.capacity, self.batch_size = config, capacity, batch_size
        self.num_kv_heads, self.head_dim_qk, self.head_dim_v = num_kv_heads, head_dim_qk, head_dim_v
        B, H = batch_size, num_kv_heads
        z = lambda n, d: torch.zeros(B, n, H, d, dtype=dtype, device=device)
        self.k_slc, self.v_slc = z(capacity, head_dim_qk), z(capacity, head_dim_v)
        self.k_win, self.v_win = z(capacity, head_dim_qk), z(capacity, head_dim_v)
        self.k_raw, self.v_raw = z(capacity, head_dim_qk), z(capacity, head_dim_v)
        tc = config.num_compressed(capacity)
        self.k_cmp, self.v_cmp = z(tc, head_dim_qk), z(tc, head_dim_v)
        self.lengths = [0] * B   # host-side: the reference path slices by length

    @property
    def dtype(self):
        return self.k_slc.dtype

    @property
    def device(self):
        return self.k_slc.device

    def check(self, x, rows, hidden):
        """Validate an append of x [len(rows), S, hidden] to batch rows `rows`."""
        if x.dim() != 3 or x.shape[-1] != hidden:
            raise ValueError(f"x must be [B, S, {hidden}], got {tuple(x.shape)}")
        if x.shape[0] != len(rows):
            raise ValueError(f"x has batch size {x.shape[0]}, the cache rows given are {len(rows)} "
                             f"(cache batch size {self.batch_size})")
        if any(not 0 <= r < self.batch_size for r in rows):
            raise ValueError(f"batch rows must be in [0, {self.batch_size}), got {list(rows)}")
        if x.dtype != self.dtype:
            raise TypeError(f"x dtype {x.dtype} does not match the cache's {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device}, the cache on {self.device}")
        over = [r for r in rows if self.lengths[r] + x.shape[1] > self.capacity]
        if over:
            raise ValueError(f"cache capacity {self.capacity} exceeded for rows {over}: lengths "
                             f"{[self.lengths[r] for r in over]} + {x.shape[1]} new tokens")
