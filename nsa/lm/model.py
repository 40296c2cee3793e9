"""A small decoder-only language model (RMSNorm, SwiGLU, RoPE, GQA) whose attention is NSA,
full causal attention, or sliding-window-only attention (NSA's window alone: the baseline that
shows the compressed and selected branches earn their keep). Byte-level vocabulary."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..api import sliding_window_attention
from ..config import NSAConfig
from ..graph import DecodeGraph
from ..layer import FullAttention, NativeSparseAttention, RMSNorm, token_shift
from ..reference import compute_dtype

ATTENTIONS = ("nsa", "full", "window")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    n_layer: int = 4
    hidden: int = 256
    n_head: int = 8
    n_kv_head: int = 2
    head_dim: int = 32
    attention: str = "nsa"
    nsa: NSAConfig = field(default_factory=NSAConfig)
    rope_theta: float = 10000.0
    token_shift: bool = True     # attention input += a learned per-channel share of the previous one
    mlp_hidden: int = 0          # SwiGLU inner width (0: 8/3 hidden rounded up to a multiple of 64)

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    def replace(self, **kw) -> "ModelConfig":
        d = {**asdict(self), "nsa": self.nsa, **kw}
        return ModelConfig(**d)


# tiny: trains on a 2-core CPU in minutes (NSA sizes scaled down so that T=512 is sparse);
# small: ~100M parameters for one GPU, paper NSA sizes; recall: 5M parameters, paper NSA sizes,
# for the spread-recall experiment (nsa compare --preset recall).
PRESETS = {
    "tiny": ModelConfig(n_layer=2, hidden=128, n_head=4, n_kv_head=2, head_dim=32,
                        nsa=NSAConfig(cmp_block_size=16, cmp_stride=8, sel_block_size=32,
                                      sel_block_count=4, window_size=64)),
    "small": ModelConfig(n_layer=14, hidden=768, n_head=16, n_kv_head=1, head_dim=64,
                         nsa=NSAConfig()),
    "recall": ModelConfig(n_layer=4, hidden=256, n_head=8, n_kv_head=2, head_dim=64, nsa=NSAConfig()),
}


def autocast(device):
    """bf16 autocast on GPU (training and evaluation alike), nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def mlp_width(cfg: ModelConfig) -> int:
    return cfg.mlp_hidden or 64 * ((8 * cfg.hidden // 3 + 63) // 64)


def num_params(cfg: ModelConfig) -> int:
    """Parameters of LanguageModel(cfg), without building it."""
    with torch.device("meta"):
        return LanguageModel(cfg).num_params()


def matched(cfg: ModelConfig, params: int) -> ModelConfig:
    """cfg with the SwiGLU width (a multiple of 8) that brings its parameter count nearest to
    params: how `nsa compare` gives the full and window-only twins NSA's size (NSA's branch
    projections, compressors and gates are extra parameters the other attentions lack)."""
    per_unit = 3 * cfg.hidden * cfg.n_layer          # gate_up (2 hidden) + down (hidden) per unit of width
    inner = mlp_width(cfg) + (params - num_params(cfg)) / per_unit
    return cfg.replace(mlp_hidden=max(8, 8 * round(inner / 8)))


class SwiGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(g) * u)


class WindowAttention(FullAttention):
    """Sliding-window-only attention (window = NSA's window_size), FullAttention's projections."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x, cu_seqlens=None):
        self._check_input(x, cu_seqlens)
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cu_seqlens)
        o = sliding_window_attention(q, k, v, window_size=self.config.window_size,
                                     cu_seqlens=cu_seqlens, backend=self.backend)
        return self.o_proj(o.reshape(B, T, -1))


_ATTN = {"nsa": NativeSparseAttention, "full": FullAttention, "window": WindowAttention}


class Block(nn.Module):
    """Pre-norm block. With cfg.token_shift, the attention input at position t is
    h_t + s * h_{t-1} (s a learned per-channel weight, starting at 0.5; h_{-1} = 0): every key
    also describes the token before it (Olsson et al. 2022's "smeared keys"), so a lookup such as
    "the byte after this marker" is one attention step instead of two composed layers. The same
    in all three attentions; it shortened the copy-task plateau of the tiny model ~3x. With a
    cache, each row's last input of the previous call is the first position's previous one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden), RMSNorm(cfg.hidden)
        self.attn = _ATTN[cfg.attention](cfg.hidden, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.head_dim,
                                         config=cfg.nsa, rope_theta=cfg.rope_theta)
        self.mlp = SwiGLU(cfg.hidden, mlp_width(cfg))
        self.shift = nn.Parameter(torch.full((cfg.hidden,), 0.5)) if cfg.token_shift else None

    def forward(self, x, cache=None):
        h = self.norm1(x)
        h = h if self.shift is None else token_shift(h, self.shift, cache=cache)
        x = x + (self.attn(h) if cache is None else self.attn(h, cache=cache))
        return x + self.mlp(self.norm2(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden)
        nn.init.normal_(self.embed.weight, std=0.02)
        for b in self.blocks:   # residual branches start small (GPT-2 style): stable from scratch
            for lin in (b.attn.o_proj, b.mlp.down):
                nn.init.normal_(lin.weight, std=0.02 / (2 * cfg.n_layer) ** 0.5)
            nn.init.normal_(b.mlp.gate_up.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, caches=None):
        """idx [B, T] int64 -> logits [B, T, V] (targets given: (logits, mean cross-entropy)).
        caches (NSA models): one NSACache per layer; idx is appended after what they hold."""
        x = self.embed(idx)
        for i, b in enumerate(self.blocks):
            x = b(x, None if caches is None else caches[i])
        logits = F.linear(self.norm(x), self.embed.weight)   # tied embeddings
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.to(compute_dtype(logits.dtype)).flatten(0, 1), targets.flatten())


def _sample(logits, temperature, top_p, generator):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:   # nucleus: the smallest set of tokens whose mass reaches top_p
        p, order = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p > top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LanguageModel, prompt, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, generator=None, use_cache: bool = True, cuda_graph: bool | None = None):
    """prompt [B, P] int64 -> [B, P + max_new_tokens]. Greedy when temperature is 0. An NSA
    model decodes with one NSACache per layer (prefill once, then a token a step); other
    attentions (and use_cache=False) recompute the whole prefix every step. cuda_graph (default:
    on when the cached decode step can be captured: CUDA, the Triton backend): the decode step of the whole model is captured once and replayed
    (nsa.graph.DecodeGraph): the host launches one graph a token instead of every kernel."""
    model.eval()
    out = prompt
    caches = None
    if use_cache and model.cfg.attention == "nsa":
        cap = prompt.shape[1] + max_new_tokens
        caches = [b.attn.new_cache(prompt.shape[0], cap) for b in model.blocks]
    capturable = caches is not None and all(b.attn.decode_capturable(prompt) for b in model.blocks)
    if cuda_graph is None:
        cuda_graph = capturable
    if cuda_graph and not capturable:
        raise ValueError("cuda_graph needs the cached NSA decode path on CUDA with the Triton backend "
                         "(an NSA model, use_cache=True)")
    step = (lambda tok: model(tok, caches=caches)[:, -1]) if caches else None
    logits = model(prompt, caches=caches)[:, -1]
    for i in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_p, generator)
        out = torch.cat([out, nxt[:, None]], 1)
        if i == max_new_tokens - 1:
            break
        if caches is None:
            logits = model(out)[:, -1]
        elif cuda_graph and i == 1:   # step 0 ran eagerly (kernels compiled): capture from here
            step = DecodeGraph(step, caches, nxt[:, None])
            logits = step(nxt[:, None])
        else:
            logits = step(nxt[:, None])
    return out
