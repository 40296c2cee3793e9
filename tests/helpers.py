"""Random NSA inputs and comparison helpers shared by the tests."""
import torch

from nsa import NSAConfig
from nsa.core import num_compressed


def make_inputs(T, HQ, H, dk, dv, cfg=NSAConfig(), B=1, dtype=torch.float64, seqlens=None,
                device="cpu", seed=0, requires_grad=False):
    """Random inputs for nsa_attention. With seqlens, one packed batch + cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    if seqlens is not None:
        B, T = 1, sum(seqlens)
        Tc = sum(num_compressed(s, cfg.cmp_block_size, cfg.cmp_stride) for s in seqlens)
        cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), dtype=torch.int32, device=device)
    else:
        Tc, cu = num_compressed(T, cfg.cmp_block_size, cfg.cmp_stride), None

    def rnd(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    t = dict(q=rnd(B, T, HQ, dk), k_cmp=rnd(B, Tc, H, dk), v_cmp=rnd(B, Tc, H, dv),
             k_slc=rnd(B, T, H, dk), v_slc=rnd(B, T, H, dv), k_win=rnd(B, T, H, dk),
             v_win=rnd(B, T, H, dv))
    gates = torch.rand(B, T, HQ, 3, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    t["gates"] = gates.requires_grad_(requires_grad)
    return t, cu


# Small configurations that keep the interpreter fast while every rule matters: CFG has the
# paper's structure (l = 2d, l' = 2l, forced first block and two local ones); ODD has sizes
# that are not powers of two and no forced first block.
CFG = NSAConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=16, sel_block_count=4,
                sel_init_blocks=1, sel_local_blocks=2, window_size=16)
ODD = NSAConfig(cmp_block_size=6, cmp_stride=3, sel_block_size=12, sel_block_count=3,
                sel_init_blocks=0, sel_local_blocks=1, window_size=1)
# Relative error allowed against float64: float32 kernels are exact up to accumulation order;
# float16 kernels round P (and dS) to half precision before the second matmul, as FlashAttention
# does: a few units of fp16's 4.9e-4 roundoff.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def cfg_kwargs(cfg):
    return dict(cmp_block_size=cfg.cmp_block_size, cmp_stride=cfg.cmp_stride,
                sel_block_size=cfg.sel_block_size, sel_block_count=cfg.sel_block_count,
                sel_init_blocks=cfg.sel_init_blocks, sel_local_blocks=cfg.sel_local_blocks)


def rel_err(a, b):
    """||a - b|| / ||b||; a reference whose RMS is under 1e-2 (an exactly-zero gradient, say)
    is judged on absolute error at that scale instead."""
    a, b = a.detach().double(), b.detach().double()
    assert not torch.isnan(a).any(), "NaN in result (unwritten output?)"
    floor = 1e-2 * max(1, b.numel()) ** 0.5
    return float((a - b).norm() / max(float(b.norm()), floor))


def torch_and_triton_layers(seed):
    """Two equal small layers (cfg CFG), on the PyTorch reference and on the Triton backend, with
    the compression's position embedding and last MLP layer perturbed, so that no part of a
    cached step hides behind a zero initialisation."""
    import nsa
    torch.manual_seed(seed)
    m = nsa.NativeSparseAttention(32, 4, 2, 16, 8, config=CFG, backend="torch")
    for c in (m.compress_k, m.compress_v):
        torch.nn.init.normal_(c.pos_emb, std=0.3)
        torch.nn.init.normal_(c.mlp[2].weight, std=0.1)
    kern = nsa.NativeSparseAttention(32, 4, 2, 16, 8, config=CFG, backend="triton")
    kern.load_state_dict(m.state_dict())
    return m, kern
