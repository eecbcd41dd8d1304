#!/usr/bin/env bash
# One device call for the kernel work of this session: GPU kernel and dispatch tests,
# then the issue-3 attention bench at 128K, batch 1 (run5: lone calls and launches
# queued ahead). Writes under $OUT/r and packs it into $OUT/r.tgz (the device returns
# at most 8 files).   Usage: OUT=/dir bash scripts/gpu_issue3_run.sh
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
R=$OUT/r
mkdir -p "$R"
timeout 280 python3 -m pytest -q -x tests/kernels/test_kernels.py tests/kernels/test_dispatch.py \
    -p no:cacheprovider > "$R/tests.log" 2>&1
echo "tests exit $?" >> "$R/tests.log"; tail -3 "$R/tests.log"
ATTN_LENGTHS=131072 ATTN_BATCH=1 SKIP_PREFILL=1 TESTS=tests/kernels/test_dispatch.py TEST_TIMEOUT=90 \
    ATTN_TIMEOUT=240 OUT=$R/run5 bash scripts/gpu_check_and_bench.sh > /dev/null 2>&1
cat "$R/run5/table.txt"
cd "$OUT" && tar czf r.tgz r && rm -rf r
