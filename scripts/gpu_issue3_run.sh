#!/usr/bin/env bash
# One device call for the kernel work of this session: GPU kernel tests,
# the issue-3 attention bench at 128K (run4) and the
# every-method bench at 128K and 32K. Writes under $OUT/r and packs it into $OUT/r.tgz
# (the device returns at most 8 files).   Usage: OUT=/dir bash scripts/gpu_issue3_run.sh
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
R=$OUT/r
mkdir -p "$R"
timeout 130 python3 -m pytest -q -x tests/kernels/test_kernels.py tests/kernels/test_block_sparse.py \
    tests/kernels/test_dispatch.py -p no:cacheprovider > "$R/tests.log" 2>&1
echo "tests exit $?" >> "$R/tests.log"; tail -3 "$R/tests.log"
ATTN_LENGTHS=131072 ATTN_BATCH=1 SKIP_PREFILL=1 TESTS=tests/kernels/test_dispatch.py TEST_TIMEOUT=60 \
    ATTN_TIMEOUT=150 OUT=$R/run4 bash scripts/gpu_check_and_bench.sh > /dev/null 2>&1
cat "$R/run4/table.txt"
OUT=$R bash scripts/gpu_methods_bench.sh > /dev/null 2>&1
tail -25 "$R/methods/run.log"
cd "$OUT" && tar czf r.tgz r && rm -rf r
