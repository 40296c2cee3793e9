"""The G = 1 fused compression + selection kernel against the two kernels it replaces, at long
packed lengths (int64 offsets; the float64 reference is out of reach there): o, lse and the
selection of cmp_select_fwd against banded_fwd + select_blocks, bf16 inputs.

  python benchmarks/check_cmp_select.py --lengths 262144 131149
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from nsa.triton import ops  # noqa: E402
from shapes import PAPER, err  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[262144, 131149], help="packed sequence lengths")
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--dk", type=int, default=128)
    a = p.parse_args()
    c, g = PAPER, torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0] + a.lengths, device="cuda").cumsum(0).int()
    cu_k = nsa.compressed_cu_seqlens(cu, c.cmp_block_size, c.cmp_stride).int()
    N, Nc = int(cu[-1]), int(cu_k[-1])
    q = torch.randn(N, a.H, a.dk, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(Nc, a.H, a.dk, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(Nc, a.H, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    sel = (c.cmp_block_size, c.cmp_stride, c.sel_block_size, c.sel_block_count, c.sel_init_blocks, c.sel_local_blocks)
    o, lse, idx = ops.cmp_select_fwd(q, k, v, cu, cu_k, a.dk ** -0.5, *sel)
    o2, lse2 = ops.banded_fwd(q, k, v, cu, cu_k, a.dk ** -0.5, c.cmp_stride, c.cmp_block_size - 1, 0)
    idx2 = ops.select_blocks(q, k, lse2, cu, cu_k, a.dk ** -0.5, *sel)
    fin = torch.isfinite(lse2)
    same_inf = bool(torch.equal(torch.isfinite(lse), fin))
    e_o, e_lse = err(o.float(), o2.float()), float((lse[fin] - lse2[fin]).abs().max())
    diff = float((idx != idx2).any(-1).float().mean())
    ok = same_inf and e_o < 1e-2 and e_lse < 1e-3 and diff < 1e-3 and bool((idx2 >= -1).all())
    print(f"lengths={a.lengths} H={a.H} dk={a.dk}: o err {e_o:.2e}, lse max diff {e_lse:.2e}, "
          f"-inf rows agree {same_inf}, selections differing {diff:.2e}  {'OK' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
