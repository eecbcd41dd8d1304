#!/usr/bin/env bash
# Kernel tests at large shapes, then the attention and prefill benchmarks, on one GPU.
# Run from the repository root; writes under $OUT (default runs/bench/run, ignored by git):
#   run.log, attention.json/.png, prefill.json/.png.  Prints the table last.
# Device command used for the committed results:
#   bash scripts/gpu_check_and_bench.sh
# Environment knobs: TESTS (pytest targets), ATTN_LENGTHS, ATTN_BATCH, ATTN_MAX_TOKENS,
# ATTN_BUDGET_MS, PREFILL_LENGTHS, SKIP_PREFILL=1, *_TIMEOUT (seconds).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-runs/bench/run}
mkdir -p "$OUT"
LOG="$OUT/run.log"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "== kernel tests (large shapes on the GPU)"
  timeout ${TEST_TIMEOUT:-150} $PY -m pytest -q -x ${TESTS:-tests/kernels/test_kernels.py tests/kernels/test_dispatch.py} -p no:cacheprovider --durations=5
  echo "tests exit: $?"
  echo "== bench attention"
  timeout ${ATTN_TIMEOUT:-220} $PY -m tokensparse.cli bench attention \
      --lengths ${ATTN_LENGTHS:-8192,16384,32768,65536,131072} --batch ${ATTN_BATCH:-1,4} --max-tokens ${ATTN_MAX_TOKENS:-262144} \
      --budget-ms ${ATTN_BUDGET_MS:-300} --out "$OUT/attention.json"
  echo "attention exit: $?"
  echo "== bench prefill"
  [ -n "$SKIP_PREFILL" ] || timeout ${PREFILL_TIMEOUT:-170} $PY -m tokensparse.cli bench prefill \
      --lengths ${PREFILL_LENGTHS:-8192,32768,131072} --keep-ratios 0.25 --out "$OUT/prefill.json"
  echo "prefill exit: $?"
} 2>&1 | tee "$LOG"
echo "== table"
$PY scripts/gpu_report.py "$OUT/attention.json" "$OUT/prefill.json" 2>&1 | tee "$OUT/table.txt"
