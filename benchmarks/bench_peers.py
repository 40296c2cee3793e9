"""This project's NSA against other open NSA kernels, side by side on one GPU (bf16, B = 1,
triton.testing.do_bench medians, forward and forward+backward; results saved after every
setting, so a run cut short keeps what it measured).

Peers, when their sources are found under --peers (default .peers/, ignored by git; each a
plain checkout, imported from there, never copied into this project):
  Scalable-Flash-Native-Sparse-Attention  (mdy666; `flash_nsa.HFNSACore`: one op from q/k/v to
      the gated output, mean-pooled compressed keys inside, gate logits in)
  native-sparse-attention-triton          (XunhaoLai; `native_sparse_attention.ops`: mean
      pooling, compressed attention with top-n, top-n sparse attention; gates composed here)
  Flash-Sparse-Attention                  (FSA; `fsa.ops.FSA_topk_sparse_attention` for the
      selected branch, the rest its vendored copy of XunhaoLai's ops)
A peer that is missing or fails is skipped with a line saying why.

What each row includes. Every peer pools its own compressed keys (mean over l keys, stride d)
inside the timed call; this project's row times `nsa.nsa_attention`, whose compressed keys are an
input (made by the layer's compression MLP), so pooling is not in its time. The peers' sliding
window needs flash-attn, absent here: each peer is timed without a window and with a
FlexAttention window stand-in (compiled, 512 keys back); this project with w = 1 (each query
sees itself: the nearest to no window its semantics has) and with its own w = 512 kernel. The
three branches share one K/V set in every row (the peers' layout; this project takes three).

  python benchmarks/bench_peers.py [--lengths 16384 65536] [--peers .peers] [--only mdy666]
      [--settings "paper 192/128"]

Rows a run leaves out (other settings, lengths or peers) stay in the stored JSON as they were,
each row with the date it was measured (`measured`); ratios are taken between rows of one run.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import types

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from shapes import environment, median_ms, save, stored  # noqa: E402

BF16 = torch.bfloat16
MDY, XL, FSA = ("Scalable-Flash-Native-Sparse-Attention", "native-sparse-attention-triton",
                "Flash-Sparse-Attention")
# (name, HQ, H, dk, dv, l, d): the paper's settings at G = 16, 4, 1, and fla's (l = d = 64)
SETTINGS = [("paper 128/128", 64, 4, 128, 128, 32, 16), ("paper 192/128", 64, 4, 192, 128, 32, 16),
            ("G4 128/128", 16, 4, 128, 128, 32, 16), ("G1 128/128", 8, 8, 128, 128, 32, 16),
            ("l=d=64 128/128", 64, 4, 128, 128, 64, 64)]
SEL_L, N_SEL, WIN = 64, 16, 512


# ----------------------------------------------------------------------------- the window stand-in
_FLEX, _MASKS = None, {}


def flex_window(q, k, v, window=WIN):
    """Causal sliding-window attention (keys t - window .. t) through FlexAttention, packed
    [T, heads, d] layout, GQA: what the peers call flash-attn for."""
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    T = q.shape[0]
    if (T, window) not in _MASKS:
        _MASKS[(T, window)] = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j <= window), None, None, T, T,
                                                device=q.device)
    o = _FLEX(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=_MASKS[(T, window)], enable_gqa=True)
    return o[0].transpose(0, 1)


# ----------------------------------------------------------------------------- peers
def _stub_modules():
    """Imports the peers need and this image may lack: pkg_resources (setuptools >= 82 removed
    it; only parse_version is used) and pandas (only its benchmark printing)."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        m = types.ModuleType("pkg_resources")
        m.parse_version = lambda s: tuple(int(x) for x in re.findall(r"\d+", str(s))[:3])
        sys.modules["pkg_resources"] = m
    try:
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = types.ModuleType("pandas")


def mdy666(root, HQ, H, dk, dv, l, d, window):
    sys.path.insert(0, os.path.join(root, MDY))
    _stub_modules()
    from flash_nsa import HFNSACore, NSAConfig, NSAHelper
    import flash_nsa.modules.hf_level_nsa as hf
    cfg = NSAConfig(head_dim=dk, qk_head_dim=dk, v_head_dim=dv, num_heads=HQ, num_kv_heads=H, kernel_size=l,
                    stride=d, block_size=SEL_L, top_n=N_SEL, num_init_blocks=1, num_local_blocks=2,
                    window_size=WIN)
    core = HFNSACore(cfg).cuda()
    NSAHelper.x_cu_seqlens = None   # its global helper caches lengths by cu_seqlens: drop them
    if window:
        hf.swa_varlen_func = lambda q, k, v, sm_scale=None: flex_window(q, k, v)
    else:
        hf.swa_varlen_func = lambda q, k, v, sm_scale=None: torch.zeros_like(q[..., :v.shape[-1]])
    return lambda q, k, v, g, cu: core(q, k, v, g, cu)


def _composed(cmp_ops, slc_op, l, d, window):
    avgpool_compress, compressed_attention = cmp_ops

    def run(q, k, v, g, cu):
        T = q.shape[0]
        ck, ccu = avgpool_compress(k, None, cu, l, d, None)
        cv, _ = avgpool_compress(v, None, cu, l, d, None)
        o_cmp, idx = compressed_attention(q, ck, cv, l, d, SEL_L, N_SEL, cu, ccu, T, (T - l) // d + 1, None, 1, 2)
        o_slc = slc_op(q, k, v, idx, SEL_L, cu, None)
        w = torch.sigmoid(g)
        o = w[..., 0:1] * o_cmp + w[..., 1:2] * o_slc
        return o + w[..., 2:3] * flex_window(q, k, v) if window else o
    return run


def xunhaolai(root, HQ, H, dk, dv, l, d, window):
    if dk != dv:
        raise RuntimeError(f"one head dim for q, k and v only (got {dk}/{dv})")
    sys.path.insert(0, os.path.join(root, XL))
    from native_sparse_attention.ops import avgpool_compress, compressed_attention, topk_sparse_attention
    return _composed((avgpool_compress, compressed_attention), topk_sparse_attention, l, d, window)


def fsa(root, HQ, H, dk, dv, l, d, window):
    if dk != dv:
        raise RuntimeError(f"one head dim for q, k and v only (got {dk}/{dv})")
    sys.path.insert(0, os.path.join(root, FSA))
    from fsa.ops import FSA_topk_sparse_attention
    from nsa_ref.ops import avgpool_compress, compressed_attention
    return _composed((avgpool_compress, compressed_attention), FSA_topk_sparse_attention, l, d, window)


PEERS = {"mdy666": (MDY, mdy666), "XunhaoLai": (XL, xunhaolai), "FSA": (FSA, fsa)}


# ----------------------------------------------------------------------------- timing
def inputs(T, HQ, H, dk, dv, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=BF16).requires_grad_(True)
    return r(T, HQ, dk), r(T, H, dk), r(T, H, dv), r(T, HQ, 3)


def timed(fn, tensors, do):
    with torch.no_grad():
        fwd = median_ms(fn, warmup=10, rep=40)
    both = median_ms(lambda: torch.autograd.backward(fn(), do), grads=list(tensors), warmup=10, rep=40)
    return dict(fwd_ms=fwd, fwd_bwd_ms=both)


def ours(T, HQ, H, dk, dv, l, d, w):
    cfg = nsa.NSAConfig(cmp_block_size=l, cmp_stride=d, sel_block_size=SEL_L, sel_block_count=N_SEL, window_size=w)
    q, k, v, g = inputs(T, HQ, H, dk, dv)
    tc = cfg.num_compressed(T)
    kc, vc = (torch.randn(1, tc, H, x.shape[-1], device="cuda", dtype=BF16, requires_grad=True) for x in (k, v))
    gates = torch.sigmoid(g.detach())[None].requires_grad_(True)
    args = (q[None], kc, vc, k[None], v[None], k[None], v[None], gates)
    fn = lambda: nsa.nsa_attention(*args, config=cfg)
    return timed(fn, (q, kc, vc, k, v, gates), torch.randn(1, T, HQ, dv, device="cuda", dtype=BF16))


def peer(name, root, T, HQ, H, dk, dv, l, d, window):
    folder, make = PEERS[name]
    if not os.path.isdir(os.path.join(root, folder)):
        return dict(skipped=f"no checkout at {os.path.join(root, folder)}")
    try:
        fn = make(root, HQ, H, dk, dv, l, d, window)
        q, k, v, g = inputs(T, HQ, H, dk, dv)
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        run = lambda: fn(q, k, v, g, cu)
        run()
        return timed(run, (q, k, v, g), torch.randn(T, HQ, dv, device="cuda", dtype=BF16))
    except Exception as e:   # a peer's failure is a row, not the end of the run
        return dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")


def kept_rows(old, args):
    """The stored rows this run does not replace, each with the date of its own run: peer rows
    of settings, lengths or peers not run now, and this project's rows of those runs (a ratio
    is taken between rows of one run)."""
    shape = lambda r: (r["setting"], r["T"], r["window"])
    rows = [dict(r, measured=r.get("measured", old["env"]["date"])) for r in old.get("rows", [])]
    run = {(s[0], T) for s in SETTINGS if s[0] in args.settings for T in args.lengths}
    peers = [r for r in rows if not r["impl"].startswith("nsa")
             and not (shape(r)[:2] in run and r["impl"] in args.only)]
    ours = [r for r in rows if r["impl"].startswith("nsa")
            and any(shape(p) == shape(r) and p["measured"] == r["measured"] for p in peers)]
    return ours + peers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--peers", default=".peers", help="folder holding the peers' checkouts")
    ap.add_argument("--only", nargs="*", default=list(PEERS), help="peers to run")
    ap.add_argument("--settings", nargs="*", default=[s[0] for s in SETTINGS],
                    help="settings to run (default: all)")
    args = ap.parse_args()
    rows = []
    kept = kept_rows(stored("peers"), args)
    date = environment()["date"]
    for name, HQ, H, dk, dv, l, d in (s for s in SETTINGS if s[0] in args.settings):
        for T in args.lengths:
            for window in (False, True):
                shape = dict(setting=name, T=T, window=window)
                r = dict(shape, impl="nsa (this project)", includes="no pooling (compressed keys are an input); "
                         + ("w=512" if window else "w=1"), **ours(T, HQ, H, dk, dv, l, d, WIN if window else 1))
                rows.append(dict(r, measured=date))
                print(r, flush=True)
                for p in args.only:
                    r = dict(shape, impl=p, includes="mean pooling inside; " + ("flex window stand-in" if window
                                                                                  else "no window"),
                             **peer(p, args.peers, T, HQ, H, dk, dv, l, d, window))
                    rows.append(dict(r, measured=date))
                    print(r, flush=True)
                torch.cuda.empty_cache()
                save("peers", dict(env=environment(), rows=kept + rows, sel=dict(block=SEL_L, n=N_SEL, window=WIN)))
    print("\n| setting | T | window | impl | fwd ms | fwd+bwd ms | their time / ours (fwd, fwd+bwd) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(o for o in rows if o["impl"].startswith("nsa") and all(o[k] == r[k] for k in ("setting", "T", "window")))
        if "skipped" in r:
            print(f"| {r['setting']} | {r['T'] // 1024}k | {r['window']} | {r['impl']} | skipped: {r['skipped']} | | |")
            continue
        ratio = "" if r is base else f"{r['fwd_ms'] / base['fwd_ms']:.2f}x, {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x"
        print(f"| {r['setting']} | {r['T'] // 1024}k | {r['window']} | {r['impl']} | {r['fwd_ms']:.1f} | "
              f"{r['fwd_bwd_ms']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
