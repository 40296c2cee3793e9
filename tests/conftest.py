import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Without a GPU the Triton kernels run in the interpreter; Triton reads this when kernels are
# defined, so it must be set before nsa.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one core's share per xdist worker: oversubscribed torch threads (2 workers x 2 threads on the
# CI's 2 cores) spin against the other worker's interpreter (a CPU-model test 8 s alone, 78 s
# beside interpreter tests)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


def _interpreter_patches_once():
    """The Triton interpreter patches triton.language (inspect.getmembers over its modules) at
    every launch, and again at every call of a @triton.jit helper inside it: ~70% of this
    suite's time on CPU (cProfile of test_selected_layouts). A helper's patch repeats the
    launch's when it sees the same modules (tl, tl.core), already patched: within a launch it is
    skipped then (done where it sees one not yet patched, as Triton's own tl.zeros does).
    Test speed only: kernels run the same. Left alone where the interpreter's internals differ."""
    try:
        from triton.runtime import interpreter as it
        launch, patch, scope = it.GridExecutor.__call__, it._patch_lang, it._LangPatchScope
    except (ImportError, AttributeError):
        return
    import inspect

    import triton.language as tl
    patched = set()   # the language modules (tl, tl.core) this launch has patched

    def patch_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if langs <= patched:      # a helper whose modules this launch already patched
            return scope()
        patched.update(langs)     # the launch's own patch (its first step), or new modules
        return patch(fn)

    def run(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.clear()

    it._patch_lang = patch_once
    it.GridExecutor.__call__ = run


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_patches_once()


@pytest.fixture(autouse=True)
def _poison_fresh_buffers(monkeypatch):
    """Kernels allocate outputs through nsa.triton.utils.empty: fill them with NaN so any
    element a kernel forgets to write shows up in the comparison."""
    monkeypatch.setenv("NSA_POISON_EMPTY", "1")
    yield
