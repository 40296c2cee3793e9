"""NSALMModel / NSALMForCausalLM: a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA) whose
attention layers are nsa.NativeSparseAttention, with the transformers API around it.

Padding (attention_mask): each row's tokens whose mask is 1 form one sequence with positions
0..n-1, padding removed (the rows are packed and run as variable-length sequences), so a
padded row computes exactly what it computes alone; padded positions output zeros. NSA's blocks
are fixed by position, which is why padding cannot simply be masked out as in dense attention.
"""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layer import BlockCompressor, NativeSparseAttention, RMSNorm, token_shift
from .cache import NSALMCache
from .configuration import NSALMConfig

# transformers renamed the cache argument and output field past_key_values -> cache (5.24);
# forward takes both names, outputs use the installed version's
_CACHE = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"


NSALMRMSNorm = RMSNorm   # nsa.layer.RMSNorm, under the name transformers code expects here


class NSALMMLP(nn.Module):
    def __init__(self, config: NSALMConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=b), nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NSALMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NSALMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = NSALMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = NativeSparseAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.v_head_dim, config=config.nsa_config, rope_theta=config.rope_theta,
            backend=config.nsa_backend, qkv_bias=config.attention_bias, o_bias=config.o_bias)
        self.post_attention_layernorm = NSALMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = NSALMMLP(config)
        self.token_shift = nn.Parameter(torch.full((config.hidden_size,), 0.5)) if config.token_shift else None

    def forward(self, hidden_states, cu_seqlens=None, state=None, rows=None):
        h = self.input_layernorm(hidden_states)
        if self.token_shift is not None:
            h = token_shift(h, self.token_shift, cu_seqlens, state, rows)
        if state is None:
            a = self.self_attn(h, cu_seqlens=cu_seqlens)
        else:
            a = self.self_attn(h, cache=state, rows=rows)
        x = hidden_states + a
        return x + self.mlp(self.post_attention_layernorm(x))


class NSALMPreTrainedModel(PreTrainedModel):
    config_class = NSALMConfig
    config: NSALMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NSALMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # generate must not hand us a DynamicCache: the model makes its NSALMCache

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, NSALMRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, NSALMDecoderLayer) and module.token_shift is not None:
            module.token_shift.fill_(0.5)
        if isinstance(module, BlockCompressor):   # phi starts as mean pooling (its last layer at 0)
            module.pos_emb.zero_()
            module.mlp[2].weight.zero_()
            module.mlp[2].bias.zero_()


def _check_kwargs(kwargs, what):
    """generate and Trainer pass these; anything else given a value is refused, not ignored."""
    known = {"return_dict", "output_hidden_states", "num_items_in_batch", "output_attentions", "cache_position"}
    bad = sorted(k for k, v in kwargs.items() if v is not None and k not in known)
    if bad:
        raise TypeError(f"{what} got unsupported argument(s) {bad}")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not supported: NSA forms no attention matrix")


def _one_cache(past_key_values, cache):
    if past_key_values is not None and cache is not None:
        raise ValueError("give the cache as past_key_values or as cache, not both")
    return cache if cache is not None else past_key_values


class NSALMModel(NSALMPreTrainedModel):
    def __init__(self, config: NSALMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(NSALMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = NSALMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, cache=None, **kwargs):
        """past_key_values (or cache, transformers' newer name): an NSALMCache to append to."""
        _check_kwargs(kwargs, type(self).__name__)
        past_key_values = _one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        cache = self._cache(past_key_values, use_cache)
        mask = self._new_token_mask(attention_mask, B, S, cache)
        hidden = [] if output_hidden_states or (output_hidden_states is None and self.config.output_hidden_states) \
            else None
        if cache is None:
            x = self._run(x, mask, hidden)
        else:
            x = self._run_cached(x, mask, cache)
            cache.seen_tokens += S
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        out = BaseModelOutputWithPast(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None,
                                      **{_CACHE: cache})
        return out if return_dict is not False else out.to_tuple()

    def _cache(self, past, use_cache):
        """The NSALMCache this call fills: the one given, or a new one when use_cache. A cache is
        filled under torch.no_grad() (generate does so); training forwards keep none."""
        if past is not None and not isinstance(past, NSALMCache):
            raise TypeError(f"past_key_values must be an NSALMCache (or None), got {type(past).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not torch.is_grad_enabled()
        if past is None and not use_cache:
            return None
        if torch.is_grad_enabled():
            raise ValueError("the NSA cache is filled for inference: call under torch.no_grad() (or use_cache=False)")
        return past if past is not None else NSALMCache(self.config)

    @staticmethod
    def _new_token_mask(mask, B, S, cache):
        """The 0/1 mask of this call's S tokens ([B, S] bool), None when all are kept."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("attention_mask must be a 2-D [batch, length] 0/1 padding mask; NSA takes no "
                             f"custom 4-D masks (got {tuple(getattr(mask, 'shape', ()))})")
        past = cache.seen_tokens if cache is not None else 0
        if mask.shape[0] != B or mask.shape[1] not in (S, past + S):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected [{B}, {S}] or "
                             f"[{B}, {past + S}] (past + new tokens)")
        new = mask[:, -S:]
        bad, full = torch.stack([((mask != 0) & (mask != 1)).any(), (new == 1).all()]).tolist()   # one sync
        if bad:
            raise ValueError("attention_mask must hold only 0 and 1")
        return None if full else new.bool()

    def _run(self, x, mask, hidden):
        cu = None
        if mask is not None:   # pack the kept tokens: one variable-length sequence per row
            B, S, D = x.shape
            keep = mask.flatten()
            lengths = mask.sum(1)
            cu = F.pad(lengths[lengths > 0].cumsum(0), (1, 0)).to(torch.int32)   # empty rows hold no sequence
            packed = x.reshape(B * S, D)[keep][None]
        h = x if mask is None else packed
        for layer in self.layers:
            if hidden is not None:
                hidden.append(h if mask is None else self._unpack(h, keep, x))
            h = layer(h, cu)
        return h if mask is None else self._unpack(h, keep, x)

    @staticmethod
    def _unpack(h, keep, like):
        out = like.new_zeros(like.shape[0] * like.shape[1], h.shape[-1])
        out[keep] = h[0]
        return out.view(*like.shape[:2], h.shape[-1])

    def _run_cached(self, x, mask, cache):
        """Append each row's kept tokens to its cache rows and attend. Rows with the same number
        of kept tokens run together (the whole batch at once when nothing is padded)."""
        B, S, _ = x.shape
        n = [S] * B if mask is None else mask.sum(1).tolist()
        states = cache.states([layer.self_attn for layer in self.layers], B, n, x.dtype, x.device)
        if mask is None and S == 1:   # decoding: a CUDA graph of all layers on a GPU
            capturable = all(layer.self_attn.decode_capturable(x) for layer in self.layers)
            return cache.decode(lambda h: self._through_layers(h, states, None), x, states, capturable)
        if mask is None:
            return self._through_layers(x, states, None)
        out = x.new_zeros(x.shape)
        groups = {}
        for r, k in enumerate(n):
            if k:
                groups.setdefault(k, []).append(r)
        for rows in groups.values():
            h = self._through_layers(torch.stack([x[r][mask[r]] for r in rows]), states, rows)
            for i, r in enumerate(rows):
                out[r, mask[r]] = h[i]
        return out

    def _through_layers(self, h, states, rows):
        for layer, state in zip(self.layers, states):
            h = layer(h, state=state, rows=rows)
        return h


class NSALMForCausalLM(NSALMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NSALMConfig):
        super().__init__(config)
        self.model = NSALMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=None,
                return_dict=None, cache=None, **kwargs):
        """labels [B, T] (shifted inside; -100 ignored) give the mean next-token cross-entropy.
        logits_to_keep: an int k keeps the last k positions' logits (0: all), a tensor the
        positions it lists."""
        _check_kwargs(kwargs, type(self).__name__)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=_one_cache(past_key_values, cache), inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{_CACHE: getattr(out, _CACHE)})
        return result if return_dict is not False else result.to_tuple()
