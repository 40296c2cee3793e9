"""What the selection kernel's top-n costs (a probe, not a fix): times nsa_select_kernel with its
running top-n merge (select._merge_top) swapped for cheaper stand-ins that give WRONG
selections, so that the difference is the merge's cost:
  base     the real merge (sort the chunk's int64 keys, max against the list, bitonic merge)
  none     elementwise max of list and chunk (no sorting at all: the scoring's cost)
  sortonly the chunk's sort, no bitonic merge
  i32      the real merge on keys truncated to 32 bits (what 32-bit keys would cost)
One variant per process (Triton compiles what select._merge_top names at first launch).
Also times the compression and window forwards alone, and writes the select kernel's TTGIR.

  python benchmarks/probe_topn.py --variant base --setting G1
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from nsa.triton import ops, select  # noqa: E402
from shapes import HEADS, PAPER, median_ms, nsa_inputs  # noqa: E402


@triton.jit
def _none(top, key):
    return tl.maximum(top, key)


@triton.jit
def _sortonly(top, key):
    return tl.maximum(top, tl.sort(key, dim=1))


@triton.jit
def _i32(top, key):
    k = (key >> 32).to(tl.int32)
    t = (top >> 32).to(tl.int32)
    m = tl.bitonic_merge(tl.maximum(t, tl.sort(k, dim=1)), dim=1, descending=True)
    return m.to(tl.int64) << 32


VARIANTS = {"base": None, "none": _none, "sortonly": _sortonly, "i32": _i32}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    p.add_argument("--setting", default="G1", choices=sorted(HEADS))
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--dk", type=int, default=128)
    p.add_argument("--branches", action="store_true", help="also time the compression and window forwards")
    a = p.parse_args()
    if VARIANTS[a.variant] is not None:
        select._merge_top = VARIANTS[a.variant]
    HQ, H = HEADS[a.setting]
    cfg = PAPER
    t = nsa_inputs(a.T, HQ, H, a.dk, 128, cfg)
    P = lambda x: x.reshape(-1, x.shape[2], x.shape[3]).contiguous()
    q, kc, vc, kw, vw = (P(t[n]) for n in ("q", "k_cmp", "v_cmp", "k_win", "v_win"))
    cu = torch.tensor([0, a.T], dtype=torch.int32, device="cuda")
    cuk = torch.tensor([0, kc.shape[0]], dtype=torch.int32, device="cuda")
    sc = a.dk ** -0.5
    l, d = cfg.cmp_block_size, cfg.cmp_stride
    _, lse = ops.banded_fwd(q, kc, vc, cu, cuk, sc, d, l - 1, 0)
    sel = lambda: ops.select_blocks(q, kc, lse, cu, cuk, sc, l, d, cfg.sel_block_size, cfg.sel_block_count,
                                    cfg.sel_init_blocks, cfg.sel_local_blocks)
    res = {"variant": a.variant, "setting": a.setting, "T": a.T, "select_ms": median_ms(sel)}
    if a.branches:
        res["cmp_fwd_ms"] = median_ms(lambda: ops.banded_fwd(q, kc, vc, cu, cuk, sc, d, l - 1, 0))
        res["win_fwd_ms"] = median_ms(lambda: ops.banded_fwd(q, kw, vw, cu, cu, sc, 1, 0, cfg.window_size))
    if a.variant == "base" and os.environ.get("OUT"):
        src = getattr(getattr(tl.standard, "_compare_and_swap", None), "src", "")
        res["triton"] = triton.__version__
        res["has_topk"] = hasattr(tl, "topk")
        try:
            kern = next(iter(select.nsa_select_kernel.device_caches[0][0].values()))
            ttgir = kern.asm.get("ttgir", "")
        except Exception as e:  # noqa: BLE001 - Triton internals differ across versions
            ttgir = f"unavailable: {e!r}"
        res["ttgir_convert_layout"] = ttgir.count("convert_layout")
        res["ttgir_local_alloc"] = ttgir.count("local_alloc")
        with open(os.path.join(os.environ["OUT"], f"select_{a.setting}.ttgir"), "w") as f:
            f.write(ttgir)
        with open(os.path.join(os.environ["OUT"], "compare_and_swap.py"), "w") as f:
            f.write(src)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
