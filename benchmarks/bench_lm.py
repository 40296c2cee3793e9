"""Training throughput of the `small` LM (~100M parameters): NSA vs full attention vs window-only,
tokens/s of whole training steps (forward, backward, AdamW) at long context, bf16 autocast, one
GPU. Medians of timed steps after warm-up, in each mode (eager; torch.compile default;
torch.compile reduce-overhead, which replays CUDA graphs), with the GPU-busy share of a
profiled step beside every time.

  python benchmarks/bench_lm.py --lengths 16384 32768 65536 [--modes off default reduce-overhead]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from nsa.lm.model import PRESETS, LanguageModel  # noqa: E402
from nsa.lm.busy import busy  # noqa: E402
from shapes import environment, save  # noqa: E402


def step_times(kind, T, steps, warmup, mode):
    torch.manual_seed(0)
    model = LanguageModel(PRESETS["small"].replace(attention=kind)).cuda()
    fwd = model if mode == "off" else torch.compile(model, mode=mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 256, (1, T), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    _, share, _ = busy(step, 2)
    return statistics.median(times), share, torch.cuda.max_memory_allocated() / 2 ** 30, model.num_params()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["off", "default", "reduce-overhead"],
                   choices=["off", "default", "reduce-overhead"], help="torch.compile modes (off: eager)")
    p.add_argument("--attentions", nargs="+", default=["nsa", "full", "window"])
    p.add_argument("--name", default="lm_throughput")
    a = p.parse_args()
    rows = []
    for T in a.lengths:
        for kind in a.attentions:
            for mode in a.modes:
                try:
                    s, share, mem, n = step_times(kind, T, a.steps, a.warmup, mode)
                except Exception as e:  # noqa: BLE001 - a mode that fails is a result
                    rows.append(dict(T=T, attention=kind, mode=mode, error=str(e).splitlines()[0][:200]))
                    print(f"T={T:6d} {kind:>6} {mode:>15}: {rows[-1]['error']}", flush=True)
                    continue
                rows.append(dict(T=T, attention=kind, mode=mode, step_s=s, tokens_per_s=T / s, gpu_busy=share,
                                 peak_gib=mem, params=n))
                print(f"T={T:6d} {kind:>6} {mode:>15}: {T / s:9.0f} tok/s  step {s * 1e3:7.1f} ms  GPU busy "
                      f"{share:4.0%}  peak {mem:5.1f} GiB  ({n / 1e6:.1f}M params)", flush=True)
                torch.cuda.empty_cache()
    print("\nNSA / full tokens/s, each at its best mode (and NSA eager / NSA best):")
    for T in a.lengths:
        best = {}
        for x in rows:
            if x["T"] == T and "tokens_per_s" in x:
                best[x["attention"]] = max(best.get(x["attention"], 0), x["tokens_per_s"])
        eager = next((x["tokens_per_s"] for x in rows if x["T"] == T and x["attention"] == "nsa"
                      and x["mode"] == "off" and "tokens_per_s" in x), None)
        if "nsa" in best and "full" in best:
            print(f"  T={T}: {best['nsa'] / best['full']:.2f}x" + (f"  (eager {eager / best['nsa']:.2f})" if eager else ""))
    save(a.name, dict(env=environment(), rows=rows))


if __name__ == "__main__":
    main()
