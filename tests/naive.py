"""An independent, per-query transcription of docs/semantics.md, in float64, for tiny inputs only.

Written from that text with Python loops over positions, sharing no code with nsa.
"""
import math

import torch


def _softmax_attend(qv, keys, values, scale):
    """qv [dk]; keys [S, dk]; values [S, dv] -> (o [dv], lse, p [S])."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=qv.dtype), -math.inf, qv.new_zeros(0)
    logits = (keys @ qv) * scale
    lse = torch.logsumexp(logits, 0)
    p = torch.exp(logits - lse)
    return p @ values, float(lse), p


def naive_nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, l, d, lp, n, init, local, w,
              scale=None):
    """One sequence: q [T,HQ,dk], k_cmp [Tc,H,dk], ... gates [T,HQ,3]. Returns a dict of
    o_cmp, lse, block_idx [T,H,n], o_slc, o_win, o (all float64)."""
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = (
        x.double() for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates))
    T, HQ, dk = q.shape
    H, dv, Tc = k_slc.shape[1], v_slc.shape[-1], k_cmp.shape[0]
    G = HQ // H
    scale = dk ** -0.5 if scale is None else scale
    nb = -(-T // lp)
    o_cmp = torch.zeros(T, HQ, dv, dtype=torch.float64)
    lse = torch.full((T, HQ), -math.inf, dtype=torch.float64)
    score = torch.zeros(T, H, max(nb, 1), dtype=torch.float64)
    for t in range(T):
        vis = [i for i in range(Tc) if i * d + l - 1 <= t]
        for h in range(HQ):
            hk = h // G
            o, lz, p = _softmax_attend(q[t, h], k_cmp[vis, hk], v_cmp[vis, hk], scale)
            o_cmp[t, h], lse[t, h] = o, lz
            for pi, i in zip(p.tolist(), vis):
                for j in range(nb):
                    ov = max(0, min(i * d + l, (j + 1) * lp) - max(i * d, j * lp))
                    score[t, hk, j] += pi * ov / d
    block_idx = torch.full((T, H, n), -1, dtype=torch.int32)
    for t in range(T):
        cands = list(range(t // lp + 1))
        forced = [j for j in cands if j < init or j >= len(cands) - local]
        for hk in range(H):
            rest = sorted((j for j in cands if j not in forced), key=lambda j: (-float(score[t, hk, j]), j))
            chosen = sorted(forced + rest[: n - len(forced)])
            block_idx[t, hk, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    o_slc = torch.zeros(T, HQ, dv, dtype=torch.float64)
    o_win = torch.zeros(T, HQ, dv, dtype=torch.float64)
    for t in range(T):
        for h in range(HQ):
            hk = h // G
            keys = [s for s in range(t + 1) if s // lp in block_idx[t, hk].tolist()]
            o_slc[t, h] = _softmax_attend(q[t, h], k_slc[keys, hk], v_slc[keys, hk], scale)[0]
            keys = list(range(max(0, t - w + 1), t + 1))
            o_win[t, h] = _softmax_attend(q[t, h], k_win[keys, hk], v_win[keys, hk], scale)[0]
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    return dict(o_cmp=o_cmp, lse=lse, block_idx=block_idx, o_slc=o_slc, o_win=o_win, o=o,
                score=score)
