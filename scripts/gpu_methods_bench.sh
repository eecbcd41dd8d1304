#!/usr/bin/env bash
# Issue 6, item 3: one attention layer at Llama-3.1-8B shapes on the H200, every method side
# by side in one run (dense cuDNN and flash, FlexPrefill, Token Sparse, Token Sparse +
# FlexPrefill) on inputs with the attention structure measured on the embedded model
# ("realistic": tokensparse.bench.structure.synthetic_qkv), at 32K and 128K, batch 1.
# Token sparse at fixed shares 50% / 25% and at coverage 0.005 / 0.02 / 0.05, each alone and
# composed with FlexPrefill. The JSON also gives the attention-time axis of the accuracy vs
# attention time plot (`tokensparse report --attention-times`).
#
# Usage (repository root):  OUT=/some/dir bash scripts/gpu_methods_bench.sh   (about 1.5 min)
#   DROPPED_ROWS=local SUFFIX=_local   the same with sink + local attention in dropped rows
set -euo pipefail
OUT=${OUT:-results}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT/methods"
python3 -m tokensparse.cli bench attention --lengths "${LENGTHS:-131072,32768}" --batch 1 \
    --inputs realistic --methods dense,token_sparse,flexprefill,token_sparse+flexprefill \
    --keep-ratios 0.5,0.25 --coverage 0.005,0.02,0.05 --budget-ms "${BUDGET_MS:-300}" \
    --dropped-rows "${DROPPED_ROWS:-zero}" \
    --out "$OUT/methods/attention${SUFFIX:-}.json" 2>&1 | tee "$OUT/methods/run${SUFFIX:-}.log"
