"""The tiny LM, the trainer (schedule, exact resume, learning), data tasks and `compare`."""
import io
import json

import numpy as np
import pytest
import torch

from nsa.lm.data import MARKS, QUESTION, Batches, load_corpus, mqar_batch, passkey_batch, passkey_example
from nsa.lm.compare import compare, verdict_table
from nsa.lm.eval import gate_means, needle_selection, passkey_accuracy, recall_ablation, shut_branch
from nsa.lm.model import ATTENTIONS, PRESETS, LanguageModel
from nsa.lm.train import TrainConfig, Trainer, lr_at

TINY = PRESETS["tiny"].replace(n_layer=1)


def _corpus(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    words = [w.encode() for w in "def class return import self None True False for while in if else".split()]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), n // 5))
    data = np.frombuffer(text, dtype=np.uint8).copy()
    return data[: len(data) * 9 // 10], data[len(data) * 9 // 10:]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_model_forward_backward(attention):
    m = LanguageModel(TINY.replace(attention=attention))
    x = torch.randint(0, 256, (2, 70))
    logits, loss = m(x, x)
    assert logits.shape == (2, 70, 256) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_lr_schedule():
    c = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(100, c) == pytest.approx(0.1) and lr_at(55, c) == pytest.approx(0.55)


def _cfg(tmp_path, **kw):
    return TrainConfig(**{**dict(steps=4, batch_size=4, seq_len=128, passkey_rows=1, mqar_rows=1, eval_every=2,
                                 eval_batches=1, warmup=2, device="cpu", out_dir=str(tmp_path)), **kw})


def test_resume_is_exact(tmp_path):
    corpus = _corpus()
    a = Trainer(TINY, _cfg(tmp_path / "a"), corpus=corpus, log=None)
    a.fit()
    b = Trainer(TINY, _cfg(tmp_path / "b", save_every=2), corpus=corpus, log=None)
    b.fit()   # as if killed after step 3: what is left is the checkpoint of step 2
    path = tmp_path / "b" / "checkpoint.pt"
    c = Trainer(TINY, _cfg(tmp_path / "b"), corpus=corpus, log=None).load(path)
    assert "mqar_loss" in a.history[0]
    assert c.step == 2
    c.fit()
    for (n, p), q in zip(a.model.named_parameters(), c.model.parameters()):
        assert torch.equal(p, q), n
    assert [r["loss"] for r in a.history] == [r["loss"] for r in c.history]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()   # no step twice
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    # a time limit stops between steps and the run continues from its checkpoint as if never
    # stopped. A clock on which each step takes 10 s, limit 25 s: after step 1, 10 s + twice
    # the longest step (room for the checkpoint) would pass it
    d = Trainer(TINY, _cfg(tmp_path / "d", time_limit=25), corpus=corpus, log=None)
    now, step = [0.0], d.train_step
    d.clock = lambda: now[0]

    def timed_step():
        now[0] += 10
        return step()
    d.train_step = timed_step
    d.fit()
    assert d.stopped_early and d.step == 1
    e = Trainer(TINY, _cfg(tmp_path / "d"), corpus=corpus, log=None).load(d.save())
    e.fit()
    assert not e.stopped_early and [r["loss"] for r in e.history] == [r["loss"] for r in a.history]


def test_training_lowers_the_loss(tmp_path):
    tr = Trainer(TINY, _cfg(tmp_path, steps=40, batch_size=8, seq_len=128, lr=3e-3, eval_every=40), corpus=_corpus(), log=None)
    h = tr.fit()
    first, last = np.mean([r["loss"] for r in h[:5]]), np.mean([r["loss"] for r in h[-5:]])
    assert last < first - 0.5, (first, last)
    assert h[-1]["val_loss"] < h[0]["loss"]


def test_progress_and_metrics(tmp_path):
    log = io.StringIO()
    tr = Trainer(TINY, _cfg(tmp_path), corpus=_corpus(), log=log)
    tr.fit()
    assert "4/4" in log.getvalue() and "tok/s" in log.getvalue()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"val_loss"' in lines[1]
    sel = json.loads(lines[1])   # NSA with passkey rows: the needle-selection share at each eval
    assert len(sel["needle_selected"]) == TINY.n_layer and 0 < sel["needle_blind"] <= 1
    assert "needle selected" in log.getvalue() and "gates cmp/slc/win" in log.getvalue()
    gates = sel["gates_text"]   # per layer, the compressed, selected and window gates: sigmoids
    assert len(gates) == TINY.n_layer and all(len(g) == 3 and all(0 < v < 1 for v in g) for g in gates)
    full = Trainer(TINY.replace(attention="full"), _cfg(tmp_path / "full"), corpus=_corpus(), log=None)
    assert "needle_selected" not in full.fit()[1]


def test_short_passkey_examples(tmp_path):
    tr = Trainer(TINY, _cfg(tmp_path, seq_len=300, passkey_rows=2, passkey_len=100), corpus=_corpus(), log=None)
    x, y = tr.tasks()["passkey"]
    assert x.shape == y.shape == (6, 100) and ((y >= 0).sum(1) == 5).all()
    r = tr.train_step()
    assert np.isfinite(r["passkey_loss"]) and 0 <= r["passkey_digit_acc"] <= 1 and r["passkey_len"] == 100
    with pytest.raises(ValueError, match="passkey_len"):
        Trainer(TINY, _cfg(tmp_path, passkey_len=129), corpus=_corpus(), log=None)
    cur = Trainer(TINY, _cfg(tmp_path, steps=12, seq_len=800, passkey_len=800, passkey_len_from=100),
                  corpus=_corpus(), log=None)   # 100, 200, 400 over steps 0-5, then 800
    assert [cur.passkey_len_at(s) for s in range(12)] == [100, 100, 200, 200, 400, 400] + [800] * 6
    cur.step = 3
    assert cur.tasks()["passkey"][0].shape == (4, 200)
    assert cur.tasks()["mqar"][0].shape == (4, 200)   # MQAR examples follow the same lengths
    assert cur.train_step()["passkey_len"] == 200   # the length the step trained on, logged
    sch = Trainer(TINY, _cfg(tmp_path, steps=12, seq_len=800, passkey_len=800, passkey_schedule="100:2, 400:7"),
                  corpus=_corpus(), log=None)
    assert [sch.passkey_len_at(s) for s in range(9)] == [100, 100, 400, 400, 400, 400, 400, 800, 800]
    for bad, msg in [("100:2,400:2", "UNTIL must rise"), ("900:3", "LEN must be in"), ("100-2", "not LEN:UNTIL")]:
        with pytest.raises(ValueError, match=msg):
            Trainer(TINY, _cfg(tmp_path, seq_len=800, passkey_schedule=bad), corpus=_corpus(), log=None)
    with pytest.raises(ValueError, match="not both"):
        Trainer(TINY, _cfg(tmp_path, seq_len=800, passkey_len_from=100, passkey_schedule="100:2"), corpus=_corpus(), log=None)
    with pytest.raises(ValueError, match="need 84 tokens"):   # the schedule's shortest examples count
        Trainer(TINY, _cfg(tmp_path, seq_len=800, passkey_schedule="64:2"), corpus=_corpus(), log=None)
    with pytest.raises(ValueError, match="passkey examples with 1 needle\\(s\\) need 84 tokens"):
        Trainer(TINY, _cfg(tmp_path, seq_len=800, passkey_len=800, passkey_len_from=64), corpus=_corpus(), log=None)
    with pytest.raises(ValueError, match="MQAR examples of 50 pairs"):
        Trainer(TINY, _cfg(tmp_path, seq_len=100, mqar_pairs=50), corpus=_corpus(), log=None)
    with pytest.raises(ValueError, match="must exceed passkey_rows \\+ mqar_rows"):
        Trainer(TINY, _cfg(tmp_path, batch_size=2), corpus=_corpus(), log=None)


def test_corpus_from_files_and_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = [f"document {i} " * 20 for i in range(40)]
    for i, d in enumerate(docs[:20]):
        (tmp_path / f"{i}.txt").write_text(d)
    train, val = load_corpus([tmp_path / f"{i}.txt" for i in range(20)])
    assert bytes(val) == docs[19].encode() and bytes(train) == "\n".join(docs[:19]).encode()
    folder = tmp_path / "ds"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"body": docs, "n": list(range(40))})).save_to_disk(folder)
    train, val = load_corpus([f"hf:{folder}?column=body"])
    assert bytes(val) == "\n".join([docs[19], docs[39]]).encode()
    assert bytes(train) == "\n".join(d for i, d in enumerate(docs) if i % 20 != 19).encode()
    one, _ = load_corpus([tmp_path / "0.txt", f"hf:{folder}?column=body&split=train"])   # files and rows mix
    assert bytes(one).startswith(docs[0].encode() + b"\n" + docs[0].encode())
    for spec, msg in [(f"hf:{folder}", "no column 'text'"), (f"hf:{folder}?column=n", "not text"),
                      (f"hf:{folder}?column=body&split=test", "no split 'test'"), (f"hf:{folder}?colum=body", "unknown")]:
        with pytest.raises(ValueError, match=msg):
            load_corpus([spec])
    with pytest.raises(ValueError, match="cannot read"):
        load_corpus([tmp_path / "missing.txt"])
    train, val = load_corpus([tmp_path / "0.txt"])   # one document: its tail is held out
    assert bytes(train) + bytes(val) == docs[0].encode() and 0 < len(val) < len(train)


def test_passkey_and_mqar_data():
    filler, _ = _corpus()
    rng = np.random.default_rng(0)
    for needles in (1, 3):
        text, spans = passkey_example(filler, 300, 0.5, rng, needles=needles)
        assert len(text) == 300 and len(spans) == needles and text.endswith(text[spans[-1][0]:])
        marks = set()
        for a, b in spans:   # each answer: the digits after its marker's first (needle) occurrence
            mark = text[a - 1:a]
            assert mark in MARKS and text.count(mark) == 2 and text[a - 1 - len(QUESTION):a - 1] == QUESTION
            key = text[a:b]
            assert key.isdigit() and len(key) == 5 and text[text.index(mark) + 1:][:5] == key
            marks.add(mark)
        assert len(marks) == needles
    x, y = passkey_batch(filler, 3, 128, rng)
    assert x.shape == y.shape == (3, 128) and ((y >= 0).sum(1) == 5).all()
    for i in range(3):   # the answer tokens are the key digits, the last 5 targets
        assert bytes(y[i, -5:].tolist()).isdigit()
    x, y = passkey_batch(filler, 2, 300, rng, needles=2)
    assert ((y >= 0).sum(1) == 10).all()
    for i in range(2):   # each target is the next byte of the row
        m = (y[i, :-1] >= 0)
        assert torch.equal(y[i, :-1][m], x[i, 1:][m])
    for length in (None, 90):   # without and with a gap of text between pairs and queries
        x, y = mqar_batch(2, 6, 3, rng, length=length, filler=filler)
        assert x.shape[1] == (length or 18) and ((y >= 0).sum(1) == 3).all()
        for i in range(2):   # each target value follows its query key in the context part
            ctx = x[i, :12].tolist()
            qs = (y[i] >= 0).nonzero().flatten().tolist()
            assert qs[0] == x.shape[1] - 5 and x[i, qs[0] - 1] == 0   # the queries follow the separator
            for pos in qs:
                key_tok, val = x[i, pos].item(), y[i, pos].item()
                assert key_tok >= 128 and ctx[ctx.index(key_tok) + 1] == val
            assert len({x[i, pos].item() for pos in qs}) == len(qs)   # distinct keys asked: nothing to copy
            keys_at = (x[i] >= 128).nonzero().flatten().tolist()   # keys only where placed
            assert keys_at == list(range(0, 12, 2)) + qs and (x[i] == 0).sum() == 1
    with pytest.raises(ValueError, match="needs a filler"):
        mqar_batch(1, 6, 3, rng, length=17, filler=filler)
    b = Batches(filler, 2, 16, seed=3)
    s = b.state_dict()
    x1, _ = b.next()
    b.load_state_dict(s)
    assert torch.equal(b.next()[0], x1)


def test_passkey_accuracy_of_an_oracle():
    """A 'model' that copies the digits from the context gets 1.0: the metric can succeed."""
    filler, _ = _corpus()

    class Oracle(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(*x.shape, 256)
            for i, row in enumerate(x.tolist()):
                s = bytes(row)
                k = s.index(b"The pass key is ") + len(b"The pass key is ") + 1   # after the marker
                key = s[k:k + 5]
                for j in range(5):
                    out[i, len(row) - 5 + j, key[j]] = 1.0
            return out
    assert passkey_accuracy(Oracle(), filler, 200, 0.5, 4) == 1.0

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 256)
    assert passkey_accuracy(Zero(), filler, 200, 0.5, 4) == 0.0


def test_needle_selection(monkeypatch):
    """The share of questions whose selected blocks hold the needle: all of them when the
    selection covers the whole context; with a selection pinned to one block, exactly the
    examples whose needle (found here by its text) lies in that block; the layers' own forward
    comes back afterwards."""
    import nsa.layer
    filler, _ = _corpus()
    torch.manual_seed(0)
    model = LanguageModel(PRESETS["tiny"])            # 2 layers; 4 selected blocks of 32
    c = PRESETS["tiny"].nsa
    hit, blind = needle_selection(model, filler, 4 * 32, n=2)
    assert hit == [1.0, 1.0] and blind == 1.0
    real, pin = nsa.layer.nsa_attention, 7

    def pinned(*a, **kw):
        o, idx = real(*a, **kw)
        return o, torch.full_like(idx, pin)
    monkeypatch.setattr(nsa.layer, "nsa_attention", pinned)
    rng, expect = np.random.default_rng(3), []
    for d in (0.3, 0.5):
        for _ in range(4):
            text, _ = passkey_example(filler, 513, d, rng)
            expect.append((text.index(b"The pass key is ") + len(b"The pass key is ") + 1) // c.sel_block_size == pin)
    hit, blind = needle_selection(model, filler, 512, depths=(0.3, 0.5), n=4, seed=3)
    assert hit == [float(np.mean(expect))] * 2 and 0 < np.mean(expect) < 1
    free = c.sel_block_count - c.sel_init_blocks - c.sel_local_blocks
    assert blind == pytest.approx(free / (512 // 32 - 3), abs=0.01)   # question in the last block
    assert all("forward" not in vars(m) for m in model.modules())


def test_gate_means_are_the_layers_own_gates():
    """gate_means: per layer the mean of each branch's gate over the masked positions, equal to
    the gates the layer itself computes for its input (captured here from branch_inputs); []
    for a model without NSA layers."""
    torch.manual_seed(0)
    model = LanguageModel(PRESETS["tiny"])
    for b in model.blocks:   # gates away from 0.5, different per position and branch
        torch.nn.init.normal_(b.attn.gate_proj.weight, std=0.5)
        torch.nn.init.normal_(b.attn.gate_proj.bias, std=1.0)
    x = torch.randint(0, 256, (2, 96))
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[0, 5], mask[1, 40:60] = True, True
    seen = []
    for b in model.blocks:
        real = b.attn.branch_inputs
        b.attn.branch_inputs = lambda h, cu=None, real=real: (lambda r: seen.append(r[-1]) or r)(real(h, cu))
    got = gate_means(model, x, mask)
    for b in model.blocks:
        del b.attn.branch_inputs
    assert len(got) == 2 and len(seen) == 2
    for g, want in zip(got, seen):
        assert g == pytest.approx(want.float()[mask].mean((0, 1)).tolist(), abs=1e-4)
        assert max(g) - min(g) > 0.01
    assert gate_means(model, x) != got   # the mask matters
    assert gate_means(LanguageModel(PRESETS["tiny"].replace(attention="full")), x) == []


def test_shut_branch_is_the_layer_without_that_branch():
    """shut_branch(layers, b): each layer computes what it computes with branch b's gate set to 0
    (nsa_attention on its own branch inputs, the gate zeroed by hand); the other layers and, after
    the context, the biases are as before. recall_ablation has one recall per branch for every
    layer and for each layer alone; {} without NSA layers."""
    from nsa.api import nsa_attention
    torch.manual_seed(0)
    model = LanguageModel(PRESETS["tiny"])
    for blk in model.blocks:
        torch.nn.init.normal_(blk.attn.gate_proj.weight, std=0.5)
        torch.nn.init.normal_(blk.attn.gate_proj.bias, std=1.0)
    m = model.blocks[0].attn
    h = torch.randn(2, 96, PRESETS["tiny"].hidden)
    before = [blk.attn.gate_proj.bias.clone() for blk in model.blocks]
    with torch.no_grad():
        full = m(h)
        for b in range(3):
            *inputs, gates = m.branch_inputs(h)
            gates = gates.clone()
            gates[..., b] = 0
            want = m.o_proj(nsa_attention(*inputs, gates, config=m.config, backend=m.backend).reshape(2, 96, -1))
            with shut_branch([m], b):
                got = m(h)
                other = model.blocks[1].attn(h)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            assert (got - full).abs().max() > 1e-3          # the branch mattered
            torch.testing.assert_close(other, model.blocks[1].attn(h), atol=0, rtol=0)
    for blk, b0 in zip(model.blocks, before):
        assert torch.equal(blk.attn.gate_proj.bias, b0)
    val = np.random.default_rng(0).integers(1, 128, 4000).astype(np.uint8)
    ab = recall_ablation(model, val, 256, 4, 4, 64, n=4)
    assert len(ab["every_layer"]) == 3 and [len(r) for r in ab["layers"]] == [3] * PRESETS["tiny"].n_layer
    assert all(0 <= a <= 1 for a in ab["every_layer"] + sum(ab["layers"], []))
    assert recall_ablation(LanguageModel(PRESETS["tiny"].replace(attention="full")), val, 256, 4, 4, 64, n=4) == {}


def test_compare_end_to_end(tmp_path):
    cfg = _cfg(tmp_path, steps=3, seq_len=256)
    s = compare("tiny", cfg, out_dir=str(tmp_path), grid_n=2, log=None)
    assert set(s) == set(ATTENTIONS)
    assert (tmp_path / "summary.json").exists()
    table = verdict_table(s)
    assert "NSA - full" in table and "held-out loss" in table
    sel = s["nsa"]["needle_selected_at_trained"]
    assert len(sel["layers"]) == PRESETS["tiny"].n_layer and 0 < sel["blind"] < 1
    assert "hold the needle at T" in table


def test_verdict_says_when_full_attention_did_not_learn_the_recall():
    """The recall verdict: the targets at T, NSA against full at 2T, and a warning only when the
    full-attention twin itself stayed below 0.9 at T (its comparison then shows nothing)."""
    def twin(loss, *acc):
        return dict(params=1e6, val_loss=loss, val_loss_at_2x=loss, mqar=0.0, tokens_per_s=1.0,
                    recall={str(n): dict(acc=a) for n, a in zip((256, 512, 1024), acc)})
    s = dict(nsa=twin(1.0, 0.95, 0.5, 0.2), full=twin(1.1, 0.23, 0.1, 0.0), window=twin(1.2, 0.1, 0.1, 0.1))
    t = verdict_table(s)
    assert "recall at T: NSA 0.95, full 0.23, window-only 0.10: met" in t and "recall at 2T: NSA 0.50, full 0.10: NSA >= full" in t
    assert "full attention did not learn the recall at T (0.23 < 0.9)" in t
    s["full"] = twin(1.1, 1.0, 0.6, 0.3)
    t = verdict_table(s)
    assert "full 1.00, window-only 0.10: met" in t and "NSA < full" in t and "did not learn" not in t
    s["nsa"] = twin(1.0, 0.9, 0.5, 0.2)
    assert "NSA 0.90, full 1.00, window-only 0.10: not met" in verdict_table(s)   # more than 0.05 below full


def test_compile_modes(tmp_path):
    from nsa.lm.train import compile_mode
    assert compile_mode("auto", "cuda") == "reduce-overhead"   # one GPU: compiled, replayed from CUDA graphs
    assert compile_mode("auto", "cuda", world=2) == "off"
    assert compile_mode("auto", "cpu") == "off"
    assert compile_mode("default", "cpu") == "default"
    tr = Trainer(TINY, _cfg(tmp_path), corpus=_corpus(), log=None)
    assert tr.net is tr.model and "compile" not in tr.describe()   # CPU, auto: eager
    with pytest.raises(ValueError, match="compile must be one of"):
        Trainer(TINY, _cfg(tmp_path, compile="max"), corpus=_corpus())
    tr = Trainer(TINY, _cfg(tmp_path, compile="default"), corpus=_corpus(), log=None)
    assert tr.net is not tr.model and "torch.compile mode default" in tr.describe()


def test_backend_choice_runs_the_chosen_kernels(tmp_path, capsys, monkeypatch):
    """backend="triton" trains window (and NSA) layers through the Triton kernels (the interpreter
    here), "auto" on a CPU through the PyTorch reference: same weights and data, losses within fp32
    noise; full attention keeps SDPA, and `nsa train` refuses a backend for it."""
    from nsa.lm.cli import main
    win = TINY.replace(attention="window")
    kw = dict(steps=2, batch_size=2, passkey_rows=0, mqar_rows=0, eval_every=100)
    ref = Trainer(win, _cfg(tmp_path / "ref", **kw), corpus=_corpus(), log=None)
    tri = Trainer(win, _cfg(tmp_path / "tri", backend="triton", **kw), corpus=_corpus(), log=None)
    assert all(b.attn.backend == "triton" for b in tri.model.blocks) and "triton backend" in tri.describe()
    assert all(b.attn.backend == "auto" for b in ref.model.blocks) and "backend" not in ref.describe()
    import nsa.triton.backend as triton_backend
    calls, op = [], triton_backend.banded_fwd
    monkeypatch.setattr(triton_backend, "banded_fwd", lambda *a: calls.append(1) or op(*a))
    h_tri = tri.fit()
    monkeypatch.undo()
    h_ref = ref.fit()
    assert calls, "the triton backend did not reach the window kernel"
    for a, b in zip(h_tri, h_ref):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
    with pytest.raises(ValueError, match="backend must be one of"):
        Trainer(win, _cfg(tmp_path, backend="cuda"), corpus=_corpus(), log=None)
    full = Trainer(TINY.replace(attention="full"), _cfg(tmp_path / "full", backend="torch", **kw), corpus=_corpus(), log=None)
    assert "backend" not in full.describe()
    assert main(["train", "--attention", "full", "--backend", "torch", "--out", str(tmp_path / "cli")]) == 2
    assert "full attention runs SDPA" in capsys.readouterr().err


def test_progress_line_shows_the_gpu_busy_share(tmp_path):
    log = io.StringIO()
    tr = Trainer(TINY, _cfg(tmp_path), corpus=_corpus(), log=log)
    tr.gpu_busy = 0.934   # what a profiled GPU step sets (train.busy)
    tr.fit()
    assert "GPU busy 93%" in log.getvalue()


def test_matched_twins_have_nsa_s_size():
    """Full and window-only twins get the SwiGLU width that gives them NSA's parameter count;
    the count without building the model is the built model's."""
    from nsa.lm.compare import PARAM_TOLERANCE, twin_configs
    from nsa.lm.model import matched, num_params
    for preset in PRESETS:
        cfgs = twin_configs(preset)
        n = {k: LanguageModel(c).num_params() if preset == "tiny" else num_params(c) for k, c in cfgs.items()}
        assert all(abs(v / n["nsa"] - 1) <= PARAM_TOLERANCE for v in n.values()), (preset, n)
        assert cfgs["full"].mlp_hidden > cfgs["nsa"].mlp_hidden == 0   # NSA's extra parameters go to the MLP
        unmatched = num_params(cfgs["nsa"].replace(attention="full"))
        assert abs(unmatched / n["nsa"] - 1) > PARAM_TOLERANCE   # without matching they differ
    c = matched(TINY.replace(attention="full"), 10 * LanguageModel(TINY).num_params())
    assert c.mlp_hidden % 8 == 0 and LanguageModel(c).num_params() == num_params(c)


def test_spread_mqar_data():
    """Spread MQAR: every asked pair lies at its reported position, at least `spread` tokens
    before the separator (so no query sees it within a window of that size), keys occur only
    where placed, and each target is the value after its key."""
    from nsa.lm.data import spread_at
    filler, _ = _corpus()
    rng = np.random.default_rng(1)
    x, y, at = mqar_batch(6, 8, 5, rng, length=300, filler=filler, spread=100, with_positions=True)
    assert x.shape == y.shape == (6, 300) and at.shape == (6, 5)
    for i in range(6):
        qs = (y[i] >= 0).nonzero().flatten()
        sep = qs[0] - 1
        assert x[i, sep] == 0 and (x[i] == 0).sum() == 1
        keys_at = (x[i, :sep] >= 128).nonzero().flatten()
        assert len(keys_at) == 8 and (keys_at % 2 == 0).all() and (keys_at <= sep - 100 - 2).all()
        for j, q in enumerate(qs):
            p = at[i, j]
            assert x[i, p] == x[i, q] and x[i, p + 1] == y[i, q] and (x[i, :q] == x[i, q]).sum() == 1
    assert at.min() < 60 and at.max() > 120   # spread through the text, not packed at the start
    assert spread_at(512, 4096) == 512 and spread_at(512, 1024) == 256
    with pytest.raises(ValueError, match="spread MQAR"):
        mqar_batch(1, 8, 5, rng, length=120, filler=filler, spread=100)


def test_recall_accuracy_of_an_oracle():
    """recall_accuracy: a 'model' that looks each asked key up in the context scores 1.0 in every
    depth bin; one that only finds pairs in the first half of the context scores 1.0 in the
    early bins and 0.0 in the late ones: the metric and its bins can succeed and fail."""
    from nsa.lm.eval import recall_accuracy
    filler, _ = _corpus()

    class Lookup(torch.nn.Module):
        def __init__(self, horizon=1.0):
            super().__init__()
            self.horizon = horizon

        def forward(self, x):
            out = torch.zeros(*x.shape, 256)
            for i, row in enumerate(x.tolist()):
                sep = row.index(0)
                for t in range(sep + 1, len(row), 2):
                    p = row.index(row[t])
                    if p < self.horizon * len(row):
                        out[i, t, row[p + 1]] = 1.0
            return out
    acc, bins = recall_accuracy(Lookup(), filler, 400, 8, 8, 100, n=8, bins=4)
    assert acc == 1.0 and bins == [1.0] * 4
    acc, bins = recall_accuracy(Lookup(0.5), filler, 400, 8, 8, 100, n=8, bins=4)
    assert bins[:2] == [1.0, 1.0] and bins[3] == 0.0 and 0 < acc < 1


def _recall_args(out, corpus, *more):
    return ["compare", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "256",
            "--passkey-rows", "0", "--mqar-rows", "2", "--mqar-pairs", "4", "--mqar-queries", "4",
            "--mqar-spread", "64", "--passkey-schedule", "128:2", "--eval-every", "2", "--device", "cpu",
            "--corpus", corpus, "--out", str(out), *more]


def test_compare_recall_pipeline(tmp_path, capsys):
    """The recall experiment's command, scaled down: three twins of one size, identical data step
    by step, results and plots written, a verdict with the recall table and NSA's selection."""
    from nsa.lm.cli import main
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\n".join(_corpus(60000)[0].tobytes().split(b" if ")))
    assert main(_recall_args(tmp_path / "run", str(corpus))) == 0
    out = capsys.readouterr().out
    for what in ("recall@T", "recall@4T", "NSA's selected blocks hold the asked pair at 512", "recall at T: NSA",
                 "NSA's recall at 256 (", "with one branch shut in every layer: compressed",
                 "full attention did not learn the recall at T"):
        assert what in out, what
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["identical_data"] and set(s["summary"]) == set(ATTENTIONS)
    params = [v["params"] for v in s["summary"].values()]
    assert max(params) / min(params) - 1 <= 0.02
    for kind, v in s["summary"].items():
        assert list(v["recall"]) == ["256", "512", "1024"] and len(v["recall"]["256"]["by_depth"]) == 5
        assert ("selected" in v["recall"]["256"]) == ("shut" in v["recall"]["256"]) == (kind == "nsa")
        assert "shut" not in v["recall"]["512"]   # at T only
        assert (run / kind / "result.json").is_file() and (run / kind / "checkpoint.pt").is_file()
    checks = [[json.loads(line)["data"] for line in (run / k / "metrics.jsonl").read_text().splitlines()]
              for k in ATTENTIONS]
    assert checks[0] == checks[1] == checks[2] and len(set(checks[0])) == 3   # same data, new each step
    for png in ("loss_curves.png", "recall_heatmap.png"):
        assert (run / png).stat().st_size > 1000
    assert not (run / "needle_heatmap.png").exists()   # no passkey rows trained: no passkey grid
    # another seed draws other data (the checksums see it); done twins are not trained again
    assert main(_recall_args(tmp_path / "seed1", str(corpus), "--seed", "1", "--steps", "1")) == 0
    assert json.loads((tmp_path / "seed1" / "nsa" / "metrics.jsonl").read_text())["data"] != checks[0][0]
    capsys.readouterr()
    assert main(_recall_args(run, str(corpus))) == 0
    assert "nsa: done earlier" in capsys.readouterr().err
    assert main(_recall_args(run, str(corpus), "--lr", "1e-3")) == 2   # other settings, same folder
    assert "holds a nsa twin of other settings" in capsys.readouterr().err
    # twins trained by separate calls (--twins, as processes side by side would), then a call that
    # only gathers them: the same results and summary as the one call
    split = tmp_path / "split"
    assert main(_recall_args(split, str(corpus), "--twins", "window")) == 0
    assert "no summary yet" in capsys.readouterr().out and not (split / "summary.json").exists()
    assert main(_recall_args(split, str(corpus), "--twins", "nsa")) == 0
    assert not (split / "summary.json").exists() and "window: done earlier" in capsys.readouterr().err
    assert main(_recall_args(split, str(corpus))) == 0   # trains the one left, then the summary
    assert capsys.readouterr().err.count("done earlier") == 2
    s2 = json.loads((split / "summary.json").read_text())
    timeless = lambda d: {k: {n: v for n, v in t.items() if n != "tokens_per_s"} for k, t in d.items()}
    assert s2["identical_data"] and timeless(s2["summary"]) == timeless(s["summary"])


def test_compare_resumes_exactly(tmp_path):
    """compare under a time limit stops inside a twin, and the same call again finishes as if
    never stopped: every twin's losses and final weights equal an uninterrupted run's."""
    cfg = _cfg(tmp_path, steps=4, seq_len=256, passkey_rows=0, mqar_rows=1, mqar_pairs=4, mqar_queries=4,
               mqar_spread=64, eval_every=4)
    corpus = _corpus()
    whole = compare("tiny", cfg, out_dir=str(tmp_path / "a"), grid_n=1, log=None, corpus=corpus)

    now = [0.0]

    def clock():   # each call is a second: a step reads the clock a few times
        now[0] += 1.0
        return now[0]
    parts = 0
    while True:
        s = compare("tiny", cfg, out_dir=str(tmp_path / "b"), grid_n=1, log=None, corpus=corpus,
                    time_limit=12, clock=clock)
        parts += 1
        if s is not None:
            break
        assert parts < 30
    assert parts > 2   # it did stop, more than once
    for kind in ATTENTIONS:
        a, b = (json.loads((tmp_path / r / kind / "result.json").read_text()) for r in "ab")
        assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
        assert [h["data"] for h in a["history"]] == [h["data"] for h in b["history"]]
        wa, wb = (torch.load(tmp_path / r / kind / "checkpoint.pt", weights_only=True)["model"] for r in "ab")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert s[kind]["val_loss"] == whole[kind]["val_loss"]
