"""The GPU-busy share of a piece of work: the GPU time of the kernels and copies it ran (from
the PyTorch profiler) over its wall time. 1.0: the GPU never waited for the host."""
from __future__ import annotations

import time

import torch


def gpu_events(prof) -> list:
    """(name, seconds) of each piece of GPU work a torch.profiler run recorded (kernels, copies,
    fills), in launch order."""
    cuda = torch.autograd.DeviceType.CUDA
    return [(e.name, getattr(e, "device_time", 0.0) / 1e6) for e in prof.events()
            if getattr(e, "device_type", None) == cuda]


def gpu_seconds(prof) -> float:
    """Seconds of GPU work a torch.profiler run recorded."""
    return sum(t for _, t in gpu_events(prof))


def busy(fn, repeat: int = 1):
    """Run fn() `repeat` times under the profiler: (its last result, GPU-busy share, wall seconds
    per call). The profiler's own cost makes the share a slight underestimate."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeat):
            out = fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return out, gpu_seconds(prof) / wall, wall / repeat
