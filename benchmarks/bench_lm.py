"""Training throughput of the `small` LM (~100M parameters): NSA vs full attention vs window-only,
tokens/s of whole training steps (forward, backward, AdamW) at long context, bf16 autocast, one
GPU. Medians of timed steps after warm-up.

  python benchmarks/bench_lm.py --lengths 8192 16384 32768
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from nsa.lm.model import PRESETS, LanguageModel  # noqa: E402
from shapes import environment, save  # noqa: E402


def step_times(kind, T, steps, warmup, compile_):
    torch.manual_seed(0)
    model = LanguageModel(PRESETS["small"].replace(attention=kind)).cuda()
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 256, (1, T), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 30, model.num_params()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (cuts host overhead)")
    a = p.parse_args()
    rows = []
    for T in a.lengths:
        for kind in ("nsa", "full", "window"):
            s, mem, n = step_times(kind, T, a.steps, a.warmup, a.compile)
            rows.append(dict(T=T, attention=kind, compiled=a.compile, step_s=s, tokens_per_s=T / s,
                             peak_gib=mem, params=n))
            print(f"T={T:6d} {kind:>6}: {T / s:9.0f} tok/s  step {s * 1e3:7.1f} ms  peak {mem:5.1f} GiB  "
                  f"({n / 1e6:.1f}M params)", flush=True)
            torch.cuda.empty_cache()
    for T in a.lengths:
        r = {x["attention"]: x["tokens_per_s"] for x in rows if x["T"] == T}
        print(f"T={T}: NSA / full tokens/s = {r['nsa'] / r['full']:.2f}x")
    save("lm_throughput" + ("_compiled" if a.compile else ""), dict(env=environment(), rows=rows))


if __name__ == "__main__":
    main()
