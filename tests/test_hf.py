"""nsa.hf: the transformers API around NSA models (tiny configs built here, nothing downloaded)."""
import math

import pytest
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Trainer, TrainingArguments)

import nsa.hf as H
from nsa import NSAConfig
from nsa.lm.cli import main as cli
from nsa.lm.model import PRESETS, LanguageModel, generate

# token 0 is the pad id of every generate call: prompts draw from 1..V-1 (generate masks pad ids out)
# small blocks so that 40-80 tokens select, compress and slide: l=8, d=4, l'=8, n=3, w=16
SPARSE = dict(cmp_block_size=8, cmp_stride=4, sel_block_size=8, sel_block_count=3, window_size=16)


def tiny_config(**kw):
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **SPARSE)
    return H.NSALMConfig(**{**base, **kw})


def tiny_model(seed=0, **kw):
    """A float64 model with every weight random (the compression MLP, gates and shifts included,
    so no branch hides behind a zero initialisation)."""
    torch.manual_seed(seed)
    m = H.NSALMForCausalLM(tiny_config(**kw)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def greedy_by_forwards(model, ids, n):
    """n greedy tokens from full parallel forwards (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


def test_auto_classes_build_and_reload_nsa_lm(tmp_path):
    assert isinstance(AutoConfig.for_model("nsa_lm"), H.NSALMConfig)
    small = tiny_config()
    assert type(AutoModel.from_config(small)) is H.NSALMModel
    assert type(AutoModelForCausalLM.from_config(small)) is H.NSALMForCausalLM
    small.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, H.NSALMConfig) and back.nsa_config == NSAConfig(**SPARSE)


def test_config_rejects_bad_settings_when_built():
    with pytest.raises(ValueError, match="cmp_stride"):
        tiny_config(cmp_stride=3)
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_config(hidden_act="gelu")
    with pytest.raises(ValueError, match="nsa_backend"):
        tiny_config(nsa_backend="cuda")


def test_labels_give_the_shifted_cross_entropy_and_every_weight_a_gradient():
    m = tiny_model().train()
    ids = torch.randint(1, 61, (2, 40))
    labels = ids.clone()
    labels[:, :5] = -100
    out = m(input_ids=ids, labels=labels)
    # transformers' causal-LM loss runs in float32 whatever the model's dtype
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    assert out.past_key_values is None   # training forwards keep no cache
    out.loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "compress" in n or "gate_proj" in n)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = torch.randint(1, 61, (2, 40))
    grads = []
    for ckpt in (False, True):
        m = tiny_model().train()
        if ckpt:
            m.gradient_checkpointing_enable()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_reload_bit_exact(tmp_path, tied):
    m = tiny_model(tie_word_embeddings=tied, token_shift=True)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(1, 61, (2, 33))
    assert torch.equal(m(input_ids=ids, use_cache=False).logits, back(input_ids=ids, use_cache=False).logits)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("token_shift", [False, True])
def test_greedy_generate_with_the_cache_equals_argmax_of_parallel_forwards(token_shift):
    m = tiny_model(token_shift=token_shift)
    ids = torch.randint(1, 61, (2, 21))   # the 30 new tokens cross blocks, the window and the capacity doubling
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_forwards(m, ids, 30))


def test_sampling_through_the_cache_is_seeded_and_top_k_1_is_greedy():
    m = tiny_model()
    ids = torch.randint(1, 61, (2, 19))
    with torch.no_grad():
        runs = []
        for _ in range(2):
            torch.manual_seed(5)
            runs.append(m.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, pad_token_id=0))
        top1 = m.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, pad_token_id=0)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(top1, greedy_by_forwards(m, ids, 12))


def test_past_key_values_carry_over_to_the_next_generate_call():
    m = tiny_model(token_shift=True)
    ids = torch.randint(1, 61, (2, 18))
    with torch.no_grad():
        first = m.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert isinstance(first.past_key_values, H.NSALMCache)
        turn = torch.cat([first.sequences, torch.randint(1, 61, (2, 13))], 1)   # a second turn of 13 tokens
        again = m.generate(turn, past_key_values=first.past_key_values, max_new_tokens=9, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(again, greedy_by_forwards(m, turn, 9))


def test_left_padded_batch_generates_as_each_row_alone():
    m = tiny_model(token_shift=True)
    lengths = [23, 9, 16]
    rows = [torch.randint(1, 61, (n,)) for n in lengths]
    P = max(lengths)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):], mask[i, P - len(r):] = r, 1
    with torch.no_grad():
        batch = m.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
        for i, r in enumerate(rows):
            alone = m.generate(r[None], max_new_tokens=20, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[i, P:], alone[0, len(r):]), f"row {i}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_equals_each_row_alone(side):
    m = tiny_model(token_shift=True)
    lengths = [30, 0, 11]
    P = max(lengths)
    ids = torch.randint(1, 61, (len(lengths), P))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        sl = slice(P - n, P) if side == "left" else slice(0, n)
        mask[i, sl] = 1
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for i, n in enumerate(lengths):
            if n:
                alone = m(input_ids=ids[i][mask[i].bool()][None], use_cache=False).logits[0]
                torch.testing.assert_close(logits[i][mask[i].bool()], alone, rtol=1e-12, atol=1e-12)


def test_beam_search_with_the_cache_equals_beam_search_without():
    m = tiny_model()
    ids = torch.randint(1, 61, (2, 17))
    with torch.no_grad():
        a = m.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0)
        b = m.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(a, b)


def test_trainer_runs_two_steps(tmp_path):
    torch.manual_seed(0)
    m = H.NSALMForCausalLM(tiny_config())
    before = [p.detach().clone() for p in m.parameters()]
    data = [{"input_ids": x, "labels": x} for x in torch.randint(1, 61, (8, 40))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-2)
    result = Trainer(model=m, args=args, train_dataset=data).train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


DENSE = [(LlamaConfig, LlamaForCausalLM, {}), (Qwen2Config, Qwen2ForCausalLM, {}),
         (MistralConfig, MistralForCausalLM, {"sliding_window": None})]


def dense_model(config_cls, model_cls, extra, seed=0):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, **extra)
    m = model_cls(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)   # biases (Qwen2's q/k/v) nonzero too
    return m


@pytest.mark.parametrize("config_cls,model_cls,extra", DENSE, ids=["llama", "qwen2", "mistral"])
def test_converted_model_with_window_gate_only_equals_the_dense_model(config_cls, model_cls, extra):
    dense = dense_model(config_cls, model_cls, extra)
    T = 48
    conv = H.convert_from_dense(dense, NSAConfig(**{**SPARSE, "window_size": T})).eval()
    with torch.no_grad():
        for layer in conv.model.layers:   # gates forced to (0, 0, 1): sigmoid(-+1e4) is 0 / 1 exactly
            layer.self_attn.gate_proj.bias.copy_(torch.tensor([-1e4, -1e4, 1e4]).repeat(4))
        ids = torch.randint(1, 61, (2, T))
        want = dense(input_ids=ids).logits
        got = conv(input_ids=ids, use_cache=False).logits
    # transformers' rotary tables are float32 even in a float64 model: ~1e-6 apart; a wrong mapping is O(0.1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_converted_model_starts_at_the_gate_init_mix():
    dense = dense_model(*DENSE[0])
    conv = H.convert_from_dense(dense, NSAConfig(**SPARSE), max_position_embeddings=4096)
    assert conv.config.max_position_embeddings == 4096
    g = torch.sigmoid(conv.model.layers[0].self_attn.gate_proj.bias.view(4, 3))
    torch.testing.assert_close(g, torch.tensor([0.05, 0.475, 0.475], dtype=g.dtype).expand(4, 3))
    assert all(torch.count_nonzero(layer.self_attn.compress_k.mlp[2].weight) == 0 for layer in conv.model.layers)


def test_convert_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="causal LM of type"):
        H.convert_from_dense(H.NSALMForCausalLM(tiny_config()))
    llama3 = dense_model(LlamaConfig, LlamaForCausalLM, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}})
    with pytest.raises(ValueError, match="llama3"):
        H.convert_from_dense(llama3)
    with pytest.raises(ValueError, match="gate_init"):
        H.convert_from_dense(dense_model(*DENSE[0]), gate_init=(0, 0, 1))
    with pytest.warns(UserWarning, match="sliding window"):
        H.convert_from_dense(dense_model(MistralConfig, MistralForCausalLM, {"sliding_window": 32}))


def test_clear_errors_for_what_the_model_cannot_honour():
    m = tiny_model()
    ids = torch.randint(1, 61, (2, 20))
    with torch.no_grad():
        with pytest.raises(ValueError, match="2-D"):
            m(input_ids=ids, attention_mask=torch.ones(2, 1, 20, 20))
        with pytest.raises(ValueError, match="only 0 and 1"):
            m(input_ids=ids, attention_mask=torch.full((2, 20), 2))
        with pytest.raises(TypeError, match="NSALMCache"):
            m(input_ids=ids, past_key_values=DynamicCache())
        with pytest.raises(TypeError, match="NSALMCache"):
            m.generate(ids, past_key_values=DynamicCache(), max_new_tokens=2)
        with pytest.raises(ValueError, match="capacity"):
            m(input_ids=ids, past_key_values=H.NSALMCache(m.config, max_cache_len=16))
        with pytest.raises(ValueError, match="capacity"):
            m.generate(ids, max_new_tokens=300, do_sample=False, pad_token_id=0)   # past max_position_embeddings
        with pytest.raises(ValueError, match="output_attentions"):
            m(input_ids=ids, output_attentions=True)
        with pytest.raises(TypeError, match="position_ids"):
            m(input_ids=ids, position_ids=torch.arange(20)[None])
        out = m(input_ids=ids)
        with pytest.raises(ValueError, match="rows"):
            m(input_ids=ids[:1], past_key_values=out.past_key_values)
        with pytest.raises(NotImplementedError, match="cropped"):
            out.past_key_values.crop(1)
    with pytest.raises(ValueError, match="no_grad"):
        m(input_ids=ids, use_cache=True)


def test_nsa_export_loads_in_transformers_and_computes_what_the_trainer_model_computes(tmp_path, capsys):
    cfg = PRESETS["tiny"].replace(n_layer=2)
    torch.manual_seed(0)
    lm = LanguageModel(cfg).double().eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from dataclasses import asdict
    torch.save(dict(model=lm.state_dict(), model_cfg=asdict(cfg), train_cfg={}, step=3), tmp_path / "ck.pt")
    assert cli(["export", str(tmp_path / "ck.pt"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert "nsa_lm model" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    lm = lm.float().double()   # the weights as saved (float32)
    ids = torch.randint(1, 256, (2, 200))   # 0 is the pad id
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, use_cache=False).logits, lm(ids), rtol=1e-10, atol=1e-10)
        assert torch.equal(hf.generate(ids[:, :150], max_new_tokens=20, do_sample=False, pad_token_id=0),
                           generate(lm, ids[:, :150], 20))


def test_nsa_export_refuses_a_full_attention_checkpoint(tmp_path, capsys):
    from dataclasses import asdict
    cfg = PRESETS["tiny"].replace(attention="full")
    torch.save(dict(model=LanguageModel(cfg).state_dict(), model_cfg=asdict(cfg), train_cfg={}, step=0),
               tmp_path / "ck.pt")
    assert cli(["export", str(tmp_path / "ck.pt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nsa: error:") and "full" in err and len(err.strip().splitlines()) == 1


def test_inputs_embeds_and_hidden_states_match_the_input_ids_path():
    m = tiny_model(token_shift=True)
    ids = torch.randint(1, 61, (2, 27))
    with torch.no_grad():
        a = m(input_ids=ids, use_cache=False, output_hidden_states=True)
        b = m(inputs_embeds=m.get_input_embeddings()(ids), use_cache=False)
        with pytest.raises(ValueError, match="exactly one"):
            m(input_ids=ids, inputs_embeds=m.get_input_embeddings()(ids))
    assert torch.equal(a.logits, b.logits)
    assert len(a.hidden_states) == m.config.num_hidden_layers + 1
    assert torch.equal(a.hidden_states[0], m.get_input_embeddings()(ids))
