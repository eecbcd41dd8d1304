"""Chunk plans of attend_kept at 128K (H200 probe): uniform chunks against small first and last chunks.

Llama-3.1-8B shapes, realistic inputs, fixed kept shares. For each plan, the whole
token_sparse_attention call and cuDNN on the kept tokens, as lone calls and with
launches queued ahead (GPU time alone), three interleaved rounds so that the spread
between rounds shows the noise. Writes chunk_probe.json under the output directory.

Usage: PYTHONPATH=src python3 scripts/gpu_chunk_probe.py OUTDIR
"""
import json
import statistics
import sys

import torch

from tokensparse import TokenSparseConfig, token_sparse_attention
from tokensparse.bench.attention import make_inputs
from tokensparse.bench.timing import time_fn
from tokensparse.kernels import pipeline, sdpa
from tokensparse.kernels.gather import gather_kept
from tokensparse.selection import select_tokens

out_dir = sys.argv[1]
dev = torch.device("cuda")
L = 131072
q, k, v = make_inputs("realistic", 1, 32, 8, L, 128, torch.bfloat16, dev)
timing = dict(warmup=2, min_reps=7, budget_ms=300)
edge_plan = pipeline.chunk_sizes


def uniform_plan(num_heads, step):
    return [min(step, num_heads - s) for s in range(0, num_heads, step)]


res = {"length": L, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
for keep in (0.5, 0.25, 0.1):
    cfg = TokenSparseConfig(budget="keep_ratio", keep_ratio=keep, window=128, min_tokens=1024)
    sel = select_tokens(q, k, cfg)
    qc, kc, vc = gather_kept(q, k, v, sel.kept_idx)
    rounds = []
    for _ in range(3):
        r = {}
        for mode in ("lone", "queued"):
            r[f"attend_{mode}"] = time_fn(lambda: sdpa.sdpa_with("cudnn", qc, kc, vc, is_causal=True), dev,
                                          queued=mode == "queued", **timing).median_ms
            for name, plan in (("uniform", uniform_plan), ("edge", edge_plan)):
                pipeline.chunk_sizes = plan
                r[f"{name}_{mode}"] = time_fn(lambda: token_sparse_attention(q, k, v, config=cfg), dev,
                                              queued=mode == "queued", **timing).median_ms
            pipeline.chunk_sizes = edge_plan
        rounds.append(r)
    del qc, kc, vc
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    for mode in ("lone", "queued"):
        for name in ("uniform", "edge"):
            summary[f"ratio_{name}_{mode}"] = summary[f"{name}_{mode}"] / summary[f"attend_{mode}"]
            summary[f"overhead_{name}_{mode}"] = summary[f"{name}_{mode}"] - summary[f"attend_{mode}"]
    res[str(keep)] = {"rounds": rounds, "median": summary}
    print(keep, json.dumps({a: round(b, 3) for a, b in summary.items()}), flush=True)
json.dump(res, open(f"{out_dir}/chunk_probe.json", "w"), indent=1)
