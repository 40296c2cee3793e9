"""Where NSA's time goes at one shape, and which launch shapes win: times every kernel op
alone (paper shape by default, bf16), then sweeps NSA_TUNE overrides (nsa/triton/tuning.py).

  python benchmarks/profile_parts.py --T 65536 [--HQ 64 --H 4 --dk 192 --dv 128] [--sweep [NAME ...]]
      [--kernels]   (also each kernel's GPU time in one forward+backward, in launch order)

Writes benchmarks/results/<gpu>/profile_T<T>_HQ<HQ>_H<H>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from nsa.triton.banded import banded_bwd, banded_fwd  # noqa: E402
from nsa.triton.select import cmp_select_fwd, select_blocks  # noqa: E402
from nsa.triton.selected import selected_bwd, selected_fwd  # noqa: E402
from nsa.lm.busy import gpu_events  # noqa: E402
from shapes import PAPER, environment, median_ms, nsa_inputs, save  # noqa: E402

# One sweep per NSA_TUNE name (nsa/triton/tuning.py): the shapes worth timing against its default.
SWEEPS = {
    "banded_fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (256, 64, 8, 3)],
    "banded_fwd_win": [(64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (32, 32, 2, 3)],
    "banded_dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
    "banded_dkv": [(64, 32, 4, 3), (64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 8, 3), (32, 64, 8, 2), (128, 64, 8, 2),
                   (64, 64, 4, 3), (64, 32, 8, 3)],
    "banded_splits": [(4,), (8,), (16,), (32,)],   # the compressed dK/dV's query ranges
    "banded_unmasked": [(0,), (1,)],   # every banded tile masked vs unmasked inner tiles (both branches)
    "select": [(128, 4, 2, 2), (128, 8, 2, 2), (64, 4, 2, 1), (128, 4, 2, 1), (256, 8, 2, 2), (64, 4, 2, 2)],
    "select_spread": [(1,), (2,)],     # tensor-core product vs stencil
    "cmp_select": [(0,), (1,)],        # G = 1: compression + selection apart vs fused
    "cmp_select_launch": [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 4, 2), (32, 4, 2)],
    "selected_fwd": [(2, 2), (4, 2), (4, 3), (2, 1), (8, 2)],
    "selected_dq": [(4, 2), (2, 2), (4, 3), (8, 2)],
    "selected_kc": [(0,), (1,)],       # the forward group-centric vs key-centric
    "selected_kc_bwd": [(0,), (1,)],   # the dQ group-centric vs key-centric
    "selected_kc_shape": [(64, 1024, 16, 4, 2), (64, 512, 4, 4, 3), (64, 512, 16, 4, 3), (64, 2048, 16, 4, 2),
                          (128, 1024, 16, 8, 3), (32, 1024, 16, 4, 3)],
    "selected_merge": [(32, 8, 3), (32, 4, 3), (16, 4, 3), (8, 2, 3), (64, 8, 3)],
    "selected_kc_mib": [(256,), (512,), (1024,)],
    "selected_kc_heads": [(0,), (1,)],  # the key-centric backward in row chunks vs whole-head passes
    "selected_dkv": [(32, 1024, 4, 3), (32, 2048, 4, 2), (32, 4096, 4, 2), (32, 1024, 8, 3), (64, 1024, 4, 3),
                     (16, 1024, 4, 3)],
}


def ms(fn):
    return median_ms(fn, warmup=10, rep=60)


def parts(T, HQ, H, dk, dv, cfg):
    t = nsa_inputs(T, HQ, H, dk, dv, cfg)
    P = lambda x: x.reshape(-1, x.shape[2], x.shape[3]).contiguous()
    q, kc, vc, ks, vs, kw, vw = (P(t[n]) for n in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win"))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    cuk = torch.tensor([0, kc.shape[0]], dtype=torch.int32, device="cuda")
    sc = dk ** -0.5
    l, d = cfg.cmp_block_size, cfg.cmp_stride
    o_c, lse_c = banded_fwd(q, kc, vc, cu, cuk, sc, d, l - 1, 0)
    idx = select_blocks(q, kc, lse_c, cu, cuk, sc, l, d, cfg.sel_block_size, cfg.sel_block_count,
                            cfg.sel_init_blocks, cfg.sel_local_blocks)
    o_s, lse_s = selected_fwd(q, ks, vs, idx, cu, sc, cfg.sel_block_size)
    o_w, lse_w = banded_fwd(q, kw, vw, cu, cu, sc, 1, 0, cfg.window_size)
    do = torch.randn_like(o_c)
    zl = torch.zeros_like(lse_c)
    zw = torch.zeros_like(lse_w)
    fns = {
        "cmp_fwd": lambda: banded_fwd(q, kc, vc, cu, cuk, sc, d, l - 1, 0),
        "select": lambda: select_blocks(q, kc, lse_c, cu, cuk, sc, l, d, cfg.sel_block_size,
                                            cfg.sel_block_count, cfg.sel_init_blocks, cfg.sel_local_blocks),
        "slc_fwd": lambda: selected_fwd(q, ks, vs, idx, cu, sc, cfg.sel_block_size),
        "win_fwd": lambda: banded_fwd(q, kw, vw, cu, cu, sc, 1, 0, cfg.window_size),
        "cmp_bwd": lambda: banded_bwd(q, kc, vc, o_c, lse_c, do, zl, cu, cuk, sc, d, l - 1, 0),
        "slc_bwd": lambda: selected_bwd(q, ks, vs, idx, o_s, lse_s, do, cu, sc, cfg.sel_block_size),
        "win_bwd": lambda: banded_bwd(q, kw, vw, o_w, lse_w, do, zw, cu, cu, sc, 1, 0, cfg.window_size),
    }
    if HQ == H:   # G = 1: compression attention and selection in one kernel (select.py)
        fns["cmp_select"] = lambda: cmp_select_fwd(q, kc, vc, cu, cuk, sc, l, d, cfg.sel_block_size,
                                                       cfg.sel_block_count, cfg.sel_init_blocks, cfg.sel_local_blocks)
    tt = nsa_inputs(T, HQ, H, dk, dv, cfg, requires_grad=True)
    dO = torch.randn(1, T, HQ, dv, device="cuda", dtype=torch.bfloat16)
    fns["api_fwd"] = lambda: nsa.nsa_attention(**tt, config=cfg)
    fns["api_fwd_bwd"] = lambda: torch.autograd.backward(nsa.nsa_attention(**tt, config=cfg), dO)
    return fns


# the ops each override affects
AFFECTS = {"banded_fwd": ["cmp_fwd", "win_fwd"], "banded_fwd_win": ["win_fwd"], "banded_dq": ["cmp_bwd", "win_bwd"],
           "banded_dkv": ["cmp_bwd", "win_bwd"], "banded_splits": ["cmp_bwd"], "banded_unmasked": ["cmp_fwd", "cmp_bwd", "win_fwd", "win_bwd"],
           "select": ["select"], "select_spread": ["select", "cmp_select"], "cmp_select": ["api_fwd"],
           "cmp_select_launch": ["cmp_select"], "selected_fwd": ["slc_fwd"], "selected_dq": ["slc_bwd"],
           "selected_kc": ["slc_fwd", "api_fwd"], "selected_kc_bwd": ["slc_bwd", "api_fwd_bwd"],
           "selected_kc_shape": ["slc_fwd", "slc_bwd"], "selected_merge": ["slc_fwd"],
           "selected_kc_mib": ["slc_fwd", "slc_bwd"], "selected_kc_heads": ["slc_bwd"], "selected_dkv": ["slc_bwd"]}


def kernel_times(fn):
    """(kernel name, ms) of every GPU kernel one call of fn launches, in launch order (torch
    profiler; a warmed-up call, so that no compilation is in it)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(name, s * 1e3) for name, s in gpu_events(prof) if s > 0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--HQ", type=int, default=64)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--dk", type=int, default=192)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--sweep", nargs="*", default=None, help="kernels to sweep (none given: all)")
    p.add_argument("--budget", type=float, default=480, help="seconds before sweeps stop")
    p.add_argument("--ops", nargs="+", default=None, help="time only these ops (default: all)")
    p.add_argument("--kernels", action="store_true", help="each kernel's time in one forward+backward")
    a = p.parse_args()
    start = time.time()
    fns = parts(a.T, a.HQ, a.H, a.dk, a.dv, PAPER)
    print(f"T={a.T} HQ={a.HQ} H={a.H} dk={a.dk} dv={a.dv}", flush=True)
    base = {}
    for name, fn in fns.items():
        if a.ops and name not in a.ops:
            continue
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            base[name] = ms(fn)
        print(f"{name:>12}: {base[name]:8.2f} ms", flush=True)
    for kind, names in (("fwd", ("cmp_fwd", "select", "slc_fwd", "win_fwd")), ("bwd", ("cmp_bwd", "slc_bwd", "win_bwd"))):
        if all(n in base for n in names):
            print(f"sum of {kind} kernels {sum(base[n] for n in names):.2f} ms", flush=True)
    kernels = []
    if a.kernels:
        kernels = kernel_times(fns["api_fwd_bwd"])
        print("kernels of one forward+backward, in launch order (ms; under 0.1 ms left out):")
        for name, t in kernels:
            if t >= 0.1:
                print(f"  {t:8.2f}  {name[:100]}", flush=True)
        print(f"  {sum(t for _, t in kernels):8.2f}  in all", flush=True)
    sweeps = {}
    if a.sweep is not None:
        for kern in (a.sweep or SWEEPS):
            for cfg in SWEEPS[kern]:
                if time.time() - start > a.budget:
                    print("budget reached; sweep stopped")
                    break
                os.environ["NSA_TUNE"] = json.dumps({kern: list(cfg)})
                res = {}
                for op in AFFECTS[kern]:
                    try:
                        res[op] = ms(fns[op])
                    except Exception as e:  # noqa: BLE001 - a config may not compile (resources)
                        res[op] = f"error: {str(e)[:80]}"
                sweeps.setdefault(kern, []).append(dict(config=cfg, **res))
                print(f"  {kern:>13} {str(cfg):>20}: " + "  ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
            os.environ.pop("NSA_TUNE", None)
    save(f"profile_T{a.T}_HQ{a.HQ}_H{a.H}", dict(env=environment(), shape=vars(a), base=base, kernels=kernels, sweeps=sweeps))


if __name__ == "__main__":
    main()
