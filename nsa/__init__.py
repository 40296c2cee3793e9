"""nsa: Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch, with Triton kernels."""
from .api import (compressed_attention, compressed_cu_seqlens, nsa_attention, nsa_decode, nsa_extend, select_blocks,
                  selected_attention, sliding_window_attention)
from .cache import NSACache
from .config import NSAConfig
from .layer import FullAttention, NativeSparseAttention
from .paged import PagedNSACache

__version__ = "0.1.0"
__all__ = ["NSAConfig", "NSACache", "PagedNSACache", "compressed_attention", "compressed_cu_seqlens",
           "nsa_attention", "nsa_decode", "nsa_extend", "select_blocks", "selected_attention",
           "sliding_window_attention", "NativeSparseAttention", "FullAttention"]
