"""A/B of block-selection kernel variants (textual edits of nsa/triton/select.py) at 64k:
time per variant x launch shape, and how many rows pick other blocks than the unedited kernel.

  python benchmarks/experiments/ab_select.py [--T 65536]
Variants: base (as committed); bf16x3 (the overlap-weight product on tensor cores: scores split
into three bf16 parts times integer overlap counts, exact products, fp32 sums); tf32 (the same
product in one tf32 pass: lossy, timing only); nosort (running top list by elementwise max:
wrong, timing only: what the sort costs); skip (merge a chunk only when one of its keys beats a
row's current n-th best).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from nsa.triton import ops  # noqa: E402
from shapes import PAPER, environment, median_ms, nsa_inputs, save  # noqa: E402

OLD_SCORE = '''    if BT >= 16:
        score = tl.dot(pg, w, input_precision="ieee")                       # [BT, NTOP]'''
BF16X3 = '''    if BT >= 16:
        wb = (w * CMP_D).to(tl.bfloat16)
        hi = pg.to(tl.bfloat16)
        r1 = pg - hi.to(tl.float32)
        mid = r1.to(tl.bfloat16)
        lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
        score = tl.dot(hi, wb)
        score = tl.dot(mid, wb, score)
        score = tl.dot(lo, wb, score) * (1.0 / CMP_D)'''
TF32 = '''    if BT >= 16:
        score = tl.dot(pg, w, input_precision="tf32")'''
MERGE = "    return _merge_top(top, key), carry"
NOSORT = "    return tl.maximum(top, key), carry"
SKIP = '''    if tl.max(tl.where(key > tl.min(top, axis=1)[:, None], 1, 0)) > 0:
        top = _merge_top(top, key)
    return top, carry'''
VARIANTS = {"base": [], "bf16x3": [(OLD_SCORE, BF16X3)], "tf32": [(OLD_SCORE, TF32)],
            "nosort": [(MERGE, NOSORT)], "tf32_nosort": [(OLD_SCORE, TF32), (MERGE, NOSORT)],
            "skip": [(MERGE, SKIP)], "bf16x3_skip": [(OLD_SCORE, BF16X3), (MERGE, SKIP)]}
SHAPES = {"G1": (8, 8, 128), "G4": (16, 4, 128), "paper": (64, 4, 192)}   # HQ, H, dk
CONFIGS = {"G1": [(128, 4, 2), (32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2), (256, 8, 2), (64, 8, 2)],
           "G4": [(128, 4, 2), (64, 4, 2), (128, 8, 2), (256, 8, 2)],
           "paper": [(128, 4, 2), (128, 8, 2), (256, 8, 2)]}


def variant_modules():
    root = pathlib.Path(tempfile.mkdtemp())
    src = pathlib.Path(ops.__file__).with_name("select.py").read_text()
    src = src.replace("from .utils import", "from nsa.triton.utils import")
    (root / "selvars").mkdir()
    (root / "selvars" / "__init__.py").write_text("")
    for name, edits in VARIANTS.items():
        s = src
        for a, b in edits:
            assert a in s, (name, a)
            s = s.replace(a, b)
        (root / "selvars" / f"v_{name}.py").write_text(s)
    sys.path.insert(0, str(root))
    return {n: importlib.import_module(f"selvars.v_{n}").nsa_select_kernel for n in VARIANTS}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    a = p.parse_args()
    kernels = variant_modules()
    cfg, T, rows = PAPER, a.T, []
    for shape in a.shapes:
        HQ, H, dk = SHAPES[shape]
        t = nsa_inputs(T, HQ, H, dk, 128, cfg)
        P = lambda x: x.reshape(-1, x.shape[2], x.shape[3]).contiguous()
        q, kc, vc = P(t["q"]), P(t["k_cmp"]), P(t["v_cmp"])
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        cuk = torch.tensor([0, kc.shape[0]], dtype=torch.int32, device="cuda")
        sc = dk ** -0.5
        _, lse = ops.banded_fwd(q, kc, vc, cu, cuk, sc, cfg.cmp_stride, cfg.cmp_block_size - 1, 0)
        sel = lambda: ops.select_blocks(q, kc, lse, cu, cuk, sc, cfg.cmp_block_size, cfg.cmp_stride,
                                        cfg.sel_block_size, cfg.sel_block_count, cfg.sel_init_blocks,
                                        cfg.sel_local_blocks)
        ref = None
        for name in a.variants:
            ops.nsa_select_kernel = kernels[name]
            for c in CONFIGS[shape]:
                os.environ["NSA_TUNE"] = json.dumps({"select": list(c)})
                try:
                    idx = sel()
                    torch.cuda.synchronize()
                    if ref is None:
                        ref = idx.clone()
                    differ = float((idx != ref).any(-1).float().mean())
                    ms = median_ms(sel, warmup=10, rep=40)
                except Exception as e:  # noqa: BLE001 - a shape may not compile
                    ms, differ = float("nan"), f"error {str(e)[:60]}"
                rows.append(dict(shape=shape, variant=name, config=c, ms=ms, rows_differ=differ))
                print(f"{shape:>6} {name:>12} {str(c):>14}: {ms:7.2f} ms  rows differing from base {differ}", flush=True)
        os.environ.pop("NSA_TUNE", None)
    save(f"ab_select_T{T}_{'_'.join(a.shapes)}", dict(env=environment(), T=T, rows=rows))


if __name__ == "__main__":
    main()
