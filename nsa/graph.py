"""DecodeGraph: a whole model's decode step over NSACaches, captured once in a CUDA graph and
replayed a token at a time.

Launched from Python, a decode step costs the host ~0.2 ms per layer (projections, the four
decode kernels, the cache writes), so a model of many layers decodes host-bound. An append of
every row of an NSACache reads no host value (positions, the ring slots and whether a block of
keys completed are computed from `seqlens` on the device), so the step can be captured whole and
replayed: one launch per token. The host half of the bookkeeping (each cache's `lengths`, the
capacity check) is done here on every replay.
"""
from __future__ import annotations

import torch

from .cache import NSACache


class DecodeGraph:
    """step(tokens) -> outputs, captured once; tokens a [B, 1] tensor like `example`.

    `step` must append exactly one token to every row of every cache in `caches` (a model's
    forward with its caches) and must have run once eagerly at this shape (kernels compiled).
    Calling the DecodeGraph copies the tokens into the graph's input, replays it, advances every
    cache's host lengths, and returns the graph's outputs: the same tensors each call,
    overwritten by the next. A cache reallocated after the capture (grow, select_rows) or a row
    at capacity is an error, not a silent read of freed memory."""

    def __init__(self, step, caches: list[NSACache], example: torch.Tensor):
        if not example.is_cuda:
            raise ValueError(f"DecodeGraph needs CUDA tensors, got {example.device}")
        if not caches:
            raise ValueError("DecodeGraph needs the caches the step appends to")
        self.caches = list(caches)
        self._rows = [list(range(c.batch_size)) for c in self.caches]   # a paged cache: every slot allocated
        self._buffers = self._pointers()
        for c, rows in zip(self.caches, self._rows):   # pages taken before the capture: none during it
            c.reserve(rows, 1)
        self.tokens = example.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(self.tokens)
        for c, rows in zip(self.caches, self._rows):   # the capture ran the host half once: undo it
            c.advance_host(rows, -1)

    def _pointers(self):
        return [(c.k_slc.data_ptr(), c.k_cmp.data_ptr(), c.seqlens.data_ptr(), c.batch_size) for c in self.caches]

    def matches(self, tokens: torch.Tensor) -> bool:
        """Whether a call with these tokens replays what was captured (same shape and dtype, the
        caches' buffers still those of the capture)."""
        return (tokens.shape == self.tokens.shape and tokens.dtype == self.tokens.dtype
                and self._pointers() == self._buffers)

    def __call__(self, tokens: torch.Tensor):
        if tokens.shape != self.tokens.shape or tokens.dtype != self.tokens.dtype:
            raise ValueError(f"tokens must be {self.tokens.dtype} of shape {tuple(self.tokens.shape)} (the "
                             f"captured step's), got {tokens.dtype} {tuple(tokens.shape)}")
        if self._pointers() != self._buffers:
            raise RuntimeError("a cache was reallocated (grow, select_rows) after the decode step was "
                               "captured: capture it again")
        for c, rows in zip(self.caches, self._rows):
            c.reserve(rows, 1)   # the capacity check (a paged cache also takes its pages here)
        self.tokens.copy_(tokens)
        self.graph.replay()
        for c, rows in zip(self.caches, self._rows):
            c.advance_host(rows, 1)
        return self.outputs
