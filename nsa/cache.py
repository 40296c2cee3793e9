"""NSACache: what one NSA layer keeps between calls when generating.

Per batch row, fixed capacity N:
- k_slc/v_slc [B, N, H, d]: the selection branch's rotated keys and values, every position
  (any block may be selected);
- k_win/v_win [B, W, H, d]: the window branch's, a ring of W = min(w, N) slots (position p in
  slot p % W): only the last w tokens are ever read;
- k_raw/v_raw [B, R, H, d]: the compression branch's raw keys and values, a ring of
  R = min(l, N) slots: enough to compress the next block of l keys when it completes;
- k_cmp/v_cmp [B, Tc(N) + 1, H, d]: the compressed tokens, one more each time a block of l raw
  keys completes (phi runs on that block only, never over the prefix); the last slot is spare: an
  append writes there what its candidate blocks that did not complete give, so that no host value
  decides whether a block completed.
Rows hold different lengths: `lengths` on the host (bookkeeping, checks) and `seqlens` on the
device (what the kernels and the layer's positions read), kept equal. An append of every row
reads only device values, so it can be captured in a CUDA graph; whoever replays it moves the
host lengths on (advance_host).
"""
from __future__ import annotations

import torch

from .config import NSAConfig


class CacheRows:
    """What NSACache and PagedNSACache share: B rows of `lengths` (host) and `seqlens` (device),
    buffers starting with k_slc, and advancing rows after an append."""

    def _rows(self, B, device):
        self.lengths = [0] * B
        self.last_input = None   # [B, hidden]: the model's token shift (nsa.model.Block), all rows at once
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=device)
        self.row_ids = torch.arange(B, device=device)   # every row, for appends that read no host value

    @property
    def dtype(self):
        return self.k_slc.dtype

    @property
    def device(self):
        return self.k_slc.device

    def advance(self, rows, rows_t, n):
        """n tokens appended to rows (host list) / rows_t (device)."""
        self.advance_host(rows, n)
        if rows_t is self.row_ids:   # every row: one kernel
            self.seqlens.add_(n)
        else:
            self.seqlens.index_add_(0, rows_t, torch.full_like(rows_t, n, dtype=torch.int32))

    def advance_host(self, rows, n):
        """The host half of advance: what a replayed CUDA graph of an append does not do."""
        for r in rows:
            self.lengths[r] += n


class NSACache(CacheRows):
    _BUFFERS = ("k_slc", "v_slc", "k_win", "v_win", "k_raw", "v_raw", "k_cmp", "v_cmp")

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
        ring = min(config.window_size, capacity)
        self.k_win, self.v_win = z(ring, head_dim_qk), z(ring, head_dim_v)
        raw = min(config.cmp_block_size, capacity)
        self.k_raw, self.v_raw = z(raw, head_dim_qk), z(raw, head_dim_v)
        tc = config.num_compressed(capacity) + 1
        self.k_cmp, self.v_cmp = z(tc, head_dim_qk), z(tc, head_dim_v)
        self._rows(B, device)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._BUFFERS)

    def grow(self, capacity: int) -> None:
        """Raise the capacity to `capacity` tokens, keeping what every row holds. While the rings
        are shorter than w (or l) they hold every position in its own slot (lengths <= the old
        capacity = their size), so a copy into the first slots of the larger rings is exact."""
        if capacity <= self.capacity:
            return
        old = {n: getattr(self, n) for n in self._BUFFERS}
        c = self.config
        sizes = {"k_slc": capacity, "k_win": min(c.window_size, capacity),
                 "k_raw": min(c.cmp_block_size, capacity), "k_cmp": c.num_compressed(capacity) + 1}
        for n, buf in old.items():
            new = buf.new_zeros(buf.shape[0], sizes["k" + n[1:]], *buf.shape[2:])
            new[:, :buf.shape[1]] = buf
            setattr(self, n, new)
        self.capacity = capacity

    def select_rows(self, index) -> None:
        """Keep the rows `index` (a 1-D index tensor or list, repeats allowed) in that order:
        beam search's reordering, a batch repeated per returned sequence."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        for n in self._BUFFERS:
            setattr(self, n, getattr(self, n).index_select(0, index))
        self.lengths = [self.lengths[i] for i in index.tolist()]
        self.seqlens = self.seqlens.index_select(0, index)
        if self.last_input is not None:
            self.last_input = self.last_input.index_select(0, index)
        self.batch_size = index.numel()
        self.row_ids = torch.arange(self.batch_size, device=self.device)

    def reset(self, rows=None):
        """Forget what rows (default: all) hold; their buffers are reused."""
        rows = range(self.batch_size) if rows is None else rows
        for r in rows:
            self.lengths[r] = 0
        if self.last_input is not None:
            self.last_input[list(rows)] = 0
        self.seqlens[torch.as_tensor(list(rows), dtype=torch.long, device=self.device)] = 0

    def check(self, x, rows, hidden):
        """Validate an append of x [len(rows), S, hidden] to batch rows `rows`."""
        if x.dim() != 3 or x.shape[-1] != hidden:
            raise ValueError(f"x must be [B, S, {hidden}], got {tuple(x.shape)}")
        if x.shape[0] != len(rows):
            raise ValueError(f"x has batch size {x.shape[0]}, the cache rows given are {len(rows)} "
                             f"(cache batch size {self.batch_size})")
        if any(not 0 <= r < self.batch_size for r in rows):
            raise ValueError(f"batch rows must be in [0, {self.batch_size}), got {list(rows)}")
        if len(set(rows)) != len(rows):
            raise ValueError(f"batch rows must be distinct, got {list(rows)}")
        if x.dtype != self.dtype:
            raise TypeError(f"x dtype {x.dtype} does not match the cache's {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device}, the cache on {self.device}")
        self.reserve(rows, x.shape[1])

    def reserve(self, rows, n):
        """Room for n more tokens in each of rows, or a clear error (the capacity is fixed)."""
        over = [r for r in rows if self.lengths[r] + n > self.capacity]
        if over:
            raise ValueError(f"cache capacity {self.capacity} exceeded for rows {over}: lengths "
                             f"{[self.lengths[r] for r in over]} + {n} new tokens")

    def write(self, rows_t, pos, k_slc, v_slc, k_win, v_win, k_raw, v_raw):
        """Store new tokens at positions pos [b, S] (device) of rows rows_t [b]: the ring buffers
        keep only the last tokens (distinct slots, so the scatter is well defined)."""
        rr = rows_t[:, None]
        self.k_slc[rr, pos], self.v_slc[rr, pos] = k_slc, v_slc
        for kb, vb, k, v in ((self.k_win, self.v_win, k_win, v_win), (self.k_raw, self.v_raw, k_raw, v_raw)):
            n = min(pos.shape[1], kb.shape[1])
            slot = pos[:, -n:] % kb.shape[1]
            kb[rr, slot], vb[rr, slot] = k[:, -n:], v[:, -n:]

    def tail(self, branch, rows_t, start):
        """The window ("win") or raw compression ("raw") keys and values of the W positions
        start[b] - W .. start[b] - 1 of rows rows_t (W the ring's size), oldest first:
        ([b, W, H, dk], [b, W, H, dv]); those below position 0 are whatever the slots hold."""
        kb, vb = (self.k_win, self.v_win) if branch == "win" else (self.k_raw, self.v_raw)
        W = kb.shape[1]
        slots = (start[:, None] - W + torch.arange(W, device=kb.device)) % W
        return kb[rows_t[:, None], slots], vb[rows_t[:, None], slots]

    @property
    def raw_span(self) -> int:
        """Raw compression positions `tail("raw")` returns."""
        return self.k_raw.shape[1]

    def write_compressed(self, rows_t, index, k, v, valid=None):
        """Compressed tokens k/v [b, M, H, d] at indices index [b, M] of rows rows_t; where
        `valid` is False they go to the spare slot instead (nothing reads it)."""
        if valid is not None:
            index = torch.where(valid, index, self.k_cmp.shape[1] - 1)
        rr = rows_t[:, None]
        self.k_cmp[rr, index], self.v_cmp[rr, index] = k.to(self.dtype), v.to(self.dtype)

    def decode_inputs(self, rows_t, all_rows):
        """nsa_decode's cache arguments for rows rows_t: (k_cmp, v_cmp, k_slc, v_slc, k_win,
        v_win, page tables as keywords: none here)."""
        bufs = (self.k_cmp, self.v_cmp, self.k_slc, self.v_slc, self.k_win, self.v_win)
        return (bufs if all_rows else tuple(b[rows_t] for b in bufs)), {}

    def extend_inputs(self, rows_t, all_rows, upto):
        """nsa_extend's (k_cmp, v_cmp, k_slc, v_slc) for rows rows_t, whose tokens (the new ones
        included) end by position `upto`: all rows read in place, a subset gathered up to there."""
        bufs = (self.k_cmp, self.v_cmp, self.k_slc, self.v_slc)
        if all_rows:
            return bufs
        nc = self.config.num_compressed(upto)
        return tuple(b[:, :n][rows_t] for b, n in zip(bufs, (nc, nc, upto, upto)))
