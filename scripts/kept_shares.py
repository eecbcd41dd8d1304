"""Kept share per sparse layer of one 8K needle prompt on the embedded SmolLM2.

One forward pass per budget setting (no generation), recorded with
``enable(..., record=True)``; the sparse layers come from the shipped profile.
Writes results/profile/kept_shares_8k.json and prints a table.

    python scripts/kept_shares.py [--length 8000] [--out results/profile/kept_shares_8k.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tokensparse
from tokensparse import TokenSparseConfig, models
from tokensparse.eval.niah import build_needle_prompt
from tokensparse.report import format_selection_report, summarize_selection

SETTINGS = {
    "coverage_0.005": dict(budget="coverage", coverage=0.005),
    "coverage_0.02": dict(budget="coverage", coverage=0.02),
    "head_coverage_0.005": dict(budget="head_coverage", coverage=0.005),
    "keep_ratio_0.5": dict(budget="keep_ratio", keep_ratio=0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--out", default="results/profile/kept_shares_8k.json")
    args = parser.parse_args()

    loaded = models.load(args.model)
    prompt = build_needle_prompt(loaded.tokenizer, args.length, args.depth)
    ids = prompt.input_ids.to(loaded.device)
    print(f"prompt: {prompt.num_tokens} tokens, context {loaded.max_context}", flush=True)

    with torch.no_grad():
        start = time.perf_counter()
        dense_logits = loaded.model(input_ids=ids, use_cache=False).logits[0, -1].float()
    dense_s = time.perf_counter() - start
    dense_top = int(dense_logits.argmax())
    print(f"dense: {dense_s:.1f} s, next token {loaded.tokenizer.decode([dense_top])!r}", flush=True)

    results = {}
    for name, settings in SETTINGS.items():
        config = TokenSparseConfig(**settings)
        tokensparse.enable(loaded.model, config, record=True)
        with torch.no_grad():
            start = time.perf_counter()
            logits = loaded.model(input_ids=ids, use_cache=False).logits[0, -1].float()
        seconds = time.perf_counter() - start
        prefill = tokensparse.selection_report(loaded.model, clear=True)[-1]
        tokensparse.disable(loaded.model)
        rows = summarize_selection(prefill)
        print(f"\n{name}: {seconds:.1f} s", flush=True)
        print(format_selection_report(prefill), flush=True)
        results[name] = {
            "config": config.to_dict(),
            "seconds": round(seconds, 2),
            "next_token_same_as_dense": int(logits.argmax()) == dense_top,
            "max_abs_logit_diff": float((logits - dense_logits).abs().max()),
            "layers": {
                str(r.layer): {
                    "kept_mean": r.kept_mean,
                    "kept_min": r.kept_min,
                    "kept_max": r.kept_max,
                    "dropped_max": r.dropped_max,
                    "dense": r.dense,
                }
                for r in rows
            },
            "kept_mean_all_layers": sum(r.kept_mean for r in rows) / max(len(rows), 1),
        }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model,
        "prompt_tokens": prompt.num_tokens,
        "needle_depth": args.depth,
        "dense_seconds": round(dense_s, 2),
        "sparse_layers": sorted(int(k) for k in next(iter(results.values()))["layers"]),
        "torch": torch.__version__,
        "tokensparse": tokensparse.__version__,
        "settings": results,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
