"""Decoding on one GPU: NSA's decode kernels against full-attention decode over the same cache,
bf16 correctness of the decode path, and prompt prefill against the training forward.

  python benchmarks/bench_decode.py                       # everything, paper shapes
  python benchmarks/bench_decode.py --lengths 8192 65536 --batches 32 --skip-check

Timing: medians of triton.testing.do_bench (L2 flushed before every call). "eager" launches
from Python; "graph" replays a captured CUDA graph of the same step (how a serving loop runs
it). Full attention is PyTorch SDPA with enable_gqa, every backend that accepts the shape, the
fastest kept. Bandwidth is counted on the bytes each must read: NSA its Tc(s) compressed, n*l'
selected and min(w, s) window tokens per KV head; full attention s tokens.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from nsa import reference  # noqa: E402
from shapes import PAPER, environment, err, graphed, median_ms, save, save_figure  # noqa: E402

HQ, H, DK, DV = 64, 4, 192, 128
BF16 = torch.bfloat16


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=BF16, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms / 1e6   # GB/s


def decode_inputs(B, s, cfg=PAPER, seed=0, dtype=BF16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda", dtype=dtype)
    nc, W = cfg.num_compressed(s), min(cfg.window_size, s)
    c = dict(k_cmp=r(B, nc, H, DK), v_cmp=r(B, nc, H, DV), k_slc=r(B, s, H, DK), v_slc=r(B, s, H, DV),
             k_win=r(B, W, H, DK), v_win=r(B, W, H, DV))
    return r(B, HQ, DK), c, torch.rand(B, HQ, 3, generator=g, device="cuda", dtype=dtype)


# ----------------------------------------------------------------------------- checks
def check_kernel(s):
    """bf16 decode kernels vs the float64 reference on the same (bf16-valued) cache."""
    lengths = [s, s - 1, s - 17, s // 2 + 5]
    q, c, gates = decode_inputs(len(lengths), s, seed=s)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    o, idx = nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=PAPER, return_block_idx=True)
    o64, idx64 = reference.nsa_decode(q.double(), *(c[k].double() for k in c), gates.double(), lens, config=PAPER)
    e, rounding = err(o, o64), err(o64.to(BF16), o64)
    return dict(s=s, err_vs_f64=e, bf16_rounding=rounding, passed=e <= 3 * rounding,
                selection_match=float((idx == idx64).all(-1).float().mean()))


def check_graph(s=16384):
    """A captured decode step replayed with new lengths and queries == an eager step."""
    q, c, gates = decode_inputs(3, s, seed=1)
    lens = torch.tensor([s, s - 100, 40], dtype=torch.int32, device="cuda")
    replay, (o_g, idx_g) = graphed(lambda: nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=PAPER,
                                                          return_block_idx=True))
    q.copy_(torch.randn_like(q))
    lens.copy_(torch.tensor([s - 3, 5000, 600], dtype=torch.int32))
    replay()
    o_e, idx_e = nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=PAPER, return_block_idx=True)
    return dict(bitwise_equal=bool(torch.equal(o_g, o_e) and torch.equal(idx_g, idx_e)))


def check_layer(prompt=2000, total=2600):
    """The layer's cached path in bf16 (prompt through the training kernels, then one token at a
    time through the decode kernels) vs float64, judged against the parallel bf16 forward."""
    torch.manual_seed(0)
    m = nsa.NativeSparseAttention(512, 16, 2, 64, 64, config=PAPER).cuda()
    m64 = nsa.NativeSparseAttention(512, 16, 2, 64, 64, config=PAPER, backend="torch").cuda().double()
    m64.load_state_dict(m.state_dict())
    m = m.to(BF16)
    x = torch.randn(2, total, 512, device="cuda", dtype=BF16)
    with torch.no_grad():
        want, want_idx = m64(x.double(), return_block_idx=True)
        par = m(x)
        cache = m.new_cache(2, total)
        steps = [m(x[:, :prompt], cache=cache, return_block_idx=True)]
        steps += [m(x[:, t:t + 1], cache=cache, return_block_idx=True) for t in range(prompt, total)]
    got = torch.cat([o for o, _ in steps], 1)
    idx = torch.cat([i for _, i in steps], 1)
    e_par, e_dec = err(par[:, prompt:], want[:, prompt:]), err(got[:, prompt:], want[:, prompt:])
    return dict(err_parallel=e_par, err_cached_decode=e_dec, err_cached_prefill=err(got[:, :prompt], want[:, :prompt]),
                selection_match=float((idx == want_idx).all(-1).float().mean()),
                passed=e_dec <= 2 * e_par + 1e-3)


# ----------------------------------------------------------------------------- timing
def time_decode(B, s, cfg=PAPER):
    q, c, gates = decode_inputs(B, s)
    lens = torch.full((B,), s, dtype=torch.int32, device="cuda")
    step = lambda: nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=cfg)
    row = dict(batch=B, s=s, nsa_eager_ms=median_ms(step))
    replay, _ = graphed(step)
    row["nsa_graph_ms"] = median_ms(replay)
    del replay
    tokens = cfg.num_compressed(s) + min(s, cfg.sel_block_count * cfg.sel_block_size) + min(cfg.window_size, s)
    row["nsa_bytes"] = B * H * tokens * (DK + DV) * 2
    del c
    # full attention over a cache of s tokens, in SDPA's own layout
    k = torch.randn(B, H, s, DK, device="cuda", dtype=BF16)
    v = torch.randn(B, H, s, DV, device="cuda", dtype=BF16)
    qf = q[:, :, None]
    best = {}
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION):
        def full(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qf, k, v, enable_gqa=True)
        try:
            full()
            torch.cuda.synchronize()
        except RuntimeError:
            continue
        eager = median_ms(full)
        replay, _ = graphed(full)
        best[be.name] = (eager, median_ms(replay))
        del replay
    name = min(best, key=lambda n: best[n][1])
    row.update(full_backend=name, full_eager_ms=best[name][0], full_graph_ms=best[name][1],
               full_bytes=B * H * s * (DK + DV) * 2, full_all={n: list(v) for n, v in best.items()})
    row["speedup_graph"] = row["full_graph_ms"] / row["nsa_graph_ms"]
    row["speedup_eager"] = row["full_eager_ms"] / row["nsa_eager_ms"]
    row["nsa_GBps"] = row["nsa_bytes"] / row["nsa_graph_ms"] / 1e6
    row["full_GBps"] = row["full_bytes"] / row["full_graph_ms"] / 1e6
    del k, v
    torch.cuda.empty_cache()
    return row


def host_overhead(B=1, s=8192, n=300):
    """Host time per eager step (GPU work here is far shorter): the public API, the custom op,
    and the launcher function alone."""
    import time
    from nsa.triton.decode import decode, decode_launch
    q, c, gates = decode_inputs(B, s)
    lens = torch.full((B,), s, dtype=torch.int32, device="cuda")
    args = (q, *c.values(), gates, lens, DK ** -0.5, 32, 16, 64, 16, 1, 2, 512)
    fns = {"nsa.nsa_decode": lambda: nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=PAPER),
           "custom op": lambda: decode(*args)}
    fns["launcher only"] = lambda: decode_launch(*args)
    out = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / n * 1e3
    return out


def time_prefill(T=65536, hidden=2048):
    """Layer-level: a prompt of T tokens into an empty cache vs the training forward."""
    torch.manual_seed(0)
    m = nsa.NativeSparseAttention(hidden, HQ, H, DK, DV, config=PAPER).cuda().to(BF16)
    x = torch.randn(1, T, hidden, device="cuda", dtype=BF16)
    train = median_ms(lambda: m(x), warmup=200, rep=1000)
    cache = m.new_cache(1, T)

    def prefill():
        cache.reset()
        with torch.no_grad():
            return m(x, cache=cache)
    pre = median_ms(prefill, warmup=200, rep=1000)
    with torch.no_grad():
        inf = median_ms(lambda: m(x), warmup=200, rep=1000)
    return dict(T=T, hidden=hidden, train_fwd_ms=train, prefill_ms=pre, no_grad_fwd_ms=inf,
                prefill_over_train=pre / train)


def plot(rows, bw):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        rs = [r for r in rows if r["batch"] == B]
        s = [r["s"] for r in rs]
        ax.plot(s, [r["full_graph_ms"] for r in rs], "o-", label="full attention (SDPA, best backend)")
        ax.plot(s, [r["nsa_graph_ms"] for r in rs], "o-", label="NSA decode (CUDA graph)")
        ax.plot(s, [r["nsa_eager_ms"] for r in rs], "o--", label="NSA decode (eager)")
        ax.plot(s, [r["nsa_bytes"] / bw / 1e6 for r in rs], ":", color="gray", label="NSA bytes at copy bandwidth")
        for r in rs:
            ax.annotate(f"{r['speedup_graph']:.1f}x", (r["s"], r["nsa_graph_ms"]), textcoords="offset points",
                        xytext=(0, -12), ha="center", fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="context length s", ylabel="ms per decode step",
               title=f"batch {B}, HQ={HQ}, H={H}, {DK}/{DV}, bf16")
        ax.set_xticks(s, [f"{x // 1024}k" for x in s])
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, "decode")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    args = ap.parse_args()
    out = dict(env=environment(), shape=dict(HQ=HQ, H=H, dk=DK, dv=DV, config=PAPER.__dict__))
    out["copy_GBps"] = bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    if not args.skip_check:
        out["check_kernel"] = [check_kernel(s) for s in (8192, 65536)]
        out["check_graph"] = check_graph()
        out["check_layer"] = check_layer()
        for k in ("check_kernel", "check_graph", "check_layer"):
            print(k, out[k], flush=True)
    rows = []
    for B in args.batches:
        for s in args.lengths:
            rows.append(time_decode(B, s))
            r = rows[-1]
            print(f"B={B:3d} s={s:7d}  nsa {r['nsa_graph_ms']:.4f} ms (eager {r['nsa_eager_ms']:.4f})  "
                  f"full {r['full_graph_ms']:.4f} ms [{r['full_backend']}]  {r['speedup_graph']:.2f}x  "
                  f"nsa {r['nsa_GBps']:.0f} GB/s ({100 * r['nsa_GBps'] / bw:.0f}% of copy)  "
                  f"full {r['full_GBps']:.0f} GB/s", flush=True)
    out["decode"] = rows
    out["host_ms_per_step"] = host_overhead()
    print("host ms per eager step", out["host_ms_per_step"], flush=True)
    if not args.skip_prefill:
        out["prefill"] = time_prefill()
        print("prefill", out["prefill"], flush=True)
    save("decode", out)
    plot(rows, bw)
    print("\n| batch | s | NSA ms (graph) | NSA ms (eager) | full ms (graph) | speedup | NSA % copy BW |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['s'] // 1024}k | {r['nsa_graph_ms']:.4f} | {r['nsa_eager_ms']:.4f} | "
              f"{r['full_graph_ms']:.4f} | {r['speedup_graph']:.2f}x | {100 * r['nsa_GBps'] / bw:.0f}% |")


if __name__ == "__main__":
    main()
