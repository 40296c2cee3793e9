"""Evaluations of a LanguageModel: passkey accuracy, MQAR recall, and whether NSA's selection
finds the needle. Model-level only: the trainer calls them (nsa.lm.train), `compare` too."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..layer import NativeSparseAttention
from .data import mqar_batch, passkey_batch, passkey_example, spread_at
from .model import autocast


def _logits(model, x, device):
    """Forward for evaluation: bf16 autocast on GPU as in training (an fp32 forward would send
    full attention to SDPA's math backend, which materialises [B, H, T, T])."""
    with autocast(device):
        return model(x.to(device)).float()


def nsa_layers(model):
    """The NSA layers of model, in order ([] for full or window attention)."""
    return [m for m in model.modules() if isinstance(m, NativeSparseAttention)]


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


@contextmanager
def _kept_block_idx(model):
    """Within the context, every NSA layer of model leaves its selected blocks [B, T, H, n] of the
    latest forward in the yielded list (one entry per layer)."""
    layers = nsa_layers(model)
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


def selection_hits(model, x, rows, q, key, device="cpu"):
    """Does NSA's block selection hold what a query needs? x [B, T] tokens; for each i, query
    position q[i] of row rows[i] needs key position key[i]. Returns (per NSA layer the share of
    (i, KV head) whose selected blocks at q[i] hold key[i]'s block, the share a selection blind
    to the key would reach: forced blocks always, the free picks spread evenly over the other
    visible blocks); ([], nan) for a model without NSA layers."""
    with _kept_block_idx(model) as kept:
        _logits(model, x, device)
    if not kept or kept[0] is None:
        return [], float("nan")
    c = nsa_layers(model)[0].config
    rows, q = torch.as_tensor(rows), torch.as_tensor(q)
    blk = torch.as_tensor(key) // c.sel_block_size
    hit = [(idx.cpu()[rows, q] == blk[:, None, None]).any(-1).float().mean().item() for idx in kept]
    visible = q // c.sel_block_size + 1
    forced = (blk < c.sel_init_blocks) | (blk >= visible - c.sel_local_blocks)
    free = c.sel_block_count - c.sel_init_blocks - c.sel_local_blocks
    others = (visible - c.sel_init_blocks - c.sel_local_blocks).clamp_min(1)
    blind = torch.where(forced, 1.0, (free / others).clamp_max(1.0))
    return hit, float(blind.mean())


@torch.no_grad()
def gate_means(model, x, mask=None, device="cpu"):
    """NSA: per layer, the mean weight of each branch's gate [compressed, selected, window] over
    the query heads and the positions of x [B, T] where mask [B, T] is true (default: all):
    whether training opens or shuts a branch. [] for a model without NSA layers."""
    model.eval()
    layers = nsa_layers(model)
    seen = []

    def record(m, args):   # the layer's input x: its gates are sigmoid(gate_proj(x)), as in forward
        h = args[0]
        seen.append(torch.sigmoid(m.gate_proj(h).float()).view(*h.shape[:2], -1, 3))
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        if layers:
            _logits(model, x, device)
    finally:
        for h in hooks:
            h.remove()
    keep = torch.ones(x.shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    return [[round(float(v), 4) for v in g[keep.to(g.device)].mean((0, 1))] for g in seen]


@torch.no_grad()
def needle_selection(model, filler, length, depths=DEPTHS, n=8, seed=0, device="cpu"):
    """Does NSA's block selection find the needle? At the position that predicts the first answer
    digit, the share of (example, KV head) pairs whose selected blocks hold the needle's first
    digit, per NSA layer, over n passkey examples per depth, and a needle-blind selection's
    share (selection_hits)."""
    model.eval()
    rng = np.random.default_rng(seed)
    xs, q, needle = [], [], []
    for d in depths:
        for _ in range(n):
            text, [(a, _b)] = passkey_example(filler, length + 1, d, rng)
            xs.append(np.frombuffer(text[:-1], dtype=np.uint8))
            q.append(a - 1)                                # the question's marker: predicts digit 1
            needle.append(text.index(text[a - 1:a]) + 1)   # the needle's marker comes first
    x = torch.from_numpy(np.stack(xs)).long()
    return selection_hits(model, x, torch.arange(len(q)), q, needle, device)


def needle_rows(model, filler, lengths, depths, n=8, device="cpu"):
    """The passkey grid a row (one length) at a time, as each is done; cell (i, j) uses seed
    i * 100 + j."""
    for i, L in enumerate(lengths):
        yield [passkey_accuracy(model, filler, L, d, n, seed=i * 100 + j, device=device) for j, d in enumerate(depths)]


def needle_grid(model, filler, lengths, depths, n=8, device="cpu"):
    """Passkey accuracy [length][depth] (needle_rows, whole)."""
    return list(needle_rows(model, filler, lengths, depths, n=n, device=device))


@torch.no_grad()
def mqar_accuracy(model, n_pairs=16, n_queries=8, n=16, device="cpu", length=None, filler=None):
    """Share of recalled values that are the argmax; with length and filler, on examples of that
    many tokens with text between the pairs and the queries (data.mqar_batch)."""
    model.eval()
    x, y = mqar_batch(n, n_pairs, n_queries, np.random.default_rng(7), length=length, filler=filler)
    pred = _logits(model, x, device).argmax(-1).cpu()
    m = y >= 0
    return float((pred[m] == y[m]).float().mean())


def recall_data(filler, length, n_pairs, n_queries, spread, n, seed=0):
    """n spread-MQAR examples (data.mqar_batch, the spread at most length / 4): x, y [n, length]
    and the asked pairs' key positions [n, n_queries]; seeded by the length too, so that every
    twin sees the same ones."""
    return mqar_batch(n, n_pairs, n_queries, np.random.default_rng([seed, length]), length=length,
                      filler=filler, spread=spread_at(spread, length), with_positions=True)


@torch.no_grad()
def recall_accuracy(model, filler, length, n_pairs, n_queries, spread, n=32, bins=5, device="cpu",
                    tokens_per_batch=1 << 16):
    """Spread MQAR recall at one length: (share of values recalled, the share per depth bin).
    A pair's depth is its position over the span where pairs may lie (0: the start of the text,
    1: spread tokens before the queries), in bins [0, 1/bins), ...; NaN for an empty bin.
    Forward passes of at most tokens_per_batch tokens."""
    model.eval()
    x, y, at = recall_data(filler, length, n_pairs, n_queries, spread, n)
    rows = max(1, tokens_per_batch // length)
    pred = torch.cat([_logits(model, x[i:i + rows], device).argmax(-1).cpu() for i in range(0, n, rows)])
    right = (pred == y)[y >= 0].view(n, n_queries).float()     # [n, Q], queries in order
    span = length - 2 * n_queries - spread_at(spread, length)   # where pairs may lie: [0, span)
    depth_bin = (at * bins // span).clamp_max(bins - 1)
    per_bin = [float(right[depth_bin == b].mean()) if (depth_bin == b).any() else float("nan") for b in range(bins)]
    return float(right.mean()), per_bin


@torch.no_grad()
def recall_selection(model, filler, length, n_pairs, n_queries, spread, n=8, device="cpu"):
    """NSA at spread MQAR: per layer, the share of (query, KV head) whose selected blocks at the
    query key hold the asked pair, and a blind selection's share (selection_hits)."""
    model.eval()
    x, y, at = recall_data(filler, length, n_pairs, n_queries, spread, n)
    q = (y >= 0).nonzero()                       # [n * Q, 2]: (row, position predicting a value)
    return selection_hits(model, x, q[:, 0], q[:, 1], at.flatten() + 1, device)


BRANCHES = ("compressed", "selected", "window")   # the order of an NSA layer's gates


@contextmanager
def shut_branch(layers, branch):
    """Within the context, the gate of one branch (an index into BRANCHES) is shut, weight 0, in
    each of the NSA layers given: its bias set far below anything the gate's weights add, so the
    sigmoid is 0 in any dtype. The biases are restored after."""
    saved = [m.gate_proj.bias.detach().clone() for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.gate_proj.bias.view(-1, len(BRANCHES))[:, branch] = -1e4
        yield
    finally:
        with torch.no_grad():
            for m, b in zip(layers, saved):
                m.gate_proj.bias.copy_(b)


@torch.no_grad()
def recall_ablation(model, filler, length, n_pairs, n_queries, spread, n=32, device="cpu"):
    """NSA at spread MQAR: which branches carry the recall. dict(every_layer=[recall with the
    compressed, the selected, the window branch shut in every layer], layers=[the same with the
    branch shut in that layer alone, per layer]); {} for a model without NSA layers. A branch
    whose shutting keeps the recall is not needed for it."""
    layers = nsa_layers(model)
    if not layers:
        return {}

    def recall_with(shut, b):
        with shut_branch(shut, b):
            return recall_accuracy(model, filler, length, n_pairs, n_queries, spread, n=n, bins=1, device=device)[0]
    return dict(every_layer=[recall_with(layers, b) for b in range(len(BRANCHES))],
                layers=[[recall_with([m], b) for b in range(len(BRANCHES))] for m in layers])
