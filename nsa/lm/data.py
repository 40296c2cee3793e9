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
    """(train, val) uint8 arrays. Default: the stdlib sources. `paths`: text files, and/or
    Hugging Face datasets as 'hf:NAME[?config=C&split=S&column=COL]' (see hf_documents). Every
    `val_every`-th document (file or dataset row) is held out whole, so validation text is never
    seen in training."""
    default = not paths
    if default:
        paths = stdlib_files()
        if not paths:
            raise ValueError("no text files found for the corpus")
    train, val, total = [], [], 0
    for i, b in enumerate(_documents(paths, skip_unreadable=default)):
        (val if i % val_every == val_every - 1 else train).append(b)
        total += len(b)
        if total >= max_bytes:
            break
    if not train and not val:
        raise ValueError(f"the corpus {[str(p) for p in paths][:3]} holds no text")
    if len(train) == 1 and not val:   # one document: its last 1/val_every is held out
        cut = len(train[0]) - len(train[0]) // val_every
        train, val = [train[0][:cut]], [train[0][cut:]]
    elif not val:
        val.append(train.pop())
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8).copy()
    return join(train), join(val)


def _documents(paths, skip_unreadable=False):
    """Each file's bytes, each dataset row's text. A user's file that cannot be read is an
    error; the stdlib scan skips such files."""
    for p in paths:
        if str(p).startswith("hf:"):
            yield from hf_documents(str(p))
            continue
        try:
            yield Path(p).read_bytes()
        except OSError as e:
            if not skip_unreadable:
                raise ValueError(f"cannot read corpus file {p}: {e}") from e


def hf_documents(spec: str):
    """The rows of a Hugging Face dataset as UTF-8 bytes. spec: 'hf:NAME' with optional
    '?config=C&split=S&column=COL' (defaults: no config, split 'train', column 'text'). NAME is a
    hub dataset (streamed, so only what is read is downloaded) or a folder written by
    `save_to_disk`. Needs the `datasets` package (pip install "nsa[hf]")."""
    from urllib.parse import parse_qsl
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{spec}: Hugging Face corpora need the datasets package: pip install 'nsa[hf]'") from e
    name, _, query = spec[3:].partition("?")
    opts = dict(parse_qsl(query, strict_parsing=bool(query)))
    unknown = set(opts) - {"config", "split", "column"}
    if unknown:
        raise ValueError(f"{spec}: unknown option(s) {sorted(unknown)}; use config, split, column")
    split, column = opts.get("split", "train"), opts.get("column", "text")
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{spec}: no split {split!r}; the dataset has {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, opts.get("config"), split=split, streaming=True)
    names = ds.column_names
    if names is not None and column not in names:
        raise ValueError(f"{spec}: no column {column!r}; the dataset has {names} (choose one with ?column=)")
    for row in ds:
        text = row[column]
        if not isinstance(text, str):
            raise ValueError(f"{spec}: column {column!r} holds {type(text).__name__}, not text")
        yield text.encode()


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


# Each key follows a marker byte that no text file holds (control bytes 0x10-0x1f): a byte-level
# model cannot find "the pass key is " by one byte where a token-level one can; the marker plays
# the part of that token (and names the key when a row holds several), so retrieval is one lookup.
MARKS = bytes(range(0x10, 0x20))
QUESTION = b"\nWhat is the pass key? The pass key is "
NEEDLE = (b" The pass key is ", b". Remember it. ")   # around <marker><key>


def passkey_min_length(needles: int = 1, digits: int = 5) -> int:
    """Shortest passkey example: the needles, the questions with their answers, one filler byte."""
    return needles * (len(NEEDLE[0]) + len(NEEDLE[1]) + len(QUESTION) + 2 * (1 + digits)) + 1


def passkey_example(filler: np.ndarray, length: int, depth: float | None, rng, digits: int = 5,
                    needles: int = 1):
    """`length` bytes: a haystack of filler holding `needles` needles 'The pass key is
    <marker>NNNNN. Remember it.' (the first at relative depth `depth`, the others, or all when
    depth is None, at random depths), then one question per needle, in random order, each
    answered: '...The pass key is <marker>NNNNN'. Returns (bytes, [(start, end) of each answer])."""
    if not 1 <= needles <= len(MARKS):
        raise ValueError(f"needles must be in [1, {len(MARKS)}], got {needles}")
    marks = [bytes([m]) for m in rng.choice(list(MARKS), needles, replace=False)]
    keys = ["".join(str(d) for d in rng.integers(0, 10, digits)).encode() for _ in range(needles)]
    needle = [NEEDLE[0] + m + k + NEEDLE[1] for m, k in zip(marks, keys)]
    shortest = passkey_min_length(needles, digits)
    if length < shortest:
        raise ValueError(f"length {length} too short for {needles} passkey needle(s): needs >= {shortest}")
    room = length - shortest + 1   # filler bytes
    start = int(rng.integers(0, len(filler) - room))
    hay = filler[start:start + room].tobytes()
    for m in MARKS:   # a user corpus may hold a marker byte: only the needles do
        hay = hay.replace(bytes([m]), b" ")
    depths = rng.random(needles)
    if depth is not None:
        depths[0] = depth
    at = np.round(depths * room).astype(int)
    parts, prev = [], 0
    for i in np.argsort(at, kind="stable"):
        parts += [hay[prev:at[i]], needle[i]]
        prev = at[i]
    text, spans = b"".join(parts + [hay[prev:]]), []
    for i in rng.permutation(needles):
        text += QUESTION + marks[i]
        spans.append((len(text), len(text) + digits))
        text += keys[i]
    return text, spans


def passkey_batch(filler, batch_size, length, rng, depth=None, digits=5, needles=1):
    """Training/eval tensors: x [B, length], y [B, length] with the loss masked (-100) to the
    answer digits. depth None: uniform random per example."""
    xs, ys = [], []
    for _ in range(batch_size):
        d = rng.random() if depth is None and needles == 1 else depth
        text, spans = passkey_example(filler, length + 1, d, rng, digits, needles)
        seq = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
        y = np.full(length, -100, dtype=np.int64)
        for a, b in spans:
            y[a - 1:b - 1] = seq[a:b]
        xs.append(seq[:-1])
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def mqar_min_length(n_pairs, n_queries):
    """Tokens of an MQAR example with no gap: the pairs, the separator, the queries (less the
    last value, which is only a target)."""
    return 2 * n_pairs + 2 * n_queries


def spread_at(spread: int, length: int) -> int:
    """The spread of MQAR examples of `length` tokens: the asked `spread`, but at most a quarter of
    the length, so that a length curriculum can start with examples shorter than the spread."""
    return min(spread, length // 4)


def mqar_batch(batch_size, n_pairs, n_queries, rng, vocab=256, length=None, filler=None, spread=0,
               with_positions=False):
    """Multi-query associative recall: 'k v k v ... | q ? q ? ...' with byte keys from the upper
    half of the vocabulary and values from the lower half; loss on the recalled values. The
    queries ask distinct keys (while n_queries <= n_pairs), so that no answer can be copied from
    an earlier query: only the pairs hold it. With
    `length` (and a `filler` corpus), each example is `length` tokens: the pairs, a gap of
    filler text (bytes of the upper half and 0 replaced by spaces, so keys and the separator
    occur only where placed), then the separator and the queries, so that every query is at
    least the gap away from its pair. With `spread` > 0 the pairs lie instead at random places
    of the filler, each at least `spread` tokens before the separator: no pair is within a
    window of `spread` tokens of any query, and recall needs attention that reaches anywhere
    in the context. with_positions: also returns the position of each asked key [B, n_queries]
    (int64), for accuracy by depth and for whether a selection held it."""
    short = mqar_min_length(n_pairs, n_queries)
    if length is not None and (filler is None or length < short):
        raise ValueError(f"an MQAR example of {n_pairs} pairs and {n_queries} queries needs a filler "
                         f"corpus and length >= {short}, got length {length}")
    hay = None if length is None else length - 2 * n_queries   # filler + pairs, before the separator
    if spread and (length is None or hay - spread < 2 * n_pairs):
        raise ValueError(f"spread MQAR ({n_pairs} pairs at least {spread} tokens before {n_queries} "
                         f"queries) needs length >= {2 * n_pairs + spread + 2 * n_queries}, got {length}")
    xs, ys, at = [], [], []
    for _ in range(batch_size):
        keys = rng.choice(np.arange(vocab // 2, vocab), n_pairs, replace=False)
        vals = rng.integers(1, vocab // 2, n_pairs)
        ask = rng.choice(n_pairs, n_queries, replace=n_queries > n_pairs)
        gap = np.zeros(0, dtype=np.int64)
        if length is not None:
            n_fill = length - short + (2 * n_pairs if spread else 0)
            start = int(rng.integers(0, len(filler) - n_fill))
            gap = filler[start:start + n_fill].astype(np.int64)
            gap = np.where((gap >= vocab // 2) | (gap == 0), 32, gap)
        if spread:   # pair i at an even offset (2-token cells), all before hay - spread
            place = 2 * rng.choice((hay - spread) // 2, n_pairs, replace=False)
            hay_seq = gap                  # a fresh array: the pairs overwrite filler cells
            hay_seq[place] = keys
            hay_seq[place + 1] = vals
        else:
            hay_seq = np.concatenate([np.stack([keys, vals], 1).ravel(), gap])
            place = 2 * np.arange(n_pairs)
        seq = np.concatenate([hay_seq, [0], np.stack([keys[ask], vals[ask]], 1).ravel()])
        y = np.full(len(seq) - 1, -100, dtype=np.int64)
        q0 = len(seq) - 2 * n_queries - 1                 # the separator
        y[q0 + 1::2] = seq[q0 + 2::2]                     # predict each value after its query key
        xs.append(seq[:-1])
        ys.append(y)
        at.append(place[ask])
    out = torch.from_numpy(np.stack(xs).astype(np.int64)), torch.from_numpy(np.stack(ys))
    return out + (torch.from_numpy(np.stack(at).astype(np.int64)),) if with_positions else out


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
