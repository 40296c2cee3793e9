"""Offline data: a byte-level corpus that ships with every Python (the standard library's own
sources: real, long, code), user text files, and synthetic long-context tasks generated on the
fly (passkey retrieval at a chosen depth, multi-query associative recall)."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch


def stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def load_corpus(paths=None, val_every: int = 20, max_bytes: int = 64 << 20):
    """(train, val) uint8 arrays. Default: the stdlib sources; every `val_every`-th file is
    held out whole, so validation text is never seen in training."""
    files = [Path(p) for p in paths] if paths else stdlib_files()
    if not files:
        raise ValueError("no text files found for the corpus")
    train, val, total = [], [], 0
    for i, f in enumerate(files):
        try:
            b = f.read_bytes()
        except OSError:
            continue
        (val if i % val_every == val_every - 1 else train).append(b)
        total += len(b)
        if total >= max_bytes:
            break
    if not val:
        val.append(train.pop())
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8).copy()
    return join(train), join(val)


class Batches:
    """Random windows of a byte array: x [B, T] and the next-byte targets y. The state is one
    numpy Generator, saved in checkpoints so that a resumed run sees the same batches."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if len(data) <= seq_len + 1:
            raise ValueError(f"corpus of {len(data)} bytes is too short for seq_len {seq_len}")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.rng = np.random.default_rng(seed)

    def next(self):
        starts = self.rng.integers(0, len(self.data) - self.seq_len - 1, self.batch_size)
        w = np.stack([self.data[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, s):
        self.rng.bit_generator.state = s["rng"]


QUESTION = b"\nWhat is the pass key? The pass key is "


def passkey_example(filler: np.ndarray, length: int, depth: float, rng, digits: int = 5):
    """A haystack of `length` bytes of filler with 'The pass key is NNNNN. Remember it.' at
    relative depth `depth`, ending with the question. Returns (prompt bytes, answer bytes)."""
    key = "".join(str(d) for d in rng.integers(0, 10, digits)).encode()
    needle = b" The pass key is " + key + b". Remember it. " + key + b" is the pass key. "
    room = length - len(needle) - len(QUESTION)
    if room < 1:
        raise ValueError(f"length {length} too short for a passkey example")
    start = int(rng.integers(0, len(filler) - room))
    hay = filler[start:start + room].tobytes()
    at = int(round(depth * room))
    return hay[:at] + needle + hay[at:] + QUESTION, key


def passkey_batch(filler, batch_size, length, rng, depth=None, digits=5):
    """Training/eval tensors: x [B, length], y [B, length] with the loss masked (-100) to the
    answer digits. depth None: uniform random per example."""
    xs, ys = [], []
    for _ in range(batch_size):
        d = rng.random() if depth is None else depth
        prompt, key = passkey_example(filler, length - digits + 1, d, rng, digits)
        seq = np.frombuffer(prompt + key, dtype=np.uint8).astype(np.int64)
        y = np.full(len(seq) - 1, -100, dtype=np.int64)
        y[-digits:] = seq[-digits:]
        xs.append(seq[:-1])
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def mqar_batch(batch_size, n_pairs, n_queries, rng, vocab=256):
    """Multi-query associative recall: 'k v k v ... | q ? q ? ...' with byte keys from the upper
    half of the vocabulary and values from the lower half; loss on the recalled values."""
    xs, ys = [], []
    for _ in range(batch_size):
        keys = rng.choice(np.arange(vocab // 2, vocab), n_pairs, replace=False)
        vals = rng.integers(1, vocab // 2, n_pairs)
        ask = rng.integers(0, n_pairs, n_queries)
        seq = np.concatenate([np.stack([keys, vals], 1).ravel(), [0], np.stack([keys[ask], vals[ask]], 1).ravel()])
        y = np.full(len(seq) - 1, -100, dtype=np.int64)
        y[2 * n_pairs + 1::2] = seq[2 * n_pairs + 2::2]     # predict each value after its query key
        xs.append(seq[:-1])
        ys.append(y)
    return torch.from_numpy(np.stack(xs).astype(np.int64)), torch.from_numpy(np.stack(ys))


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
