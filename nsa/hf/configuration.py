"""NSALMConfig: a Llama-style decoder whose attention layers are NativeSparseAttention."""
from __future__ import annotations

from transformers import PreTrainedConfig

from ..config import NSAConfig

# the NSAConfig fields, under their names in this config (docs/semantics.md §1)
NSA_FIELDS = ("cmp_block_size", "cmp_stride", "sel_block_size", "sel_block_count", "sel_init_blocks",
              "sel_local_blocks", "window_size")


class NSALMConfig(PreTrainedConfig):
    """The usual decoder fields (Llama's names and meanings) plus NSA's sparsity settings.

    head_dim (query/key width) defaults to hidden_size // num_attention_heads, v_head_dim to
    head_dim. attention_bias gives q and every branch's k/v projection a bias (Qwen2-style),
    o_bias the output projection. token_shift adds a learned per-channel share of the previous
    position's attention input (the `nsa train` models use it; dense models converted with
    convert_from_dense do not). nsa_backend picks the kernels: "auto", "triton" or "torch".
    """

    model_type = "nsa_lm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    v_head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    token_shift: bool = False
    cmp_block_size: int = 32
    cmp_stride: int = 16
    sel_block_size: int = 64
    sel_block_count: int = 16
    sel_init_blocks: int = 1
    sel_local_blocks: int = 2
    window_size: int = 512
    nsa_backend: str = "auto"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU MLP), got {self.hidden_act!r}")
        if self.nsa_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"nsa_backend must be 'auto', 'triton' or 'torch', got {self.nsa_backend!r}")
        self.nsa_config  # validates the sparsity settings now, not at the first forward
        super().__post_init__(**kwargs)

    @property
    def nsa_config(self) -> NSAConfig:
        return NSAConfig(**{f: getattr(self, f) for f in NSA_FIELDS})
