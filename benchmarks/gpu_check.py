"""GPU correctness in bf16 (or fp16, --dtype float16): the Triton backend against the float64
reference, judged against an eager run of the same reference in that dtype (its matmuls and
softmax in bf16 / fp16).

Pass rule, for the output and every gradient: err(kernel) <= 2 * err(eager) + 1e-3, with
err = ||x - x_f64|| / ||x_f64||. The selection is compared with the float64 reference's and
the fraction of (token, head) rows that differ (near ties under rounding) is reported; outputs
and gradients are then compared on the kernel's own selection, so both compute one function.

  python benchmarks/gpu_check.py --lengths 4096 16384 65536 [--small-groups-at 8192] [--wide 8192,16,4 ...]
      [--long 262221,64,4,192,128 ...] [--dtype float16] [--name gpu_check]

--wide: T,HQ,H cases with dk = dv = 256 (the launch shapes fitted to shared memory; default two).
--long: sequences too long for the full reference (past 2**31 elements: int64 offsets), checked
at a few query positions against reference.nsa_at_positions (check_long).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from nsa import reference  # noqa: E402
from nsa.core import combine, selection_kwargs  # noqa: E402
from shapes import PAPER, environment, err, nsa_inputs, save  # noqa: E402

NAMES = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]


def run_reference(t, cfg, idx, cu=None):
    o_cmp, _ = reference.compressed_attention(t["q"], t["k_cmp"], t["v_cmp"], cmp_block_size=cfg.cmp_block_size,
                                              cmp_stride=cfg.cmp_stride, cu_seqlens=cu)
    o_slc = reference.selected_attention(t["q"], t["k_slc"], t["v_slc"], idx, sel_block_size=cfg.sel_block_size, cu_seqlens=cu)
    o_win = reference.sliding_window_attention(t["q"], t["k_win"], t["v_win"], window_size=cfg.window_size, cu_seqlens=cu)
    return combine(o_cmp, o_slc, o_win, t["gates"])


def fwd_bwd(fn, t, do):
    o = fn(t)
    grads = torch.autograd.grad(o, [t[n] for n in NAMES], do)
    return [o] + list(grads)


def eager(fn):
    """fn() with the reference computing in its inputs' dtype (the eager baseline), not fp32."""
    orig = reference.compute_dtype
    reference.compute_dtype = lambda dt: dt
    try:
        return fn()
    finally:
        reference.compute_dtype = orig


def judge(kern, ref, base):
    """Per tensor (o, then the gradients of NAMES): err of the kernel's and of the eager
    baseline's against float64, the pass rule, and whether the kernel's holds a NaN."""
    rows = []
    for name, a, r, e in zip(["o"] + ["d" + n for n in NAMES], kern, ref, base):
        ek, ee = err(a, r), err(e, r)
        rows.append(dict(tensor=name, err_kernel=ek, err_eager=ee, ok=ek <= 2 * ee + 1e-3,
                         nan=bool(torch.isnan(a).any())))
    return rows


def check(T, HQ, H, dk, dv, cfg, dtype=torch.bfloat16):
    base = nsa_inputs(T, HQ, H, dk, dv, cfg, seed=T)
    mk = lambda dt: {k: v.detach().to(dt).requires_grad_() for k, v in base.items()}
    tk, t64, t_eager = mk(dtype), mk(torch.float64), mk(dtype)
    do = torch.randn(1, T, HQ, dv, device="cuda", dtype=torch.bfloat16).to(dtype)
    t0 = time.time()
    o_k, idx_k = nsa.nsa_attention(**tk, config=cfg, return_block_idx=True, backend="triton")
    with torch.no_grad():
        _, lse64 = reference.compressed_attention(t64["q"], t64["k_cmp"], t64["v_cmp"],
                                                  cmp_block_size=cfg.cmp_block_size, cmp_stride=cfg.cmp_stride)
        idx64 = reference.select_blocks(t64["q"], t64["k_cmp"], lse64, **selection_kwargs(cfg))
    sel_diff = float((idx_k != idx64).any(-1).float().mean())
    kern = fwd_bwd(lambda t: nsa.nsa_attention(**t, config=cfg, backend="triton"), tk, do)
    ref = fwd_bwd(lambda t: run_reference(t, cfg, idx_k), t64, do.double())
    rows = judge(kern, ref, eager(lambda: fwd_bwd(lambda t: run_reference(t, cfg, idx_k), t_eager, do)))
    return dict(T=T, HQ=HQ, H=H, dk=dk, dv=dv, dtype=str(dtype).split(".")[-1], config=vars(cfg), selection_rows_differing=sel_diff,
                seconds=time.time() - t0, tensors=rows, ok=all(r["ok"] and not r["nan"] for r in rows))


def long_positions(T, HQ, dk):
    """Checked query positions of a long sequence: its ends, a few inside, and the first row
    whose q offset (row * HQ * dk elements) passes 2**31, and the next."""
    over = -(-2 ** 31 // (HQ * dk))
    pos = {0, 63, 4095, T // 3, T // 2 + 1, T - 65, T - 1} | ({over, over + 1} if over + 1 < T else set())
    return sorted(p for p in pos if p < T)


def check_long(T, HQ, H, dk, dv, cfg, dtype=torch.bfloat16):
    """A sequence too long for the full reference (int64 offsets): the kernels run the whole of
    it, dO is zero except at long_positions; output and every gradient there (dK/dV: whole, as
    only those rows add to them) against reference.nsa_at_positions in float64, judged against
    it in `dtype`, as check() does. The kernel's dq and dgates off those rows must be exactly 0."""
    pos = long_positions(T, HQ, dk)
    base = nsa_inputs(T, HQ, H, dk, dv, cfg, seed=T)
    p = torch.tensor(pos, device="cuda")
    do = torch.zeros(1, T, HQ, dv, device="cuda", dtype=dtype)
    do[0, p] = torch.randn(len(pos), HQ, dv, device="cuda").to(dtype)
    t0 = time.time()
    tk = {k: v.detach().to(dtype).requires_grad_() for k, v in base.items()}
    o_k, idx_k = nsa.nsa_attention(**tk, config=cfg, return_block_idx=True, backend="triton")
    gk = torch.autograd.grad(o_k, [tk[n] for n in NAMES], do)
    off = torch.ones(T, dtype=torch.bool, device="cuda")
    off[p] = False
    stray = max(float(g[0, off].abs().max()) for g in (gk[0], gk[-1]))   # dq, dgates off the rows
    nan = bool(torch.isnan(o_k).any()) or any(bool(torch.isnan(g).any()) for g in gk)
    kern = [o_k[0, p], gk[0][0, p]] + [g[0] for g in gk[1:-1]] + [gk[-1][0, p]]
    del o_k, gk, tk
    torch.cuda.empty_cache()

    def at_rows(dt):   # o and the gradients at the rows by autograd through nsa_at_positions
        t = {k: (v.detach()[0, p] if k in ("q", "gates") else v.detach()[0]).to(dt).requires_grad_()
             for k, v in base.items()}
        o, idx = reference.nsa_at_positions(*(t[n] for n in NAMES), p, config=cfg)
        return [o] + list(torch.autograd.grad(o, [t[n] for n in NAMES], do[0, p].to(dt))), idx

    ref, idx64 = at_rows(torch.float64)
    sel_diff = float((idx_k[0, p] != idx64).any(-1).float().mean())
    rows = judge(kern, ref, eager(lambda: at_rows(dtype)[0]))
    ok = all(r["ok"] for r in rows) and not nan and stray == 0 and sel_diff == 0
    return dict(T=T, HQ=HQ, H=H, dk=dk, dv=dv, dtype=str(dtype).split(".")[-1], positions=pos,
                config=vars(cfg), selection_rows_differing=sel_diff, nan=nan, stray_grad=stray,
                seconds=time.time() - t0, tensors=rows, ok=ok)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--small-groups-at", type=int, default=8192, help="0: no small-group cases")
    p.add_argument("--wide", type=lambda x: tuple(int(v) for v in x.split(",")), nargs="*",
                   default=[(8192, 16, 4), (4096, 64, 4)], help="T,HQ,H cases with dk = dv = 256")
    p.add_argument("--long", type=lambda x: tuple(int(v) for v in x.split(",")), nargs="*", default=[],
                   help="T,HQ,H,dk,dv cases checked at some positions only (check_long), e.g. 262221,64,4,192,128")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--name", default="gpu_check", help="results file stem (benchmarks/results/<gpu>/<name>.json)")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    cases = [(T, 64, 4, 192, 128) for T in a.lengths]
    if a.small_groups_at:
        cases += [(a.small_groups_at, 16, 4, 128, 128), (a.small_groups_at, 8, 8, 64, 64),
                  (a.small_groups_at + 77, 12, 4, 256, 64)]
    cases += [(T, HQ, H, 256, 256) for T, HQ, H in a.wide]
    results = []
    for fn, c in [(check, c) for c in cases] + [(check_long, c) for c in a.long]:
        r = fn(*c, PAPER, dtype)
        results.append(r)
        worst = max(r["tensors"], key=lambda x: x["err_kernel"] / (2 * x["err_eager"] + 1e-3))
        print(f"T={c[0]:6d} HQ={c[1]:2d} H={c[2]} dk/dv={c[3]}/{c[4]}  ok={r['ok']}  sel-diff={r['selection_rows_differing']:.4f}  "
              f"worst {worst['tensor']}: kernel {worst['err_kernel']:.2e} vs eager {worst['err_eager']:.2e}  ({r['seconds']:.0f}s)"
              + (f"  [{len(r['positions'])} positions, stray grad {r['stray_grad']:.1e}, nan {r['nan']}]" if "positions" in r else ""),
              flush=True)
        torch.cuda.empty_cache()
    save(a.name, dict(env=environment(), dtype=a.dtype, results=results))
    print("ALL OK" if all(r["ok"] for r in results) else "FAILURES")


if __name__ == "__main__":
    main()
