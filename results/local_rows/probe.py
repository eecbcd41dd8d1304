import sys, types, json, os, torch
pkg = types.ModuleType("tokensparse"); pkg.__path__ = ["src/tokensparse"]; sys.modules["tokensparse"] = pkg
from tokensparse.config import TokenSparseConfig
from tokensparse.selection import select_tokens
from tokensparse.kernels import pipeline, block_sparse, sdpa
from tokensparse.kernels.local_rows import fill_dropped_rows, fill_dropped_rows_torch, kept_row_mask
from tokensparse.bench.timing import time_fn, peak_memory
dev = torch.device("cuda"); R = {}
def T(fn, **kw): return round(time_fn(fn, dev, warmup=2, min_reps=5, budget_ms=kw.pop("b", 300), **kw).median_ms, 4)
def P(fn): return peak_memory(fn, dev)["peak_bytes"]
def qkv(B, L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, h, L, 128, generator=g, device="cuda").to(torch.bfloat16) for h in (32, 8, 8)]
def legacy(out, q, k, v, idx):
    L = q.shape[2]; bi, bc = sink_pattern(L)
    loc = block_sparse.block_sparse_attention(q, k, v, bi.expand(1, 32, -1, -1), bc.expand(1, 32, -1).contiguous(), 64)
    return torch.where(kept_row_mask(idx, L)[..., :L, None], out, loc)
def sink_pattern(L):
    nb = block_sparse.num_blocks(L, 64); m = torch.zeros(nb, nb, dtype=torch.bool, device="cuda"); b = torch.arange(nb, device="cuda")
    m[:, 0] = True; m[b, b] = True; m[b[1:], b[1:] - 1] = True
    return block_sparse.lists_from_block_mask(m[None, None])
# correctness, left padding, blhd
L = 32768; q, k, v = qkv(2, L, 1); pm = torch.ones(2, L, dtype=torch.bool, device="cuda"); pm[1, :1000] = False
s = select_tokens(q, k, TokenSparseConfig(budget="keep_ratio", keep_ratio=0.5), key_padding_mask=pm)
base = torch.randn(2, L, 32, 128, device="cuda", dtype=torch.bfloat16)
got = fill_dropped_rows(base.clone().transpose(1, 2), q, k, v, s.kept_idx, 64, seq_lens=s.seq_lens)
ref = fill_dropped_rows_torch(base.clone().transpose(1, 2), q, k, v, s.kept_idx, 64, seq_lens=s.seq_lens)
kept = kept_row_mask(s.kept_idx, L)[..., :L]
R["check"] = dict(err=float((got.double() - ref.double()).norm() / ref.double().norm()), kept_same=bool(torch.equal(got[kept], base.transpose(1, 2)[kept])), nan=bool(got.isnan().any()))
print(R["check"], flush=True); del q, k, v, got, ref, base
tiles = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2), (256, 64, 8, 2), (64, 32, 4, 2), (128, 128, 8, 2)]
for L in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    q, k, v = qkv(1, L)
    dense = lambda: sdpa.sdpa_with("cudnn", q, k, v, is_causal=True, enable_gqa=True)
    r = R[L] = dict(dense_ms=T(dense), dense_peak=P(dense))
    for ratio in (0.5, 0.25):
        idx = select_tokens(q, k, TokenSparseConfig(budget="keep_ratio", keep_ratio=ratio)).kept_idx
        zero = lambda: pipeline.attend_kept(q, k, v, idx)
        local = lambda: fill_dropped_rows(zero(), q, k, v, idx, 64)
        old = lambda: legacy(zero(), q, k, v, idx)
        e = r[ratio] = dict(zero_ms=T(zero), local_ms=T(local), legacy_ms=T(old), zero_q=T(zero, queued=True), local_q=T(local, queued=True),
                            zero_peak=P(zero) / r["dense_peak"], local_peak=P(local) / r["dense_peak"], legacy_peak=P(old) / r["dense_peak"])
        out = zero()
        e["fill"] = {str(t): T(lambda: fill_dropped_rows(out, q, k, v, idx, 64, tiles=t)) for t in tiles}
        e["legacy_fill"] = T(lambda: legacy(out, q, k, v, idx)); e["all_rows"] = T(lambda: fill_dropped_rows(out, q, k, v, None, 64))
        e["mask"] = T(lambda: kept_row_mask(idx, L)); del out
        print(L, ratio, json.dumps(e), flush=True)
    del q, k, v; torch.cuda.empty_cache()
json.dump(R, open(os.environ["OUT"] + "/probe.json", "w"), indent=1, default=str)
