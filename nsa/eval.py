"""Evaluations of a trained LanguageModel, and `compare`: NSA, full and window-only twins
trained on identical data and steps, with plots and a verdict table."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data import mqar_batch, mqar_min_length, passkey_batch, passkey_example
from .layer import NativeSparseAttention
from .model import ATTENTIONS, PRESETS
from .train import TrainConfig, Trainer, autocast


def _logits(model, x, device):
    """Forward for evaluation: bf16 autocast on GPU as in training (an fp32 forward would send
    full attention to SDPA's math backend, which materialises [B, H, T, T])."""
    with autocast(device):
        return model(x.to(device)).float()


@torch.no_grad()
def passkey_accuracy(model, filler, length, depth, n, seed=0, device="cpu"):
    """Share of examples whose every answer digit is the model's argmax (teacher forced)."""
    model.eval()
    rng = np.random.default_rng(seed)
    x, y = passkey_batch(filler, n, length, rng, depth=depth)
    pred = _logits(model, x, device).argmax(-1).cpu()
    mask = y >= 0
    return float(((pred == y) | ~mask).all(-1).float().mean())


DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]   # needle depths of the passkey grid


def passkey_lengths(cfg: TrainConfig):
    """Context lengths of the passkey grid: half, once and twice the trained sequence length,
    and the passkey example length when training used shorter examples."""
    L = cfg.seq_len
    return sorted({cfg.passkey_len or L, L // 2, L, 2 * L})


@contextmanager
def _kept_block_idx(model):
    """Within the context, every NSA layer of model leaves its selected blocks [B, T, H, n] of the
    latest forward in the yielded list (one entry per layer)."""
    layers = [m for m in model.modules() if isinstance(m, NativeSparseAttention)]
    kept = [None] * len(layers)

    def keeping(i, forward):
        def f(x, cu_seqlens=None):
            out, kept[i] = forward(x, cu_seqlens, return_block_idx=True)
            return out
        return f
    for i, m in enumerate(layers):
        m.forward = keeping(i, m.forward)
    try:
        yield kept
    finally:
        for m in layers:
            del m.forward


@torch.no_grad()
def needle_selection(model, filler, length, depths=DEPTHS, n=8, seed=0, device="cpu"):
    """Does NSA's block selection find the needle? At the position that predicts the first answer
    digit, the share of (example, KV head) pairs whose selected blocks hold the needle's first
    digit, per NSA layer, over n passkey examples per depth; and the share a selection blind to
    the needle would reach (forced blocks always, the free picks spread evenly over the other
    visible blocks)."""
    model.eval()
    rng = np.random.default_rng(seed)
    xs, q, needle = [], [], []
    for d in depths:
        for _ in range(n):
            text, [(a, _b)] = passkey_example(filler, length + 1, d, rng)
            xs.append(np.frombuffer(text[:-1], dtype=np.uint8))
            q.append(a - 1)                                # the question's marker: predicts digit 1
            needle.append(text.index(text[a - 1:a]) + 1)   # the needle's marker comes first
    with _kept_block_idx(model) as kept:
        _logits(model, torch.from_numpy(np.stack(xs)).long(), device)
    if not kept or kept[0] is None:
        return [], float("nan")
    c = next(m for m in model.modules() if isinstance(m, NativeSparseAttention)).config
    rows, q, blk = torch.arange(len(q)), torch.tensor(q), torch.tensor(needle) // c.sel_block_size
    hit = [(idx.cpu()[rows, q] == blk[:, None, None]).any(-1).float().mean().item() for idx in kept]
    visible = q // c.sel_block_size + 1
    forced = (blk < c.sel_init_blocks) | (blk >= visible - c.sel_local_blocks)
    free = c.sel_block_count - c.sel_init_blocks - c.sel_local_blocks
    others = (visible - c.sel_init_blocks - c.sel_local_blocks).clamp_min(1)
    blind = torch.where(forced, 1.0, (free / others).clamp_max(1.0))
    return hit, float(blind.mean())


def needle_grid(model, filler, lengths, depths, n=8, device="cpu"):
    return [[passkey_accuracy(model, filler, L, d, n, seed=i * 100 + j, device=device)
             for j, d in enumerate(depths)] for i, L in enumerate(lengths)]


@torch.no_grad()
def mqar_accuracy(model, n_pairs=16, n_queries=8, n=16, device="cpu", length=None, filler=None):
    """Share of recalled values that are the argmax; with length and filler, on examples of that
    many tokens with text between the pairs and the queries (data.mqar_batch)."""
    model.eval()
    x, y = mqar_batch(n, n_pairs, n_queries, np.random.default_rng(7), length=length, filler=filler)
    pred = _logits(model, x, device).argmax(-1).cpu()
    m = y >= 0
    return float((pred[m] == y[m]).float().mean())


def mqar_at_trained_length(trainer):
    """(example length, MQAR accuracy) with the trained pair count, at the trained example length
    (passkey_len or seq_len), held-out text between the pairs and the queries; NaN when that
    length cannot hold them."""
    c = trainer.cfg
    length = c.passkey_len or c.seq_len
    if length < mqar_min_length(c.mqar_pairs, c.mqar_queries):
        return length, float("nan")
    return length, mqar_accuracy(trainer.model, n_pairs=c.mqar_pairs, n_queries=c.mqar_queries,
                                 device=trainer.device, length=length, filler=trainer.val_data)


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: plots skipped (pip install matplotlib)", file=sys.stderr)
        return None


def plot_heatmaps(grids, lengths, depths, path):
    plt = _plt()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 3.2), squeeze=False)
    for ax, (name, g) in zip(axes[0], grids.items()):
        im = ax.imshow(np.array(g).T, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (bytes)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey retrieval: {name}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_curves(histories, path):
    plt = _plt()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in histories.items():
        ax.plot([r["step"] for r in h], [r["loss"] for r in h], label=f"{name} (train)", alpha=0.6)
        v = [(r["step"], r["val_loss"]) for r in h if "val_loss" in r]
        if v:
            ax.plot(*zip(*v), marker="o", label=f"{name} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def compare(preset="tiny", train_cfg: TrainConfig | None = None, out_dir="runs/compare",
            attentions=ATTENTIONS, grid_n=8, log=sys.stderr, corpus=None):
    """Train one twin per attention kind (same seed: identical initial data order and steps),
    evaluate, plot, and return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = train_cfg or TrainConfig()
    mcfg = PRESETS[preset]
    summary, histories, grids = {}, {}, {}
    L = base.seq_len
    lengths, depths = passkey_lengths(base), DEPTHS
    for kind in attentions:
        if log is not None:
            log.write(f"== training {kind} ({preset}) ==\n")
        tr = Trainer(mcfg.replace(attention=kind), replace(base, out_dir=str(out / kind)), corpus=corpus, log=log)
        corpus = (tr.train_data, tr.val_data)
        hist = tr.fit()
        tr.save()
        dev = tr.device
        grids[kind] = needle_grid(tr.model, tr.val_data, lengths, depths, n=grid_n, device=dev)
        g = np.array(grids[kind])
        summary[kind] = dict(params=tr.model.num_params(), val_loss=tr.val_loss(batches=2 * base.eval_batches),
                             passkey_at_trained=float(g[lengths.index(L)].mean()),
                             passkey_at_2x=float(g[lengths.index(2 * L)].mean()),
                             mqar=mqar_accuracy(tr.model, device=dev),
                             mqar_at_trained=mqar_at_trained_length(tr)[1],
                             tokens_per_s=float(np.median([r["tokens_per_s"] for r in hist])))
        if kind == "nsa":
            hit, blind = needle_selection(tr.model, tr.val_data, L, n=grid_n, device=dev)
            summary[kind]["needle_selected_at_trained"] = dict(layers=hit, blind=blind)
        histories[kind] = hist
    plot_curves(histories, out / "loss_curves.png")
    plot_heatmaps(grids, lengths, depths, out / "needle_heatmap.png")
    json.dump(dict(preset=preset, train=vars(base), summary=summary, grids=grids, lengths=lengths,
                   depths=depths), open(out / "summary.json", "w"), indent=1)
    return summary


def verdict_table(summary):
    rows = [f"{'attention':>9} | {'params':>8} | {'held-out loss':>13} | {'passkey@T':>9} | {'passkey@2T':>10} | "
            f"{'MQAR':>5} | {'MQAR@T':>6} | {'tok/s':>7}"]
    rows.append("-" * len(rows[0]))
    for k, s in summary.items():
        rows.append(f"{k:>9} | {s['params'] / 1e6:7.2f}M | {s['val_loss']:13.4f} | {s['passkey_at_trained']:9.2f} | "
                    f"{s['passkey_at_2x']:10.2f} | {s['mqar']:5.2f} | {s['mqar_at_trained']:6.2f} | {s['tokens_per_s']:7.0f}")
    rows.append("MQAR: 16 pairs, no gap; MQAR@T: the trained pairs at the trained example length, text "
                "between pairs and queries")
    sel = summary.get("nsa", {}).get("needle_selected_at_trained")
    if sel and sel["layers"]:
        rows.append("NSA's selected blocks hold the needle at T, per layer: " +
                    " ".join(f"{h:.2f}" for h in sel["layers"]) + f" (a needle-blind selection: {sel['blind']:.2f})")
    if {"nsa", "full", "window"} <= set(summary):
        n, f, w = (summary[k]["val_loss"] for k in ("nsa", "full", "window"))
        rows.append(f"NSA - full = {n - f:+.4f} nats ({'within' if n <= f + 0.02 else 'outside'} +0.02); "
                    f"NSA - window-only = {n - w:+.4f} nats ({'below' if n < w else 'not below'})")
    return "\n".join(rows)
