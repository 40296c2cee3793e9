"""Plot a passkey-curriculum run from its metrics.jsonl: answer digits right (rolling mean) with
the example length of each phase, and, at each evaluation, the per-layer share of questions
whose selected blocks hold the needle against a needle-blind selection's share.

  python benchmarks/plot_curriculum.py RUN/metrics.jsonl OUT.png [--schedule "128:150,..." --final 4096]

Runs that predate the per-step `passkey_len` record need --schedule (and --final, the length
after the last phase) to label the phases.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def lengths_of(rows, schedule, final):
    if all("passkey_len" in r for r in rows):
        return [r["passkey_len"] for r in rows]
    phases = [tuple(int(v) for v in p.split(":")) for p in schedule.split(",") if p.strip()]
    if not phases or final is None:
        raise SystemExit("metrics have no passkey_len: give --schedule and --final")
    # a step's record is written after it ran at passkey_len_at(step - 1)
    return [next((L for L, until in phases if r["step"] - 1 < until), final) for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics")
    p.add_argument("png")
    p.add_argument("--schedule", default="")
    p.add_argument("--final", type=int)
    p.add_argument("--window", type=int, default=50, help="rolling-mean window in steps")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.metrics)]
    rows = [r for r in rows if r.get("passkey_digit_acc") is not None]
    steps = np.array([r["step"] for r in rows])
    acc = np.array([r["passkey_digit_acc"] for r in rows])
    lens = lengths_of(rows, a.schedule, a.final)
    w = min(a.window, len(acc))
    smooth = np.convolve(acc, np.ones(w) / w, mode="valid")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax1.plot(steps, acc, lw=0.4, alpha=0.35, color="tab:blue")
    ax1.plot(steps[w - 1:], smooth, color="tab:blue", label=f"answer digits right ({w}-step mean)")
    ax1.axhline(0.1, ls=":", color="gray", label="chance per digit")
    starts = [0] + [i for i in range(1, len(lens)) if lens[i] != lens[i - 1]]
    for j, i in enumerate(starts):
        ax1.axvline(steps[i], color="gray", lw=0.5)
        ax1.text(steps[i], 1.02, f"{lens[i]}", fontsize=8, va="bottom")
    ax1.set_ylim(0, 1.1)
    ax1.set_ylabel("share")
    ax1.set_title("passkey curriculum (phase labels: example length in bytes)", fontsize=10)
    ax1.legend(loc="lower left", fontsize=8)

    ev = [r for r in rows if r.get("needle_selected")]
    if ev:
        es = [r["step"] for r in ev]
        sel = np.array([r["needle_selected"] for r in ev])
        ax2.plot(es, sel[:, 0], "o-", label="layer 0")
        ax2.plot(es, sel.max(1), "s--", label="best layer")
        ax2.plot(es, sel.mean(1), "^-", label="mean over layers")
        ax2.plot(es, [r["needle_blind"] for r in ev], "k:", label="needle-blind selection")
        ax2.legend(loc="lower right", fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("step")
    ax2.set_ylabel("needle block selected")
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
