"""Registers, spills, shared memory and matrix instructions of every Triton kernel an NSA
forward+backward launches, on a machine without a GPU: each launch is compiled (not run) through
Triton's own JIT binder, so with the same specialisation as on the GPU, for a faked sm_90 target,
and ptxas -v reads the result. Spills show where a launch shape holds too much per thread (the G=1
selection kernel spilled ~2.9 KB a thread at 128 positions: 9.4 ms at 64k on an H100, 3.0 after
its fix). `mma` counts Hopper's wgmma and the older mma.sync in the PTX: Triton issues wgmma only
where a dot's M side is at least 64 rows (the compressed dK/dV with 32-key tiles ran on mma.sync:
64k backward 65.0 -> 56.9 ms on wgmma with 64-key tiles, H200).
Register counts come from this machine's triton, which may differ from the GPU image's.

  python benchmarks/ptxas_report.py G1 G4 paper [--T 4096] [--dtype float32] [--decode]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

import torch
import triton
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nsa  # noqa: E402
import nsa.api  # noqa: E402
from nsa.triton import backend as triton_backend  # noqa: E402
from nsa.triton import banded, decode, fused, gate, index, select, selected, tuning  # noqa: E402

SHAPES = {"G1": (8, 8, 128, 128), "G2": (8, 4, 128, 128), "G4": (16, 4, 128, 128),
          "paper": (64, 4, 192, 128), "paper128": (64, 4, 128, 128),
          "d256": (64, 4, 256, 256), "dv256": (64, 4, 128, 256), "G4d256": (16, 4, 256, 256), "G1d256": (8, 8, 256, 256),
          "d64": (64, 4, 64, 64), "G1d64": (8, 8, 64, 64)}   # HQ, H, dk, dv
SHOWN = ("BT", "BM", "BN", "BQ", "SEG", "GP", "KA", "KB", "BV", "DQ_PART", "ACCUM", "UNMASKED", "SPLIT_TC")


class _Sm90:
    """Enough of a driver for the JIT to compile for an H100 without one."""
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def record_launches():
    """Make every kernel launch compile only; returns the dict the compiled kernels go to."""
    seen, run = {}, jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        k = run(self, *args, grid=grid, warmup=True, **kwargs)
        seen.setdefault(id(k), (self.fn.__name__, k, kwargs))

    driver.set_active(_Sm90())
    jit.JITFunction.run = compile_only
    tuning.interpreting = lambda: False                        # GPU launch shapes
    tuning._sm_count = lambda device_index: 132                 # an H100's
    for family in (banded, decode, fused, gate, index, select, selected):   # valid indices, not poison
        family.empty = lambda *shape, dtype, device: torch.zeros(*shape, dtype=dtype, device=device)
    nsa.api._backend = lambda backend, x: triton_backend       # CPU tensors through the Triton path
    return seen


def _assemble(ptx):
    """ptxas -v's report of one PTX text, assembled for sm_90a."""
    exe = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))[0]
    path = "/tmp/nsa_ptxas_report.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    return subprocess.run([exe, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"], capture_output=True, text=True).stderr


def ptxas(kernel):
    out = _assemble(kernel.asm["ptx"])
    old = re.search(r"Unsupported \.version (\S+); current version is '(\S+)'", out)
    if old:   # a newer Triton than its bundled ptxas: the PTX rarely needs the newer ISA version
        out = _assemble(kernel.asm["ptx"].replace(f".version {old.group(1)}", f".version {old.group(2)}", 1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return int(re.search(r"Used (\d+) registers", out).group(1)), int(spill.group(1)), int(spill.group(2))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--decode", action="store_true", help="also a decoding step's kernels")
    a = p.parse_args()
    seen = record_launches()
    cfg = nsa.NSAConfig()
    for name in a.shapes:
        HQ, H, dk, dv = SHAPES[name]
        seen.clear()
        g = torch.Generator().manual_seed(0)
        dt = getattr(torch, a.dtype)
        r = lambda *s: torch.randn(*s, generator=g, dtype=dt).requires_grad_(True)
        Tc = cfg.num_compressed(a.T)
        t = dict(q=r(1, a.T, HQ, dk), k_cmp=r(1, Tc, H, dk), v_cmp=r(1, Tc, H, dv), k_slc=r(1, a.T, H, dk),
                 v_slc=r(1, a.T, H, dv), k_win=r(1, a.T, H, dk), v_win=r(1, a.T, H, dv))
        t["gates"] = torch.rand(1, a.T, HQ, 3, generator=g, dtype=dt).requires_grad_(True)
        try:   # outputs are never written (zeros): a step that needs real values may stop
            nsa.nsa_attention(**t, config=cfg, backend="triton").float().sum().backward()
            if a.decode:   # one decoding step of 4 rows over a cache of T tokens
                c = {n: x.detach().expand(4, *x.shape[1:]).contiguous() for n, x in t.items() if n[:2] in ("k_", "v_")}
                c["k_win"], c["v_win"] = c["k_win"][:, :cfg.window_size], c["v_win"][:, :cfg.window_size]
                nsa.nsa_decode(r(4, HQ, dk).detach(), **c, gates=torch.rand(4, HQ, 3, dtype=dt),
                               lengths=torch.tensor([a.T, 1, a.T // 2, 77]), config=cfg, backend="triton")
        except (RuntimeError, IndexError) as e:
            print(f"({name}: stopped after {len(seen)} kernels: {str(e)[:80]})")
        print(f"== {name}: HQ={HQ} H={H} dk={dk} dv={dv} T={a.T} {a.dtype}")
        for fname, k, kw in seen.values():
            regs, st, ld = ptxas(k)
            shown = " ".join(f"{x}={kw[x]}" for x in SHOWN if x in kw)
            ptx = k.asm["ptx"]
            mma = f"mma={ptx.count('wgmma.mma_async')}wg/{ptx.count('mma.sync')}sync"
            flag = ("  <- spills" if st > 64 else "") + ("  <- shared memory over the limit" if k.metadata.shared > tuning.SMEM_LIMIT else "")
            print(f"  {fname:32s} warps={kw.get('num_warps', 4)} regs={regs:3d} spill st/ld={st}/{ld} "
                  f"smem={k.metadata.shared} {mma} {shown}{flag}", flush=True)


if __name__ == "__main__":
    main()
