"""Where the time of one chunk goes (CUDA only).

SmolLM2 shapes with random bf16 weights; an 8K chunk after a 64K cached prefix
and a whole 16K prompt, dense and token sparse on every layer: CUDA-event
times, kernel launches and host syncs of the chunk, the profiler's top host
ops and a cProfile of one chunk.

    OUT=$OUT python3 scripts/profile_chunk.py     # writes $OUT/host_profile.json
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tokensparse
from tokensparse.integrations.chunk_sdpa import chunk_sdpa

SPECS = ("dense", "token_sparse:keep_tokens=8192,sparse_layers=0-29",
         "token_sparse:keep_ratio=0.5,sparse_layers=0-29", "token_sparse:coverage=0.02,sparse_layers=0-29")
PREFIX, CHUNK = 65536, 8192
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[reps // 2]


def profile_spec(model, ids: torch.Tensor) -> dict:
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :PREFIX], past_key_values=cache, use_cache=True, logits_to_keep=1)

    def chunk():
        # A fresh cache over the same prefix tensors, so every call sees the same 64K prefix.
        fresh = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            fresh.update(layer.keys, layer.values, i)
        model(input_ids=ids[:, PREFIX:], past_key_values=fresh, use_cache=True, logits_to_keep=1)

    def whole_16k():
        model(input_ids=ids[:, :16384], use_cache=True, logits_to_keep=1)

    row = {"chunk8k_after64k_ms": median_ms(chunk), "whole16k_ms": median_ms(whole_16k)}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        chunk()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    row["syncs"] = {e.key: e.count for e in averages
                    if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::_local_scalar_dense"}
    row["launches"] = sum(e.count for e in averages if e.key in LAUNCHES)
    row["top_cpu"] = averages.table(sort_by="self_cpu_time_total", row_limit=30)
    profiler = cProfile.Profile()
    profiler.enable()
    chunk()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    row["cprofile"] = text.getvalue()
    return row


def main() -> None:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=131072, rope_theta=100000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, config.vocab_size, (1, PREFIX + CHUNK), device="cuda")
    report = {}
    with torch.inference_mode(), chunk_sdpa(model):
        for spec in SPECS:
            if spec != "dense":
                tokensparse.enable(model, spec)
            report[spec] = profile_spec(model, ids)
            print(spec, {k: v for k, v in report[spec].items() if k not in ("top_cpu", "cprofile")}, flush=True)
            if spec != "dense":
                tokensparse.disable(model)
    with open(os.path.join(os.environ.get("OUT", "runs"), "host_profile.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
