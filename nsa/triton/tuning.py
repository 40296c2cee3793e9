"""Every launch-shape choice of the Triton backend, each with the reason for it.

The interpreter (TRITON_INTERPRET=1, CI) runs tiles as numpy arrays: small tiles keep it fast.
GPU choices come from benchmarks/profile_parts.py sweeps on an H100 and, since session 9, an
H200 (each choice says which); NSA_TUNE='{"kernel": [..]}' overrides one for such sweeps.
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
    """Head dims (column tiles' widths) as wide as 256/256, where kernels holding [rows, dk] and
    [rows, dv] fp32 accumulators spill registers at the warps chosen for narrower dims (ptxas,
    results/session16): they take more warps there."""
    return dk + dv >= 512


def banded_smem(kind: str, rows: int, bn: int, stages: int, dk: int, dv: int, esize: int) -> int:
    """Bytes of shared memory a banded launch takes, as Triton lays the kernels out for sm_90: a
    buffer per pipeline stage of the tiles the loop streams (forward and dQ: a key tile's K and
    V; dK/dV: a query tile's q and dO) and the tiles it holds throughout (q; q and dO; K and V).
    dk, dv: the column tiles' widths. Equal to the compiled kernels' sizes for the forward and
    dQ, above them for dK/dV (benchmarks/ptxas_report.py, dims 64 to 256)."""
    if kind == "dkv":
        return (stages * rows + bn) * (dk + dv) * esize
    return (stages * bn * (dk + dv) + rows * (dk if kind == "fwd" else dk + dv)) * esize


def banded(kind: str, dk: int, dv: int, gp: int, win: int = 0, esize: int = 2):
    """(rows, BN keys, num_warps, num_stages) for kind in fwd / dq / dkv; BT = rows // gp
    positions; win > 0: the window branch. dk, dv: the column tiles' widths, esize: the
    inputs' element size; a default shape that would not fit in shared memory (dk = dv = 256,
    or fp32) takes fewer stages, down to 2, then half the rows, then one stage (not measured:
    the measured shapes fit); an NSA_TUNE shape is taken as given."""
    if interpreting():
        return max(1, 16 // gp) * gp, 16, 4, 1
    # measured at 64k, HQ=64, H=4, 192/128 on the H100 (profile_T65536_before): fwd 25 -> 15 ms with
    # 128 rows, 8 warps, 3 stages; dq best at 128/64/8/2; dkv best with 32-key tiles. Small
    # groups' window forward (H200, results/session11/tiles): 64 rows, 32-key tiles, 4 warps
    # G=4 1.14 -> 0.98 ms, G=1 0.64 -> 0.53 (their compression forward: 128/64/8/3 stays best)
    # The backward at the paper shape on the H200 (results/session15/cmpbwd, compression / window
    # backward in ms): dkv 64/32/4 at 2 stages 71.0-71.4 / 19.1-21.7, at 3 stages 66.2 / 18.0
    # (128/32/4/2 66.7 / 19.6; 64/16 or 8 warps 96-97); dq at 3 stages 69.6 / 19.0 against 71.1-71.5
    # At dk = dv = 256 (H200, 32k, paper heads, results/session16/wide; compression / window
    # backward in ms), the fitted defaults spill registers (the dK/dV accumulators): dkv 64/32/4/3
    # 39.4 / 20.0, 8 warps 33.1 / 16.4 (32/32/4/3 33.5 / 16.1); dq 64/64/4/2 39.3 / 20.0,
    # 128/32/8/3 37.0 / 19.0. The forward's fitted 128/64/8/2 is its best (5.0 / 3.3). Small
    # groups, 64k (results/session16/small256): G=4 dkv 36.9 / 8.7 -> 30.0 / 8.4, dq 31.4 / 9.0
    # -> 30.1 / 8.4; G=1 dkv 17.5 / 5.7 -> 14.5 / 4.9, dq 15.4 / 5.2 -> 14.6 / 4.9.
    default = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 3), "dkv": (64, 32, 4, 3)}[kind]
    if _wide(dk, dv) and kind != "fwd":
        default = {"dq": (128, 32, 8, 3), "dkv": (64, 32, 8, 3)}[kind]
    if kind == "fwd" and win > 0 and gp <= 4:
        default = (64, 32, 4, 3)
    own = _pick(f"banded_{kind}_win", None) if win > 0 else None   # the window's alone (A/B timing)
    return own or _pick(f"banded_{kind}", _fit(kind, default, dk, dv, esize))


def _fit(kind: str, shape: tuple, dk: int, dv: int, esize: int) -> tuple:
    """shape with fewer stages (down to 2), then half the rows (down to 32; at most a warp per
    16 rows, at least 4), then one stage, until banded_smem fits SMEM_LIMIT."""
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
    """Whether the banded kernels run the tiles every row sees without a mask, in a loop of
    their own (the forward and dQ over key tiles, dK/dV over query tiles). Pays for the
    compression branch (64k, H100: forward 14.0 -> 12.1 ms; backward 80.7 -> 77.5,
    results/session8/call5); the window's band is ~9 tiles, split 1 + 7 + 1, and its forward
    was slower that way (4.23 -> 4.55 ms; its backward read 23.5 -> 20.5 ms, within the
    run's spread of 21.3-23.5 for the masked one, so left masked).
    NSA_TUNE='{"banded_unmasked": [1]}' forces it on (0: off) for A/B timing. The interpreter
    always takes it, so that CI checks the unmasked tiles of both branches."""
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


def banded_query_splits(n_queries: int, key_tiles: int, win: int, device) -> int:
    """Programs that share one key tile's query range in the dK/dV kernel. The compression
    branch has 16x fewer keys than queries: one program per key tile left 256 programs at 64k,
    the first walking all 64k queries (147 ms for its backward on an H100; 85 ms with 8
    splits), and 16 programs for the whole GPU at 8k with one KV head. So: at least
    cdiv(N, 8192) splits, and enough for two programs per SM; at most 16. The window's query
    ranges are short: no split."""
    if win > 0:
        return 1
    if interpreting():
        return 2   # CI exercises the split path
    fill = splits_to_fill(key_tiles, device)
    return max(1, min(16, max(-(-n_queries // 8192), fill)))


def key_tiles(dk: int):
    """(KA, KB): the kernels' q/k head dim as two power-of-two column tiles, so that a dim
    between powers of two is not padded to the next one (192 = 128 + 64: a quarter less QK work
    than 256). KB = 0 when one tile is as small (powers of two, or 100 -> 128).
    NSA_TUNE='{"key_tiles": [256, 0]}' forces one padded tile (for A/B timing)."""
    full = pow2(dk, 16)
    ka = full // 2
    kb = pow2(dk - ka, 16)
    return _pick("key_tiles", (ka, kb) if full != dk and ka + kb < full else (full, 0))


def select(dk: int, gp: int):
    """(rows, num_warps, num_stages, spread) of the selection kernel; spread: how the
    probabilities go to block scores (select.py): 1 product on tensor cores, 2 stencil (the
    launcher takes 2 where 1 cannot run). Sweeps at 64k, ms: H100 (results/session8/call1,
    call2; fp32 product -> tensor cores) G=1 (HQ=H=8, dk 128) 128 rows 9.35 (ptxas spills) ->
    3.12, 64 rows 4.61 -> 3.03; G=2 (8/4) 128 rows 2.89 -> 2.47, 64 rows 2.69 -> 3.23. H200
    (results/session11/probe, fp32 product / tensor cores / stencil): G=1 64 rows 3.92 / 2.53 / 2.63;
    G=4 (16/4) 128 rows 4.02 / 4.46 / 3.26, 64 rows 3.85 / 6.19 / 3.34; paper (64/4, dk 192)
    256 rows 8 warps 11.77 / 17.89 / 12.15, 128 rows 8 warps - / 17.44 / 10.97, 128 rows 4 warps
    13.97 / 13.99 / 11.54. So: 64 positions a tile on tensor cores for G <= 2, the stencil on
    128 rows beyond (8 warps past G = 4, except past dk 192: unmeasured there, 4 as before).
    NSA_TUNE='{"select": [rows, warps, stages(, spread)]}' overrides ("select_spread": [s] the
    spread alone). The interpreter tiles 16 positions so that small groups take the
    tensor-core path there too."""
    if interpreting():
        default = (16 * gp, 4, 1, 1) if gp <= 2 else (max(1, 16 // gp) * gp, 4, 1, 2)
    else:
        default = ((64 * gp, 4, 2, 1) if gp <= 2 else (128, 4, 2, 2) if gp <= 4 or dk > 192
                   else (128, 8, 2, 2))
    v = _pick("select", default)
    return (*v[:3], _pick("select_spread", (v[3] if len(v) == 4 else default[3],))[0])


def cmp_select(gp: int, bv: int) -> bool:
    """Whether nsa_attention runs the compression attention and the selection in one kernel
    (select.py, nsa_cmp_select_kernel). Not for groups of G > 1 (their scores sum each head's
    probabilities, normalised by its own lse, which the compression pass must finish first),
    nor for value tiles wider than 128 (bv: dv padded). H200, 64k, G = 1 (HQ = H = 8;
    results/session13/fused, dims), apart -> fused, ms: dk/dv 128/128 1.41 + 2.55 -> 3.84 (the
    forward 8.03 -> 7.91), 192/128 1.57 + 3.13 -> 4.18, 64/64 0.96 + 2.39 -> 3.36, but 128/256
    1.55 + 2.57 -> 5.83 (the accumulator's registers). NSA_TUNE='{"cmp_select": [0]}' (or 1)
    decides for A/B timing; the interpreter fuses at every dv, so that CI runs the kernel."""
    forced = _pick("cmp_select", None)
    if forced is not None:
        return gp == 1 and bool(forced[0])
    return gp == 1 and (bv <= 128 or interpreting())


def cmp_select_launch():
    """(rows, num_warps, num_stages) of nsa_cmp_select_kernel. 64k, 128/128 (results/session13/
    fused, stages): 64 rows / 4 warps / 2 stages 3.81-3.84 ms; 128 rows / 8 warps 4.20-4.72,
    1 stage 4.49-4.51, 2 warps 5.6-7.3, others 6.0-10.6. NSA_TUNE='{"cmp_select_launch": [..]}'."""
    return _pick("cmp_select_launch", (16, 4, 1) if interpreting() else (64, 4, 2))


def selected(kind: str, dk: int, dv: int):
    """(num_warps, num_stages) of the group-centric selected-attention kernels (fwd, dq); dk, dv:
    the column tiles' widths."""
    if interpreting():
        return 4, 1
    # 64k sweep (H100): the forward at 2 warps 21.6 ms, 4 warps 22.0. H200, paper shape 64k
    # (results/session16/gc, warps/stages): forward 2/2 19.4, 4/2 20.3, others 22.9-37.0; the
    # selected backward with dQ at 4/2 48.9, 2/2 48.3 (within the spread), others 53.4-56.2.
    # At dk = dv = 256 the forward spills at 2 warps (ptxas: 208 B a thread; none at 4):
    # paper heads (results/session16/fwd256) 32k 16.4 -> 15.3 ms, 64k 33.5 -> 32.9 at 4/2
    return _pick(f"selected_{kind}", (4 if _wide(dk, dv) else 2, 2) if kind == "fwd" else (4, 2))


def selected_key_centric(g: int, kind: str) -> bool:
    """Whether the selected-attention forward (kind "fwd") or dQ ("bwd") runs key-centric
    (selected.py): for small groups, whose group-centric tiles are mostly padding. Measured at
    64k, dk = dv = 128, on an H100 (benchmarks/results/small_groups/call2): the forward at G=1
    33.1 -> 11.8 ms, G=2 17.0 -> 13.1; the backward at G=1 53.1 -> 13.5 ms, G=2 28.3 -> 13.4,
    G=4 30.0 -> 26.6. The forward at G=4 was slower (16.7 -> 24.3) until one inverse index
    served all row chunks; since, 16.7 -> 6.7 ms (results/session8/call1). NSA_TUNE='{"selected_kc": [0]}' (or 1;
    "selected_kc_bwd" for dQ) forces it for A/B timing; the interpreter takes it for every
    G < 16, so that CI checks both."""
    forced = _pick("selected_kc" if kind == "fwd" else "selected_kc_bwd", None)
    if forced is not None:
        return bool(forced[0])
    if interpreting():
        return g < 16
    return g <= 4


def selected_key_centric_shape(gp: int):
    """(rows per tile, SEG queries per program, BT positions per program of the key-centric dQ's
    sum, num_warps, num_stages) of the key-centric forward. 64k, dk = dv = 128, H200, selected
    forward (index + kernel + merge) in ms (results/session14/kc, tune): 64 rows / 4 warps for
    all; one query head per KV head (G=1, 8/8) 256 queries a segment 2 stages 3.42-3.45, 512 3.30,
    1024 3.26-3.29, 2048 3.42, 4096 3.74, with 3 stages 3.58-3.90; G=4 (16/4) 256 / 512 / 1024
    at 2 stages 5.25-5.28 / 5.20 / 5.26-5.30, at 3 stages 4.99-5.02 / 4.94 / 5.01; G=2 (8/4)
    3.38 / 3.28 / 3.31 and 3.31 / 3.21 / -. 128 rows or 8 warps: slower (4.2-8.3). (Measured
    before the kernel loaded each tile's query rows a tile ahead.) The interpreter uses short
    segments so that CI sees long lists split."""
    if interpreting():
        return 16, int(os.environ.get("NSA_SEL_SEGMENT", "8")), max(1, 4 // gp), 4, 1
    return _pick("selected_kc_shape", (64, 1024, 16, 4, 2) if gp == 1 else (64, 512, max(1, 16 // gp), 4, 3))


def selected_merge_launch(gp: int):
    """(positions, num_warps, num_stages) of a key-centric forward's merge program. Positions,
    64k, H200, twice each (results/session12/merge; 4 / 16 / 32 / 64, the selected forward in ms):
    G=4 (16/4) 5.42 / 5.51 / 5.29 / 23.6, G=1 (8/8) 3.48 / 3.45 / 3.72 / 4.08 (the dQ sum, which
    had shared the merge's tile, is best at 4 positions for G=4: 8.61 ms against 9.47 at 32).
    Launch (results/session14/tune, positions / warps / stages): G=1 16/4/3 (any stages) 3.44,
    8/2/3 3.40, 32/8/3 3.34, 32/4/3 3.71, 64/8/3 3.73; G=4 32/4/3 5.27, 16/2/3 5.25, 32/8/3 6.31.
    The interpreter: the dQ sum's. NSA_TUNE='{"selected_merge": [positions(, warps, stages)]}'."""
    if interpreting():
        return selected_key_centric_shape(gp)[2], 4, 1
    v = _pick("selected_merge", (32, 8, 3) if gp == 1 else (32 if gp >= 4 else 16, 4, 3))
    return (*v, *(4, 3)[len(v) - 1:])   # warps 4 and stages 3 where the override leaves them out


def selected_key_centric_rows(h: int, n: int, g: int, d: int, esize: int, lse: bool = False) -> int:
    """Query rows per chunk of a key-centric pass: its partials (a row of d in q's dtype, plus an
    fp32 lse for the forward, per (row, KV head, slot, head)) stay under NSA_TUNE
    selected_kc_mib MiB. Fewer chunks are faster (each reloads the K/V blocks; the backward adds
    to fp32 dK/dV per chunk), more use less memory. 64k, G=1, H100 (results/small_groups/call6),
    forward / backward: 128 MiB 5.5 / 12.5 ms, 256 MiB 4.8 / 9.0, 512 MiB 4.6 / 7.4, 1024 MiB
    4.5 / 6.6; fwd+bwd peak memory 2.4 GB at 512. The partials per row grow with the query heads
    (G=4, 16/4, has twice G=1's 8/8), as do the tensors full attention holds, so the budget is
    64 MiB per query head, at least 512: 64k, H200 (results/session12/mib), G=4 512 -> 1024 MiB
    fwd 12.83 -> 12.69 ms, fwd+bwd 43.09 -> 40.87, peak 0.82x -> 1.07x FA2's; G=1 stays at 512
    (1024 there: fwd+bwd 23.31 -> 22.72 but peak 1.09x -> 1.40x). The interpreter: 48 rows
    (NSA_TUNE selected_kc_rows), so that CI runs several chunks."""
    if interpreting():
        return _pick("selected_kc_rows", (48,))[0]
    mib = _pick("selected_kc_mib", (max(512, 64 * h * g),))[0]
    return max(1, (mib << 20) // (h * n * g * (d * esize + 4 * lse)))


def selected_key_centric_heads(n_rows: int, h: int, rows: int) -> int:
    """KV heads per pass of the key-centric backward when one head's partials for all n_rows
    rows fit half the budget that `rows` rows of all h heads have (selected_key_centric_rows);
    0 when they do not. A pass over whole heads writes dK/dV once, in q's dtype; row chunks
    instead sum dK/dV over the chunks in fp32 buffers the size of two K/V sets in fp32. Half:
    at 64k, G=1, dk 128 (H200, results/session10) two heads a pass (512 MiB of partials) peaked
    at 1439 MB (FA2 1028), one head a pass (256 MiB, with the forward also at 256) at 1218 MB,
    fwd+bwd 24.9 -> 25.7 ms; row chunks 2408 MB. NSA_TUNE='{"selected_kc_heads": [0]}' turns head
    passes off (A/B timing)."""
    if not _pick("selected_kc_heads", (1,))[0]:
        return 0
    return min(h, rows * h // 2 // max(1, n_rows))


def selected_bwd_queries(gp: int, dk: int, dv: int):
    """(rows per step, SEG queries per segment, num_warps, num_stages) of the dK/dV kernel. SEG
    bounds how long one program runs (the first block is selected by every query); the fp32
    partial buffer it implies is at most 2 * T*H*n / SEG blocks. 32 rows: 87 -> 69 ms for the
    paper shape's selected backward at 64k against 64 rows (H100). With the kernel loading each
    tile's query rows a tile ahead, selected backward at 64k, H200 (results/session15/bwd), SEG /
    stages: G=1 (8/8) 2048/2 5.36, 4096/2 4.69, 4096/3 4.74, 8192/2-3 6.4-6.8; G=4 (16/4)
    2048/2 8.45, 2048/3 7.50, 1024/3 7.12, 512/3 7.34, 2048/4 9.63; paper (64/4, 192/128)
    2048/2 50.4-50.8, 1024/3 48.6, 2048/3 49.2; G=2 (8/4) 2048/2 4.69, 1024/3 4.35, 2048/3 4.47,
    512/3 4.62, 4096/2 5.55. dk, dv: the column tiles' widths; at dk = dv = 256 the kernel holds
    [64, 256] fp32 dK and dV, which spill at 4 warps: paper heads, 32k (results/session16/sel256)
    1024/3 at 4 warps 72.0, at 8 warps 48.1 (8 warps 2 stages 51.5, 64 rows 50.5, 16 rows
    57.4); 64k (results/session16/small256) G=4 45.1 -> 21.5, G=1 (4096/2) 35.2 -> 19.3. At
    narrower dims 8 warps is slower (64k, results/session16/w8): paper 192/128 49.0 -> 61.3,
    G=4 7.1 -> 11.0, G=1 4.7 -> 7.4."""
    if interpreting():
        return max(1, 16 // gp) * gp, int(os.environ.get("NSA_SEL_SEGMENT", "8")), 4, 1
    default = (32, 4096, 4, 2) if gp == 1 else (32, 1024, 4, 3)
    if _wide(dk, dv):
        default = (32, default[1], 8, default[3])
    return _pick("selected_dkv", default)


def decode(programs: int, cmp_tokens: int, win_tokens: int, sel_tokens: int, blocks: int, device):
    """Launch shapes of a decode step with `programs` (row, KV head) pairs: BN keys per tile,
    BCH blocks scored per step, CHK blocks per top-n round, splits S_C / S_W / S_S / S_B of the
    compressed, window and selected keys and of the block scores, num_warps. Enough splits for
    ~2 programs per SM (twice that on the compressed keys), none shorter than 4 tiles (a
    split's fixed cost: loading q, writing a partial). The interpreter uses 2 splits each and 4-block chunks so that CI exercises every
    merge, empty splits included."""
    if interpreting():
        return dict(BN=16, BCH=4, CHK=4, S_C=2, S_W=2, S_S=2, S_B=2, warps=4, stages=1, merge_warps=4)
    # profile_decode.py sweep at 64k (H100): batch 32 0.275 -> 0.248 ms with 32-key tiles,
    # twice the splits on the compressed keys (the most bytes) and a 1-warp merge
    t = dict(BN=32, BCH=64, CHK=1024, warps=4, stages=3, merge_warps=1)
    want = splits_to_fill(programs, device)
    cap = lambda n, per, most=want: max(1, min(most, -(-n // per)))
    t.update(S_C=cap(cmp_tokens, 4 * t["BN"], 2 * want), S_W=cap(win_tokens, 4 * t["BN"]),
             S_S=cap(sel_tokens, 4 * t["BN"]), S_B=cap(blocks, 2 * t["BCH"]))
    over = _overrides(os.environ.get("NSA_TUNE", "")).get("decode", {})
    return {**t, **over}


__all__ = ["banded", "key_tiles", "select", "cmp_select", "cmp_select_launch", "selected", "selected_key_centric", "selected_key_centric_shape", "selected_merge_launch", "selected_key_centric_rows", "selected_key_centric_heads", "selected_bwd_queries", "decode", "interpreting", "pow2"]
