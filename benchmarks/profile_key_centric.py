"""Kernel-by-kernel CUDA times of the key-centric selected attention (forward and backward) at
64k, G=1, with a small and a large partial-buffer budget (torch.profiler): where the cost of
more row chunks goes.

  python benchmarks/profile_key_centric.py
"""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from nsa.triton import ops  # noqa: E402
from shapes import PAPER, nsa_inputs  # noqa: E402

T, HQ, H = 65536, 8, 8
t = nsa_inputs(T, HQ, H, 128, 128, PAPER)
P = lambda x: x.reshape(-1, x.shape[2], x.shape[3]).contiguous()
q, kc, vc, ks, vs = (P(t[n]) for n in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc"))
cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
cuk = torch.tensor([0, kc.shape[0]], dtype=torch.int32, device="cuda")
sc = 128 ** -0.5
c = PAPER
o_c, lse_c = ops.banded_fwd(q, kc, vc, cu, cuk, sc, c.cmp_stride, c.cmp_block_size - 1, 0)
idx = ops.select_blocks(q, kc, lse_c, cu, cuk, sc, c.cmp_block_size, c.cmp_stride, c.sel_block_size,
                        c.sel_block_count, c.sel_init_blocks, c.sel_local_blocks)
do = torch.randn_like(q)
for mib in (128, 1024):
    os.environ["NSA_TUNE"] = json.dumps({"selected_kc_mib": [mib]})
    run = lambda: ops.selected_bwd(q, ks, vs, idx, *ops.selected_fwd(q, ks, vs, idx, cu, sc, 64), do, cu, sc, 64)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"=== selected_kc_mib {mib}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=50))
