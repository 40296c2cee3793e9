"""NSALMCache: a transformers Cache whose layers hold NSA's decoding state (nsa.NSACache).

Each layer keeps the selection branch's K/V (every position), the window ring, the compression
ring and the compressed tokens; NativeSparseAttention appends to them itself (the decode kernels
for one token a step, the training kernels for a prompt), so the key/value `update` interface of
other caches does not apply. The buffers are allocated at the first forward (batch size, dtype
and device from the input) and double when a row outgrows them, up to max_cache_len.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import NSACache
from ..graph import DecodeGraph


class NSALMCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.state: NSACache | None = None

    def _no_kv(self, *args, **kwargs):
        raise TypeError("an NSA layer fills its cache itself (NativeSparseAttention with cache=...); "
                        "it takes no key/value updates")

    lazy_initialization = update = _no_kv

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise TypeError("NSA layers build no attention mask from the cache (their sparsity is not a mask)")

    def get_seq_length(self) -> int:
        return max(self.state.lengths) if self.state is not None else 0

    def get_max_length(self) -> int:
        return self.state.capacity if self.state is not None else -1

    @property
    def batch_size(self) -> int:
        return self.state.batch_size if self.state is not None else -1

    def reset(self) -> None:
        if self.state is not None:
            self.state.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state.select_rows(torch.arange(self.state.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an NSA cache cannot be cropped: its compressed tokens and rings hold no "
                                  "earlier state (assisted or speculative decoding is not supported)")


class NSALMCache(Cache):
    """The cache of an NSALMForCausalLM: one NSACache per layer.

    get_seq_length() is the number of input columns seen (padding included, as generate counts
    them); each row's own token count is in `layers[i].state.lengths`. max_cache_len (default:
    config.max_position_embeddings) bounds every row's length; a longer input is an error.
    cuda_graph: decode steps of all rows replay one CUDA graph of all layers on a GPU (decode).
    """

    def __init__(self, config, max_cache_len: int | None = None, cuda_graph: bool = True):
        super().__init__(layers=[NSALMCacheLayer() for _ in range(config.num_hidden_layers)])
        self.capacity = int(max_cache_len or config.max_position_embeddings)
        self.seen_tokens = 0
        self.cuda_graph = cuda_graph
        self._graph: DecodeGraph | None = None
        self._eager_steps = 0

    def decode(self, run, h, states: list[NSACache], capturable: bool):
        """run(h): one token for every row through all layers. With cuda_graph and a capturable
        step (CUDA, the Triton backend), it is replayed from a CUDA graph (nsa.graph.DecodeGraph):
        captured at the second step of a shape (the first, eager, compiles the kernels) and again
        after the buffers grow."""
        if not (self.cuda_graph and capturable):
            return run(h)
        if self._graph is not None and self._graph.matches(h):
            return self._graph(h)
        self._graph = None
        if self._eager_steps == 0:
            self._eager_steps = 1
            return run(h)
        self._eager_steps = 0
        self._graph = DecodeGraph(run, states, h)
        return self._graph(h)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)

    def reset(self):
        super().reset()
        self.seen_tokens = 0
        self._graph = None

    def states(self, attentions, batch_size: int, new_tokens: list[int], dtype, device) -> list[NSACache]:
        """Each layer's NSACache, allocated (first call) or grown so that every row r can take
        new_tokens[r] more tokens. attentions: the model's NativeSparseAttention layers."""
        first = self.layers[0].state
        if first is not None and first.batch_size != batch_size:
            raise ValueError(f"past_key_values holds {first.batch_size} rows, the input has {batch_size}")
        held = first.lengths if first is not None else [0] * batch_size
        need = max(h + n for h, n in zip(held, new_tokens))
        if need > self.capacity:
            raise ValueError(f"a row would hold {need} tokens, past the cache's capacity ("
                             f"{self.capacity} tokens: max_cache_len, config.max_position_embeddings unless given)")
        out = []
        for layer, attn in zip(self.layers, attentions):
            if layer.state is None:
                layer.state = attn.new_cache(batch_size, need, dtype=dtype, device=device)
            elif need > layer.state.capacity:   # double: appends one token at a time stay cheap
                layer.state.grow(min(self.capacity, max(need, 2 * layer.state.capacity)))
            out.append(layer.state)
        return out
