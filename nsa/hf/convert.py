"""NSA models from other weights: a dense Llama / Qwen2 / Mistral causal LM (convert_from_dense)
or a model trained by `nsa train` (from_trainer_checkpoint, behind `nsa export`)."""
from __future__ import annotations

import math
import warnings

import torch

from ..config import NSAConfig
from .configuration import NSA_FIELDS, NSALMConfig
from .modeling import NSALMForCausalLM

DENSE_TYPES = ("llama", "qwen2", "mistral")


def _rope_theta(cfg) -> float:
    """The dense model's RoPE base; only plain RoPE maps onto NSA's rotary embedding."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"rope type {kind!r} cannot be converted: NSA layers use plain RoPE (rope_type 'default')")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ValueError("the dense config gives no rope_theta")
    return float(theta)


def _kv_weight(k, v, heads):
    """Per head, the k rows then the v rows: the layout of NSA's branch projections
    ([heads * (dk + dv), in], viewed as [heads, dk + dv] per token)."""
    return torch.cat([k.reshape(heads, -1, *k.shape[1:]), v.reshape(heads, -1, *v.shape[1:])], 1).flatten(0, 1)


@torch.no_grad()
def convert_from_dense(model, nsa_config: NSAConfig | None = None, gate_init=(0.05, 0.475, 0.475),
                       max_position_embeddings: int | None = None):
    """An NSALMForCausalLM with the dense causal LM's weights: embeddings, norms, MLPs, q and o
    projections copied; every branch's k/v projection (compression, selection, window) a copy
    of the dense k/v; the compression MLP at mean pooling (its last layer and the position
    embedding zero); the gates constant at gate_init = (compression, selection, window)
    probabilities (weights 0, biases their logits). With the defaults, up to T = n * l' = 1024
    tokens the selection and up to w = 512 the window see exactly what dense attention sees, so
    the converted model starts at 0.95 dense + 0.05 compression there.
    The dense model's own sliding window (Mistral, Qwen2), if any, is not carried over (a
    warning says so). max_position_embeddings (default: the dense model's) bounds the length
    the converted model's cache takes: raise it for continued pretraining to long context."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in DENSE_TYPES or not hasattr(model, "model"):
        raise ValueError(f"convert_from_dense takes a causal LM of type {DENSE_TYPES}, got "
                         f"{type(model).__name__} (model_type {getattr(cfg, 'model_type', None)!r})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (SwiGLU with silu only)")
    if len(gate_init) != 3 or not all(0 < g < 1 for g in gate_init):
        raise ValueError(f"gate_init must be three probabilities strictly between 0 and 1, got {gate_init}")
    nsa_config = nsa_config or NSAConfig()
    if not isinstance(nsa_config, NSAConfig):
        raise TypeError(f"nsa_config must be an NSAConfig, got {type(nsa_config).__name__}")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        warnings.warn(f"the dense model's sliding window ({window}) is not carried over: the NSA layers attend "
                      f"every position through their branches (window_size {nsa_config.window_size})", stacklevel=2)
    src = model.model
    a0, m0 = src.layers[0].self_attn, src.layers[0].mlp
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    new_cfg = NSALMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, v_head_dim=head_dim,
        max_position_embeddings=max_position_embeddings or cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=_rope_theta(cfg), tie_word_embeddings=bool(cfg.tie_word_embeddings),
        attention_bias=a0.q_proj.bias is not None, o_bias=a0.o_proj.bias is not None,
        mlp_bias=m0.gate_proj.bias is not None, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, **{f: getattr(nsa_config, f) for f in NSA_FIELDS})
    p = next(model.parameters())
    out = NSALMForCausalLM(new_cfg).to(dtype=p.dtype, device=p.device)
    dst = out.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    if not new_cfg.tie_word_embeddings:
        out.lm_head.weight.copy_(model.lm_head.weight)
    gate_bias = torch.tensor([math.log(g / (1 - g)) for g in gate_init]).repeat(heads)
    for s, d in zip(src.layers, dst.layers):
        d.input_layernorm.weight.copy_(s.input_layernorm.weight)
        d.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(d.mlp, name).load_state_dict(getattr(s.mlp, name).state_dict())
        sa, da = s.self_attn, d.self_attn
        da.q_proj.load_state_dict(sa.q_proj.state_dict())
        da.o_proj.load_state_dict(sa.o_proj.state_dict())
        for proj in (da.cmp_proj, da.slc_proj, da.win_proj):
            proj.weight.copy_(_kv_weight(sa.k_proj.weight, sa.v_proj.weight, kv_heads))
            if proj.bias is not None:
                proj.bias.copy_(_kv_weight(sa.k_proj.bias, sa.v_proj.bias, kv_heads))
        da.gate_proj.weight.zero_()
        da.gate_proj.bias.copy_(gate_bias)
    return out


def _trainer_config(model_cfg: dict, state: dict) -> NSALMConfig:
    n = model_cfg["nsa"]
    inner = state["blocks.0.mlp.gate_up.weight"].shape[0] // 2
    return NSALMConfig(
        vocab_size=model_cfg["vocab_size"], hidden_size=model_cfg["hidden"], intermediate_size=inner,
        num_hidden_layers=model_cfg["n_layer"], num_attention_heads=model_cfg["n_head"],
        num_key_value_heads=model_cfg["n_kv_head"], head_dim=model_cfg["head_dim"], v_head_dim=model_cfg["head_dim"],
        rope_theta=float(model_cfg["rope_theta"]), rms_norm_eps=1e-6, tie_word_embeddings=True,
        token_shift=bool(model_cfg.get("token_shift", False)), **{f: n[f] for f in NSA_FIELDS})


@torch.no_grad()
def from_trainer_checkpoint(state: dict, model_cfg: dict) -> NSALMForCausalLM:
    """The NSALMForCausalLM that computes what an `nsa train` NSA model computes: state is the
    checkpoint's "model" state dict, model_cfg its "model_cfg" (nsa.lm.model.ModelConfig as a
    dict). Tied embeddings, RMSNorm eps 1e-6, the fused gate/up projection split in two."""
    if model_cfg.get("attention") != "nsa":
        raise ValueError(f"only NSA models export to nsa_lm; this checkpoint's attention is "
                         f"{model_cfg.get('attention')!r} (the full and window twins are baselines)")
    cfg = _trainer_config(model_cfg, state)
    out = NSALMForCausalLM(cfg)
    new = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["embed.weight"]}
    inner = cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        s, d = f"blocks.{i}.", f"model.layers.{i}."
        new[d + "input_layernorm.weight"] = state[s + "norm1.weight"]
        new[d + "post_attention_layernorm.weight"] = state[s + "norm2.weight"]
        gate_up = state[s + "mlp.gate_up.weight"]
        new[d + "mlp.gate_proj.weight"], new[d + "mlp.up_proj.weight"] = gate_up[:inner], gate_up[inner:]
        new[d + "mlp.down_proj.weight"] = state[s + "mlp.down.weight"]
        if cfg.token_shift:
            new[d + "token_shift"] = state[s + "shift"]
        for k, v in state.items():
            if k.startswith(s + "attn."):
                new[d + "self_attn." + k[len(s + "attn."):]] = v
    missing, unexpected = out.load_state_dict(new, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match an nsa_lm model: missing {missing}, unexpected {unexpected}")
    return out
