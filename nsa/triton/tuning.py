"""Every launch-shape choice of the Triton backend: one small function each, with a one-line
reason and the command that re-measures it. The measurements behind the choices are in
docs/performance.md.

`PP` below is `python benchmarks/profile_parts.py --T 65536` (the paper shape: HQ=64, H=4,
192/128; add `--HQ 16 --H 4 --dk 128 --dv 128` for G=4, `--HQ 8 --H 8 ...` for G=1).
NSA_TUNE='{"name": [...]}' overrides the choice `name` (what `PP --sweep name` does). The
interpreter (TRITON_INTERPRET=1, CI) takes small tiles, and takes every optional path, so that CI
runs each of them.
"""
from __future__ import annotations

import functools
import json
import os

from .utils import pow2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _overrides(env: str):
    return json.loads(env) if env else {}


def _pick(name, default):
    v = _overrides(os.environ.get("NSA_TUNE", "")).get(name)
    return tuple(v) if v else default


# Shared memory one thread block may use on an H100 / H200 (227 KB); a launch over it fails.
SMEM_LIMIT = 232448


def _wide(dk: int, dv: int) -> bool:
    """Head dims as wide as 256/256 (column tiles' widths): fp32 [rows, dk] and [rows, dv]
    accumulators spill registers at the narrower dims' warps, so those kernels take more warps.
    Re-measure: python benchmarks/ptxas_report.py d256 G1d256."""
    return dk + dv >= 512


def banded_smem(kind: str, rows: int, bn: int, stages: int, dk: int, dv: int, esize: int) -> int:
    """Bytes of shared memory a banded launch takes as Triton lays it out for sm_90: a buffer per
    pipeline stage of the streamed tiles (forward, dQ: a key tile's K and V; dK/dV: a query
    tile's q and dO) plus the tiles held throughout. Equals the compiled size for the forward and
    dQ, bounds it for dK/dV. Re-measure: python benchmarks/ptxas_report.py d64 paper d256."""
    if kind == "dkv":
        return (stages * rows + bn) * (dk + dv) * esize
    return (stages * bn * (dk + dv) + rows * (dk if kind == "fwd" else dk + dv)) * esize


def banded(kind: str, dk: int, dv: int, gp: int, win: int = 0, esize: int = 2):
    """(rows, BN keys, num_warps, num_stages) of a banded kernel (kind fwd / dq / dkv; win > 0:
    the window branch), fitted to shared memory (_fit). Each default was the fastest of its sweep
    (fwd 128/64/8/3; dq 128/64/8/3; dkv 64/64/8/3 from G = 4 up, else 64/32/4/3; wide heads 8
    warps for the backward; the window forward of small groups 64/32/4/3). dK/dV's key tile is
    the MMA's M side and Triton issues Hopper's wgmma only from M = 64: 32-key tiles ran on
    mma.sync (H200, 64k compression backward, paper 65.0 -> 56.9 ms, G=4 13.3 -> 11.9; G=1 6.7
    -> 6.8, so it keeps 32). Re-measure: PP --sweep banded_fwd banded_fwd_win banded_dq
    banded_dkv (with --dk 256 --dv 256 for the wide heads)."""
    if interpreting():
        return max(1, 16 // gp) * gp, 16, 4, 1
    default = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 3),
               "dkv": (64, 64, 8, 3) if gp >= 4 else (64, 32, 4, 3)}[kind]
    if _wide(dk, dv) and kind != "fwd":
        default = {"dq": (128, 32, 8, 3), "dkv": (64, 32, 8, 3)}[kind]
    if kind == "fwd" and win > 0 and gp <= 4:
        default = (64, 32, 4, 3)
    own = _pick(f"banded_{kind}_win", None) if win > 0 else None   # the window's alone (A/B timing)
    return own or _pick(f"banded_{kind}", _fit(kind, default, dk, dv, esize))


def _fit(kind: str, shape: tuple, dk: int, dv: int, esize: int) -> tuple:
    """shape with fewer stages (down to 2), then half the rows (down to 32; at most a warp per
    16 rows, at least 4), then one stage, until banded_smem fits SMEM_LIMIT: a launch over the
    limit fails (256/256 asked 256 KB forward, 320 KB dQ). Re-measure: python
    benchmarks/ptxas_report.py d256 dv256 --dtype float32."""
    rows, bn, warps, stages = shape
    while banded_smem(kind, rows, bn, stages, dk, dv, esize) > SMEM_LIMIT:
        if stages > 2:
            stages -= 1
        elif rows > 32:
            rows //= 2
            warps = max(4, min(warps, rows // 16))
        elif stages > 1:
            stages -= 1
        else:
            break
    return rows, bn, warps, stages


def banded_unmasked(win: int) -> bool:
    """Whether the banded kernels run the tiles every row sees without a mask, in a loop of their
    own: pays for the compression branch (64k forward 14.0 -> 12.1 ms), not for the window's
    short band (its forward 4.23 -> 4.55 ms). Re-measure: PP --sweep banded_unmasked."""
    if interpreting():
        return True
    return bool(_pick("banded_unmasked", (win == 0,))[0])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    import torch
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def splits_to_fill(programs: int, device) -> int:
    """Splits per program that give about two programs per SM."""
    return -(-2 * _sm_count(device.index or 0) // max(1, programs))


def banded_query_splits(key_tiles: int, win: int, device) -> int:
    """Query ranges of a sequence that the compressed dK/dV splits over, one program per (key
    tile, range), the fp32 partials summed after: with 16x fewer keys than queries, one program
    per key tile left the GPU mostly idle (H100, 64k backward 147 -> 85 ms with 8 splits). The
    ranges are the same for every key tile (the key tiles of one range read its query tiles side
    by side), so a key tile works only in the ranges past its keys, about half of them: 16, or
    twice what gives two programs per SM when the key tiles are few (a small model at 8k), at most
    64. H200, paper shape, compressed backward ms at 8k / 16k / 32k / 64k: 4 ranges 1.76 / 4.90 /
    16.2 / 57.5, 8 1.73 / 4.33 / 14.9 / 56.4, 16 1.47 / 4.34 / 14.5 / 54.6, 32 1.36 / 4.21 /
    14.2 / 54.4 (twice the partials for ~1%); each key tile's own range cut in 8: 1.51 / 4.77 /
    16.2 / 56.9; the `small` model's heads (16/1, 64/64) at 8k / 16k, 64 / 34 ranges: 0.61 /
    0.77 against 0.62 / 0.83. The window's ranges are short: no split. Re-measure: PP --sweep
    banded_splits (at several --T)."""
    if win > 0:
        return 1
    default = 2 if interpreting() else min(64, max(16, 2 * splits_to_fill(key_tiles, device)))
    return _pick("banded_splits", (default,))[0]


def key_tiles(dk: int):
    """(KA, KB): the q/k head dim as two power-of-two column tiles, so that a dim between powers
    of two is not padded (192 = 128 + 64: a quarter less QK work than 256; 64k forward 71.5 ->
    60.3 ms); KB = 0 when one tile is as small. Re-measure: PP --sweep with NSA_TUNE
    '{"key_tiles": [256, 0]}' against the default."""
    full = pow2(dk, 16)
    ka = full // 2
    kb = pow2(dk - ka, 16)
    return _pick("key_tiles", (ka, kb) if full != dk and ka + kb < full else (full, 0))


def select(dk: int, gp: int):
    """(rows, num_warps, num_stages, spread) of the selection kernel; spread 1: the overlap
    product on tensor cores, 2: a stencil (select.py). Tensor cores on 64 positions for G <= 2
    (G=1 64k 3.92 -> 2.53 ms), the stencil on 128 rows beyond (paper 17.4 -> 11.0), 8 warps past
    G = 4. Re-measure: PP --sweep select select_spread (and at G=1, G=4)."""
    if interpreting():
        default = (16 * gp, 4, 1, 1) if gp <= 2 else (max(1, 16 // gp) * gp, 4, 1, 2)
    else:
        default = ((64 * gp, 4, 2, 1) if gp <= 2 else (128, 4, 2, 2) if gp <= 4 or dk > 192
                   else (128, 8, 2, 2))
    v = _pick("select", default)
    return (*v[:3], _pick("select_spread", (v[3] if len(v) == 4 else default[3],))[0])


def cmp_select(gp: int, bv: int) -> bool:
    """Whether the compression attention and the selection run as one kernel: only for G = 1
    (larger groups need each head's lse first) with value tiles up to 128 (64k 128/128: 1.41 +
    2.55 -> 3.84 ms; at dv 256 slower, 5.83). The interpreter fuses at every dv. Re-measure:
    PP --HQ 8 --H 8 --dk 128 --dv 128 --sweep cmp_select."""
    forced = _pick("cmp_select", None)
    if forced is not None:
        return gp == 1 and bool(forced[0])
    return gp == 1 and (bv <= 128 or interpreting())


def cmp_select_launch():
    """(rows, num_warps, num_stages) of the fused G = 1 kernel: 64/4/2 the fastest (3.81 ms at
    64k; 128/8 4.2-4.7). Re-measure: PP --HQ 8 --H 8 --dk 128 --dv 128 --sweep cmp_select_launch."""
    return _pick("cmp_select_launch", (16, 4, 1) if interpreting() else (64, 4, 2))


def selected(kind: str, dk: int, dv: int):
    """(num_warps, num_stages) of the group-centric selected kernels (fwd, dq): forward 2/2 the
    fastest (64k 19.4 ms, 4/2 20.3), 4/2 at 256/256 where 2 warps spill; dQ 4/2. Re-measure:
    PP --sweep selected_fwd selected_dq."""
    if interpreting():
        return 4, 1
    return _pick(f"selected_{kind}", (4 if _wide(dk, dv) else 2, 2) if kind == "fwd" else (4, 2))


def selected_key_centric(g: int, kind: str) -> bool:
    """Whether the selected forward ("fwd") or dQ ("bwd") runs key-centric: for G <= 4, whose
    group-centric tiles are mostly padding (64k forward G=1 33.1 -> 11.8 ms, G=4 16.7 -> 6.7).
    The interpreter takes it for every G < 16. Re-measure: PP --HQ 16 --H 4 --dk 128 --dv 128
    --sweep selected_kc selected_kc_bwd."""
    forced = _pick("selected_kc" if kind == "fwd" else "selected_kc_bwd", None)
    if forced is not None:
        return bool(forced[0])
    if interpreting():
        return g < 16
    return g <= 4


def selected_key_centric_shape(gp: int):
    """(rows per tile, SEG queries per program, BT positions per program of the key-centric dQ
    sum, num_warps, num_stages) of the key-centric forward: 64 rows / 4 warps the fastest, longer
    segments for G = 1. The interpreter cuts short segments, so that CI sees long lists split.
    Re-measure: PP --HQ 8 --H 8 --dk 128 --dv 128 --sweep selected_kc_shape."""
    if interpreting():
        return 16, int(os.environ.get("NSA_SEL_SEGMENT", "8")), max(1, 4 // gp), 4, 1
    return _pick("selected_kc_shape", (64, 1024, 16, 4, 2) if gp == 1 else (64, 512, max(1, 16 // gp), 4, 3))


def selected_merge_launch(gp: int):
    """(positions, num_warps, num_stages) of the key-centric forward's merge: the fastest of its
    sweep per group size (G=1 32/8/3, G=4 32/4/3). Re-measure: PP --HQ 16 --H 4 --dk 128
    --dv 128 --sweep selected_merge."""
    if interpreting():
        return selected_key_centric_shape(gp)[2], 4, 1
    v = _pick("selected_merge", (32, 8, 3) if gp == 1 else (32 if gp >= 4 else 16, 4, 3))
    return (*v, *(4, 3)[len(v) - 1:])   # warps 4 and stages 3 where the override leaves them out


def selected_key_centric_rows(h: int, n: int, g: int, d: int, esize: int, lse: bool = False) -> int:
    """Query rows per chunk of a key-centric pass, so that its partials stay under 64 MiB per
    query head, at least 512 MiB: fewer chunks are faster (G=1 fwd+bwd 12.5 + 5.5 ms at 128 MiB,
    7.4 + 4.6 at 512), more use less memory. The interpreter: 48 rows, so that CI runs several
    chunks. Re-measure: PP --HQ 8 --H 8 --dk 128 --dv 128 --sweep selected_kc_mib."""
    if interpreting():
        return _pick("selected_kc_rows", (48,))[0]
    mib = _pick("selected_kc_mib", (max(512, 64 * h * g),))[0]
    return max(1, (mib << 20) // (h * n * g * (d * esize + 4 * lse)))


def selected_key_centric_heads(n_rows: int, h: int, rows: int) -> int:
    """KV heads per pass of the key-centric backward when one head's partials for all rows fit
    half the chunk budget (0: row chunks instead). Whole-head passes write dK/dV once, without
    fp32 sums over chunks (G=1 64k peak 2408 -> 1218 MB). Re-measure: PP --HQ 8 --H 8 --dk 128
    --dv 128 --sweep selected_kc_heads."""
    if not _pick("selected_kc_heads", (1,))[0]:
        return 0
    return min(h, rows * h // 2 // max(1, n_rows))


def selected_bwd_queries(gp: int, dk: int, dv: int):
    """(rows per step, SEG queries per segment, num_warps, num_stages) of the selected dK/dV
    kernel: SEG bounds how long one program runs (every query selects the first block); the
    fastest per group (G=1 32/4096/4/2, others 32/1024/4/3); 8 warps at 256/256, where 4 spill
    (32k 72.0 -> 48.1 ms), slower elsewhere. Re-measure: PP --sweep selected_dkv (and at G=1)."""
    if interpreting():
        return max(1, 16 // gp) * gp, int(os.environ.get("NSA_SEL_SEGMENT", "8")), 4, 1
    default = (32, 4096, 4, 2) if gp == 1 else (32, 1024, 4, 3)
    if _wide(dk, dv):
        default = (32, default[1], 8, default[3])
    return _pick("selected_dkv", default)


def decode(programs: int, cmp_tokens: int, win_tokens: int, sel_tokens: int, blocks: int, device):
    """Launch shapes of a decode step over `programs` (row, KV head) pairs: BN keys a tile, BCH
    blocks scored a step, CHK blocks a top-n round, splits S_C / S_W / S_S / S_B (compressed,
    window, selected keys, block scores) for ~2 programs per SM (twice on the compressed keys,
    the most bytes), none under 4 tiles; 32-key tiles and a 1-warp merge (batch 32, 64k: 0.275
    -> 0.248 ms). The interpreter: 2 splits each, so that CI runs every merge, empty splits too.
    Re-measure: python benchmarks/bench_decode.py (NSA_TUNE='{"decode": {"BN": 64}}')."""
    if interpreting():
        return dict(BN=16, BCH=4, CHK=4, S_C=2, S_W=2, S_S=2, S_B=2, warps=4, stages=1, merge_warps=4)
    t = dict(BN=32, BCH=64, CHK=1024, warps=4, stages=3, merge_warps=1)
    want = splits_to_fill(programs, device)
    cap = lambda n, per, most=want: max(1, min(most, -(-n // per)))
    t.update(S_C=cap(cmp_tokens, 4 * t["BN"], 2 * want), S_W=cap(win_tokens, 4 * t["BN"]),
             S_S=cap(sel_tokens, 4 * t["BN"]), S_B=cap(blocks, 2 * t["BCH"]))
    over = _overrides(os.environ.get("NSA_TUNE", "")).get("decode", {})
    return {**t, **over}
