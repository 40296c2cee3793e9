"""The `nsa` command line as a user meets it: one-line errors, printed decisions, safe loading."""
import subprocess
import sys

import pytest
import torch

from nsa.lm.cli import main


@pytest.fixture
def corpus(tmp_path):
    words = "def class return import self None True False for while in if else".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(6000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def _train(out, corpus, *more):
    return main(["train", "--steps", "2", "--batch-size", "4", "--seq-len", "128", "--eval-every", "2",
                 "--corpus", corpus, "--out", str(out), *more])


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nsa: error: "), err
    return err[0]


def test_python_dash_m_nsa_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "nsa", "train", "--help"], capture_output=True, text=True)
    text = " ".join(out.stdout.split())   # help text wraps at the terminal width
    assert out.returncode == 0 and "--resume" in text and "(default: runs/train)" in text


def test_resume_without_checkpoint_is_an_error(tmp_path, corpus, capsys):
    assert _train(tmp_path / "none", corpus, "--resume") == 2
    assert "no checkpoint at" in _error_line(capsys)
    assert not (tmp_path / "none").exists()   # nothing started from scratch


def test_resume_decisions_are_printed(tmp_path, corpus, capsys):
    assert _train(tmp_path, corpus) == 0
    out = capsys.readouterr()
    assert "ETA" in out.err and "elapsed" in out.err            # the progress line
    assert "NSA runs the PyTorch reference" in out.out          # said on a CPU
    # the checkpoint's settings stand unless given; a longer run says what it changes
    assert main(["train", "--steps", "3", "--corpus", corpus, "--out", str(tmp_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: steps 2 (checkpoint) -> 3 (command line): the LR schedule is recomputed" in out
    assert "resumed from" in out and "at step 2 of 3" in out
    assert "batch_size" not in out and "eval_every" not in out   # not given: the checkpoint's, unchanged
    # a setting with a default left out on resume is a change too, and is said
    assert main(["train", "--steps", "3", "--corpus", corpus, "--out", str(tmp_path), "--resume",
                 "--passkey-rows", "1"]) == 0
    assert "resume: passkey_rows 2 (checkpoint) -> 1 (command line)" in capsys.readouterr().out
    # a checkpoint of another attention kind: one line, not a state_dict traceback
    assert _train(tmp_path, corpus, "--resume", "--attention", "full") == 2
    assert "holds a 'nsa' model; --attention is 'full'" in _error_line(capsys)
    # another preset given: its model is checked against the checkpoint's, in one line
    assert _train(tmp_path, corpus, "--resume", "--preset", "recall") == 2
    assert "holds another model: n_layer" in _error_line(capsys)


def test_resume_takes_the_checkpoints_model(tmp_path, corpus, capsys):
    """Neither --preset nor --attention on --resume: the checkpoint's model and attention, not the
    defaults' (a recall window twin resumed by `--resume --steps N` alone)."""
    args = ["--preset", "recall", "--attention", "window", "--mqar-rows", "0", "--passkey-schedule=",
            "--passkey-len", "0", "--batch-size", "2"]
    assert _train(tmp_path, corpus, *args) == 0
    capsys.readouterr()
    assert main(["train", "--steps", "3", "--corpus", corpus, "--out", str(tmp_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "at step 2 of 3" in out and "window model, 3.54M parameters" in out   # recall-sized, not tiny


def test_eval_errors_and_progress(tmp_path, corpus, capsys):
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint at" in _error_line(capsys)
    assert _train(tmp_path, corpus) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "checkpoint.pt"), "--corpus", corpus, "--lengths", "128",
                 "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "s] held-out loss" in out and "passkey accuracy" in out and "needle block" in out


def test_a_checkpoint_carrying_code_is_refused(tmp_path, corpus, capsys):
    assert _train(tmp_path, corpus) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["history"] = [print]   # any pickled callable: loading it would run code
    torch.save(ckpt, tmp_path / "evil.pt")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "evil.pt")]) == 2
    assert "not a plain-data nsa checkpoint: refused to unpickle code" in _error_line(capsys)
