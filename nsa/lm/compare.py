"""`nsa compare`: NSA, full and window-only twins of one size trained on identical data and steps,
evaluated alike: loss curves, passkey and recall heat maps, summary.json and a verdict table.
Resumable: a finished twin is not trained again, an unfinished one continues from its checkpoint."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .data import mqar_min_length
from .eval import (BRANCHES, DEPTHS, mqar_accuracy, needle_grid, needle_selection, recall_ablation, recall_accuracy,
                   recall_selection)
from .model import ATTENTIONS, PRESETS, matched, num_params
from .train import TrainConfig, Trainer, read_checkpoint

PARAM_TOLERANCE = 0.02   # the twins' parameter counts differ from NSA's by at most this share
RECALL_BINS = 5          # depth bins of the recall table (eval.recall_accuracy)
LEARNED = 0.9            # recall at T that counts as the task learned: the target for NSA, the premise for full


def twin_configs(preset: str, attentions=ATTENTIONS) -> dict:
    """One ModelConfig per attention: the preset's for NSA; for the others, the SwiGLU width that
    gives them NSA's parameter count (within PARAM_TOLERANCE)."""
    nsa_cfg = PRESETS[preset].replace(attention="nsa")
    target = num_params(nsa_cfg)
    out = {}
    for kind in attentions:
        cfg = nsa_cfg if kind == "nsa" else matched(nsa_cfg.replace(attention=kind), target)
        if abs(num_params(cfg) / target - 1) > PARAM_TOLERANCE:
            raise ValueError(f"the {kind} twin of {preset} has {num_params(cfg):,} parameters, NSA "
                             f"{target:,}: no SwiGLU width matches within {PARAM_TOLERANCE:.0%}")
        out[kind] = cfg
    return out


def passkey_lengths(cfg: TrainConfig):
    """Context lengths of the passkey grid: half, once and twice the trained sequence length,
    and the passkey example length when training used shorter examples."""
    L = cfg.seq_len
    return sorted({cfg.passkey_len or L, L // 2, L, 2 * L})


def recall_lengths(cfg: TrainConfig):
    """Lengths of the recall table: once, twice and four times the trained example length."""
    n = cfg.passkey_len or cfg.seq_len
    return [n, 2 * n, 4 * n]


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


def evaluate_twin(tr: Trainer, grid_n: int = 8) -> dict:
    """A trained twin's results: size, held-out loss at T and 2T, tokens/s; the passkey grid
    (when it trained on passkey rows); MQAR; the spread-recall table over recall_lengths and depth
    bins (when it trained on spread MQAR); for NSA, whether its selection holds the needle / the
    asked pair, against a blind selection."""
    c, m, dev, val = tr.cfg, tr.model, tr.device, tr.val_data
    T = c.seq_len
    r = dict(params=m.num_params(), val_loss=tr.val_loss(batches=2 * c.eval_batches),
             val_loss_at_2x=tr.val_loss(batches=2 * c.eval_batches, seq_len=2 * T),
             mqar=mqar_accuracy(m, device=dev),
             tokens_per_s=float(np.median([h["tokens_per_s"] for h in tr.history])))
    nsa = tr.model_cfg.attention == "nsa"
    if c.passkey_rows:
        lengths = passkey_lengths(c)
        g = needle_grid(m, val, lengths, DEPTHS, n=grid_n, device=dev)
        r.update(passkey_grid=g, passkey_lengths=lengths, passkey_at_trained=float(np.mean(g[lengths.index(T)])),
                 passkey_at_2x=float(np.mean(g[lengths.index(2 * T)])))
        if nsa:
            hit, blind = needle_selection(m, val, T, n=grid_n, device=dev)
            r["needle_selected_at_trained"] = dict(layers=hit, blind=blind)
    if c.mqar_rows and c.mqar_spread:
        r["recall"] = {}
        lengths = recall_lengths(c)
        for n in lengths:
            acc, by_depth = recall_accuracy(m, val, n, c.mqar_pairs, c.mqar_queries, c.mqar_spread, n=8 * grid_n,
                                            bins=RECALL_BINS, device=dev)
            r["recall"][str(n)] = dict(acc=acc, by_depth=by_depth)
            if nsa:
                hit, blind = recall_selection(m, val, n, c.mqar_pairs, c.mqar_queries, c.mqar_spread, n=grid_n,
                                              device=dev)
                r["recall"][str(n)].update(selected=hit, blind=blind)
                if n == lengths[0]:   # at T: which branches of which layers carry the recall
                    r["recall"][str(n)]["shut"] = recall_ablation(m, val, n, c.mqar_pairs, c.mqar_queries,
                                                                  c.mqar_spread, n=4 * grid_n, device=dev)
    elif c.mqar_rows:
        r["mqar_at_trained"] = mqar_at_trained_length(tr)[1]
    return r


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: plots skipped (pip install matplotlib)", file=sys.stderr)
        return None


def plot_heatmaps(grids, lengths, rows, path, title="passkey retrieval", ylabel="needle depth",
                  what="share of passkeys with every digit right"):
    """One heat map [length][row] per twin; returns a note when every cell is 0 (no signal)."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 3.2), squeeze=False)
    for i, (ax, (name, g)) in enumerate(zip(axes[0], grids.items())):
        a = np.array(g, dtype=float).T
        im = ax.imshow(a, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (r, c), v in np.ndenumerate(a):
            ax.text(c, r, "-" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(rows)), rows if i == 0 else [""] * len(rows))
        ax.set_xlabel("context length (bytes)")
        if i == 0:
            ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}")
    bar = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    bar.set_label(what)
    blank = not any(v for g in grids.values() for row in g for v in row if v == v)
    if blank:
        fig.suptitle("every cell 0: no model here retrieves (no signal in this plot)", y=1.04, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"{path}: every cell is 0.00 (no twin retrieves at these sizes): the heat map carries no signal" if blank else None


def plot_curves(histories, path):
    """Training and held-out loss per twin; with retrieval rows, a second panel of the training
    retrieval accuracy (MQAR values, passkey digits) per step."""
    plt = _plt()
    if plt is None:
        return
    task = next((k for k in ("mqar_acc", "passkey_digit_acc") if any(k in r for h in histories.values() for r in h)), None)
    fig, axes = plt.subplots(1, 2 if task else 1, figsize=(12 if task else 6, 4), squeeze=False)
    ax = axes[0][0]
    for name, h in histories.items():
        ax.plot([r["step"] for r in h], [r["loss"] for r in h], label=f"{name} (train)", alpha=0.6)
        v = [(r["step"], r["val_loss"]) for r in h if "val_loss" in r]
        if v:
            ax.plot(*zip(*v), marker="o", label=f"{name} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("text loss (nats / byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    if task:
        ax = axes[0][1]
        for name, h in histories.items():
            pts = [(r["step"], r[task]) for r in h if task in r]
            ax.plot(*zip(*pts), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training accuracy: " + ("MQAR values" if task == "mqar_acc" else "passkey digits"))
        ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _settings(cfg: TrainConfig) -> dict:
    """What must be equal for a twin's earlier work to count in this run (a setting that an
    earlier version did not record counts as its default)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "time_limit", "device")}


def compare(preset="tiny", train_cfg: TrainConfig | None = None, out_dir="runs/compare",
            attentions=ATTENTIONS, grid_n=8, log="stderr", corpus=None, time_limit: float = 0,
            clock=time.monotonic, train=None):
    """Train one twin per attention kind (twin_configs: one size; one seed: identical data and
    steps, step checksums in each history), evaluate (evaluate_twin), plot, and return the summary.
    A twin whose result.json holds this run's settings is not trained again; one with a
    checkpoint continues from it. time_limit (seconds of clock, 0: none) bounds the whole call:
    training stops in time to checkpoint and compare returns None (call it again to continue).
    train: the twins this call may train (default: all); the others must be done already (their
    result.json in out_dir, from another process or an earlier call), else compare returns None
    once it has trained its own: several processes can train the twins side by side, and a last
    call without `train` writes the plots and the summary."""
    log = sys.stderr if log == "stderr" else log
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = train_cfg or TrainConfig()
    t0 = clock()
    unknown = set(train or ()) - set(attentions)
    if unknown:
        raise ValueError(f"twins to train must be among {list(attentions)}, got {sorted(unknown)}")
    summary, histories, missing = {}, {}, []
    for kind, mcfg in twin_configs(preset, attentions).items():
        d = out / kind
        done, ckpt = d / "result.json", d / "checkpoint.pt"
        if done.is_file():
            r = json.loads(done.read_text())
            if _settings(TrainConfig(**r["train"])) != _settings(base) or r["model"] != json.loads(json.dumps(asdict(mcfg))):
                raise ValueError(f"{d} holds a {kind} twin of other settings: give another --out, or delete {d}")
            summary[kind], histories[kind] = r["summary"], r["history"]
            if log is not None:
                log.write(f"== {kind}: done earlier ({done}) ==\n")
            continue
        if train is not None and kind not in train:
            missing.append(kind)
            continue
        left = time_limit - (clock() - t0) if time_limit else 0
        if time_limit and left <= 0:
            return None
        tr = Trainer(mcfg, replace(base, out_dir=str(d), time_limit=left), corpus=corpus, log=log)
        tr.clock = clock
        corpus = (tr.train_data, tr.val_data)
        if ckpt.is_file():
            if _settings(TrainConfig(**read_checkpoint(ckpt)["train_cfg"])) != _settings(base):
                raise ValueError(f"{ckpt} holds a run of other settings: give another --out, or delete {d}")
            tr.load(ckpt)
        if log is not None:
            log.write(f"== training {kind} ({preset}): {tr.describe()}"
                      f"{f', from step {tr.step}' if tr.step else ''} ==\n")
        tr.fit()
        tr.save()
        if tr.stopped_early:
            if log is not None:
                log.write(f"time limit: {kind} stopped at step {tr.step} of {base.steps}, saved {ckpt}\n")
            return None
        summary[kind], histories[kind] = evaluate_twin(tr, grid_n), tr.history
        done.write_text(json.dumps(dict(train=_settings(base), model=asdict(mcfg), summary=summary[kind],
                                        history=tr.history)))
    if missing:
        if log is not None:
            log.write(f"not trained here: {', '.join(missing)} (the summary waits for their result.json in {out})\n")
        return None
    plot_curves(histories, out / "loss_curves.png")
    notes = []
    grids = {k: s["passkey_grid"] for k, s in summary.items() if "passkey_grid" in s}
    if grids:
        lengths = next(s["passkey_lengths"] for s in summary.values() if "passkey_lengths" in s)
        notes.append(plot_heatmaps(grids, lengths, [f"{d:.0%}" for d in DEPTHS], out / "needle_heatmap.png"))
    rec = {k: s["recall"] for k, s in summary.items() if "recall" in s}
    if rec:
        lengths = [int(n) for n in next(iter(rec.values()))]
        grids = {k: [r[str(n)]["by_depth"] for n in lengths] for k, r in rec.items()}
        bins = [f"{b / RECALL_BINS:.0%}-{(b + 1) / RECALL_BINS:.0%}" for b in range(RECALL_BINS)]
        notes.append(plot_heatmaps(grids, lengths, bins, out / "recall_heatmap.png", title="recall",
                                   ylabel="asked pair's depth", what="share of values recalled"))
    for note in filter(None, notes):
        if log is not None:
            log.write(note + "\n")
    same = len({tuple(r["data"] for r in h) for h in histories.values()}) == 1
    json.dump(dict(preset=preset, train=vars(base), summary=summary, identical_data=same),
              open(out / "summary.json", "w"), indent=1)
    if not same:
        raise RuntimeError(f"the twins in {out} saw different data (step checksums differ)")
    return summary


def verdict_table(summary):
    first = next(iter(summary.values()))
    cols = [("params", lambda s: f"{s['params'] / 1e6:7.2f}M", 8), ("held-out loss", lambda s: f"{s['val_loss']:.4f}", 13),
            ("loss@2T", lambda s: f"{s['val_loss_at_2x']:.4f}", 7)]
    if "passkey_at_trained" in first:
        cols += [("passkey@T", lambda s: f"{s['passkey_at_trained']:.2f}", 9),
                 ("passkey@2T", lambda s: f"{s['passkey_at_2x']:.2f}", 10)]
    cols.append(("MQAR", lambda s: f"{s['mqar']:.2f}", 5))
    if "mqar_at_trained" in first:
        cols.append(("MQAR@T", lambda s: f"{s['mqar_at_trained']:.2f}", 6))
    lengths = list(first.get("recall", {}))   # recall_lengths: T, 2T, 4T
    for label, n in zip(("T", "2T", "4T"), lengths):
        cols.append((f"recall@{label}", lambda s, n=n: f"{s['recall'][n]['acc']:.2f}", 9))
    cols.append(("tok/s", lambda s: f"{s['tokens_per_s']:.0f}", 7))
    rows = [f"{'attention':>9} | " + " | ".join(f"{name:>{w}}" for name, _, w in cols)]
    rows.append("-" * len(rows[0]))
    for k, s in summary.items():
        rows.append(f"{k:>9} | " + " | ".join(f"{f(s):>{w}}" for _, f, w in cols))
    rows.append("held-out loss, loss@2T: nats per byte on held-out text at the trained length T and at 2T "
                "(lower is better)")
    if "passkey_at_trained" in first:
        rows.append("passkey@T, @2T: share of passkeys with every digit right at T and at 2T")
    rows.append("MQAR: share of values recalled, 16 pairs, no gap" + (
        "; MQAR@T: the trained pairs at the trained example length, text between pairs and queries"
        if "mqar_at_trained" in first else ""))
    if lengths:
        rows.append(f"recall@T, @2T, @4T: share of values recalled with the pairs spread through the text, "
                    f"every pair beyond the window of its queries, at the trained example length T = {lengths[0]} "
                    f"and at 2T, 4T")
    rows.append("tok/s: median over the training steps")
    nsa = summary.get("nsa", {})
    sel = nsa.get("needle_selected_at_trained")
    if sel and sel["layers"]:
        rows.append("NSA's selected blocks hold the needle at T, per layer: " +
                    " ".join(f"{h:.2f}" for h in sel["layers"]) + f" (a needle-blind selection: {sel['blind']:.2f})")
    for n in lengths:
        r = nsa.get("recall", {}).get(n, {})
        if r.get("selected"):
            rows.append(f"NSA's selected blocks hold the asked pair at {n}, per layer: " +
                        " ".join(f"{h:.2f}" for h in r["selected"]) + f" (a blind selection: {r['blind']:.2f})")
        if r.get("shut"):
            each = lambda accs: ", ".join(f"{b} {a:.2f}" for b, a in zip(BRANCHES, accs))
            rows.append(f"NSA's recall at {n} ({r['acc']:.2f}) with one branch shut in every layer: "
                        f"{each(r['shut']['every_layer'])}; in one layer alone: " +
                        "; ".join(f"layer {i}: {each(a)}" for i, a in enumerate(r["shut"]["layers"])))
    if {"nsa", "full", "window"} <= set(summary):
        n, f, w = (summary[k]["val_loss"] for k in ("nsa", "full", "window"))
        rows.append(f"NSA - full = {n - f:+.4f} nats/byte: NSA {'matches or beats' if n <= f + 0.02 else 'trails'} "
                    f"full attention (the paper's claim; 'matches' = no more than 0.02 above)")
        rows.append(f"NSA - window-only = {n - w:+.4f} nats/byte: the compression and selection branches "
                    f"{'earn their keep' if n < w else 'do not help here'} (window-only is NSA's sliding window alone)")
        if lengths:
            acc = {k: [summary[k]["recall"][m]["acc"] for m in lengths] for k in ("nsa", "full", "window")}
            met = acc["nsa"][0] >= LEARNED and acc["nsa"][0] >= acc["full"][0] - 0.05 and acc["window"][0] <= 0.3
            rows.append(f"recall at T: NSA {acc['nsa'][0]:.2f}, full {acc['full'][0]:.2f}, window-only "
                        f"{acc['window'][0]:.2f}: {'met' if met else 'not met'} (NSA >= {LEARNED} and at most 0.05 below "
                        f"full, window-only <= 0.3)")
            if len(lengths) > 1:
                rows.append(f"recall at 2T: NSA {acc['nsa'][1]:.2f}, full {acc['full'][1]:.2f}: NSA "
                            f"{'>=' if acc['nsa'][1] >= acc['full'][1] else '<'} full")
            if acc["full"][0] < LEARNED:
                rows.append(f"full attention did not learn the recall at T ({acc['full'][0]:.2f} < {LEARNED}): this run "
                            f"cannot show that NSA recalls as well as a full attention that has learned it, at T "
                            f"or 2T (another --seed may; docs/training.md)")
    return "\n".join(rows)
