"""nsa.hf on one GPU, bf16, a `small`-sized model (14 layers, hidden 768, 16/1 heads, head dim 64):

1. check: `generate` of NEW greedy tokens after a PROMPT-token prompt on the kernels; its logits at
   every step against a float64 parallel forward of the same tokens (the reference path), beside
   an eager bf16 run of the same steps through the PyTorch reference (prefill, then the kernel's
   tokens one at a time through the cache). The GPU check's rule: err(kernel) <= 2 err(eager) + 1e-3.
2. speed: tokens/s of `generate` for the NSA model against LlamaForCausalLM of the same size
   (SDPA), batch B, a SPEED_PROMPT-token prompt: prefill + first token, and decode tokens/s.

  python benchmarks/bench_hf.py [--prompt 4096 --new 64 --speed-prompt 32768 --batch 8]
"""
from __future__ import annotations

import argparse
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa.hf as H  # noqa: E402
from shapes import environment, err, save, wall_s  # noqa: E402

DIMS = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=14,
            num_attention_heads=16, num_key_value_heads=1, head_dim=64, max_position_embeddings=131072)


def nsa_model(seed=0):
    torch.manual_seed(seed)
    return H.NSALMForCausalLM(H.NSALMConfig(**DIMS)).eval()


def set_backend(model, backend):
    for layer in model.model.layers:
        layer.self_attn.backend = backend
    return model


@torch.no_grad()
def check(prompt_len, new, batch=2):
    model = nsa_model().cuda()
    kern = set_backend(model.to(torch.bfloat16), "auto")
    prompt = torch.randint(1, DIMS["vocab_size"], (batch, prompt_len), device="cuda")
    out = kern.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, output_logits=True,
                        return_dict_in_generate=True)
    seq, k_logits = out.sequences, torch.stack(out.logits, 1).float()        # [B, new, V]
    eager = set_backend(kern, "torch")                                       # same bf16 weights
    cache = H.NSALMCache(eager.config)
    e_logits = [eager(input_ids=prompt, past_key_values=cache).logits[:, -1]]
    for i in range(new - 1):
        e_logits.append(eager(input_ids=seq[:, prompt_len + i:prompt_len + i + 1], past_key_values=cache).logits[:, -1])
    e_logits = torch.stack(e_logits, 1).float()
    ref = set_backend(nsa_model().cuda().double(), "torch")
    r_logits = ref(input_ids=seq[:, :-1], use_cache=False, logits_to_keep=new).logits           # [B, new, V]
    ek, ee = err(k_logits, r_logits), err(e_logits, r_logits)
    same = (seq[:, prompt_len:] == r_logits.argmax(-1)).float().mean().item()
    row = dict(prompt=prompt_len, new=new, batch=batch, err_kernel=ek, err_eager=ee, ok=ek <= 2 * ee + 1e-3,
               nan=bool(torch.isnan(k_logits).any()), greedy_tokens_equal_float64_argmax=same)
    del model, ref
    torch.cuda.empty_cache()
    return row


@torch.no_grad()
def speed(kind, prompt_len, batch, new, reps):
    torch.manual_seed(0)
    if kind == "nsa":
        model = nsa_model()
    else:
        cfg = LlamaConfig(**{k: v for k, v in DIMS.items()}, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).eval()
    model = model.to("cuda", torch.bfloat16)
    prompt = torch.randint(1, DIMS["vocab_size"], (batch, prompt_len), device="cuda")

    def gen(n):
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    gen(2)()                                                   # compile and tune the kernels
    torch.cuda.reset_peak_memory_stats()
    t1, tn = wall_s(gen(1), reps), wall_s(gen(new + 1), reps)
    row = dict(kind=kind, prompt=prompt_len, batch=batch, new=new, prefill_s=t1, generate_s=tn,
               decode_tokens_per_s=batch * new / (tn - t1), generate_tokens_per_s=batch * (new + 1) / tn,
               peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
               params=sum(p.numel() for p in model.parameters()))

    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--speed-prompt", type=int, default=32768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--speed-new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-speed", action="store_true")
    a = p.parse_args()
    c = check(a.prompt, a.new)
    print(f"check: {a.new} greedy tokens after {a.prompt}: logits err kernel {c['err_kernel']:.2e}, eager "
          f"{c['err_eager']:.2e} -> {'OK' if c['ok'] and not c['nan'] else 'FAIL'}; tokens equal to float64 argmax "
          f"{c['greedy_tokens_equal_float64_argmax']:.3f}", flush=True)
    rows = [] if a.skip_speed else [speed(k, a.speed_prompt, a.batch, a.speed_new, a.reps) for k in ("nsa", "llama")]
    save("hf_generate", dict(env=environment(), dims=DIMS, check=c, speed=rows))
    if rows:
        print(f"\ngenerate, batch {a.batch}, {a.speed_prompt}-token prompt, {a.speed_new} new tokens (bf16):")
        print(f"{'model':8s} {'prefill s':>10s} {'decode tok/s':>13s} {'all tok/s':>10s} {'peak GiB':>9s}")
        for r in rows:
            print(f"{r['kind']:8s} {r['prefill_s']:10.3f} {r['decode_tokens_per_s']:13.0f} "
                  f"{r['generate_tokens_per_s']:10.1f} {r['peak_gib']:9.1f}")
        n, f = rows
        print(f"NSA / Llama: decode {n['decode_tokens_per_s'] / f['decode_tokens_per_s']:.2f}x, whole generate "
              f"{n['generate_tokens_per_s'] / f['generate_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
