"""Command line: `nsa demo`, `nsa train`, `nsa eval`, `nsa compare` (the README's main job), `nsa export`.
`python -m nsa ...` runs it too."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path


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


def _train_args(p):
    p.add_argument("--preset", default="tiny", choices=list(PRESET_TRAINING),
                   help="model and training sizes: tiny (0.57M, CPU), small (97M, one GPU), recall (5M, one "
                        "GPU: the spread-recall experiment of docs/training.md); on --resume the checkpoint's model")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: the preset's; on --resume the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch in rows (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="bytes per row (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--corpus", nargs="*", default=None, help="text files and/or Hugging Face datasets as hf:NAME[?config=C&split=S&column=COL] "
                        "(default: Python's stdlib sources)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (default: at the end)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds: stop between steps in time to checkpoint (continue with --resume; nsa compare: "
                        "with the same command)")
    p.add_argument("--passkey-rows", type=int, default=None, help="rows of each batch that are passkey examples (default: the preset's)")
    p.add_argument("--passkey-needles", type=int, default=None, help="needles (each with its question) per passkey example")
    p.add_argument("--passkey-len", type=int, default=None,
                   help="bytes per retrieval example (0: seq-len); a passkey or MQAR row holds seq-len // this many")
    p.add_argument("--passkey-len-from", type=int, default=None,
                   help="curriculum: retrieval examples start this long and double, over the first half "
                        "of training, up to --passkey-len")
    p.add_argument("--passkey-schedule", default=None,
                   help="curriculum by hand: 'LEN:UNTIL,...' = examples of LEN bytes before step UNTIL, "
                        "then the next phase; after the last, --passkey-len (e.g. 128:150,256:250,2048:1200)")
    p.add_argument("--mqar-rows", type=int, default=None,
                   help="rows of each batch that are multi-query associative recall examples (cut like "
                        "the passkey rows: pairs, a gap of text, then the queries)")
    p.add_argument("--mqar-pairs", type=int, default=None, help="key-value pairs per MQAR example")
    p.add_argument("--mqar-queries", type=int, default=None, help="queries per MQAR example")
    p.add_argument("--mqar-spread", type=int, default=None,
                   help="> 0: MQAR pairs lie at random places of the text, each at least this many tokens "
                        "before the queries (0: the pairs first, then the text)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="the kernels of NSA and window attention: auto (Triton on a GPU, the PyTorch reference "
                        "on a CPU), triton, torch (the reference anywhere: an A/B of the kernels in training); "
                        "full attention runs SDPA")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "default", "reduce-overhead"],
                   help="torch.compile the model's forward; auto: reduce-overhead (CUDA graphs) on one GPU, "
                        "off on a CPU or under torchrun")


# Options whose default (None on the command line) is the preset's, else TrainConfig's.
_FROM_PRESET = ("steps", "batch_size", "seq_len", "lr", "passkey_rows", "passkey_needles", "passkey_len",
                "passkey_len_from", "passkey_schedule", "mqar_rows", "mqar_pairs", "mqar_queries", "mqar_spread")


# tiny: the three twins train on a 2-core CPU in a few minutes; small: one GPU, long context;
# recall: one GPU, spread recall at 4k (docs/training.md, "Recall beyond the window")
PRESET_TRAINING = {"tiny": dict(steps=150, batch_size=8, seq_len=256, lr=3e-3),
                   "small": dict(steps=2000, batch_size=8, seq_len=8192, lr=1e-3),
                   "recall": dict(steps=6000, batch_size=16, seq_len=4096, lr=2e-3, passkey_rows=0,
                                  mqar_rows=12, mqar_pairs=16, mqar_queries=16, mqar_spread=512,
                                  passkey_schedule="256:1200,2048:4500")}


def _train_cfg(a, out_dir, base=None):
    """The run's TrainConfig from the command line; where it gives no value for an option of
    _FROM_PRESET: base's (a resumed checkpoint's settings), else the preset's, else TrainConfig's."""
    from nsa.lm.train import TrainConfig
    base = {**asdict(TrainConfig()), **(base or PRESET_TRAINING[a.preset])}
    d = {k: getattr(a, k) if getattr(a, k) is not None else base[k] for k in _FROM_PRESET}
    return TrainConfig(**d, warmup=max(1, d["steps"] // 10), eval_every=min(a.eval_every, d["steps"]),
                       seed=a.seed, device=a.device, out_dir=out_dir, save_every=a.save_every,
                       parallel=getattr(a, "parallel", "ddp"), time_limit=getattr(a, "time_limit", 0),
                       compile=a.compile, backend=a.backend)


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): one process group, NCCL on GPUs, gloo on CPUs."""
    import os

    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _fail(msg) -> int:
    print(f"nsa: error: {msg}", file=sys.stderr)
    return 2


def _resume_base(a, ckpt):
    """The checkpoint of --resume. Its attention stands unless --attention gives another (an error);
    its model stands unless --preset is given (then Trainer.load checks that they agree)."""
    from nsa.lm.train import read_checkpoint
    s = read_checkpoint(ckpt)
    kind = s["model_cfg"]["attention"]
    if "attention" in a.given and kind != a.attention:
        raise ValueError(f"{ckpt} holds a '{kind}' model; --attention is '{a.attention}' (give --attention "
                         f"{kind}, or another --out for a new run)")
    a.attention = kind
    return s


def _resume_cfg(a, old: dict, step: int):
    """The resumed run's TrainConfig: the checkpoint's settings, but for the options given on the
    command line; each change printed (a new --steps recomputes the cosine schedule and its
    warmup from the checkpoint's step on)."""
    from nsa.lm.train import TrainConfig
    new = asdict(_train_cfg(a, a.out, old))
    cfg = {k: new[k] if k in a.given or k in ("out_dir", "device") else v for k, v in old.items() if k in new}
    if "steps" in a.given:
        cfg["warmup"] = new["warmup"]
    for k, v in cfg.items():
        if old[k] != v and k not in ("out_dir", "device"):
            why = f": the LR schedule is recomputed for {v} steps from step {step} on" if k == "steps" else ""
            print(f"resume: {k} {old[k]} (checkpoint) -> {v} (command line){why}")
    return TrainConfig(**cfg)


def train(a) -> int:
    from nsa.lm.data import load_corpus
    from nsa.lm.model import PRESETS
    from nsa.lm.train import Trainer, model_config_from
    _init_distributed()
    ckpt = Path(a.out) / "checkpoint.pt"
    if a.resume and not ckpt.is_file():
        return _fail(f"--resume: no checkpoint at {ckpt} (drop --resume to start a new run there)")
    try:
        s = _resume_base(a, ckpt) if a.resume else None
        if a.attention == "full" and a.backend != "auto":
            return _fail(f"--backend {a.backend}: full attention runs SDPA (--backend chooses the kernels of nsa "
                         f"and window attention)")
        cfg = _resume_cfg(a, s["train_cfg"], s["step"]) if a.resume else _train_cfg(a, a.out)
        model_cfg = (model_config_from(s["model_cfg"]) if a.resume and "preset" not in a.given
                     else PRESETS[a.preset].replace(attention=a.attention))
        tr = Trainer(model_cfg, cfg, corpus=load_corpus(a.corpus))
        if a.resume:
            tr.load(ckpt)
            print(f"resumed from {ckpt} at step {tr.step} of {tr.cfg.steps}")
    except (ValueError, FileNotFoundError) as e:
        return _fail(e)
    print(tr.describe())
    tr.fit()
    if tr.stopped_early:
        print(f"time limit: stopped at step {tr.step} of {tr.cfg.steps}; saved {tr.save()} "
              f"(continue with --resume)")
        return 0
    print(f"saved {tr.save()}; held-out loss {tr.val_loss():.4f}")
    return 0


def evaluate(a) -> int:
    from nsa.lm.compare import mqar_at_trained_length, passkey_lengths
    from nsa.lm.data import load_corpus
    from nsa.lm.eval import DEPTHS, mqar_accuracy, needle_rows, needle_selection
    from nsa.lm.train import TrainConfig, Trainer, model_config_from, read_checkpoint
    t0 = time.monotonic()
    say = lambda msg: print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)
    try:
        s = read_checkpoint(a.checkpoint)
        tr = Trainer(model_config_from(s["model_cfg"]), TrainConfig(**{**s["train_cfg"], "device": a.device}),
                     corpus=load_corpus(a.corpus), log=None)
        tr.load(a.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        return _fail(e)
    say(f"{tr.describe()}, at step {tr.step}")
    say(f"held-out loss {tr.val_loss():.4f} nats/byte")
    L_mq, mq_long = mqar_at_trained_length(tr)
    say(f"MQAR accuracy {mqar_accuracy(tr.model, device=tr.device):.2f} (16 pairs, no gap), {mq_long:.2f} at "
        f"{L_mq} tokens ({tr.cfg.mqar_pairs} pairs, text between pairs and queries)")
    lengths, depths = a.lengths or passkey_lengths(tr.cfg), DEPTHS
    say("passkey accuracy, share of examples with every digit right (rows: length; columns: depth "
        + ", ".join(f"{d:.0%}" for d in depths) + ")")
    for L_, row in zip(lengths, needle_rows(tr.model, tr.val_data, lengths, depths, n=a.samples, device=tr.device)):
        print(f"  {L_:6d}: " + "  ".join(f"{v:.2f}" for v in row), flush=True)
    if tr.model_cfg.attention == "nsa":
        print("needle block among the selected ones at the question (per layer, share of examples x KV heads; "
              "'blind': a selection that ignores the needle)")
        for L_ in lengths:
            hit, blind = needle_selection(tr.model, tr.val_data, L_, depths, n=a.samples, device=tr.device)
            print(f"  {L_:6d}: blind {blind:.2f}; layers " + " ".join(f"{h:.2f}" for h in hit))
    return 0


def compare_cmd(a) -> int:
    from nsa.lm.compare import compare, verdict_table
    from nsa.lm.data import load_corpus
    try:
        summary = compare(a.preset, _train_cfg(a, a.out), out_dir=a.out, corpus=load_corpus(a.corpus),
                          time_limit=a.time_limit, train=a.twins)
    except (ValueError, FileNotFoundError) as e:
        return _fail(e)
    if summary is None:
        print(f"no summary yet: the work so far is in {a.out}/ (the same command again continues a twin stopped "
              f"by the time limit" + ("; once every twin is done, the command without --twins writes the summary)"
                                      if a.twins is not None else ")"))
        return 0
    print(verdict_table(summary))
    print(f"plots and summary.json in {a.out}/")
    return 0


def export(a) -> int:
    from nsa.lm.train import read_checkpoint
    try:
        import torch
        from nsa.hf import from_trainer_checkpoint
    except ImportError as e:
        return _fail(f"nsa export needs transformers ({e}): pip install -e \".[hf]\"")
    try:
        s = read_checkpoint(a.checkpoint)
        model = from_trainer_checkpoint(s["model"], s["model_cfg"])
    except (ValueError, FileNotFoundError) as e:
        return _fail(e)
    model.to(getattr(torch, a.dtype)).save_pretrained(a.out)
    print(f"{a.out}/: nsa_lm model ({sum(p.numel() for p in model.parameters()):,} parameters, {a.dtype}, "
          f"step {s['step']}); load with import nsa.hf; AutoModelForCausalLM.from_pretrained({a.out!r})")
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None: those options say where their default comes from."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _preset_epilog():
    return "presets: " + "; ".join(f"{k}: " + ", ".join(f"{a}={v}" for a, v in d.items())
                                   for k, d in PRESET_TRAINING.items())


def main(argv=None) -> int:
    fmt = _Help
    p = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention tools", formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the NSA layer forward+backward once and print what a query reads",
                       formatter_class=fmt)
    d.add_argument("--seqlen", type=int, default=4096, help="tokens")
    d.add_argument("--hidden", type=int, default=256, help="hidden size")
    d.add_argument("--heads", type=int, default=8, help="query heads")
    d.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    d.add_argument("--head-dim", type=int, default=32, help="head dim of q, k and v")
    d.set_defaults(func=demo)
    t = sub.add_parser("train", help="train the tiny, small or recall LM with one attention kind",
                       formatter_class=fmt, epilog=_preset_epilog())
    _train_args(t)
    t.add_argument("--attention", default="nsa", choices=["nsa", "full", "window"],
                   help="NSA, full causal attention, or NSA's sliding window alone (on --resume the checkpoint's)")
    t.add_argument("--out", default="runs/train", help="folder of checkpoint.pt and metrics.jsonl")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (an error when there is none); settings not given "
                        "are the checkpoint's, changed ones are printed")
    t.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: DistributedDataParallel or FSDP2 (fully_shard)")
    t.set_defaults(func=train)
    e = sub.add_parser("eval", help="held-out loss, MQAR, passkey grid and needle selection of a checkpoint",
                       formatter_class=fmt)
    e.add_argument("checkpoint", help="a checkpoint.pt of nsa train or nsa compare")
    e.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="passkey context lengths (default: half, once and twice the trained length, and the "
                        "passkey example length when training used shorter examples)")
    e.add_argument("--samples", type=int, default=8, help="passkey examples per (length, depth) cell")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, ...")
    e.add_argument("--corpus", nargs="*", default=None,
                   help="the corpus the model was trained on (default: Python's stdlib sources)")
    e.set_defaults(func=evaluate)
    c = sub.add_parser("compare", help="train NSA, full and window-only twins on identical data; plots + verdict",
                       formatter_class=fmt, epilog=_preset_epilog())
    _train_args(c)
    c.add_argument("--out", default="runs/compare", help="folder of the plots, summary.json and each twin's run")
    c.add_argument("--twins", nargs="+", default=None, choices=["nsa", "full", "window"],
                   help="train only these twins (e.g. one per process, side by side on one GPU); a call "
                        "without --twins writes the summary once all are done")
    c.set_defaults(func=compare_cmd)
    x = sub.add_parser("export", help="turn a checkpoint of nsa train into a transformers save_pretrained folder",
                       formatter_class=fmt)
    x.add_argument("checkpoint", help="a checkpoint.pt of nsa train (attention nsa)")
    x.add_argument("out", help="folder to write (config.json, model.safetensors)")
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights")
    x.set_defaults(func=export)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.given = _given(sub.choices[args.cmd], argv)
    return args.func(args)


def _given(parser, argv) -> set:
    """The dests of the options argv gives (--opt VALUE or --opt=VALUE)."""
    words = {w.split("=", 1)[0] for w in argv if w.startswith("--")}
    return {act.dest for act in parser._actions if words & set(act.option_strings)}


if __name__ == "__main__":
    sys.exit(main())
