"""Where NSA's time goes at one shape, and which launch shapes win: times every kernel op
alone (paper shape, bf16), then sweeps NSA_TUNE overrides per kernel.

  python benchmarks/profile_parts.py --T 65536 [--sweep] [--budget 500]
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
from nsa.triton import ops  # noqa: E402
from shapes import PAPER, environment, median_ms, nsa_inputs, save  # noqa: E402

SWEEPS = {
    "banded_fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2),
                   (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3),
                   (256, 64, 8, 3), (32, 64, 4, 3)],
    "banded_dq": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
    "banded_dkv": [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2)],
    "select": [(64, 4, 2, 1), (64, 4, 2, 2), (128, 4, 2, 1), (128, 4, 2, 2), (128, 8, 2, 2), (256, 8, 2, 2),
               (32, 4, 2, 1), (64, 4, 3, 1), (128, 4, 3, 2)],   # (rows, warps, stages, spread: select.py)
    "cmp_select_launch": [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (128, 4, 2), (32, 4, 2), (64, 8, 2)],
    "cmp_select_more": [(64, 4, 1), (64, 4, 2), (64, 4, 1), (64, 4, 2), (128, 8, 1), (32, 2, 2), (32, 2, 1)],
    "selected_fwd": [(4, 2), (4, 1), (4, 3), (4, 4), (2, 2), (2, 1), (8, 2), (8, 3), (2, 3), (1, 2)],
    "banded_unmasked": [(0,), (1,)],   # A/B: every banded tile masked vs unmasked inner tiles (both branches)
    "selected_kc": [(0,), (1,)],   # A/B: group-centric vs key-centric forward
    "selected_kc_shape": [(64, 256, 16, 4, 2), (64, 256, 4, 4, 2), (64, 256, 8, 4, 2), (64, 256, 32, 4, 2),
                          (64, 256, 2, 4, 2), (32, 256, 16, 4, 2), (64, 512, 16, 4, 2), (128, 256, 16, 8, 2)],
    # dQ-sum positions per program (3rd), twice each in turn. In session 12 (results/session12/
    # merge) the forward's merge shared it, hence slc_fwd there; since, "selected_merge" has its own
    "selected_kc_merge": [(64, 256, b, 4, 2) for _ in range(2) for b in (4, 16, 32, 64)],
    "selected_merge": [(4,), (8,), (16,), (32,), (64,)],   # the forward's merge alone
    "selected_merge_launch": [(16, 4, 3), (16, 4, 2), (16, 4, 4), (16, 2, 3), (8, 2, 3), (32, 4, 3), (32, 8, 3),
                              (32, 4, 4), (64, 8, 3)],   # (positions, warps, stages)
    "banded_fwd_win": [(64, 32, 4, 3), (64, 32, 4, 2), (64, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3),
                       (128, 32, 8, 3), (32, 32, 2, 3), (64, 16, 4, 3), (128, 64, 4, 3)],
    "select_spread": [(1,), (2,)],   # the G = 1 fused kernel's (and the selection kernel's) spread
    # the key-centric forward's pipelining: longer segments, deeper stages (session 14)
    "selected_kc_pipe": [(64, 256, 16, 4, 2), (64, 256, 16, 4, 3), (64, 1024, 16, 4, 2), (64, 1024, 16, 4, 3),
                         (64, 1024, 16, 4, 4), (64, 2048, 16, 4, 3), (128, 1024, 16, 8, 3), (128, 1024, 16, 4, 3),
                         (32, 1024, 16, 4, 3), (64, 256, 16, 4, 2)],
    "selected_kc_pipe2": [(64, 512, 16, 4, 2), (64, 1024, 16, 4, 2), (64, 2048, 16, 4, 2), (64, 4096, 16, 4, 2),
                          (64, 256, 16, 4, 3), (64, 512, 16, 4, 3), (64, 256, 16, 4, 4), (64, 1024, 16, 8, 2),
                          (64, 1024, 16, 8, 3), (64, 256, 16, 4, 2)],
    "selected_kc_mib": [(128,), (256,), (512,), (1024,)],
    "selected_kc_bwd": [(0,), (1,)],   # A/B of the dQ: group-centric vs key-centric partials
    "selected_dq": [(4, 2), (4, 1), (4, 3), (2, 2), (8, 2)],
    "selected_dkv": [(64, 2048, 4, 2), (64, 2048, 4, 3), (128, 2048, 8, 2), (32, 2048, 4, 2), (64, 1024, 4, 2)],
    # after the one-tile-ahead list loads (session 15): the dK/dV kernel's and the forward's again
    "selected_dkv_pipe": [(32, 2048, 4, 2), (32, 2048, 4, 3), (64, 2048, 4, 2), (64, 2048, 4, 3), (16, 2048, 4, 2),
                          (32, 1024, 4, 2), (32, 4096, 4, 2), (32, 2048, 4, 2)],
    # the banded backward at the paper shape on the H200 (its launches were measured on the H100)
    "banded_dkv2": [(64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3), (128, 32, 4, 2), (64, 16, 4, 2),
                    (32, 32, 4, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    "banded_dq2": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 2)],
    "selected_dkv_g1": [(32, 2048, 4, 2), (32, 4096, 4, 2), (32, 4096, 4, 3), (32, 8192, 4, 2), (32, 8192, 4, 3),
                        (64, 4096, 4, 2), (32, 2048, 4, 2)],
    "selected_dkv_g4": [(32, 2048, 4, 2), (32, 2048, 4, 3), (32, 1024, 4, 3), (32, 2048, 4, 4), (32, 512, 4, 3),
                        (32, 1024, 4, 2), (32, 2048, 4, 2)],
    "selected_dkv_g2": [(32, 1024, 4, 3), (32, 2048, 4, 3), (32, 2048, 4, 2), (32, 4096, 4, 2), (32, 512, 4, 3),
                        (32, 1024, 4, 3)],
    "selected_dkv_g16": [(32, 2048, 4, 2), (32, 2048, 4, 3), (32, 1024, 4, 2), (32, 1024, 4, 3), (32, 512, 4, 3),
                         (32, 4096, 4, 2), (32, 2048, 4, 2)],
    "selected_kc_pipe3": [(64, 1024, 16, 4, 2), (64, 1024, 16, 4, 3), (64, 512, 16, 4, 3), (64, 2048, 16, 4, 2),
                          (64, 512, 4, 4, 3), (64, 512, 4, 4, 2), (64, 1024, 4, 4, 3), (64, 256, 4, 4, 4),
                          (64, 1024, 16, 4, 2)],
    # dk = dv = 256 (session 16): shapes that fit shared memory there (tuning.banded_smem); the
    # first of each is the fitted default
    "banded_fwd256": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3), (64, 64, 4, 2)],
    "banded_dq256": [(64, 64, 4, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 4)],
    "banded_dkv256": [(64, 32, 4, 3), (32, 32, 4, 3), (64, 32, 8, 3), (64, 16, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2),
                      (32, 16, 4, 3)],
    # the selected backward at 256/256: its dK/dV kernel holds [64, 256] fp32 dK and dV (ptxas: spills at 4 warps)
    "selected_dkv256": [(32, 1024, 4, 3), (32, 1024, 8, 3), (32, 1024, 8, 2), (16, 1024, 4, 3), (16, 1024, 8, 3),
                        (32, 2048, 8, 2), (64, 1024, 8, 2)],
    # 8 warps at the other shapes (64k): paper 192/128, G=4 and G=1 at 128/128
    "selected_dkv_w8": [(32, 1024, 4, 3), (32, 1024, 8, 3), (32, 1024, 8, 2), (64, 1024, 8, 3), (32, 2048, 8, 3)],
    "selected_dkv_w8g1": [(32, 4096, 4, 2), (32, 4096, 8, 2), (32, 4096, 8, 3), (64, 4096, 8, 2)],
    "selected_fwd256": [(2, 2), (4, 2), (4, 3), (8, 2), (2, 2)],   # ptxas: 2 warps spill 208 B at 256/256, 4 none
    # small groups at 256/256: the paper heads' wide launches against the narrow dims' (A/B)
    "selected_dkv_s256": [(32, 1024, 4, 3), (32, 1024, 8, 3), (32, 1024, 4, 3), (32, 1024, 8, 3)],
    "selected_dkv_s256g1": [(32, 4096, 4, 2), (32, 4096, 8, 2), (32, 4096, 4, 2), (32, 4096, 8, 2)],
    "banded_dkv_s256": [(64, 32, 4, 3), (64, 32, 8, 3), (64, 32, 4, 3), (64, 32, 8, 3)],
    "banded_dq_s256": [(64, 64, 4, 2), (128, 32, 8, 3), (64, 64, 4, 2), (128, 32, 8, 3)],
    "selected_dq256": [(4, 2), (8, 2), (8, 3), (4, 3), (2, 2)],
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
    o_c, lse_c = ops.banded_fwd(q, kc, vc, cu, cuk, sc, d, l - 1, 0)
    idx = ops.select_blocks(q, kc, lse_c, cu, cuk, sc, l, d, cfg.sel_block_size, cfg.sel_block_count,
                            cfg.sel_init_blocks, cfg.sel_local_blocks)
    o_s, lse_s = ops.selected_fwd(q, ks, vs, idx, cu, sc, cfg.sel_block_size)
    o_w, lse_w = ops.banded_fwd(q, kw, vw, cu, cu, sc, 1, 0, cfg.window_size)
    do = torch.randn_like(o_c)
    zl = torch.zeros_like(lse_c)
    zw = torch.zeros_like(lse_w)
    fns = {
        "cmp_fwd": lambda: ops.banded_fwd(q, kc, vc, cu, cuk, sc, d, l - 1, 0),
        "select": lambda: ops.select_blocks(q, kc, lse_c, cu, cuk, sc, l, d, cfg.sel_block_size,
                                            cfg.sel_block_count, cfg.sel_init_blocks, cfg.sel_local_blocks),
        "slc_fwd": lambda: ops.selected_fwd(q, ks, vs, idx, cu, sc, cfg.sel_block_size),
        "win_fwd": lambda: ops.banded_fwd(q, kw, vw, cu, cu, sc, 1, 0, cfg.window_size),
        "cmp_bwd": lambda: ops.banded_bwd(q, kc, vc, o_c, lse_c, do, zl, cu, cuk, sc, d, l - 1, 0),
        "slc_bwd": lambda: ops.selected_bwd(q, ks, vs, idx, o_s, lse_s, do, cu, sc, cfg.sel_block_size),
        "win_bwd": lambda: ops.banded_bwd(q, kw, vw, o_w, lse_w, do, zw, cu, cu, sc, 1, 0, cfg.window_size),
    }
    if HQ == H:   # G = 1: compression attention and selection in one kernel (select.py)
        fns["cmp_select"] = lambda: ops.cmp_select_fwd(q, kc, vc, cu, cuk, sc, l, d, cfg.sel_block_size,
                                                       cfg.sel_block_count, cfg.sel_init_blocks, cfg.sel_local_blocks)
    tt = nsa_inputs(T, HQ, H, dk, dv, cfg, requires_grad=True)
    dO = torch.randn(1, T, HQ, dv, device="cuda", dtype=torch.bfloat16)
    fns["api_fwd"] = lambda: nsa.nsa_attention(**tt, config=cfg)
    fns["api_fwd_bwd"] = lambda: torch.autograd.backward(nsa.nsa_attention(**tt, config=cfg), dO)
    return fns


# sweeps of another name's override
ALIAS = {"selected_kc_merge": "selected_kc_shape", "selected_kc_pipe": "selected_kc_shape", "selected_kc_pipe2": "selected_kc_shape",
         "selected_kc_pipe3": "selected_kc_shape", "selected_dkv_pipe": "selected_dkv", "banded_dkv2": "banded_dkv", "banded_dq2": "banded_dq",
         "selected_dkv_g1": "selected_dkv", "selected_dkv_g4": "selected_dkv", "selected_dkv_g2": "selected_dkv", "selected_dkv_g16": "selected_dkv",
         "selected_merge_launch": "selected_merge", "cmp_select_more": "cmp_select_launch",
         "banded_fwd256": "banded_fwd", "banded_dq256": "banded_dq", "banded_dkv256": "banded_dkv",
         "selected_dkv256": "selected_dkv", "selected_dkv_w8": "selected_dkv", "selected_dkv_w8g1": "selected_dkv", "selected_dq256": "selected_dq", "selected_fwd256": "selected_fwd",
         "selected_dkv_s256": "selected_dkv", "selected_dkv_s256g1": "selected_dkv", "banded_dkv_s256": "banded_dkv",
         "banded_dq_s256": "banded_dq"}

# which ops a kernel's override affects (a sweep of another name's override: that one's, unless given)
AFFECTS = {"banded_unmasked": ["cmp_fwd", "cmp_bwd", "win_fwd", "win_bwd"], "banded_fwd": ["cmp_fwd", "win_fwd"], "banded_dq": ["cmp_bwd", "win_bwd"], "banded_dkv": ["cmp_bwd", "win_bwd"],
           "select": ["select"], "cmp_select_launch": ["cmp_select"], "selected_fwd": ["slc_fwd"], "selected_kc": ["slc_fwd", "api_fwd"],
           "selected_kc_shape": ["slc_fwd", "slc_bwd"], "selected_kc_merge": ["slc_bwd"], "selected_kc_pipe": ["slc_fwd"], "selected_kc_pipe2": ["slc_fwd"],
           "selected_kc_pipe3": ["slc_fwd"], "banded_fwd_win": ["win_fwd"], "select_spread": ["select", "cmp_select"], "selected_merge": ["slc_fwd"],
           "selected_kc_mib": ["slc_fwd", "slc_bwd"], "selected_kc_bwd": ["slc_bwd", "api_fwd_bwd"], "selected_dq": ["slc_bwd"], "selected_dkv": ["slc_bwd"]}


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
    sweeps = {}
    if a.sweep is not None:
        for kern in (a.sweep or SWEEPS):
            for cfg in SWEEPS[kern]:
                if time.time() - start > a.budget:
                    print("budget reached; sweep stopped")
                    break
                os.environ["NSA_TUNE"] = json.dumps({ALIAS.get(kern, kern): list(cfg)})
                res = {}
                for op in AFFECTS.get(kern) or AFFECTS[ALIAS[kern]]:
                    try:
                        res[op] = ms(fns[op])
                    except Exception as e:  # noqa: BLE001 - a config may not compile (resources)
                        res[op] = f"error: {str(e)[:80]}"
                sweeps.setdefault(kern, []).append(dict(config=cfg, **res))
                print(f"  {kern:>13} {str(cfg):>20}: " + "  ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
            os.environ.pop("NSA_TUNE", None)
    save(f"profile_T{a.T}_HQ{a.HQ}_H{a.H}", dict(env=environment(), shape=vars(a), base=base, sweeps=sweeps))


if __name__ == "__main__":
    main()
