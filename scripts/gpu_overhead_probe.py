"""Where the token-sparse layer's time goes beyond cuDNN on the kept tokens (H200 probe).

For keep 0.5 and 0.25 at 128K, Llama-3.1-8B shapes: SDPA (cuDNN) on the compressed
tensors of all heads at once against the same work split into chunks of n heads, and
a torch.profiler trace of one token_sparse_attention call (GPU kernel times and the
idle gaps between them). Writes probe.json under the output directory.

Usage: PYTHONPATH=src python3 scripts/gpu_overhead_probe.py OUTDIR
"""
import json
import sys

import torch

from tokensparse import TokenSparseConfig, token_sparse_attention
from tokensparse.bench.attention import make_inputs
from tokensparse.bench.timing import time_fn
from tokensparse.kernels import sdpa
from tokensparse.kernels.gather import gather_kept
from tokensparse.selection import select_tokens

out_dir = sys.argv[1]
dev = torch.device("cuda")
L = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
q, k, v = make_inputs("realistic", 1, 32, 8, L, 128, torch.bfloat16, dev)
res = {}
for keep in (0.5, 0.25):
    cfg = TokenSparseConfig(budget="keep_ratio", keep_ratio=keep, window=128, min_tokens=1024)
    sel = select_tokens(q, k, cfg)
    qc, kc, vc = gather_kept(q, k, v, sel.kept_idx)
    r = {}
    for n in (1, 2, 3, 4, 6, 8, 16, 32):
        def chunked():
            for s in range(0, 32, n):
                sdpa.sdpa_with("cudnn", qc[:, s:s + n], kc[:, s:s + n], vc[:, s:s + n], is_causal=True)
        r[f"sdpa_chunks_of_{n}"] = time_fn(chunked, dev, warmup=1, min_reps=3, budget_ms=300).median_ms
    del qc, kc, vc
    from tokensparse.bench.timing import peak_memory
    from tokensparse.kernels.pipeline import attend_kept, default_chunk_budget
    budget = default_chunk_budget(q)
    for streams in (1, 2, 3):
        for factor in (1.0, 1.25):
            fn = lambda: attend_kept(q, k, v, sel.kept_idx, chunk_budget=int(budget * factor), num_streams=streams)
            r[f"attend_kept_streams{streams}_budget{factor}"] = {
                "ms": time_fn(fn, dev, warmup=1, min_reps=3, budget_ms=300).median_ms,
                "extra_bytes": peak_memory(fn, dev)["extra_bytes"],
            }
    r["dense_extra_bytes"] = peak_memory(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), dev)["extra_bytes"]
    r["total"] = time_fn(lambda: token_sparse_attention(q, k, v, config=cfg), dev, warmup=1, min_reps=3,
                         budget_ms=300).median_ms
    from torch.profiler import ProfilerActivity, profile
    token_sparse_attention(q, k, v, config=cfg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        token_sparse_attention(q, k, v, config=cfg)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.time_range.start)
    kernels = []
    prev_end = None
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        gap = 0.0 if prev_end is None else max(0.0, start - prev_end)
        kernels.append({"name": e.name[:80], "us": end - start, "gap_before_us": gap})
        prev_end = end if prev_end is None else max(prev_end, end)
    r["kernels"] = kernels
    r["gpu_busy_us"] = sum(x["us"] for x in kernels)
    r["gaps_us"] = sum(x["gap_before_us"] for x in kernels)
    r["span_us"] = (events[-1].time_range.end - events[0].time_range.start) if events else 0
    res[str(keep)] = r
    print(keep, {a: b for a, b in r.items() if a != "kernels"}, flush=True)
    for x in kernels[:80]:
        print(f"  {x['us']:9.1f} gap {x['gap_before_us']:8.1f}  {x['name']}")
json.dump(res, open(f"{out_dir}/probe.json", "w"), indent=1)
