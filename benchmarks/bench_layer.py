"""The whole attention layer, forward + backward, on one GPU (bf16): NativeSparseAttention
(projections, RoPE, compression MLP, gates, the kernels) against FullAttention (the same
projections and RoPE, PyTorch SDPA with the cuDNN and the FlashAttention-2 backend), at the
paper's dims (hidden 2560, 64 query / 4 KV heads, dk 192, dv 128) and the `small` preset's
(hidden 768, 16 / 1 heads, 64 / 64). Each layer runs eager and CUDA-graphed
(torch.cuda.make_graphed_callables: forward and backward captured once, replayed), and beside
every time stands the GPU-busy share: the profiled kernel time of a step over its wall time.

  python benchmarks/bench_layer.py [--lengths 8192 ... 65536] [--dims paper small]

Prints a table, writes benchmarks/results/<gpu>/layer.json and layer.png.
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from nsa.lm.busy import busy  # noqa: E402
from shapes import environment, save, save_figure, wall_s  # noqa: E402

DIMS = {"paper": dict(hidden=2560, HQ=64, H=4, dk=192, dv=128), "small": dict(hidden=768, HQ=16, H=1, dk=64, dv=64)}
SDPA = {"cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
        "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION}


def build(impl, d):
    torch.manual_seed(0)
    if impl == "nsa":
        layer = nsa.NativeSparseAttention(d["hidden"], d["HQ"], d["H"], d["dk"], d["dv"])
    else:   # FlashAttention-2 needs dv == dk: its layer gets v as wide as k
        dv = d["dk"] if impl == "flash" else d["dv"]
        layer = nsa.FullAttention(d["hidden"], d["HQ"], d["H"], d["dk"], dv)
    return layer.to("cuda", torch.bfloat16)


def measure(impl, d, T, mode, reps):
    layer = build(impl, d)
    x = torch.randn(1, T, d["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(x)
    fn = layer

    def step():
        fn(x).backward(do)
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    ctx = torch.nn.attention.sdpa_kernel(SDPA[impl]) if impl in SDPA else torch.enable_grad()
    with ctx:
        if mode == "graphed":
            fn = torch.cuda.make_graphed_callables(layer, (x,), num_warmup_iters=3)
        for _ in range(3):
            step()
        ms = wall_s(step, reps) * 1e3
        _, share, prof_s = busy(step, 3)
    return dict(ms=ms, gpu_busy=share, profiled_ms=prof_s * 1e3)


def plot(rows, name, out=None):
    """layer.png: ms against T per dims, one line per impl and mode; out: a path instead of
    the results folders."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = sorted({r["dims"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.2), squeeze=False)
    for ax, dn in zip(axes[0], dims):
        for (impl, mode) in sorted({(r["impl"], r["mode"]) for r in rows if r["dims"] == dn}):
            pts = [(r["T"], r["ms"]) for r in rows if (r["dims"], r["impl"], r["mode"]) == (dn, impl, mode) and "ms" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if mode == "graphed" else "--", label=f"{impl} {mode}")
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="layer forward + backward, ms",
               title=f"{dn} dims ({DIMS[dn]['HQ']}/{DIMS[dn]['H']} heads, {DIMS[dn]['dk']}/{DIMS[dn]['dv']})")
        ax.set_xticks(sorted({r["T"] for r in rows}), [f"{t // 1024}k" for t in sorted({r["T"] for r in rows})])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120)
    else:
        save_figure(fig, name)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--dims", nargs="+", default=list(DIMS), choices=list(DIMS))
    p.add_argument("--impls", nargs="+", default=["nsa", "cudnn", "flash"])
    p.add_argument("--modes", nargs="+", default=["eager", "graphed"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--name", default="layer")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot of a saved layer.json beside it")
    a = p.parse_args()
    if a.replot:
        import json
        plot(json.load(open(a.replot))["rows"], a.name, out=a.replot.rsplit(".", 1)[0] + ".png")
        return
    rows = []
    for dn in a.dims:
        for T in a.lengths:
            for impl in a.impls:
                for mode in a.modes:
                    try:
                        r = measure(impl, DIMS[dn], T, mode, a.reps)
                    except Exception as e:  # noqa: BLE001 - a backend or a capture that fails is a result
                        r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    rows.append(dict(dims=dn, T=T, impl=impl, mode=mode, **r))
                    busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") else "-"
                    print(f"{dn:5s} T={T:6d} {impl:5s} {mode:7s} " +
                          (f"{r['ms']:9.2f} ms  GPU busy {busy}" if "ms" in r else r["error"]), flush=True)
                    torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if "ms" in r:
            k = (r["dims"], r["T"], r["impl"])
            best[k] = min(best.get(k, float("inf")), r["ms"])
    ratios = [dict(dims=dn, T=T, vs=impl, ratio=best[(dn, T, impl)] / best[(dn, T, "nsa")])
              for (dn, T, impl) in best if impl != "nsa" and (dn, T, "nsa") in best]
    save(a.name, dict(env=environment(), dims=DIMS, rows=rows, ratios_best_mode=ratios))
    plot(rows, a.name)
    print("\nlayer fwd+bwd, each at its best mode: other / nsa")
    for q in ratios:
        print(f"  {q['dims']:5s} T={q['T']:6d} vs {q['vs']:5s}: {q['ratio']:.2f}x")


if __name__ == "__main__":
    main()
