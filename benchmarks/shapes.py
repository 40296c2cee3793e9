"""Shared shape registry and timing helpers of the benchmark scripts."""
from __future__ import annotations

import datetime
import json
import os
import platform

import torch

import nsa

PAPER = nsa.NSAConfig()                                   # l=32, d=16, l'=64, n=16, w=512
FLA_COMPARABLE = nsa.NSAConfig(cmp_block_size=64, cmp_stride=64, sel_block_size=64,
                               sel_block_count=16, window_size=1)   # fla: no window branch
LENGTHS = [4096, 8192, 16384, 32768, 65536]
HEADS = {"paper": (64, 4), "G4": (16, 4), "G1": (8, 8)}   # (HQ, H)
DIMS = {"192/128": (192, 128), "128/128": (128, 128)}


def nsa_inputs(T, HQ, H, dk, dv, cfg, dtype=torch.bfloat16, device="cuda", requires_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    Tc = cfg.num_compressed(T)

    def r(*s):
        return torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_(requires_grad)
    t = dict(q=r(1, T, HQ, dk), k_cmp=r(1, Tc, H, dk), v_cmp=r(1, Tc, H, dv), k_slc=r(1, T, H, dk),
             v_slc=r(1, T, H, dv), k_win=r(1, T, H, dk), v_win=r(1, T, H, dv))
    t["gates"] = torch.rand(1, T, HQ, 3, generator=g, device=device, dtype=dtype).requires_grad_(requires_grad)
    return t


def median_ms(fn, grads=None, warmup=25, rep=100):
    """Median time of fn in ms (triton.testing.do_bench; warmup/rep are milliseconds)."""
    import triton
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")


def wall_s(fn, reps):
    """Median wall time of fn() in seconds, the GPU synchronised around each call (whole
    steps with host work, where do_bench's kernel timing would miss the host)."""
    import statistics
    import time
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream): returns replay, outputs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def err(x, ref):
    """||x - ref|| / ||ref||, in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def environment():
    import triton
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"))


def results_dirs():
    """benchmarks/results/<gpu>/ (the latest results of each GPU), and $OUT when set."""
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", gpu)]
    dirs += [os.environ["OUT"]] if os.environ.get("OUT") else []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    return dirs


def stored(name):
    """The stored <results>/<name>.json of this GPU ({} when there is none)."""
    path = os.path.join(results_dirs()[0], f"{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save(name, payload):
    """<results>/<name>.json in every results_dirs()."""
    for d in results_dirs():
        with open(os.path.join(d, f"{name}.json"), "w") as f:
            json.dump(payload, f, indent=1)


def save_figure(fig, name):
    """<results>/<name>.png in every results_dirs()."""
    for d in results_dirs():
        fig.savefig(os.path.join(d, f"{name}.png"), dpi=120)
