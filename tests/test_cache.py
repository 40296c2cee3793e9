"""NSACache and the layer's incremental path: prefill + decoding == one parallel forward."""
import pytest
import torch

import nsa
from helpers import CFG, torch_and_triton_layers


def _layer(seed=0):
    torch.manual_seed(seed)
    return nsa.NativeSparseAttention(32, 4, 2, 8, 6, config=CFG).double()


@pytest.mark.parametrize("prefill", [1, 7, 33, 64], ids=lambda p: f"prefill{p}")
def test_prefill_then_decode_equals_parallel(prefill):
    m = _layer()
    x = torch.randn(2, 75, 32, dtype=torch.float64)
    with torch.no_grad():
        full, idx_full = m(x, return_block_idx=True)
        cache = m.new_cache(2, 80)
        outs, idxs = [], []
        o, i = m(x[:, :prefill], cache=cache, return_block_idx=True)
        outs.append(o), idxs.append(i)
        for t in range(prefill, 75):
            o, i = m(x[:, t:t + 1], cache=cache, return_block_idx=True)
            outs.append(o), idxs.append(i)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
    assert torch.equal(torch.cat(idxs, 1), idx_full)
    assert cache.lengths == [75, 75]
    assert cache.k_cmp.shape[1] == CFG.num_compressed(80) + 1   # and the spare slot


def test_chunked_prefill_equals_parallel():
    m = _layer(1)
    x = torch.randn(1, 60, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(1, 60)
        got = torch.cat([m(x[:, a:b], cache=cache) for a, b in ((0, 13), (13, 40), (40, 60))], 1)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-12)


def test_rows_of_different_lengths_decode_as_if_alone():
    m = _layer(2)
    xa = torch.randn(1, 40, 32, dtype=torch.float64)
    xb = torch.randn(1, 55, 32, dtype=torch.float64)
    with torch.no_grad():
        fa, fb = m(xa), m(xb)
        cache = m.new_cache(2, 64)
        m(xa[:, :30], cache=cache, rows=[0])
        m(xb[:, :45], cache=cache, rows=[1])
        steps = [m(torch.cat([xa[:, t:t + 1], xb[:, 45 + t - 30:46 + t - 30]]), cache=cache) for t in range(30, 40)]
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[0], fa[0, 30:40], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], fb[0, 45:55], rtol=0, atol=1e-12)


def test_rings_hold_only_what_is_read():
    cache = _layer().new_cache(3, 80)
    assert cache.k_win.shape[1] == CFG.window_size and cache.k_raw.shape[1] == CFG.cmp_block_size
    assert cache.k_slc.shape[1] == 80 and cache.k_cmp.shape[1] == CFG.num_compressed(80) + 1
    small = _layer().new_cache(1, 5)   # capacity under l and w: rings shrink to it
    assert small.k_win.shape[1] == 5 and small.k_raw.shape[1] == 5 and small.k_cmp.shape[1] == 1   # the spare slot only


@pytest.mark.parametrize("capacity", [5, 8, 16], ids=lambda c: f"cap{c}")
def test_small_capacities(capacity):
    m = _layer(3)
    x = torch.randn(1, capacity, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(1, capacity)
        got = torch.cat([m(x[:, :2], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(2, capacity)], 1)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-12)
    assert cache.seqlens.tolist() == [capacity]


def test_decode_a_subset_of_rows():
    m = _layer(4)
    x = torch.randn(3, 50, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(3, 50)
        m(x[:, :40], cache=cache)
        got = [m(x[1:2, t:t + 1], cache=cache, rows=[1]) for t in range(40, 50)]
        cache.reset([0])
        again = m(x[:1, :25], cache=cache, rows=[0])
    torch.testing.assert_close(torch.cat(got, 1), full[1:2, 40:], rtol=0, atol=1e-12)
    torch.testing.assert_close(again, full[:1, :25], rtol=0, atol=1e-12)
    assert cache.lengths == [25, 50, 40] and cache.seqlens.tolist() == [25, 50, 40]


def test_triton_cached_path_matches_parallel():
    """The layer's cached path with backend='triton': prompt through the training kernels, a
    chunk after it (nsa_extend: the training kernels after held keys, ending mid-block), then
    the decode kernels, one token at a time (the interpreter on CPU)."""
    torch.manual_seed(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = nsa.NativeSparseAttention(32, 4, 2, 16, 8, config=CFG, backend="triton").to(dev)
    ref = nsa.NativeSparseAttention(32, 4, 2, 16, 8, config=CFG, backend="torch").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 70, 32, device=dev)
    with torch.no_grad():
        want, want_idx = ref(x.double().cpu(), return_block_idx=True)
        cache = m.new_cache(2, 70)
        outs, idxs = zip(*[m(x[:, a:b], cache=cache, return_block_idx=True)
                           for a, b in [(0, 37), (37, 58)] + [(t, t + 1) for t in range(58, 70)]])
    got = torch.cat(outs, 1).cpu()
    assert not torch.isnan(got).any()
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()
    assert torch.equal(torch.cat(idxs, 1).cpu(), want_idx)


def test_fused_decode_append_fills_the_cache_as_pytorch_does():
    """One token a step through the Triton bookkeeping (nsa/triton/append.py: rotary, ring slots,
    the candidate block, the compressed token's conditional store) leaves every cache buffer as
    the PyTorch path does, across block completions and ring wrap-arounds, all rows or some."""
    m, kern = torch_and_triton_layers(seed=6)
    x = torch.randn(3, 50, 32)
    with torch.no_grad():
        caches = [layer.new_cache(3, 50) for layer in (m, kern)]
        for layer, cache in zip((m, kern), caches):
            layer(x[:, :5], cache=cache)
            for t in range(5, 45):
                layer(x[:, t:t + 1], cache=cache)
            for t in range(45, 50):
                layer(x[[2, 0], t:t + 1], cache=cache, rows=[2, 0])
    want, got = caches
    for name in ("k_slc", "v_slc", "k_win", "v_win", "k_raw", "v_raw"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=2e-6)
    for r, L in enumerate(want.lengths):   # the spare slot holds whatever the non-blocks gave
        n = CFG.num_compressed(L)
        torch.testing.assert_close(got.k_cmp[r, :n], want.k_cmp[r, :n], rtol=0, atol=2e-6)
        torch.testing.assert_close(got.v_cmp[r, :n], want.v_cmp[r, :n], rtol=0, atol=2e-6)
    assert got.lengths == want.lengths == [50, 45, 50] and torch.equal(got.seqlens, want.seqlens)


def test_cuda_graph_needs_a_capturable_step():
    """A CUDA graph of the decode step needs CUDA tensors and the Triton backend: asked for
    elsewhere, a clear error (generate's default simply runs eagerly)."""
    from nsa.graph import DecodeGraph
    from nsa.lm.model import PRESETS, LanguageModel, generate
    model = LanguageModel(PRESETS["tiny"]).eval()
    prompt = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="cuda_graph needs the cached NSA decode path on CUDA"):
        generate(model, prompt, 2, cuda_graph=True)
    assert generate(model, prompt, 2).shape == (1, 10)
    cache = model.blocks[0].attn.new_cache(1, 10)
    with pytest.raises(ValueError, match="DecodeGraph needs CUDA tensors"):
        DecodeGraph(lambda t: t, [cache], prompt[:, :1])


def test_cache_errors():
    m = _layer()
    cache = m.new_cache(2, 10)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        m(x, cache=cache)
        with pytest.raises(ValueError, match=r"cache capacity 10 exceeded for rows \[0, 1\]: lengths \[8, 8\] \+ 3"):
            m(torch.randn(2, 3, 32, dtype=torch.float64), cache=cache)
        with pytest.raises(ValueError, match="x has batch size 3, the cache rows given are 2"):
            m(torch.randn(3, 1, 32, dtype=torch.float64), cache=cache, rows=[0, 1])
        with pytest.raises(ValueError, match=r"batch rows must be in \[0, 2\), got \[5\]"):
            m(torch.randn(1, 1, 32, dtype=torch.float64), cache=cache, rows=[5])
        with pytest.raises(TypeError, match="x dtype torch.float32 does not match the cache's torch.float64"):
            m(torch.randn(2, 1, 32), cache=cache)
        with pytest.raises(ValueError, match="cache and cu_seqlens cannot be combined"):
            m(x[:1], cache=cache, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"batch rows must be distinct, got \[1, 1\]"):
            m(torch.randn(2, 1, 32, dtype=torch.float64), cache=cache, rows=[1, 1])
        with pytest.raises(ValueError, match="capacity must be a positive int"):
            m.new_cache(1, 0)


def test_generate_with_cache_equals_recompute():
    from nsa.lm.model import PRESETS, LanguageModel, generate
    torch.manual_seed(0)
    m = LanguageModel(PRESETS["tiny"].replace(n_layer=2)).double()
    prompt = torch.randint(0, 256, (2, 37))
    a = generate(m, prompt, 12)
    b = generate(m, prompt, 12, use_cache=False)
    assert a.shape == (2, 49) and torch.equal(a[:, :37], prompt)
    assert torch.equal(a, b)
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    s1 = generate(m, prompt, 8, temperature=0.8, top_p=0.9, generator=g1)
    s2 = generate(m, prompt, 8, temperature=0.8, top_p=0.9, generator=g2, use_cache=False)
    assert torch.equal(s1, s2)


def test_model_cached_logits_equal_forward():
    """Prefill, then a token a step, through the per-layer caches (the token shift's carried
    input included): logits equal the whole-sequence forward's. Weights drawn large, so that
    every branch and the shift move the logits."""
    from nsa.lm.model import PRESETS, LanguageModel
    torch.manual_seed(1)
    m = LanguageModel(PRESETS["tiny"].replace(n_layer=2)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randint(0, 256, (2, 45))
    want = m(x)
    caches = [b.attn.new_cache(2, 45) for b in m.blocks]
    got = [m(x[:, :30], caches=caches)] + [m(x[:, t:t + 1], caches=caches) for t in range(30, 45)]
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-9, atol=1e-9)


def test_top_p_keeps_the_nucleus():
    from nsa.lm.model import _sample
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(_sample(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}     # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 never drawn
