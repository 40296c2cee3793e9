"""PagedNSACache: one NSA layer's decoding state in fixed-size pages, for a server that holds
many sequences of different lengths and frees each one's memory when it finishes.

A page holds `page_size` consecutive positions of one sequence (a multiple of the selection
block l' and of the compression stride d). Two pools, each with a block table [max_seqs,
max_pages] (int32, -1 = no page; page j holds positions [j*page, (j+1)*page)), shaped like the
paged caches of vLLM and FlashInfer:
- main pages: the selection branch's K/V of every position (any block may be selected) and the
  compressed tokens whose blocks start in the page (page/d of them), through `block_table`;
- recent pages: the window branch's K/V and the compression branch's raw K/V, through
  `window_table`. Only the last max(w, l) positions are ever read, so a recent page is handed
  back as soon as the sequence has moved past it: a sequence holds at most
  2 (max(w, l) / page + 1) of them, whatever its length.
Pages are taken as a sequence grows (reserve, called by the layer before each append) and all
handed back by free(). Decoding reads through the tables (nsa_decode's paged layout); a chunk
after a prefix reads the rows' pages, as far as its longest row reaches, into contiguous
buffers first (nsa_extend).

The allocator and the tables are a PageTable. A model's layers share one (`share=` another
layer's cache), as an engine's block table serves every layer: a page number names the same
positions of the same sequence in every layer's pools, sequences are allocated and freed once,
and the first layer to append a step takes its pages (the others find them taken).

The layer's interface is NSACache's (nsa/cache.py): NativeSparseAttention(x, cache=paged,
rows=[...]) appends to sequences `rows` (slots from allocate()).
"""
from __future__ import annotations

import weakref

import torch

from .cache import CacheRows
from .config import NSAConfig, check_int
from .reference import from_pages


class PageTable:
    """The pages of up to max_seqs sequences: free lists of main and recent pages, the host's
    tables and their device copies, which slots are in use, and the caches (layers) whose pools
    the page numbers index."""

    def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int,
                 num_window_pages: int, device):
        self.num_pages, self.page_size, self.max_seqs = num_pages, page_size, max_seqs
        self.max_pages_per_seq, self.num_window_pages = max_pages_per_seq, num_window_pages
        self._free = list(range(num_pages - 1, -1, -1))            # pop() hands out the lowest first
        self._win_free = list(range(num_window_pages - 1, -1, -1))
        self._host = torch.full((2, max_seqs, max_pages_per_seq), -1, dtype=torch.int32)
        self.main, self.recent = self._host[0], self._host[1]      # the host's copy, edited
        self._tables = torch.full((2, max_seqs, max_pages_per_seq), -1, dtype=torch.int32, device=device)
        self.block_table, self.window_table = self._tables[0], self._tables[1]
        self._dirty = False
        self.active = [False] * max_seqs
        self.dropped = [0] * max_seqs   # recent pages before this index were handed back
        self.caches = weakref.WeakSet()

    @property
    def free_pages(self) -> tuple[int, int]:
        """(main, recent) pages not held by any sequence."""
        return len(self._free), len(self._win_free)

    def allocate(self) -> int:
        try:
            slot = self.active.index(False)
        except ValueError:
            raise ValueError(f"all {self.max_seqs} sequence slots are in use (max_seqs); free one first") from None
        self.active[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if not (0 <= slot < self.max_seqs and self.active[slot]):
            raise ValueError(f"sequence slot {slot} is not allocated")
        main, recent = self.main[slot], self.recent[slot]
        self._release(main[main >= 0].tolist(), recent[recent >= 0].tolist())
        main.fill_(-1)
        recent.fill_(-1)
        self.active[slot], self.dropped[slot] = False, 0
        for c in self.caches:
            c.lengths[slot] = 0
            c.seqlens[slot] = 0
            if c.last_input is not None:
                c.last_input[slot] = 0
        self._sync()

    def _release(self, main, recent):
        for c in self.caches:
            if c.poison:   # what a freed page held must never reach an output
                for pool in (c.k_slc, c.v_slc, c.k_cmp, c.v_cmp):
                    pool[main] = float("nan")
                for pool in (c.k_win, c.v_win, c.k_raw, c.v_raw):
                    pool[recent] = float("nan")
        self._free += main
        self._win_free += recent
        self._dirty = True

    def _take(self, pool, kind, row):
        if not pool:
            raise ValueError(f"out of {kind} pages: sequence {row} needs one more and none is free "
                             f"(free finished sequences, or build the cache with more pages)")
        return pool.pop()

    def reserve(self, rows, lengths, n, keep):
        """Pages for n more tokens after lengths[r] in each of rows, recent pages before the last
        `keep` positions handed back. Taking what a row already holds is a no-op, so every layer
        of a step may ask."""
        ps = self.page_size
        for r in rows:
            L, E = lengths[r], lengths[r] + n
            main, win = self.main[r], self.recent[r]
            first = max(0, L - keep) // ps                     # recent pages still read from here on
            if first < self.dropped[r]:
                raise ValueError(f"sequence {r} is at length {L} in this layer, but a layer sharing its pages "
                                 f"has moved past it and handed back its recent pages before position "
                                 f"{self.dropped[r] * ps}: append the same tokens to every layer in turn")
            self.dropped[r] = max(self.dropped[r], first)
            old = win[:first]
            if bool((old >= 0).any()):
                self._release([], old[old >= 0].tolist())
                old.fill_(-1)
            for j in range(-(-L // ps) if L else 0, -(-E // ps)):
                if main[j] < 0:
                    main[j] = self._take(self._free, "main", r)
                    self._dirty = True
            for j in range(max(first, max(L, E - keep) // ps), -(-E // ps)):   # write() keeps the last `keep`
                if win[j] < 0:
                    win[j] = self._take(self._win_free, "recent", r)
                    self._dirty = True
        self._sync()

    def _sync(self):
        """The tables to the device, when they changed (a decode step mostly changes nothing)."""
        if not self._dirty:
            return
        if self._tables.is_cuda:   # a pinned snapshot: kernels queued before still read the old tables
            snap = torch.empty_like(self._host, pin_memory=True).copy_(self._host)
            self._tables.copy_(snap, non_blocking=True)   # the caching host allocator keeps snap until copied
        else:
            self._tables.copy_(self._host)
        self._dirty = False


class PagedNSACache(CacheRows):
    """One layer's pools of pages. share: another layer's PagedNSACache whose PageTable this one
    uses (the same page and sequence counts and config); allocate() and free() on either then act
    on both."""

    def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int,
                 num_kv_heads: int, head_dim_qk: int, head_dim_v: int, config: NSAConfig = NSAConfig(),
                 num_window_pages: int | None = None, dtype=torch.float32, device="cpu", poison: bool = False,
                 share: "PagedNSACache | None" = None):
        for name, v in (("num_pages", num_pages), ("page_size", page_size), ("max_seqs", max_seqs),
                        ("max_pages_per_seq", max_pages_per_seq)):
            check_int(name, v, 1)
        if page_size % config.sel_block_size or page_size % config.cmp_stride:
            raise ValueError(f"page_size ({page_size}) must be a multiple of sel_block_size "
                             f"({config.sel_block_size}) and of cmp_stride ({config.cmp_stride})")
        self.config, self.page_size, self.batch_size = config, page_size, max_seqs
        self.num_kv_heads, self.head_dim_qk, self.head_dim_v = num_kv_heads, head_dim_qk, head_dim_v
        self.capacity = max_pages_per_seq * page_size
        self.win_span = min(config.window_size, self.capacity)      # what tail("win") returns
        self.raw_span = min(config.cmp_block_size, self.capacity)   # what tail("raw") returns
        self.keep = max(self.win_span, self.raw_span)   # the last positions an append reads again
        per_seq = 2 * (-(-self.keep // page_size) + 1)   # an append holds the pages of the last `keep` before and after it
        num_window_pages = num_window_pages or max_seqs * per_seq
        if share is not None:
            self._check_share(share, torch.empty(0, device=device).device, config, dict(
                num_pages=num_pages, page_size=page_size, max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq,
                num_window_pages=num_window_pages))
            self.table = share.table
        else:
            self.table = PageTable(num_pages, page_size, max_seqs, max_pages_per_seq, num_window_pages, device)
        self.poison = poison
        fill = float("nan") if poison else 0.0
        H, dk, dv = num_kv_heads, head_dim_qk, head_dim_v
        z = lambda n, rows, d: torch.full((n + 1, rows, H, d), fill, dtype=dtype, device=device)   # +1: a scratch page
        self.k_slc, self.v_slc = z(num_pages, page_size, dk), z(num_pages, page_size, dv)
        self.k_cmp, self.v_cmp = (z(num_pages, page_size // config.cmp_stride, d) for d in (dk, dv))
        self.k_win, self.v_win = z(num_window_pages, page_size, dk), z(num_window_pages, page_size, dv)
        self.k_raw, self.v_raw = z(num_window_pages, page_size, dk), z(num_window_pages, page_size, dv)
        self.scratch, self.win_scratch = num_pages, num_window_pages
        self._rows(max_seqs, device)
        self.table.caches.add(self)

    @staticmethod
    def _check_share(share, device, config, sizes):
        if not isinstance(share, PagedNSACache):
            raise TypeError(f"share must be a PagedNSACache, got {type(share).__name__}")
        t = share.table
        for name, mine in sizes.items():   # PageTable keeps each size under the same name
            if mine != getattr(t, name):
                raise ValueError(f"share: {name} {mine} differs from the shared cache's {getattr(t, name)}")
        if share.device != device:
            raise ValueError(f"share: device {device} differs from the shared cache's {share.device}")
        if config != share.config:
            raise ValueError(f"share: config {config} differs from the shared cache's {share.config}")
        if any(t.active):   # this layer's pools would lack what the other layers hold of them
            raise ValueError(f"share: the shared cache already holds sequences (slots "
                             f"{[i for i, a in enumerate(t.active) if a]}); build every layer's cache first")

    @property
    def block_table(self):
        return self.table.block_table

    @property
    def window_table(self):
        return self.table.window_table

    @property
    def active(self):
        return self.table.active

    @property
    def free_pages(self) -> tuple[int, int]:
        """(main, recent) pages not held by any sequence."""
        return self.table.free_pages

    # ------------------------------------------------------------------ sequences
    def allocate(self) -> int:
        """A free sequence slot (a batch row of the layer's `rows`), empty, in every layer that
        shares this cache's pages."""
        return self.table.allocate()

    def free(self, slot: int) -> None:
        """Hand back the sequence's pages and its slot (in every layer sharing them)."""
        self.table.free(slot)

    def reserve(self, rows, n):
        """Pages for n more tokens in each of rows (taken now, unless another layer took them),
        recent pages the rows have moved past handed back; the tables copied to the device."""
        for r in rows:
            if not (0 <= r < self.batch_size and self.active[r]):
                raise ValueError(f"sequence slot {r} is not allocated (allocate() it; a freed slot must be "
                                 f"allocated again)")
            if self.lengths[r] + n > self.capacity:
                raise ValueError(f"cache capacity {self.capacity} exceeded for sequence {r}: length "
                                 f"{self.lengths[r]} + {n} new tokens (max_pages_per_seq x page_size)")
        self.table.reserve(rows, self.lengths, n, self.keep)

    # ------------------------------------------------------------------ the layer's interface
    def check(self, x, rows, hidden):
        """Validate an append of x [len(rows), S, hidden] to sequences `rows`, and take its pages."""
        if x.dim() != 3 or x.shape[-1] != hidden:
            raise ValueError(f"x must be [B, S, {hidden}], got {tuple(x.shape)}")
        if x.shape[0] != len(rows):
            raise ValueError(f"x has batch size {x.shape[0]}, the sequences given are {len(rows)}")
        if len(set(rows)) != len(rows):
            raise ValueError(f"sequences must be distinct, got {list(rows)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise TypeError(f"x is {x.dtype} on {x.device}, the cache {self.dtype} on {self.device}")
        self.reserve(rows, x.shape[1])

    def _pages(self, table, rows_t, pos, scratch):
        """(page, row in page) of positions pos [b, S] of rows rows_t; the scratch page where
        the table has none."""
        page = table[rows_t[:, None], torch.div(pos, self.page_size, rounding_mode="floor")].long()
        return torch.where(page >= 0, page, scratch), pos % self.page_size

    def write(self, rows_t, pos, k_slc, v_slc, k_win, v_win, k_raw, v_raw):
        pg, off = self._pages(self.block_table, rows_t, pos, self.scratch)
        self.k_slc[pg, off], self.v_slc[pg, off] = k_slc, v_slc
        n = min(pos.shape[1], self.keep)   # only these are read again
        pg, off = self._pages(self.window_table, rows_t, pos[:, -n:], self.win_scratch)
        self.k_win[pg, off], self.v_win[pg, off] = k_win[:, -n:], v_win[:, -n:]
        self.k_raw[pg, off], self.v_raw[pg, off] = k_raw[:, -n:], v_raw[:, -n:]

    def tail(self, branch, rows_t, start):
        kb, vb, W = ((self.k_win, self.v_win, self.win_span) if branch == "win"
                     else (self.k_raw, self.v_raw, self.raw_span))
        pos = (start[:, None] - W + torch.arange(W, device=kb.device)).clamp_min(0)
        table = self.window_table[rows_t]
        return from_pages(kb, table, pos), from_pages(vb, table, pos)

    def write_compressed(self, rows_t, index, k, v, valid=None):
        d = self.config.cmp_stride
        pg, off = self._pages(self.block_table, rows_t, index * d, self.scratch)
        if valid is not None:
            pg = torch.where(valid, pg, self.scratch)
        self.k_cmp[pg, off // d], self.v_cmp[pg, off // d] = k.to(self.dtype), v.to(self.dtype)

    def decode_inputs(self, rows_t, all_rows):
        tables = (self.block_table, self.window_table) if all_rows else (self.block_table[rows_t],
                                                                        self.window_table[rows_t])
        return ((self.k_cmp, self.v_cmp, self.k_slc, self.v_slc, self.k_win, self.v_win),
                dict(block_table=tables[0], window_table=tables[1]))

    def extend_inputs(self, rows_t, all_rows, upto):
        """The rows' pages up to position `upto` (past every row's tokens, the new ones included)
        read into contiguous buffers [b, upto rounded up to pages] (positions past a row's length
        read whatever page 0 holds: nsa_extend reads none of them)."""
        table = self.block_table[rows_t]
        n = -(-upto // self.page_size) * self.page_size
        pos = torch.arange(n, device=self.device).expand(rows_t.numel(), -1)
        cpos = torch.arange(n // self.config.cmp_stride, device=self.device).expand(rows_t.numel(), -1)
        return (from_pages(self.k_cmp, table, cpos), from_pages(self.v_cmp, table, cpos),
                from_pages(self.k_slc, table, pos), from_pages(self.v_slc, table, pos))
