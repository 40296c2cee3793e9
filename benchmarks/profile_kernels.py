"""Kernel-by-kernel CUDA times (torch.profiler) of one NSA forward, or forward+backward, at
one shape: where the time goes, torch ops (sorts, index building) included. Each NSA_TUNE
override given runs as its own table (e.g. the key-centric partial budget).

  python benchmarks/profile_kernels.py --setting G1 --T 65536 [--backward] [--tune '{"selected_kc_mib": [128]}' ...]

--plain N runs it N times without the profiler, for an outside one (Nsight Compute):
  ncu -k regex:nsa_cmp_select --launch-skip 1 --launch-count 1 --set full -o rep \
      python benchmarks/profile_kernels.py --setting G1 --plain 2
"""
import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from shapes import HEADS, PAPER, nsa_inputs  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--setting", default="G1", choices=sorted(HEADS))
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--dk", type=int, default=128)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--backward", action="store_true", help="profile forward+backward")
    p.add_argument("--tune", nargs="*", default=[""], help="NSA_TUNE JSON per table ('' = defaults)")
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--plain", type=int, default=0, help="run N times, no profiler (for ncu)")
    a = p.parse_args()
    HQ, H = HEADS[a.setting]
    t = nsa_inputs(a.T, HQ, H, a.dk, a.dv, PAPER, requires_grad=a.backward)
    do = torch.randn(1, a.T, HQ, a.dv, device="cuda", dtype=torch.bfloat16)

    def run():
        o = nsa.nsa_attention(**t, config=PAPER)
        if a.backward:
            torch.autograd.backward(o, do)

    if a.plain:
        with torch.enable_grad() if a.backward else torch.no_grad():
            for _ in range(a.plain):
                run()
        torch.cuda.synchronize()
        return
    for tune in a.tune:
        os.environ["NSA_TUNE"] = tune
        with torch.enable_grad() if a.backward else torch.no_grad():
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                run()
                torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in ev) / 1e3
        print(f"=== {a.setting} T={a.T} {'fwd+bwd' if a.backward else 'fwd'} NSA_TUNE={tune or '-'}: "
              f"GPU {total:.2f} ms in {sum(e.count for e in ev)} launches", flush=True)
        for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:a.rows]:
            print(f"  {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:<3d} {e.key[:90]}", flush=True)
    os.environ.pop("NSA_TUNE", None)


if __name__ == "__main__":
    main()
