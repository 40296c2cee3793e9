"""Command line: `nsa demo` (the README's main job)."""
from __future__ import annotations

import argparse
import sys
import time


def _keys_read(cfg, T):
    """Keys the last query of a length-T sequence reads in the three branches."""
    return cfg.num_compressed(T) + min(T, cfg.sel_block_count * cfg.sel_block_size) + min(T, cfg.window_size)


def demo(args) -> int:
    import torch

    import nsa

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = nsa.NSAConfig()
    layer = nsa.NativeSparseAttention(args.hidden, args.heads, args.kv_heads, args.head_dim,
                                      args.head_dim, config=cfg).to(device)
    x = torch.randn(1, args.seqlen, args.hidden, device=device, requires_grad=True)
    print(f"NSA layer on {device}: T={args.seqlen}, hidden={args.hidden}, heads={args.heads}/"
          f"{args.kv_heads} (q/kv), head_dim={args.head_dim}, {cfg}")
    t0 = time.perf_counter()
    y, idx = layer(x, return_block_idx=True)
    t1 = time.perf_counter()
    y.float().pow(2).mean().backward()
    t2 = time.perf_counter()
    sel = (idx >= 0).sum(-1).float()
    T = args.seqlen
    n_cmp, n_sel, n_win = cfg.num_compressed(T), int(sel[0, -1].max()) * cfg.sel_block_size, min(T, cfg.window_size)
    print(f"forward {t1 - t0:.2f} s, backward {t2 - t1:.2f} s")
    print(f"output: shape {tuple(y.shape)}, mean {y.mean():+.3e}, std {y.std():.3e}, "
          f"finite {bool(torch.isfinite(y).all())}; grad norm of x {x.grad.norm():.3e}")
    print(f"selected blocks per query: mean {sel.mean():.2f} (max {cfg.sel_block_count})")
    print(f"last query attends {n_cmp} compressed + {n_sel} selected + {n_win} window = "
          f"{n_cmp + n_sel + n_win} keys where full attention reads {T} "
          f"({(n_cmp + n_sel + n_win) / T:.1%}; the branches overlap at short T; at T=65536 "
          f"the same rule reads {_keys_read(cfg, 65536) / 65536:.1%})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the NSA layer forward+backward once and print stats")
    d.add_argument("--seqlen", type=int, default=4096)
    d.add_argument("--hidden", type=int, default=256)
    d.add_argument("--heads", type=int, default=8)
    d.add_argument("--kv-heads", type=int, default=2)
    d.add_argument("--head-dim", type=int, default=32)
    d.set_defaults(func=demo)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
