"""Every tile-size choice of the Triton backend, each with the reason for it.

The interpreter (TRITON_INTERPRET=1, CI) runs tiles as numpy arrays: small tiles keep it fast.
GPU choices are first guesses sized from register pressure; see benchmarks/ for measurements.
"""
from __future__ import annotations

import os

from .utils import pow2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def banded(bk: int, bv: int, gp: int):
    """(BT positions, BN keys, num_warps, num_stages) for the banded kernels. A tile of
    BT*gp rows: 64 rows when head dims pad to 256 (q tile + accumulator must stay in
    registers), else 128."""
    if interpreting():
        return max(1, 16 // gp), 16, 4, 1
    rows = 64 if max(bk, bv) >= 256 else 128
    return max(1, rows // gp), 64, 4 if rows == 64 else 8, 2


def select(bk: int, gp: int):
    """(BT positions, num_warps): 64 rows per tile, as in the banded forward."""
    if interpreting():
        return max(1, 16 // gp), 4
    return max(1, 64 // gp), 4


def selected(gp: int):
    """Rows of the group-centric tile: the group's heads, padded to the 16-row MMA minimum."""
    return max(16, gp)


def selected_bwd_queries(gp: int):
    """(BQ queries per step, SEG queries per segment) of the dK/dV kernel. SEG bounds how long
    one program runs (the first block is selected by every query); the fp32 partial buffer it
    implies is at most 2 * T*H*n / SEG blocks."""
    if interpreting():
        return max(1, 16 // gp), int(os.environ.get("NSA_SEL_SEGMENT", "8"))
    return max(1, 64 // gp), 2048


__all__ = ["banded", "select", "selected", "selected_bwd_queries", "interpreting", "pow2"]
