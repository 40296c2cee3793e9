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


@pytest.mark.parametrize("T", [5, 8, 30, 37])
def test_regular_blocks_equal_gathered_blocks(T):
    """BlockCompressor.regular (a strided view) gives forward's output and gradients for the
    blocks at 0, d, 2d, ... (T = 5: no block, still a function of the weights)."""
    torch.manual_seed(0)
    c = nsa.layer.BlockCompressor(8, 6).double()
    torch.nn.init.normal_(c.pos_emb)
    torch.nn.init.normal_(c.mlp[2].weight)
    x = torch.randn(2, T, 3, 6, dtype=torch.float64, requires_grad=True)
    rows = torch.arange(nsa.NSAConfig(cmp_block_size=8, cmp_stride=4).num_compressed(T)) * 4
    got, want = c.regular(x, 4), c(x, rows)
    assert got.shape == want.shape == (2, rows.numel(), 3, 6)
    w = torch.randn_like(want)
    grads = lambda y: torch.autograd.grad((y * w).sum(), [x, *c.parameters()], allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(got), grads(want)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_triton_layer_step_equals_float64(packed):
    """The eager training step through the Triton backend (one fused projection, rotary
    kernels, the strided compressor or the packed gather, FusedNSA) in float32 against the same
    layer on the PyTorch reference in float64: the output and every gradient, x's and each
    parameter's."""
    torch.manual_seed(0)
    cfg = nsa.NSAConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=16, sel_block_count=3, window_size=16)
    ref = nsa.NativeSparseAttention(32, 4, 2, 16, 8, config=cfg, backend="torch", qkv_bias=packed).double()
    for c in (ref.compress_k, ref.compress_v):   # nothing hidden behind a zero initialisation
        torch.nn.init.normal_(c.pos_emb, std=0.3)
        torch.nn.init.normal_(c.mlp[2].weight, std=0.1)
    for n, p in ref.named_parameters():
        if n.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    kern = nsa.NativeSparseAttention(32, 4, 2, 16, 8, config=cfg, backend="triton", qkv_bias=packed)
    kern.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(1 if packed else 2, 45, 32, dtype=torch.float64)
    cu = torch.tensor([0, 20, 45], dtype=torch.int32) if packed else None
    w = torch.randn(x.shape[0], 45, 32, dtype=torch.float64)
    outs = []
    for m, dt in ((ref, torch.float64), (kern, torch.float32)):
        xi = x.detach().to(dt).requires_grad_()
        y = m(xi, cu_seqlens=cu)
        (y * w.to(dt)).sum().backward()
        outs.append([y, xi.grad] + [p.grad for p in m.parameters()])
    names = ["out", "x.grad"] + [n + ".grad" for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, *outs):
        assert a is not None and b is not None, name
        err = ((b.double() - a).norm() / a.norm().clamp_min(1e-30)).item()
        assert err < 2e-5, f"{name}: relative error {err:.2e}"


def test_frozen_projection_leaves_the_others_training():
    """The projections are one product over concatenated weights: freezing one of them (a
    fine-tune of some) keeps every other projection's gradient, and equals the unfrozen layer's."""
    torch.manual_seed(0)
    m = nsa.NativeSparseAttention(32, 4, 2, 8, 8, config=CFG).double()
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    m(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.q_proj.weight.requires_grad_(False)
    for _ in range(2):   # a second step too: nothing of the first is kept
        m.zero_grad(set_to_none=True)
        m(x).square().sum().backward()
        assert m.q_proj.weight.grad is None
        for n, p in m.named_parameters():
            if n != "q_proj.weight":
                torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-12)
