"""The NSA layer and its full-attention twin: shapes, packing, gradients, and that it trains."""
import pytest
import torch

import nsa

CFG = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=16, sel_block_count=4, window_size=16)


@pytest.mark.parametrize("cls", [nsa.NativeSparseAttention, nsa.FullAttention])
def test_shapes_and_grads(cls):
    torch.manual_seed(0)
    m = cls(48, 6, 2, 16, 8, config=CFG)
    x = torch.randn(2, 37, 48, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_block_idx_shape():
    m = nsa.NativeSparseAttention(32, 4, 2, 8, 8, config=CFG)
    _, idx = m(torch.randn(1, 50, 32), return_block_idx=True)
    assert idx.shape == (1, 50, 2, 4) and idx.dtype == torch.int32


@pytest.mark.parametrize("cls", [nsa.NativeSparseAttention, nsa.FullAttention])
def test_packed_equals_separate(cls):
    torch.manual_seed(0)
    m = cls(32, 4, 2, 8, 8, config=CFG).double()
    lens = [20, 5, 41]
    x = torch.randn(1, sum(lens), 32, dtype=torch.float64)
    cu = torch.tensor([0, 20, 25, 66], dtype=torch.int32)
    y = m(x, cu_seqlens=cu)
    for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        torch.testing.assert_close(y[:, a:b], m(x[:, a:b]), rtol=1e-10, atol=1e-10)


def test_layer_is_causal():
    torch.manual_seed(0)
    m = nsa.NativeSparseAttention(32, 4, 2, 8, 8, config=CFG).double()
    x = torch.randn(1, 60, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 33:] = torch.randn_like(x2[:, 33:])
    torch.testing.assert_close(m(x)[:, :33], m(x2)[:, :33], rtol=0, atol=1e-12)


def test_compressor_starts_as_mean_pooling():
    c = nsa.layer.BlockCompressor(4, 6)
    x = torch.randn(2, 12, 3, 6)
    rows = torch.tensor([0, 2, 4, 6, 8])
    out = c(x, rows)
    expect = torch.stack([x[:, r:r + 4].mean(1) for r in rows.tolist()], 1)
    torch.testing.assert_close(out, expect)


def test_few_training_steps_lower_the_loss():
    """Copy task: predict the token seen 20 steps earlier (beyond the window of 16, so the
    compressed/selected branches must carry it)."""
    torch.manual_seed(0)
    vocab, dim, T = 16, 64, 64
    emb = torch.nn.Embedding(vocab, dim)
    attn = nsa.NativeSparseAttention(dim, 4, 2, 16, 16, config=CFG)
    head = torch.nn.Linear(dim, vocab)
    params = [*emb.parameters(), *attn.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(30):
        tok = torch.randint(0, vocab, (8, T))
        h = emb(tok)
        logits = head(h + attn(h))
        loss = torch.nn.functional.cross_entropy(logits[:, 20:].reshape(-1, vocab), tok[:, :-20].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
