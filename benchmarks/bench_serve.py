"""Serving on one GPU: a chunk after a cached prefix, and whole-model decoding from a CUDA graph.

1. checks (bf16): nsa_extend against the float64 reference (paper heads 64/4 192/128, and G = 1),
   selections compared; a `small` model's decode step replayed from a CUDA graph
   (nsa.graph.DecodeGraph) against the same steps run eagerly, bit for bit, and on paged caches
   sharing one page table against contiguous ones; nsa.hf generate with
   the graph against without, token for token and logits bit for bit.
2. chunk: S new queries after a P-token prefix (nsa_extend, reading the cache in place) against
   those queries inside one training forward of P + S tokens: the marginal cost
   F(P + S) - F(P) of nsa_attention, and its share S / (P + S) of F(P + S).
4. generate: the `small` preset (random weights, bf16), B rows of an L-token prompt: decode
   tokens/s replaying DecodeGraph (and eager, a few steps), against its full-attention twin with
   a static KV cache of the same length read by SDPA (every backend that runs, the fastest
   kept), captured in a CUDA graph the same way.

3. paged: nsa_decode through block tables (64-token pages, shuffled) against the contiguous
   cache holding the same values, paper heads, CUDA-graph replays side by side.

  python benchmarks/bench_serve.py [--chunk 4096 --prefix 61440] [--gen 32:65536 1:8192]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import nsa  # noqa: E402
from nsa import reference  # noqa: E402
from nsa.graph import DecodeGraph  # noqa: E402
from nsa.layer import rotary  # noqa: E402
from nsa.lm.model import PRESETS, LanguageModel  # noqa: E402
from shapes import PAPER, environment, err, graphed, median_ms, nsa_inputs, save, wall_s  # noqa: E402

BF16 = torch.bfloat16


def cache_inputs(lengths, S, HQ, H, dk, dv, cfg=PAPER, seed=0):
    """Random cache-layout inputs of nsa_extend: capacity max(lengths), window tensor S + w - 1."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=BF16)
    B, N = len(lengths), max(lengths)
    Wt, nc = S + min(cfg.window_size - 1, N - S), cfg.num_compressed(N) + 1
    c = dict(k_cmp=r(B, nc, H, dk), v_cmp=r(B, nc, H, dv), k_slc=r(B, N, H, dk), v_slc=r(B, N, H, dv),
             k_win=r(B, Wt, H, dk), v_win=r(B, Wt, H, dv))
    gates = torch.rand(B, S, HQ, 3, generator=g, device="cuda", dtype=BF16)
    return r(B, S, HQ, dk), c, gates, torch.tensor(lengths, dtype=torch.int32, device="cuda")


# ----------------------------------------------------------------------------- checks
def check_extend(HQ, H, dk, dv, lengths=(6000, 3333), S=1500):
    q, c, gates, lens = cache_inputs(list(lengths), S, HQ, H, dk, dv, seed=HQ)
    o, idx = nsa.nsa_extend(q, **c, gates=gates, lengths=lens, config=PAPER, return_block_idx=True)
    o64, idx64 = reference.nsa_extend(q.double(), *(c[k].double() for k in c), gates.double(), lens, config=PAPER)
    e, rounding = err(o, o64), err(o64.to(BF16), o64)
    return dict(heads=f"{HQ}/{H}", dims=f"{dk}/{dv}", lengths=list(lengths), S=S, err_vs_f64=e, bf16_rounding=rounding,
                passed=e <= 3 * rounding, selection_match=float((idx == idx64).all(-1).float().mean()))


def small_lm(attention="nsa", seed=0):
    torch.manual_seed(seed)
    return LanguageModel(PRESETS["small"].replace(attention=attention)).cuda().to(BF16).eval()


@torch.no_grad()
def check_graph(B=3, prompt=3000, steps=40):
    """The same tokens through two identical caches: eager steps against DecodeGraph replays."""
    model = small_lm()
    x = torch.randint(0, 256, (B, prompt + steps), device="cuda")
    caches = [[b.attn.new_cache(B, prompt + steps) for b in model.blocks] for _ in range(2)]
    for cs in caches:
        model(x[:, :prompt], caches=cs)
    eager = [model(x[:, t:t + 1], caches=caches[0])[:, -1].clone() for t in range(prompt, prompt + steps)]
    step = lambda tok: model(tok, caches=caches[1])[:, -1]
    got = [step(x[:, prompt:prompt + 1]).clone()]
    graph = DecodeGraph(step, caches[1], x[:, prompt + 1:prompt + 2])
    got += [graph(x[:, t:t + 1]).clone() for t in range(prompt + 1, prompt + steps)]
    same = all(torch.equal(a, b) for a, b in zip(eager, got))
    return dict(batch=B, prompt=prompt, steps=steps, bitwise_equal=same,
                max_abs_diff=max(float((a.float() - b.float()).abs().max()) for a, b in zip(eager, got)),
                lengths_equal=caches[0][0].lengths == caches[1][0].lengths,
                seqlens_equal=bool(torch.equal(caches[0][-1].seqlens, caches[1][-1].seqlens)))


@torch.no_grad()
def check_paged_graph(B=3, prompt=3000, steps=40, page=64):
    """The same tokens through contiguous caches stepped eagerly and through paged caches whose
    layers share one page table, stepped by DecodeGraph replays (the paged bookkeeping of
    nsa/triton/append.py inside the graph); one sequence is freed and allocated again first, so
    its pages are not the lowest."""
    model = small_lm()
    x = torch.randint(0, 256, (B, prompt + steps), device="cuda")
    flat = [b.attn.new_cache(B, prompt + steps) for b in model.blocks]
    per_seq = -(-(prompt + steps) // page)
    paged, a = [], model.blocks[0].attn
    for b in model.blocks:
        paged.append(nsa.PagedNSACache(B * per_seq + 4, page, B, per_seq, a.num_kv_heads, a.head_dim_qk,
                                       a.head_dim_v, a.config, dtype=BF16, device="cuda", poison=True,
                                       share=paged[0] if paged else None))
    slots = [paged[0].allocate() for _ in range(B)]
    paged[0].free(slots[0])
    assert paged[0].allocate() == slots[0]
    for cs in (flat, paged):
        model(x[:, :prompt], caches=cs)
    eager = [model(x[:, t:t + 1], caches=flat)[:, -1].clone() for t in range(prompt, prompt + steps)]
    step = lambda tok: model(tok, caches=paged)[:, -1]
    got = [step(x[:, prompt:prompt + 1]).clone()]
    graph = DecodeGraph(step, paged, x[:, prompt + 1:prompt + 2])
    got += [graph(x[:, t:t + 1]).clone() for t in range(prompt + 1, prompt + steps)]
    return dict(batch=B, prompt=prompt, steps=steps, page=page, bitwise_equal=all(torch.equal(a, b) for a, b in zip(eager, got)),
                max_abs_diff=max(float((a.float() - b.float()).abs().max()) for a, b in zip(eager, got)),
                argmax_equal=all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(eager, got)),
                nan=any(bool(torch.isnan(b).any()) for b in got),
                seqlens_equal=bool(torch.equal(flat[-1].seqlens, paged[-1].seqlens)))


@torch.no_grad()
def check_hf_graph(B=2, prompt=2000, new=48):
    import nsa.hf as HF
    torch.manual_seed(0)
    cfg = HF.NSALMConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    model = HF.NSALMForCausalLM(cfg).cuda().to(BF16).eval()
    ids = torch.randint(1, 4096, (B, prompt), device="cuda")
    runs = []
    for graph in (False, True):
        cache = HF.NSALMCache(cfg, max_cache_len=prompt + new, cuda_graph=graph)
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, past_key_values=cache,
                             output_logits=True, return_dict_in_generate=True)
        runs.append((out.sequences, torch.stack(out.logits, 1), cache._graph is not None))
    (s0, l0, _), (s1, l1, used) = runs
    return dict(batch=B, prompt=prompt, new=new, graph_used=used, tokens_equal=bool(torch.equal(s0, s1)),
                logits_bitwise_equal=bool(torch.equal(l0, l1)))


# ----------------------------------------------------------------------------- chunk after a prefix
def _extend_ms(P, S, HQ, H, dk, dv):
    q, c, gates, lens = cache_inputs([P + S], S, HQ, H, dk, dv)
    return median_ms(lambda: nsa.nsa_extend(q, **c, gates=gates, lengths=lens, config=PAPER))


def _forward_ms(T, HQ, H, dk, dv):
    t = nsa_inputs(T, HQ, H, dk, dv, PAPER)
    return median_ms(lambda: nsa.nsa_attention(**t, config=PAPER))


@torch.no_grad()
def time_chunk(P, S, HQ=64, H=4, dk=192, dv=128):
    ext = _extend_ms(P, S, HQ, H, dk, dv)
    full = {T: _forward_ms(T, HQ, H, dk, dv) for T in (P, P + S)}
    marginal = full[P + S] - full[P]
    share = full[P + S] * S / (P + S)
    return dict(prefix=P, chunk=S, heads=f"{HQ}/{H}", dims=f"{dk}/{dv}", extend_ms=ext,
                train_fwd_ms={str(k): v for k, v in full.items()}, marginal_ms=marginal, share_ms=share,
                over_marginal=ext / marginal, over_share=ext / share)


# ----------------------------------------------------------------------------- paged decoding
def paged_inputs(c, lengths, page=64, cfg=PAPER, seed=0):
    """The contiguous cache c (decode layout, window ring of the capacity) copied into pages
    of a shuffled pool, with block and window tables."""
    B, N = c["k_slc"].shape[:2]
    MP, d = -(-N // page), cfg.cmp_stride
    g = torch.Generator(device="cuda").manual_seed(seed)
    table = torch.randperm(B * MP, generator=g, device="cuda").view(B, MP).to(torch.int32)
    pools = {}
    for name, per in (("k_slc", page), ("v_slc", page), ("k_cmp", page // d), ("v_cmp", page // d),
                      ("k_win", page), ("v_win", page)):
        x = c[name]
        x = torch.cat([x, x.new_zeros(B, MP * per - x.shape[1], *x.shape[2:])], 1).view(B, MP, per, *x.shape[2:])
        pool = x.new_zeros(B * MP, per, *x.shape[3:])
        pool[table.long()] = x
        pools[name] = pool
    return pools, table


@torch.no_grad()
def time_paged(B, s, HQ=64, H=4, dk=192, dv=128):
    """nsa_decode through block tables against the contiguous cache it was copied from: the
    same values (outputs equal within bf16 rounding, selections equal), medians of CUDA-graph
    replays side by side."""
    g = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda", dtype=BF16)
    nc = PAPER.num_compressed(s) + 1
    c = dict(k_cmp=r(B, nc, H, dk), v_cmp=r(B, nc, H, dv), k_slc=r(B, s, H, dk), v_slc=r(B, s, H, dv),
             k_win=r(B, s, H, dk), v_win=r(B, s, H, dv))      # a ring of the capacity: the same positions as pages
    q, gates = r(B, HQ, dk), torch.rand(B, HQ, 3, generator=g, device="cuda", dtype=BF16)
    lens = torch.full((B,), s, dtype=torch.int32, device="cuda")
    pools, table = paged_inputs(c, lens)
    flat = lambda: nsa.nsa_decode(q, **c, gates=gates, lengths=lens, config=PAPER, return_block_idx=True)
    paged = lambda: nsa.nsa_decode(q, **pools, gates=gates, lengths=lens, config=PAPER, return_block_idx=True,
                                   block_table=table, window_table=table)
    (o1, i1), (o2, i2) = flat(), paged()
    row = dict(batch=B, s=s, selections_equal=bool(torch.equal(i1, i2)), err_paged_vs_contiguous=err(o2, o1))
    for name, fn in (("contiguous", flat), ("paged", paged)):
        replay, _ = graphed(fn)
        row[f"{name}_ms"] = median_ms(replay)
        del replay
    row["paged_over_contiguous"] = row["paged_ms"] / row["contiguous_ms"]
    return row


# ----------------------------------------------------------------------------- whole-model decoding
class FullTwinStep:
    """The full-attention twin's decode step at a fixed cache length L: every layer's K/V in a
    static [B, H, L, d] buffer (random: the timing does not depend on the values), the new
    token's K/V written at slot L - 1, SDPA over all L. Graph-captured like DecodeGraph."""

    def __init__(self, model, B, L, backend):
        self.model, self.backend, self.L = model, backend, L
        a = model.blocks[0].attn
        mk = lambda d: torch.randn(B, a.num_kv_heads, L, d, device="cuda", dtype=BF16)
        self.kv = [(mk(a.head_dim_qk), mk(a.head_dim_v)) for _ in model.blocks]
        self.last = [torch.zeros(B, model.cfg.hidden, device="cuda", dtype=BF16) for _ in model.blocks]
        self.pos = torch.full((B, 1), L - 1, device="cuda")

    def __call__(self, tok):
        x = self.model.embed(tok)
        for blk, (K, V), last in zip(self.model.blocks, self.kv, self.last):
            a, h = blk.attn, blk.norm1(x)
            if blk.shift is not None:
                h, prev = h + blk.shift.to(h.dtype) * last[:, None], h
                last.copy_(prev[:, -1])
            B = h.shape[0]
            q = rotary(a.q_proj(h).view(B, 1, a.num_heads, a.head_dim_qk), self.pos, a.rope_theta)
            k, v = a._kv(a.kv_proj, h)
            K[:, :, -1:] = rotary(k, self.pos, a.rope_theta).transpose(1, 2)
            V[:, :, -1:] = v.transpose(1, 2)
            with sdpa_kernel(self.backend):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, enable_gqa=True)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
            x = x + blk.mlp(blk.norm2(x))
        return F.linear(self.model.norm(x), self.model.embed.weight)[:, -1]


def graph_of(fn, example):
    static = example.clone()
    fn(static)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(static)
    return static, g, out


def _nsa_generate(B, L, new):
    """Prefill, three eager steps, then `new` tokens replayed from DecodeGraph: (row, last token)."""
    model = small_lm()
    prompt = torch.randint(0, 256, (B, L), device="cuda")
    caches = [b.attn.new_cache(B, L + new + 4) for b in model.blocks]
    prefill_s = wall_s(lambda: model(prompt, caches=caches), 1)
    step = lambda tok: model(tok, caches=caches)[:, -1]
    tok = step(prompt[:, -1:]).argmax(-1, keepdim=True)           # the first step, eager: kernels compiled
    eager_s = wall_s(lambda: step(tok), 3)
    graph = DecodeGraph(step, caches, tok)

    def decode():
        nonlocal tok
        for _ in range(new):
            tok = graph(tok).argmax(-1, keepdim=True)
    graph_s = wall_s(decode, 1) / new
    return dict(prefill_s=prefill_s, eager_step_ms=eager_s * 1e3, graph_step_ms=graph_s * 1e3,
                tok_per_s=B / graph_s, eager_tok_per_s=B / eager_s), tok


def _full_step_ms(twin, B, L, new, backend, tok):
    fstep = FullTwinStep(twin, B, L + new, backend)
    static, g, out = graph_of(fstep, tok)

    def run():
        for _ in range(new):
            static.copy_(out.argmax(-1, keepdim=True))
            g.replay()
    return wall_s(run, 1) / new * 1e3


@torch.no_grad()
def time_generate(B, L, new=32):
    nsa_row, tok = _nsa_generate(B, L, new)
    torch.cuda.empty_cache()
    twin = small_lm("full")
    best = {}
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            best[be.name] = _full_step_ms(twin, B, L, new, be, tok)
        except RuntimeError as e:
            best[be.name] = f"skipped: {str(e).splitlines()[0][:120]}"
        torch.cuda.empty_cache()
    times = {k: v for k, v in best.items() if isinstance(v, float)}
    name = min(times, key=times.get)
    full_row = dict(backend=name, graph_step_ms=times[name], tok_per_s=B / times[name] * 1e3, all=best)
    return dict(batch=B, prompt=L, new=new, nsa=nsa_row, full=full_row, speedup=nsa_row["tok_per_s"] / full_row["tok_per_s"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--prefix", type=int, default=61440)
    ap.add_argument("--gen", nargs="+", default=["32:65536", "1:8192", "1:65536"], help="BATCH:PROMPT pairs")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    out = dict(env=environment(), config=PAPER.__dict__)
    if not args.skip_check:
        out["check_extend"] = [check_extend(64, 4, 192, 128), check_extend(8, 8, 128, 128)]
        out["check_graph"] = check_graph()
        out["check_paged_graph"] = check_paged_graph()
        out["check_hf_graph"] = check_hf_graph()
        for k in ("check_extend", "check_graph", "check_paged_graph", "check_hf_graph"):
            print(k, out[k], flush=True)
    out["chunk"] = time_chunk(args.prefix, args.chunk)
    print("chunk", out["chunk"], flush=True)
    out["paged"] = [time_paged(B, s) for B, s in ((32, 65536), (1, 65536), (32, 8192))]
    for r in out["paged"]:
        print("paged", r, flush=True)
    out["generate"] = []
    for spec in args.gen:
        B, L = (int(x) for x in spec.split(":"))
        out["generate"].append(time_generate(B, L))
        print("generate", out["generate"][-1], flush=True)
    save("serve", out)
    c = out["chunk"]
    print(f"\nchunk {c['chunk']} after {c['prefix']}: extend {c['extend_ms']:.2f} ms, marginal training forward "
          f"{c['marginal_ms']:.2f} ms ({c['over_marginal']:.2f}x), share {c['share_ms']:.2f} ms ({c['over_share']:.2f}x)")
    print("| batch | s | contiguous ms | paged ms | paged / contiguous | selections equal |")
    print("|---|---|---|---|---|---|")
    for r in out["paged"]:
        print(f"| {r['batch']} | {r['s'] // 1024}k | {r['contiguous_ms']:.4f} | {r['paged_ms']:.4f} | "
              f"{r['paged_over_contiguous']:.3f} | {r['selections_equal']} |")
    print("| batch | prompt | NSA tok/s (graph) | NSA tok/s (eager) | full tok/s (graph) | NSA / full |")
    print("|---|---|---|---|---|---|")
    for r in out["generate"]:
        print(f"| {r['batch']} | {r['prompt'] // 1024}k | {r['nsa']['tok_per_s']:.0f} | {r['nsa']['eager_tok_per_s']:.0f} | "
              f"{r['full']['tok_per_s']:.0f} [{r['full']['backend']}] | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
