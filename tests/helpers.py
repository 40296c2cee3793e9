"""Random NSA inputs and comparison helpers shared by the tests."""
import torch

from nsa import NSAConfig
from nsa.reference import num_compressed


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
