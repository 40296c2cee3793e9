"""Where a decode step's time goes: per-kernel CUDA times (torch.profiler) and a sweep of the
launch shapes (NSA_TUNE overrides of nsa.triton.tuning.decode), CUDA-graph medians.

  python benchmarks/profile_decode.py --cases 1:65536 32:65536 --sweep
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from bench_decode import decode_inputs, graphed  # noqa: E402
from shapes import PAPER, environment, median_ms, save  # noqa: E402


def kernel_times(step, n=20):
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count >= n:
            times[e.key[:60]] = e.device_time_total / e.count / 1000   # ms
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["1:65536", "32:65536"])
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    out = dict(env=environment(), cases=[])
    from nsa.triton import tuning
    for case in args.cases:
        B, s = map(int, case.split(":"))
        q, c, gates = decode_inputs(B, s)
        lens = torch.full((B,), s, dtype=torch.int32, device="cuda")
        step = lambda: nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=PAPER)
        nc, nb = PAPER.num_compressed(s), -(-s // PAPER.sel_block_size)
        default = tuning.decode(B * 4, nc, min(512, s), 1024, nb, q.device)
        rec = dict(batch=B, s=s, default=default, kernels=kernel_times(step), sweep=[])
        print(f"B={B} s={s} default {default}")
        for k, v in sorted(rec["kernels"].items(), key=lambda kv: -kv[1]):
            print(f"   {v * 1000:8.1f} us  {k}")
        if args.sweep:
            d = default
            grid = itertools.product([32, 64], [d["S_C"], 2 * d["S_C"]], sorted({1, 2, d["S_S"]}), [2, 3], [1, 4])
            for bn, sc, ss, stages, mw in grid:
                tune = dict(BN=bn, S_C=sc, S_S=ss, stages=stages, merge_warps=mw)
                os.environ["NSA_TUNE"] = json.dumps({"decode": tune})
                try:
                    replay, _ = graphed(step)
                    ms = median_ms(replay)
                except Exception as e:   # a shape that does not compile: recorded, not fatal
                    ms = float("nan")
                    print("   failed", tune, type(e).__name__)
                rec["sweep"].append(dict(tune, ms=ms))
            os.environ.pop("NSA_TUNE")
            for r in sorted(rec["sweep"], key=lambda r: r["ms"])[:6]:
                print("   ", r)
        out["cases"].append(rec)
        del q, c
        torch.cuda.empty_cache()
    save("profile_decode", out)


if __name__ == "__main__":
    main()
