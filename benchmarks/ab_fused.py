"""A/B of the backward's memory work, in one process on one GPU (do_bench medians, peak memory
of one forward+backward above the inputs): NSA through the composed custom ops with the
key-centric backward in row chunks (the code before session 10), the same with whole-head
passes, and the fused eager node (ops.FusedNSA) with head passes; FlashAttention-2 (SDPA) as
the yardstick. Writes benchmarks/results/ab_fused_<gpu>.json.

  python benchmarks/ab_fused.py [--T 65536] [--settings G1 G4 paper]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
import nsa.triton  # noqa: E402
from bench_train import peak_mb, time_sdpa  # noqa: E402
from shapes import HEADS, PAPER, environment, median_ms, nsa_inputs, save  # noqa: E402

NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")


def composed(t, cfg):
    return nsa.api.gated_nsa(nsa.triton, *(t[n] for n in NAMES), config=cfg, scale=None, cu_seqlens=None)[0]


def fused(t, cfg):
    return nsa.nsa_attention(**t, config=cfg)


VARIANTS = [("composed, row chunks", '{"selected_kc_heads": [0]}', composed),
            ("composed, head passes", "", composed),
            ("fused, head passes", "", fused)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--settings", nargs="+", default=["G1", "G4", "paper"])
    a = p.parse_args()
    rows = []
    for s in a.settings:
        HQ, H = HEADS[s]
        dk, dv = (192, 128) if s == "paper" else (128, 128)
        t = nsa_inputs(a.T, HQ, H, dk, dv, PAPER, requires_grad=True)
        do = torch.randn(1, a.T, HQ, dv, device="cuda", dtype=torch.bfloat16)
        for name, tune, fn in VARIANTS:
            os.environ["NSA_TUNE"] = tune
            both = lambda: torch.autograd.backward(fn(t, PAPER), do)
            with torch.no_grad():
                r = dict(fwd=median_ms(lambda: fn(t, PAPER)))
            r["fwd_bwd"] = median_ms(both, list(t.values()))
            r["peak_mb"] = peak_mb(both)
            rows.append(dict(setting=s, T=a.T, HQ=HQ, H=H, dk=dk, dv=dv, impl=name, **r))
            print(rows[-1], flush=True)
        os.environ["NSA_TUNE"] = ""
        del t, do
        torch.cuda.empty_cache()
        r = time_sdpa(a.T, HQ, H, dk, dv, "flash")
        rows.append(dict(setting=s, T=a.T, HQ=HQ, H=H, dk=dk, dv=dv, impl="sdpa-flash", **r))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    save("ab_fused", dict(env=environment(), rows=rows))
    print(f"\n{'setting':>8} {'impl':>22} {'fwd ms':>8} {'fwd+bwd':>8} {'peak MB':>8} {'peak/FA2':>8}")
    for r in rows:
        fa = next(o for o in rows if o["setting"] == r["setting"] and o["impl"] == "sdpa-flash")
        print(f"{r['setting']:>8} {r['impl']:>22} {r['fwd']:8.2f} {r['fwd_bwd']:8.2f} {r['peak_mb']:8.0f} "
              f"{r['peak_mb'] / fa['peak_mb']:8.2f}")


if __name__ == "__main__":
    main()
