"""Training / prefill speed of NSA (this project's Triton kernels) against full causal attention
(PyTorch SDPA with the FlashAttention-2 backend and with the cuDNN backend) and, when importable,
fla-core's parallel_nsa. One process, one GPU, triton.testing.do_bench medians.

  python benchmarks/bench_train.py [--lengths 4096 ... 65536] [--quick] [--dims 192/128 256/256]

Prints a table, writes benchmarks/results/<gpu>/train.json and train.png.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from shapes import (DIMS, FLA_COMPARABLE, HEADS, LENGTHS, PAPER, environment, median_ms,  # noqa: E402
                    nsa_inputs, save, save_figure)

BACKENDS = {"flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
            "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION}


def peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def time_nsa(T, HQ, H, dk, dv, cfg):
    t = nsa_inputs(T, HQ, H, dk, dv, cfg, requires_grad=True)
    do = torch.randn(1, T, HQ, dv, device="cuda", dtype=torch.bfloat16)
    fwd = lambda: nsa.nsa_attention(**t, config=cfg)
    both = lambda: torch.autograd.backward(fwd(), do)
    with torch.no_grad():
        r = dict(fwd=median_ms(fwd))
    r["fwd_bwd"] = median_ms(both, list(t.values()))
    r["peak_mb"] = peak_mb(both)
    return r


def time_sdpa(T, HQ, H, dk, dv, backend):
    """Full causal attention over the same q and one branch's k/v; FlashAttention-2 needs
    dv == dk, so v is padded (the cost the issue's 361 ms figure includes)."""
    dvp = dk if backend == "flash" else dv
    g = torch.Generator(device="cuda").manual_seed(0)
    r_ = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q, k, v = r_(1, HQ, T, dk), r_(1, H, T, dk), r_(1, H, T, dvp)
    do = torch.randn(1, HQ, T, dvp, device="cuda", dtype=torch.bfloat16)
    with torch.nn.attention.sdpa_kernel(BACKENDS[backend]):
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            fwd()
        except RuntimeError as e:   # a backend that refuses GQA gets expanded k/v
            kk, vv = (x.detach().repeat_interleave(HQ // H, 1).requires_grad_() for x in (k, v))
            k, v = kk, vv
            fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
            print(f"  note: {backend} refused enable_gqa ({str(e)[:60]}...): k/v expanded")
        both = lambda: torch.autograd.backward(fwd(), do)
        with torch.no_grad():
            r = dict(fwd=median_ms(fwd))
        r["fwd_bwd"] = median_ms(both, [q, k, v])
        r["peak_mb"] = peak_mb(both)
    return r


def time_fla(T, HQ, H, dk, dv):
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return dict(error=f"fla-core not importable: {e}")
    g = torch.Generator(device="cuda").manual_seed(0)
    r_ = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q, k, v = r_(1, T, HQ, dk), r_(1, T, H, dk), r_(1, T, H, dv)
    gc, gs = (torch.rand(1, T, HQ, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    do = torch.randn(1, T, HQ, dv, device="cuda", dtype=torch.bfloat16)
    fwd = lambda: parallel_nsa(q, k, v, gc, gs, None, block_counts=16, block_size=64, window_size=0)
    both = lambda: torch.autograd.backward(fwd(), do)
    try:
        with torch.no_grad():
            r = dict(fwd=median_ms(fwd))
        r["fwd_bwd"] = median_ms(both, [q, k, v, gc, gs])
    except Exception as e:  # noqa: BLE001
        return dict(error=f"fla-core failed: {str(e)[:200]}")
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--quick", action="store_true", help="paper shape 192/128 only")
    p.add_argument("--dims", nargs="+", default=list(DIMS), help="dk/dv of the paper setting (default: 192/128 128/128)")
    p.add_argument("--settings", nargs="+", default=["paper", "G4", "G1", "fla-comparable"],
                   help="which shape families to time (default: all)")
    p.add_argument("--name", default="train", help="results file stem (benchmarks/results/<gpu>/<name>.json)")
    a = p.parse_args()
    rows = []

    def record(setting, T, HQ, H, dk, dv, impl, r):
        rows.append(dict(setting=setting, T=T, HQ=HQ, H=H, dk=dk, dv=dv, impl=impl, **r))
        print(f"{setting:>14} T={T:6d} HQ={HQ:2d} H={H} {dk}/{dv} {impl:>12}: " +
              ("  ".join(f"{k}={v:.2f}" for k, v in r.items() if isinstance(v, float)) or r.get("error", "")), flush=True)

    dims = {d: tuple(int(x) for x in d.split("/")) for d in (["192/128"] if a.quick else a.dims)}
    for dname, (dk, dv) in dims.items() if "paper" in a.settings else ():
        HQ, H = HEADS["paper"]
        for T in a.lengths:
            record("paper", T, HQ, H, dk, dv, "nsa", time_nsa(T, HQ, H, dk, dv, PAPER))
            for b in BACKENDS:
                try:
                    r = time_sdpa(T, HQ, H, dk, dv, b)
                except RuntimeError as e:   # e.g. a backend without this head dim
                    r = dict(error=f"sdpa-{b} failed: {str(e)[:200]}")
                record("paper", T, HQ, H, dk, dv, f"sdpa-{b}", r)
            torch.cuda.empty_cache()
    if not a.quick:
        for hname in [h for h in ("G4", "G1") if h in a.settings]:
            HQ, H = HEADS[hname]
            for T in a.lengths[-2:]:
                record(hname, T, HQ, H, 128, 128, "nsa", time_nsa(T, HQ, H, 128, 128, PAPER))
                record(hname, T, HQ, H, 128, 128, "sdpa-flash", time_sdpa(T, HQ, H, 128, 128, "flash"))
        HQ, H = HEADS["paper"]
        for T in a.lengths[-2:] if "fla-comparable" in a.settings else ():
            record("fla-comparable", T, HQ, H, 128, 128, "nsa", time_nsa(T, HQ, H, 128, 128, FLA_COMPARABLE))
            record("fla-comparable", T, HQ, H, 128, 128, "fla", time_fla(T, HQ, H, 128, 128))
    summary = ratios(rows)
    save(a.name, dict(env=environment(), rows=rows, ratios=summary))
    plot(rows, a.name)
    print("\nspeed-up of NSA (other / nsa), medians in one run:")
    for s in summary:
        print(f"  {s['setting']:>14} T={s['T']:6d} {s['dk']}/{s['dv']} vs {s['vs']:>10}: fwd {s['fwd']:.2f}x"
              f"  fwd+bwd {s['fwd_bwd']:.2f}x" + (f"  peak-mem ratio {s['mem']:.2f}" if s.get("mem") else ""))


def ratios(rows):
    out = []
    for r in rows:
        if r["impl"] != "nsa" or "fwd" not in r:
            continue
        for o in rows:
            same = all(o[k] == r[k] for k in ("setting", "T", "HQ", "H", "dk", "dv"))
            if same and o["impl"] != "nsa" and "fwd" in o:
                out.append(dict(setting=r["setting"], T=r["T"], dk=r["dk"], dv=r["dv"], vs=o["impl"],
                                fwd=o["fwd"] / r["fwd"], fwd_bwd=o["fwd_bwd"] / r["fwd_bwd"],
                                mem=(r["peak_mb"] / o["peak_mb"]) if o.get("peak_mb") else None))
    return out


def plot(rows, name):
    if not any(r["setting"] == "paper" and r["dk"] == 192 for r in rows):
        return   # the plot shows the paper shape only
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("fwd", "fwd_bwd")):
        for impl in ("nsa", "sdpa-flash", "sdpa-cudnn"):
            pts = sorted((r["T"], r[key]) for r in rows if r["impl"] == impl and r["setting"] == "paper"
                         and r["dk"] == 192 and key in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{key.replace('_', '+')}: HQ=64, H=4, dk=192, dv=128, bf16")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, name)


if __name__ == "__main__":
    main()
