"""A compiled training step computes what the eager one does: the `small` NSA LM, bf16 autocast,
one row of T bytes; loss and every parameter's gradient of torch.compile (default and
reduce-overhead, the CUDA-graph replay the trainer uses on a GPU) against float64 (the PyTorch
reference in float64), beside the eager step's. The GPU check's rule, per tensor:
err(compiled) <= 2 err(eager) + 1e-3, err = ||x - x_f64|| / ||x_f64||.

  python benchmarks/check_lm_step.py [--T 4096] [--modes default reduce-overhead]
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from nsa.lm.model import PRESETS, LanguageModel  # noqa: E402
from shapes import environment, err, save  # noqa: E402


def loss_and_grads(model, fwd, x, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        _, loss = fwd(x, x)
    loss.backward()
    return [loss.detach()] + [p.grad.detach().clone() for p in model.parameters()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"], choices=["default", "reduce-overhead"])
    a = p.parse_args()
    torch.manual_seed(0)
    model = LanguageModel(PRESETS["small"]).cuda()
    names = ["loss"] + [n for n, _ in model.named_parameters()]
    x = torch.randint(0, 256, (1, a.T), device="cuda")
    ref = LanguageModel(PRESETS["small"]).cuda().double()
    ref.load_state_dict(model.state_dict())
    for b in ref.blocks:
        b.attn.backend = "torch"
    truth = loss_and_grads(ref, ref, x, bf16=False)
    del ref
    eager = loss_and_grads(model, model, x, bf16=True)
    results = {}
    for mode in a.modes:
        fwd = torch.compile(model, mode=mode)
        for _ in range(3):   # compile, warm up, record the graphs
            got = loss_and_grads(model, fwd, x, bf16=True)
        rows = [dict(tensor=n, err_compiled=err(g, t), err_eager=err(e, t)) for n, g, e, t in zip(names, got, eager, truth)]
        for r in rows:
            r["ok"] = r["err_compiled"] <= 2 * r["err_eager"] + 1e-3
        worst = max(rows, key=lambda r: r["err_compiled"] / (2 * r["err_eager"] + 1e-3))
        results[mode] = dict(ok=all(r["ok"] for r in rows), worst=worst, loss=float(got[0]), rows=rows,
                             bitwise_equal_to_eager=all(torch.equal(g, e) for g, e in zip(got, eager)))
        print(f"{mode:15s} ok={results[mode]['ok']}  loss {float(got[0]):.6f} (eager {float(eager[0]):.6f}, "
              f"f64 {float(truth[0]):.6f})  worst {worst['tensor']}: {worst['err_compiled']:.2e} vs eager "
              f"{worst['err_eager']:.2e}  bit-equal to eager: {results[mode]['bitwise_equal_to_eager']}", flush=True)
    save("lm_step_check", dict(env=environment(), T=a.T, results=results))
    print("ALL OK" if all(r["ok"] for r in results.values()) else "FAILURES")


if __name__ == "__main__":
    main()
