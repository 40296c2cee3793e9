"""Trainer for nsa.lm.model.LanguageModel: reads top to bottom.

AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on GPU, checkpoints that
resume exactly (model, optimizer, step, data and RNG states), a progress line with loss and
tokens/s, metrics as JSONL. Each batch mixes corpus text with passkey examples, so that
retrieval from long context is part of what the model learns.

Several processes (`torchrun --nproc_per_node N -m nsa train ... [--parallel fsdp]`):
DistributedDataParallel (`parallel="ddp"`) or FSDP2 (`parallel="fsdp"`: `fully_shard` on every
block and on the model; parameters, gradients and optimizer state sharded across ranks), gloo on
CPU, NCCL on GPU. batch_size is the global batch; every rank draws the same global batch and
trains on its own slice, so N processes compute what one process would. Checkpoints hold full
(unsharded) state either way, so a run saved under one layout resumes under another.
"""
from __future__ import annotations

import json
import math
import pickle
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

from .data import (Batches, load_corpus, mqar_batch, mqar_min_length, passkey_batch, passkey_min_length,
                   spread_at)
from ..api import backend_module
from ..config import NSAConfig
from ..reference import compute_dtype
from .eval import gate_means, needle_selection, recall_data, recall_selection
from .busy import busy
from .model import LanguageModel, ModelConfig, autocast


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    passkey_rows: int = 2          # rows of each batch that are passkey examples
    passkey_needles: int = 1       # needles (and questions) per passkey example
    passkey_len: int = 0           # bytes per passkey example (0: seq_len); each passkey row of
                                   # seq_len bytes then holds seq_len // passkey_len examples
    passkey_len_from: int = 0      # curriculum (0: none): examples start at this length and double,
                                   # in equal phases over the first half of training, up to passkey_len
    passkey_schedule: str = ""     # curriculum by hand (instead of passkey_len_from): "LEN:UNTIL,..."
                                   # = examples of LEN bytes before step UNTIL, then the next; after
                                   # the last, passkey_len (or seq_len)
    mqar_rows: int = 0             # rows of each batch that are MQAR examples, cut like the passkey
                                   # rows into examples of the passkey length (and curriculum)
    mqar_pairs: int = 16           # key-value pairs per MQAR example (then a gap of text, then
    mqar_queries: int = 8          # this many queries)
    mqar_spread: int = 0           # > 0: the pairs lie at random places of the text instead, each
                                   # at least this many tokens (at most length / 4: data.spread_at)
                                   # before the queries (data.mqar_batch)
    eval_every: int = 100
    save_every: int = 0            # also checkpoint every this many steps (0: only when fit ends)
    time_limit: float = 0          # seconds (0: none): fit stops between steps, leaving twice the
                                   # longest step for the checkpoint; a resumed run continues exactly
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    parallel: str = "ddp"          # with several processes: "ddp" or "fsdp" (FSDP2, fully_shard)
    compile: str = "auto"          # the model's forward: "auto" (reduce-overhead on one GPU: compiled
                                   # and replayed from CUDA graphs; eager on a CPU or with several
                                   # processes), "off", "default", "reduce-overhead"
    backend: str = "auto"          # the kernels of nsa and window attention: "auto" (Triton on a GPU,
                                   # the PyTorch reference on a CPU), "triton", "torch" (the reference
                                   # on any device: an A/B of the kernels in training); full
                                   # attention runs SDPA whatever this says
    out_dir: str = "runs/run"


def parse_schedule(spec: str, seq_len: int):
    """'LEN:UNTIL,...' -> [(LEN, UNTIL), ...]: lengths in [1, seq_len], UNTIL rising."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            length, until = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"passkey_schedule: {part!r} is not LEN:UNTIL (two integers)") from None
        if not 1 <= length <= seq_len or until <= (out[-1][1] if out else 0):
            raise ValueError(f"passkey_schedule: {part!r}: LEN must be in [1, seq_len={seq_len}] and "
                             f"UNTIL must rise above the previous phase's")
        out.append((length, until))
    return out


def lr_at(step: int, c: TrainConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    frac = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, corpus=None, log="stderr"):
        """log: a text stream for the progress line, None for none; "stderr": sys.stderr when called."""
        self.model_cfg, self.cfg = model_cfg, cfg
        self.log = sys.stderr if log == "stderr" else log
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
        for name in ("batch_size", "passkey_rows", "mqar_rows"):
            if getattr(cfg, name) % self.world:
                raise ValueError(f"{name} ({getattr(cfg, name)}) must be divisible by the number of "
                                 f"processes ({self.world})")
        if cfg.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {cfg.parallel!r}")
        if cfg.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {cfg.compile!r}")
        if cfg.compile not in ("auto", "off") and self.world > 1:
            raise ValueError(f"compile={cfg.compile!r} runs on one process only (use 'auto' or 'off' under torchrun)")
        backend_module(cfg.backend, torch.empty(0, device=self.device))   # a clear error before building
        torch.manual_seed(cfg.seed)
        self.model = LanguageModel(model_cfg).to(self.device)
        if model_cfg.attention != "full":
            for b in self.model.blocks:
                b.attn.backend = cfg.backend
        self.net = self.model
        if self.world > 1 and cfg.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.device.type, (self.world,))
            for b in self.model.blocks:
                fully_shard(b, mesh=mesh)
            fully_shard(self.model, mesh=mesh)    # embeddings, final norm, head
        elif self.world > 1:
            self.net = DistributedDataParallel(self.model)
        self.compile_mode = compile_mode(cfg.compile, self.device, self.world)
        if self.compile_mode != "off":
            # static shapes: a length curriculum compiles each example length once (dynamic shapes
            # failed in inductor, torch 2.11); train/eval switches recompile too: room for them all
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.net = torch.compile(self.model, mode=self.compile_mode, dynamic=False)
        self.gpu_busy = None   # the GPU-busy share of the last profiled step (GPU runs)
        if self.rank:
            self.log = None
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        self.train_data, self.val_data = corpus if corpus is not None else load_corpus()
        text_rows = cfg.batch_size - cfg.passkey_rows - cfg.mqar_rows
        if not 0 <= cfg.passkey_len <= cfg.seq_len:
            raise ValueError(f"passkey_len ({cfg.passkey_len}) must be in [0, seq_len={cfg.seq_len}]")
        if not 0 <= cfg.passkey_len_from <= (cfg.passkey_len or cfg.seq_len):
            raise ValueError(f"passkey_len_from ({cfg.passkey_len_from}) must be in [0, passkey_len]")
        if text_rows < 1:
            raise ValueError(f"batch_size ({cfg.batch_size}) must exceed passkey_rows + mqar_rows "
                             f"({cfg.passkey_rows} + {cfg.mqar_rows})")
        self.schedule = parse_schedule(cfg.passkey_schedule, cfg.seq_len)
        if self.schedule and cfg.passkey_len_from:
            raise ValueError("give passkey_len_from or passkey_schedule, not both")
        shortest = min([L for L, _ in self.schedule] + [cfg.passkey_len_from or cfg.passkey_len or cfg.seq_len])
        need = passkey_min_length(cfg.passkey_needles)
        if cfg.passkey_rows and need > shortest:
            raise ValueError(f"passkey examples with {cfg.passkey_needles} needle(s) need {need} tokens: more "
                             f"than the (shortest) example length {shortest}")
        need = mqar_min_length(cfg.mqar_pairs, cfg.mqar_queries) + spread_at(cfg.mqar_spread, shortest)
        if cfg.mqar_rows and need > shortest:
            spread = f" spread {spread_at(cfg.mqar_spread, shortest)} tokens before them" if cfg.mqar_spread else ""
            raise ValueError(f"MQAR examples of {cfg.mqar_pairs} pairs and {cfg.mqar_queries} queries{spread} "
                             f"need {need} tokens: more than the (shortest) example length {shortest}")
        if not 1 <= cfg.mqar_pairs <= 128 or cfg.mqar_queries < 1:
            raise ValueError("mqar_pairs must be in [1, 128] (distinct byte keys) and mqar_queries >= 1")
        self.batches = Batches(self.train_data, text_rows, cfg.seq_len, seed=cfg.seed)
        self.pk_rng = np.random.default_rng(cfg.seed + 1)
        self.mq_rng = np.random.default_rng(cfg.seed + 2)
        self.step = 0
        self.history = []
        self.out = Path(cfg.out_dir)

    def describe(self) -> str:
        """One line: the model, its size and device (and that NSA runs the reference on a CPU)."""
        kind = self.model_cfg.attention
        note = (" (on a CPU NSA runs the PyTorch reference: the Triton kernels need a GPU)"
                if kind == "nsa" and self.device.type == "cpu" and self.cfg.backend != "triton" else "")
        mode = "" if self.compile_mode == "off" else f", torch.compile mode {self.compile_mode}"
        backend = f", {self.cfg.backend} backend" if self.cfg.backend != "auto" and kind != "full" else ""
        return f"{kind} model, {self.model.num_params() / 1e6:.2f}M parameters, on {self.device}{mode}{backend}{note}"

    # ------------------------------------------------------------------ one step
    def _mine(self, t):
        """This rank's slice of a global batch."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def losses(self, x, y, tasks):
        """(LM loss, {task: (answer loss, share of answer tokens that are the argmax)}) for the
        text rows x, y and each task's (x, y) of retrieval examples (passkey, MQAR)."""
        out = {}
        with autocast(self.device):
            lm = self.net(self._mine(x).to(self.device), self._mine(y).to(self.device))[1]
            for name, (tx, ty) in tasks.items():
                logits = self.net(self._mine(tx).to(self.device))
                logits = logits.to(compute_dtype(logits.dtype)).flatten(0, 1)
                t = self._mine(ty).to(self.device).flatten()
                out[name] = (F.cross_entropy(logits, t, ignore_index=-100),
                             (logits.argmax(-1) == t)[t >= 0].float().mean())
        return lm, out

    def passkey_len_at(self, step: int) -> int:
        """Passkey example length at a step: passkey_len (or seq_len); with a curriculum,
        passkey_len_from * 2^k in equal phases over the first half of training, then the full
        length."""
        c = self.cfg
        full = c.passkey_len or c.seq_len
        for length, until in self.schedule:
            if step < until:
                return length
        if not c.passkey_len_from:
            return full
        lens = [c.passkey_len_from]
        while lens[-1] * 2 < full:
            lens.append(lens[-1] * 2)
        phase = (c.steps / 2) / len(lens)
        return lens[int(step // phase)] if step < c.steps / 2 else full

    def tasks(self):
        """The step's retrieval examples by task: passkey and MQAR rows, each row of seq_len
        tokens cut into seq_len // n examples of n = passkey_len_at(step) tokens (tokens per
        step do not change)."""
        c, n = self.cfg, self.passkey_len_at(self.step)
        out = {}
        if c.passkey_rows:
            out["passkey"] = passkey_batch(self.train_data, c.passkey_rows * (c.seq_len // n), n, self.pk_rng,
                                           needles=c.passkey_needles)
        if c.mqar_rows:
            out["mqar"] = mqar_batch(c.mqar_rows * (c.seq_len // n), c.mqar_pairs, c.mqar_queries,
                                     self.mq_rng, length=n, filler=self.train_data, spread=spread_at(c.mqar_spread, n))
        return out

    def train_step(self):
        c = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, c)
        x, y = self.batches.next()
        self.model.train()
        pk_len = self.passkey_len_at(self.step)
        tasks = self.tasks()
        lm, task = self.losses(x, y, tasks)
        loss = lm + sum(t[0] for t in task.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        if hasattr(gnorm, "full_tensor"):   # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        self.opt.step()
        self.step += 1
        vals = torch.stack([lm.detach()] + [v.detach() for t in task.values() for v in t]).double()
        if self.world > 1:   # report the global mean, as one process would
            dist.all_reduce(vals)
            vals /= self.world
        vals = vals.tolist()
        rec = dict(step=self.step, loss=vals[0], passkey_loss=None, grad_norm=float(gnorm),
                   lr=self.opt.param_groups[0]["lr"], data=batch_checksum(x, y, tasks))
        names = {"passkey": ("passkey_loss", "passkey_digit_acc"), "mqar": ("mqar_loss", "mqar_acc")}
        for i, name in enumerate(task):
            rec.update(zip(names[name], vals[1 + 2 * i:3 + 2 * i]))
        if task:
            rec["passkey_len"] = pk_len   # the retrieval examples' length at this step (curricula)
        return rec

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def val_loss(self, batches=None, seq_len=None):
        self.model.eval()
        b = Batches(self.val_data, self.cfg.batch_size, seq_len or self.cfg.seq_len, seed=12345)
        tot = 0.0
        n = batches or self.cfg.eval_batches
        for _ in range(n):
            x, y = b.next()
            with autocast(self.device):
                tot += float(self.model(x.to(self.device), y.to(self.device))[1])
        return tot / n

    def needle_selection(self, samples=4):
        """NSA: per layer, the share of passkey questions (with passkey rows) and of spread MQAR
        queries (with mqar_spread) at the current example length whose selected blocks hold the
        needle or the asked pair, and a blind selection's share (eval.needle_selection,
        eval.recall_selection); the mean gate of each branch on a held-out text row
        (gates_text) and at the MQAR queries (gates_recall, with MQAR rows) (eval.gate_means);
        {} otherwise."""
        c, out = self.cfg, {}
        if self.model_cfg.attention != "nsa":
            return out
        n = self.passkey_len_at(self.step)
        x, _ = Batches(self.val_data, 1, c.seq_len, seed=12345).next()
        out["gates_text"] = gate_means(self.model, x, device=self.device)
        if c.mqar_rows:
            x, y, _ = recall_data(self.val_data, n, c.mqar_pairs, c.mqar_queries, c.mqar_spread, samples)
            out["gates_recall"] = gate_means(self.model, x, y >= 0, device=self.device)
        if c.passkey_rows:
            hit, blind = needle_selection(self.model, self.val_data, n, n=samples, device=self.device)
            out.update(needle_selected=hit, needle_blind=blind)
        if c.mqar_rows and c.mqar_spread:
            hit, blind = recall_selection(self.model, self.val_data, n, c.mqar_pairs, c.mqar_queries, c.mqar_spread,
                                          n=samples, device=self.device)
            out.update(recall_selected=hit, recall_blind=blind)
        return out

    # ------------------------------------------------------------------ loop
    def fit(self):
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = open(self.out / "metrics.jsonl", "w") if self.rank == 0 else None
        for rec in self.history if metrics else ():   # a resumed run: the steps its checkpoint holds
            metrics.write(json.dumps(rec) + "\n")
        tokens = c.batch_size * c.seq_len
        t0 = self.clock()
        self._started, self._first = t0, None   # for the progress line's elapsed time and ETA
        self.stopped_early, times = False, []
        while self.step < c.steps:
            if self._out_of_time(self.clock() - t0, times):
                self.stopped_early = True
                break
            t_step = self.clock()
            if self._profile_now():
                rec, self.gpu_busy, _ = busy(self.train_step)
                rec["gpu_busy"] = self.gpu_busy
            else:
                rec = self.train_step()
            rec["tokens_per_s"] = tokens / max(self.clock() - t_step, 1e-9)   # this step's, evaluation aside
            if self._first is None:
                self._first = (self.clock(), self.step)   # the ETA leaves out the first step (compilation)
            if self.step % c.eval_every == 0 or self.step == c.steps:
                rec["val_loss"] = self.val_loss()
                rec.update(self.needle_selection())
            self.history.append(rec)
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
            self._progress(rec)
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.save()
            times.append(self.clock() - t_step)
        if metrics:
            metrics.close()
        if self.log is not None:
            self.log.write("\n")
        return self.history

    clock = staticmethod(time.monotonic)   # seconds, for the time limit and tokens/s

    def _profile_now(self):
        """On a GPU, the 5th step (compiled and captured by then) and the step before each
        evaluation run under the profiler for the GPU-busy share."""
        nxt = self.step + 1
        return self.device.type == "cuda" and (nxt == 5 or nxt % self.cfg.eval_every == 0)

    def _out_of_time(self, elapsed, times):
        """Whether the next step (with room for a checkpoint: twice the longest of the last 10
        steps, leaving out the run's first, which compiles) would end past time_limit; rank 0
        decides for all ranks, so that they stop together."""
        if not self.cfg.time_limit:
            return False
        recent = times[1:][-10:] or times
        stop = elapsed + 2 * max(recent, default=0.0) > self.cfg.time_limit
        if self.world > 1:
            flag = torch.tensor(float(stop), device=self.device)
            dist.broadcast(flag, 0)
            stop = bool(flag)
        return stop

    def _progress(self, r):
        if self.log is None:
            return
        width = 24
        done = int(width * self.step / self.cfg.steps)
        extra = f" val {r['val_loss']:.3f}" if "val_loss" in r else ""
        if r.get("needle_selected"):
            extra += f" needle selected {max(r['needle_selected']):.2f} best layer (blind {r['needle_blind']:.2f})"
        pk = f" passkey {r['passkey_loss']:.3f} ({r['passkey_digit_acc']:.0%} digits)" if r["passkey_loss"] is not None else ""
        pk += f" mqar {r['mqar_loss']:.3f} ({r['mqar_acc']:.0%})" if "mqar_loss" in r else ""
        if r.get("recall_selected"):
            pk += f" pair selected {max(r['recall_selected']):.2f} (blind {r['recall_blind']:.2f})"
        if r.get("gates_text"):   # each branch's gate, the mean over layers
            g = [sum(col) / len(col) for col in zip(*r["gates_text"])]
            pk += " gates cmp/slc/win " + "/".join(f"{v:.2f}" for v in g)
        now = self.clock()
        elapsed = now - self._started
        (t1, step1), left = self._first, self.cfg.steps - self.step
        eta = (now - t1) / (self.step - step1) * left if self.step > step1 else elapsed * left
        line = (f"[{'#' * done}{'.' * (width - done)}] {self.step}/{self.cfg.steps} "
                f"loss {r['loss']:.3f}{extra}{pk} | {r['tokens_per_s']:.0f} tok/s"
                f"{'' if self.gpu_busy is None else f', GPU busy {self.gpu_busy:.0%}'} | "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")
        end = "\r" if self.log.isatty() and "val_loss" not in r else "\n"
        if end == "\n" and self.step % max(1, self.cfg.steps // 20) and "val_loss" not in r:
            return   # not a terminal: print about 20 lines per run
        self.log.write(line + end)
        self.log.flush()

    # ------------------------------------------------------------------ checkpoints
    _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save(self, path=None):
        """Every rank calls it (FSDP gathers the full state); rank 0 writes; every rank gets the
        path back."""
        path = Path(path or self.out / "checkpoint.pt")
        model_sd = get_model_state_dict(self.model, options=self._FULL)
        opt_sd = get_optimizer_state_dict(self.model, self.opt, options=self._FULL)
        if self.rank:
            dist.barrier()
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")   # a run killed while saving keeps the last checkpoint
        torch.save(dict(model=model_sd, opt=opt_sd, step=self.step,
                        batches=self.batches.state_dict(), pk_rng=self.pk_rng.bit_generator.state,
                        mq_rng=self.mq_rng.bit_generator.state,
                        torch_rng=torch.get_rng_state(), history=self.history,
                        model_cfg=asdict(self.model_cfg), nsa_cfg=asdict(self.model_cfg.nsa),
                        train_cfg=asdict(self.cfg)), tmp)
        tmp.replace(path)
        if self.world > 1:
            dist.barrier()
        return path

    def load(self, path):
        """Continue from a checkpoint of save(): it must hold this trainer's model kind and
        shapes (read_checkpoint's rules; a mismatch is a one-line ValueError)."""
        s = read_checkpoint(path)
        theirs, ours = asdict(model_config_from(s["model_cfg"])), asdict(self.model_cfg)
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs[k]!r} (checkpoint) vs {ours[k]!r} (this run)"
                             for k in ours if theirs.get(k) != ours[k])
            raise ValueError(f"{path} holds another model: {diff}")
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, s["model"], options=full)
        set_optimizer_state_dict(self.model, self.opt, s["opt"], options=full)
        self.step = s["step"]
        self.batches.load_state_dict(s["batches"])
        self.pk_rng.bit_generator.state = s["pk_rng"]
        if "mq_rng" in s:   # checkpoints written before MQAR training existed have none
            self.mq_rng.bit_generator.state = s["mq_rng"]
        torch.set_rng_state(s["torch_rng"])
        self.history = s["history"]
        return self


def batch_checksum(x, y, tasks) -> int:
    """CRC-32 of a step's data (the text rows and every task's examples): runs that see the same
    data have the same checksums step by step."""
    crc = 0
    for t in (x, y, *(t for pair in tasks.values() for t in pair)):
        crc = zlib.crc32(t.numpy().tobytes(), crc)
    return crc


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


COMPILE_MODES = ("auto", "off", "default", "reduce-overhead")


def compile_mode(mode: str, device, world: int = 1) -> str:
    """What compile="auto" means here: reduce-overhead on one GPU, otherwise off."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if torch.device(device).type == "cuda" and world == 1 else "off"


def read_checkpoint(path) -> dict:
    """A checkpoint of Trainer.save as plain data. Loaded with weights_only=True: a file that
    carries pickled code (a callable, a class) is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "it holds pickled objects")
        raise ValueError(f"{path} is not a plain-data nsa checkpoint: refused to unpickle code ({what})") from None
    if not isinstance(s, dict) or not {"model", "model_cfg", "train_cfg", "step"} <= set(s):
        raise ValueError(f"{path} is not a checkpoint of `nsa train` (no model, model_cfg, train_cfg, step)")
    return s


def model_config_from(d):
    d = {"token_shift": False, **d}   # checkpoints written before token_shift existed
    return ModelConfig(**{**d, "nsa": NSAConfig(**d["nsa"])})
