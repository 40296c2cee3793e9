"""PagedNSACache: pages and block tables give what the contiguous cache gives, step for step.

Free and unassigned pages are NaN (poison=True), so a sequence that read a page it does not
hold would show NaN in its output; sequences are allocated and freed in random orders.
"""
import random

import pytest
import torch

import nsa
from helpers import CFG, TOL, make_inputs, rel_err, torch_and_triton_layers
from test_decode import as_cache

PAGE = 16   # a multiple of CFG's l' = 16 and d = 4


def _layer(backend="torch", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nsa.NativeSparseAttention(32, 4, 2, 8, 6, config=CFG, backend=backend).to(dtype)


def _paged(m, num_pages=24, max_seqs=3, max_pages=5, **kw):
    p = m.q_proj.weight
    return nsa.PagedNSACache(num_pages, PAGE, max_seqs, max_pages, m.num_kv_heads, m.head_dim_qk, m.head_dim_v,
                             m.config, dtype=p.dtype, device=p.device, poison=True, **kw)


def _run(m, cache, slot, x, chunks):
    """x [1, T, hidden] appended to sequence `slot` in chunks (lengths): the outputs, joined."""
    outs, t = [], 0
    for n in chunks:
        outs.append(m(x[:, t:t + n], cache=cache, rows=[slot]))
        t += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_equals_contiguous_through_random_allocations(seed):
    """Sequences of random lengths, chunkings and allocate/free orders: each one's outputs equal
    those of the same tokens through a contiguous NSACache of its own, and no NaN shows."""
    rng = random.Random(seed)
    m = _layer(seed=seed)
    paged = _paged(m)
    x = torch.randn(6, 80, 32, dtype=torch.float64)
    with torch.no_grad():
        live = {}
        for s in range(6):
            if len(live) == paged.batch_size or (live and rng.random() < 0.4):
                paged.free(live.pop(rng.choice(sorted(live))))
            slot = paged.allocate()
            T = rng.randint(20, 80)
            chunks, left = [], T
            while left:
                n = rng.choice([1, 1, 1, 3, 7, 17, 33])
                chunks.append(min(n, left))
                left -= chunks[-1]
            got = _run(m, paged, slot, x[s:s + 1], chunks)
            want = _run(m, m.new_cache(1, 80), 0, x[s:s + 1], chunks)
            assert not torch.isnan(got).any()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
            live[s] = slot
    assert paged.free_pages[0] + sum(-(-paged.lengths[r] // PAGE) for r in range(3) if paged.active[r]) == 24


def test_interleaved_sequences_decode_together():
    """Rows at different lengths decode in one batch through the page tables (and a subset)."""
    m = _layer(seed=3)
    paged = _paged(m)
    xs = torch.randn(3, 70, 32, dtype=torch.float64)
    with torch.no_grad():
        full = [m(xs[i:i + 1]) for i in range(3)]
        slots = [paged.allocate() for _ in range(3)]
        starts = [40, 9, 23]
        for i, s in enumerate(slots):
            m(xs[i:i + 1, :starts[i]], cache=paged, rows=[s])
        steps = []
        for t in range(12):
            tok = torch.stack([xs[i, starts[i] + t] for i in range(3)])[:, None]
            steps.append(m(tok, cache=paged))
        got = torch.cat(steps, 1)
        for i in range(3):
            torch.testing.assert_close(got[i], full[i][0, starts[i]:starts[i] + 12], rtol=0, atol=1e-12)
        one = m(xs[1:2, starts[1] + 12:starts[1] + 13], cache=paged, rows=[1])
    torch.testing.assert_close(one[0], full[1][0, starts[1] + 12:starts[1] + 13], rtol=0, atol=1e-12)


def test_recent_pages_are_handed_back():
    m = _layer()
    paged = _paged(m, num_pages=10, max_seqs=1, max_pages=10)
    x = torch.randn(1, 150, 32, dtype=torch.float64)
    with torch.no_grad():
        s = paged.allocate()
        for t in range(150):
            m(x[:, t:t + 1], cache=paged, rows=[s])
    held = int((paged.table.recent[s] >= 0).sum())
    keep = max(CFG.window_size, CFG.cmp_block_size)
    assert held <= -(-keep // PAGE) + 2 and paged.free_pages == (0, paged.k_win.shape[0] - 1 - held)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_paged_decode(dtype):
    """nsa_decode through block tables (NaN in every page not in them) == float64 contiguous."""
    T, lengths = 70, [70, 1, 33, 48]
    B = len(lengths)
    t, _ = make_inputs(T, 4, 2, 8, 8, CFG, B=B, seed=11)
    full, idx_full = nsa.nsa_attention(**t, config=CFG, return_block_idx=True, backend="torch")
    c, q, gates = as_cache(t, lengths, CFG, T, T)        # ring = capacity: every position
    MP, d = -(-T // PAGE), CFG.cmp_stride
    order = torch.randperm(B * MP + 4, generator=torch.Generator().manual_seed(0))
    table = order[:B * MP].view(B, MP).to(torch.int32)
    pools = {}
    for name, per in (("k_slc", PAGE), ("v_slc", PAGE), ("k_cmp", PAGE // d), ("v_cmp", PAGE // d),
                      ("k_win", PAGE), ("v_win", PAGE)):
        x = c[name]
        pad = torch.full((B, MP * per - x.shape[1], *x.shape[2:]), float("nan"), dtype=x.dtype)
        x = torch.cat([x, pad], 1).view(B, MP, per, *x.shape[2:])
        pool = torch.full((B * MP + 4, per, *x.shape[3:]), float("nan"), dtype=x.dtype)
        pool[table.long()] = x
        for b, L in enumerate(lengths):   # nothing past a row's length, nor older than its window
            n = CFG.num_compressed(L) if "cmp" in name else L
            pool.view(-1, *x.shape[3:])[(table[b].long()[:, None] * per + torch.arange(per)).flatten()[n:]] = float("nan")
            if "win" in name:
                old = max(0, L - CFG.window_size)
                pool.view(-1, *x.shape[3:])[(table[b].long()[:, None] * per + torch.arange(per)).flatten()[:old]] = float("nan")
        pools[name] = pool.to(dtype)
    rows, last = torch.arange(B), torch.tensor(lengths) - 1
    o, idx = nsa.nsa_decode(q.to(dtype), **pools, gates=gates.to(dtype), lengths=torch.tensor(lengths, dtype=torch.int32),
                            config=CFG, return_block_idx=True, backend="triton", block_table=table, window_table=table)
    assert not torch.isnan(o).any()
    assert torch.equal(idx, idx_full[rows, last])
    assert rel_err(o, full[rows, last]) < TOL[dtype]


def test_triton_layer_paged_matches_contiguous():
    """The layer on the Triton backend (interpreter): prefill, a chunk after it, decoding, a
    freed sequence's slot and pages reused by the next one."""
    m = _layer("triton", seed=5, dtype=torch.float32)
    paged = _paged(m, num_pages=12, max_seqs=2, max_pages=5)
    x = torch.randn(3, 70, 32)
    with torch.no_grad():
        a = paged.allocate()
        _run(m, paged, a, x[0:1], [30])
        paged.free(a)
        for s, chunks in ((1, [37, 21, 1, 1, 1]), (2, [5, 1, 1, 17])):
            slot = paged.allocate()
            got = _run(m, paged, slot, x[s:s + 1], chunks)
            want = _run(m, m.new_cache(1, 80), 0, x[s:s + 1], chunks)
            assert not torch.isnan(got).any()
            assert (got - want).abs().max() < 1e-5 * want.abs().max()


def test_paged_errors():
    m = _layer()
    paged = _paged(m, num_pages=3, max_seqs=2, max_pages=5)
    x = torch.randn(1, 50, 32, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(ValueError, match="sequence slot 0 is not allocated"):
            m(x[:, :4], cache=paged, rows=[0])
        s = paged.allocate()
        with pytest.raises(ValueError, match=r"out of main pages: sequence 0 needs one more"):
            m(x[:, :50], cache=paged, rows=[s])
        paged.free(s)
        s = paged.allocate()
        m(x[:, :20], cache=paged, rows=[s])
        paged.free(s)
        with pytest.raises(ValueError, match="sequence slot 0 is not allocated"):
            m(x[:, 20:21], cache=paged, rows=[s])
        with pytest.raises(ValueError, match="sequence slot 1 is not allocated"):
            paged.free(1)
        big = _paged(m, num_pages=40, max_seqs=1, max_pages=2)
        s = big.allocate()
        with pytest.raises(ValueError, match=r"cache capacity 32 exceeded for sequence 0: length 0 \+ 33"):
            m(x[:, :33], cache=big, rows=[s])
    with pytest.raises(ValueError, match="page_size .* must be a multiple of sel_block_size"):
        nsa.PagedNSACache(4, 24, 1, 2, 2, 8, 6, CFG)
    p2 = _paged(m, max_seqs=1)
    p2.allocate()
    with pytest.raises(ValueError, match="all 1 sequence slots are in use"):
        p2.allocate()


def test_layers_share_one_page_table():
    """Two layers (the second reads the first's output) on one PageTable: each sequence equals
    the two layers through contiguous caches of their own; its pages are taken once for both
    layers; allocate() and free() through either layer's cache act on both."""
    m1, m2 = _layer(seed=6), _layer(seed=7)
    c1 = _paged(m1, num_pages=12, max_seqs=2, max_pages=5)
    c2 = _paged(m2, num_pages=12, max_seqs=2, max_pages=5, share=c1)
    x = torch.randn(3, 60, 32, dtype=torch.float64)

    def run(caches, slot, s, chunks):
        outs, t = [], 0
        for n in chunks:
            h = m1(x[s:s + 1, t:t + n], cache=caches[0], rows=[slot])
            outs.append(m2(h, cache=caches[1], rows=[slot]))
            t += n
        return torch.cat(outs, 1)

    def check(slot, s, chunks):
        got = run((c1, c2), slot, s, chunks)
        want = run((m1.new_cache(1, 80), m2.new_cache(1, 80)), 0, s, chunks)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    with torch.no_grad():
        a = c1.allocate()
        assert c2.active[a] and c1.block_table is c2.block_table
        check(a, 0, [20, 1, 1, 9])
        assert c1.free_pages == c2.free_pages and c1.free_pages[0] == 12 - 2   # 31 positions: two pages, once
        b = c2.allocate()
        check(b, 1, [37, 1])
        c2.free(a)
        assert not c1.active[a] and c1.lengths[a] == c2.lengths[a] == 0
        a = c1.allocate()
        check(a, 2, [5, 1, 17])
    with pytest.raises(ValueError, match="share: page_size 32 differs from the shared cache's 16"):
        nsa.PagedNSACache(12, 32, 2, 5, 2, 8, 6, CFG, share=c1)
    with pytest.raises(ValueError, match=r"share: the shared cache already holds sequences \(slots \[0, 1\]\)"):
        _paged(m2, num_pages=12, max_seqs=2, max_pages=5, share=c1)
    with pytest.raises(TypeError, match="share must be a PagedNSACache, got NSACache"):
        _paged(m2, share=m2.new_cache(1, 80))


def test_fused_decode_append_fills_pages_as_pytorch_does():
    """One token a step through the Triton bookkeeping (nsa/triton/append.py) on a paged cache
    writes every page as the PyTorch path does (rotary, the selection K/V, the window and raw
    pages, the candidate block across page edges, the compressed token's page), all rows or
    some, with a sequence freed and its pages handed to another; untouched pages stay NaN."""
    m, kern = torch_and_triton_layers(seed=8)
    x = torch.randn(4, 60, 32)
    caches = []
    with torch.no_grad():
        for layer in (m, kern):
            cache = _paged(layer, num_pages=14, max_seqs=3, max_pages=4)
            rows = [cache.allocate() for _ in range(3)]
            layer(x[:3, :5], cache=cache)
            for t in range(5, 30):
                layer(x[:3, t:t + 1], cache=cache)
            cache.free(rows[1])
            s = cache.allocate()
            layer(x[3:, :7], cache=cache, rows=[s])
            for t in range(30, 50):
                layer(x[[2, 0], t:t + 1], cache=cache, rows=[2, 0])
            caches.append(cache)
    want, got = caches
    assert got.lengths == want.lengths == [50, 7, 50] and torch.equal(got.block_table, want.block_table)
    for name in ("k_slc", "v_slc", "k_win", "v_win", "k_raw", "v_raw", "k_cmp", "v_cmp"):
        w, g = getattr(want, name)[:-1], getattr(got, name)[:-1]   # the scratch page takes masked writes
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name
        torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), rtol=0, atol=2e-6)


def test_shared_pages_need_layers_in_step():
    """A layer that lags behind another on the same pages by more than the window would read
    recent pages handed back: an error, not NaN or another sequence's keys."""
    m1, m2 = _layer(seed=9), _layer(seed=10)
    c1 = _paged(m1, num_pages=12, max_seqs=1, max_pages=5)
    c2 = _paged(m2, num_pages=12, max_seqs=1, max_pages=5, share=c1)
    x = torch.randn(1, 60, 32, dtype=torch.float64)
    with torch.no_grad():
        s = c1.allocate()
        m1(x[:, :40], cache=c1, rows=[s])
        m2(x[:, :20], cache=c2, rows=[s])            # behind, but its recent pages are still held
        with pytest.raises(ValueError, match="sequence 0 is at length 20 in this layer, but a layer sharing"):
            for t in range(40, 60):
                m1(x[:, t:t + 1], cache=c1, rows=[s])
                m2(x[:, t - 20:t - 19], cache=c2, rows=[s])
