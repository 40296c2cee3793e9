"""The worked example of docs/semantics.md, section 11, checked number by number.

Every table of that section is restated here and compared with the PyTorch reference
(backend="torch", float64). Run: python -m pytest -q tests/test_semantics_example.py
"""
import math
from fractions import Fraction as F

import pytest
import torch

import nsa
from nsa import reference

DT = torch.float64
T, L, D, LP, N, INIT, LOCAL, W = 16, 4, 2, 4, 3, 1, 1, 4
SCALE = math.log(2.0)            # exp(SCALE * q.k) = 2 ** (q.k)
TC = 7                           # Tc(16) = (16 - 4) // 2 + 1
NB = 4                           # ceil(16 / 4) selection blocks
CFG = nsa.NSAConfig(cmp_block_size=L, cmp_stride=D, sel_block_size=LP, sel_block_count=N,
                    sel_init_blocks=INIT, sel_local_blocks=LOCAL, window_size=W)
CMP = dict(cmp_block_size=L, cmp_stride=D)
SEL = dict(CMP, sel_block_size=LP, sel_block_count=N, sel_init_blocks=INIT, sel_local_blocks=LOCAL)

# ---- the tables of the document --------------------------------------------------------------
FIRST_VISIBLE = [3, 5, 7, 9, 11, 13, 15]          # token i is visible from t = 2i + 3 on
WEIGHTS = [[2, 0, 0, 0],
           [1, 1, 0, 0],
           [0, 2, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 2, 0],
           [0, 0, 1, 1],
           [0, 0, 0, 2]]
# block scores s[t, j] for the pairs t = 2m+1, 2m+2 (equal visibility, q = 0 except t = 15)
SCORES = {
    (0, 1, 2): [0, 0, 0, 0],
    (3, 4): [2, 0, 0, 0],
    (5, 6): [F(3, 2), F(1, 2), 0, 0],
    (7, 8): [1, 1, 0, 0],
    (9, 10): [F(3, 4), 1, F(1, 4), 0],
    (11, 12): [F(3, 5), F(4, 5), F(3, 5), 0],
    (13, 14): [F(1, 2), F(2, 3), F(2, 3), F(1, 6)],
    (15,): [F(3, 8), F(1, 2), F(3, 4), F(3, 8)],
}
BLOCK_IDX = [[0, -1, -1]] * 4 + [[0, 1, -1]] * 4 + [[0, 1, 2]] * 4 + [[0, 1, 3]] * 3 + [[0, 2, 3]]
LSE = [-math.inf] * 3 + [math.log(c) for c in (1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6)] + [math.log(8)]
O_CMP = [0.0] * 5 + [0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5, 2.5, 25 / 8]


def inputs():
    """q: 0 everywhere but q_15 = 1; k_cmp: 0 but token 4 = 1; v_cmp_i = i (dk = dv = 1)."""
    q = torch.zeros(1, T, 1, 1, dtype=DT)
    q[0, 15] = 1.0
    k_cmp = torch.zeros(1, TC, 1, 1, dtype=DT)
    k_cmp[0, 4] = 1.0
    v_cmp = torch.arange(TC, dtype=DT).view(1, TC, 1, 1)
    k_zero = torch.zeros(1, T, 1, 1, dtype=DT)             # k_slc = k_win = 0: uniform weights
    v_pos = torch.arange(T, dtype=DT).view(1, T, 1, 1)     # v_slc = v_win = position
    gates = torch.tensor([0.5, 0.25, 0.25], dtype=DT).expand(1, T, 1, 3).contiguous()
    return q, k_cmp, v_cmp, k_zero, v_pos, gates


def scores_table():
    rows = [None] * T
    for ts, vals in SCORES.items():
        for t in ts:
            rows[t] = [float(v) for v in vals]
    return torch.tensor(rows, dtype=DT)


# ---- tests --------------------------------------------------------------------------------
def test_config_is_valid_and_counts():
    assert CFG.num_compressed(T) == TC == nsa.core.num_compressed(T, L, D)
    assert [CFG.num_compressed(x) for x in (3, 4, 5, 6, 14, 16)] == [0, 1, 1, 2, 6, 7]
    assert -(-T // LP) == NB


def test_config_validity_rules():
    for bad, name in ((dict(cmp_stride=3), "cmp_stride"),                  # d must divide l
                      (dict(sel_block_size=40), "sel_block_size"),         # d must divide l'
                      (dict(cmp_block_size=128), "cmp_block_size"),        # l <= l'
                      (dict(sel_block_count=2), "sel_block_count"),        # n >= init + local
                      (dict(window_size=0), "window_size"),                # sizes >= 1
                      (dict(sel_init_blocks=-1), "sel_init_blocks")):      # counts >= 0
        with pytest.raises(ValueError, match=name):
            nsa.NSAConfig(**bad)
    nsa.NSAConfig(window_size=1, sel_init_blocks=0, sel_local_blocks=0, sel_block_count=1)
    with pytest.raises(TypeError):
        nsa.NSAConfig(cmp_block_size=32.0)


def test_visibility_table():
    # token i is visible to t iff i*d + l - 1 <= t
    for i, t0 in enumerate(FIRST_VISIBLE):
        assert i * D + L - 1 == t0
    last = reference._cmp_last_visible(torch.arange(T), L, D).tolist()
    assert last == [sum(t >= f for f in FIRST_VISIBLE) - 1 for t in range(T)]
    # the same seen through compressed_attention: one-hot values, equal logits
    q = torch.zeros(1, T, 1, 1, dtype=DT)
    k = torch.zeros(1, TC, 1, 1, dtype=DT)
    v = torch.eye(TC, dtype=DT).view(1, TC, 1, TC)
    o, _ = nsa.compressed_attention(q, k, v, **CMP, backend="torch")
    seen = (o[0, :, 0] > 0).tolist()
    assert seen == [[t >= f for f in FIRST_VISIBLE] for t in range(T)]


def test_overlap_weights():
    w = reference.overlap_weights(TC, NB, L, D, LP, DT)
    assert w.tolist() == WEIGHTS
    assert w.sum(1).tolist() == [L / D] * TC          # each token spreads l/d in all


def test_compression_branch():
    q, k_cmp, v_cmp, *_ = inputs()
    o, lse = nsa.compressed_attention(q, k_cmp, v_cmp, **CMP, scale=SCALE, backend="torch")
    assert lse.dtype == torch.float64
    assert torch.equal(lse[0, :3, 0], torch.full((3,), -math.inf, dtype=DT))
    torch.testing.assert_close(lse[0, :, 0], torch.tensor(LSE, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(o[0, :, 0, 0], torch.tensor(O_CMP, dtype=DT), rtol=0, atol=1e-12)
    assert not torch.isnan(o).any()


def test_block_scores():
    q, k_cmp, v_cmp, *_ = inputs()
    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, **CMP, scale=SCALE, backend="torch")
    w = reference.overlap_weights(TC, NB, L, D, LP, DT)
    s = reference.block_scores(q[0].view(T, 1, 1, 1), k_cmp[0], lse[0].view(T, 1, 1),
                               torch.arange(T), w, SCALE, L, D)[:, 0]
    torch.testing.assert_close(s, scores_table(), rtol=0, atol=1e-12)
    # recomputed from the probabilities exp(scale*q.k - lse) of the visible tokens
    vis = torch.tensor([[t >= f for f in FIRST_VISIBLE] for t in range(T)])
    logits = SCALE * q[0, :, 0, 0, None] * k_cmp[0, :, 0, 0][None, :]
    p = torch.where(vis, torch.exp(logits - lse[0, :, 0, None]), torch.zeros((), dtype=DT))
    torch.testing.assert_close(p @ w, scores_table(), rtol=0, atol=1e-12)
    # t = 15: probabilities 1/8 each, 2/8 for token 4
    torch.testing.assert_close(p[15], torch.tensor([1, 1, 1, 1, 2, 1, 1], dtype=DT) / 8,
                               rtol=0, atol=1e-12)
    # the tie of t = 13 and 14 is exact: blocks 1 and 2 score the same
    assert s[13, 1] == s[13, 2] and s[14, 1] == s[14, 2]
    assert (s[3:].sum(1) - L / D).abs().max() < 1e-12   # a query that sees a token: total l/d


def test_selected_blocks():
    q, k_cmp, v_cmp, *_ = inputs()
    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, **CMP, scale=SCALE, backend="torch")
    idx = nsa.select_blocks(q, k_cmp, lse, **SEL, scale=SCALE, backend="torch")
    assert idx.dtype == torch.int32 and idx.shape == (1, T, 1, N)
    assert idx[0, :, 0].tolist() == BLOCK_IDX
    # the same indices from pick_blocks on the documented scores
    got = reference.pick_blocks(scores_table()[:, None, :], torch.arange(T), sel_block_size=LP,
                                sel_block_count=N, sel_init_blocks=INIT, sel_local_blocks=LOCAL)
    assert got[:, 0].tolist() == BLOCK_IDX


def test_tie_goes_to_lower_block_either_way():
    # swapping the tied blocks' positions does not change the rule: the lower index wins
    s = torch.tensor([[[0.0, 0.5, 0.5, 0.0]]], dtype=DT)
    got = reference.pick_blocks(s, torch.tensor([15]), sel_block_size=LP, sel_block_count=N,
                                sel_init_blocks=INIT, sel_local_blocks=LOCAL)
    assert got[0, 0].tolist() == [0, 1, 3]


def test_selected_window_and_gated_output():
    q, k_cmp, v_cmp, k0, vpos, gates = inputs()
    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, **CMP, scale=SCALE, backend="torch")
    idx = nsa.select_blocks(q, k_cmp, lse, **SEL, scale=SCALE, backend="torch")
    o_slc = nsa.selected_attention(q, k0, vpos, idx, sel_block_size=LP, scale=SCALE, backend="torch")
    o_win = nsa.sliding_window_attention(q, k0, vpos, window_size=W, scale=SCALE, backend="torch")
    # t = 13: blocks 0, 1, 3 -> keys 0..7, 12, 13 (mean 5.3); window keys 10..13 (mean 11.5)
    assert o_slc[0, 13, 0, 0].item() == pytest.approx(53 / 10, abs=1e-12)
    assert o_win[0, 13, 0, 0].item() == pytest.approx(11.5, abs=1e-12)
    # t = 15: blocks 0, 2, 3 -> keys 0..3, 8..15 (mean 49/6); window keys 12..15 (mean 13.5)
    assert o_slc[0, 15, 0, 0].item() == pytest.approx(49 / 6, abs=1e-12)
    assert o_win[0, 15, 0, 0].item() == pytest.approx(13.5, abs=1e-12)
    o, idx2 = nsa.nsa_attention(q, k_cmp, v_cmp, k0, vpos, k0, vpos, gates, config=CFG,
                                scale=SCALE, return_block_idx=True, backend="torch")
    assert torch.equal(idx2, idx)
    assert o[0, 13, 0, 0].item() == pytest.approx(0.5 * 2.5 + 0.25 * 5.3 + 0.25 * 11.5, abs=1e-12)
    assert o[0, 13, 0, 0].item() == pytest.approx(5.45, abs=1e-12)
    expect15 = 0.5 * 25 / 8 + 0.25 * 49 / 6 + 0.25 * 13.5
    assert o[0, 15, 0, 0].item() == pytest.approx(expect15, abs=1e-12)
    assert o[0, 15, 0, 0].item() == pytest.approx(335 / 48, abs=1e-12)


def test_decode_from_ring_buffer():
    q, k_cmp, v_cmp, k0, vpos, gates = inputs()
    o_full, idx_full = nsa.nsa_attention(q, k_cmp, v_cmp, k0, vpos, k0, vpos, gates, config=CFG,
                                         scale=SCALE, return_block_idx=True, backend="torch")
    lengths = torch.tensor([14, 16])
    B = 2
    ring_k = torch.zeros(B, W, 1, 1, dtype=DT)
    ring_v = torch.full((B, W, 1, 1), -99.0, dtype=DT)
    for b, Lb in enumerate(lengths.tolist()):
        for p in range(Lb):                    # position p goes to slot p % W
            ring_v[b, p % W] = float(p)
    assert ring_v[0, :, 0, 0].tolist() == [12, 13, 10, 11]
    assert ring_v[1, :, 0, 0].tolist() == [12, 13, 14, 15]
    rep = lambda x: x.expand(B, *x.shape[1:]).contiguous()
    qd = torch.stack([q[0, 13], q[0, 15]])
    gd = torch.stack([gates[0, 13], gates[0, 15]])
    o, idx = nsa.nsa_decode(qd, rep(k_cmp), rep(v_cmp), rep(k0), rep(vpos), ring_k, ring_v, gd,
                            lengths, config=CFG, scale=SCALE, return_block_idx=True, backend="torch")
    assert idx[:, 0].tolist() == [[0, 1, 3], [0, 2, 3]]
    torch.testing.assert_close(o, torch.stack([o_full[0, 13], o_full[0, 15]]), rtol=0, atol=1e-12)
    assert o[0, 0].item() == pytest.approx(5.45, abs=1e-12)


def test_packed_sequences():
    cu = torch.tensor([0, 16, 19, 24], dtype=torch.int32)      # lengths 16, 3, 5
    assert nsa.compressed_cu_seqlens(cu, L, D).tolist() == [0, 7, 7, 8]
    # the example packed twice gives, for each copy, the example's own results
    q, k_cmp, v_cmp, *_ = inputs()
    cat = lambda x: torch.cat([x, x], 1)
    cu2 = torch.tensor([0, T, 2 * T], dtype=torch.int32)
    o, lse = nsa.compressed_attention(cat(q), cat(k_cmp), cat(v_cmp), **CMP, scale=SCALE,
                                      cu_seqlens=cu2, backend="torch")
    idx = nsa.select_blocks(cat(q), cat(k_cmp), lse, **SEL, scale=SCALE, cu_seqlens=cu2,
                            backend="torch")
    assert idx[0, :, 0].tolist() == BLOCK_IDX + BLOCK_IDX
    torch.testing.assert_close(o[0, :, 0, 0], torch.tensor(O_CMP + O_CMP, dtype=DT), rtol=0, atol=1e-12)
