#!/usr/bin/env bash
# H200 recipe of the method registry / whole-model prefill work, in stages that each fit one
# device call (10 min). Every stage writes under $OUT/<stage>/ (default runs/gpu) and logs.
#
#   OUT=$OUT bash scripts/gpu_session.sh kernels    GPU tests, one layer at 128K (every method side by
#                                                   side, Llama-3.1-8B shapes), one layer's fixed cost
#                                                   at the embedded model's shapes (16K, 64K)
#   OUT=$OUT bash scripts/gpu_session.sh prefill    time to first token: the embedded model (real weights,
#                                                   YaRN x16, 4K-128K) and Llama-3.1-8B (random weights)
#   OUT=$OUT bash scripts/gpu_session.sh ruler      RULER 4K/8K on the embedded model, $EVAL_METHODS
#   OUT=$OUT bash scripts/gpu_session.sh niah       NIAH 1K-8K on the embedded model, $EVAL_METHODS
#   OUT=$OUT bash scripts/gpu_session.sh chunked    chunked prefill: the embedded model at 32K-128K in 8K
#                                                   chunks (YaRN x16) and at 1M in 16K chunks (YaRN x128),
#                                                   chunked dense vs token sparse with a fixed key budget
#   OUT=$OUT bash scripts/gpu_session.sh chunked_ruler   RULER 4K/8K on the embedded model, whole prompt vs
#   OUT=$OUT bash scripts/gpu_session.sh chunked_niah    1K chunks ($CHUNK_METHODS); NIAH 1K-8K likewise
#   OUT=$OUT bash scripts/gpu_session.sh tiers      time to first token of the tiered plans (coverage 0.02 on
#                                                   the safe layers, a milder token sparse on the others) beside
#                                                   dense, the modes taking turns over 2 rounds, 4K-128K
#   OUT=$OUT bash scripts/gpu_session.sh tiers_ruler     RULER 4K/8K and NIAH 1K-8K of the tiered plans
#   OUT=$OUT bash scripts/gpu_session.sh tiers_niah
#
# TOKENSPARSE_GGUF: path of SmolLM2-135M-Instruct.Q4_1.gguf (prefill, ruler, niah).
set -uo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
STAGE=${1:?stage: kernels, prefill, ruler, niah, chunked, chunked_ruler, chunked_niah, tiers, tiers_ruler or tiers_niah}
PY=${PYTHON:-python3}
GGUF=${TOKENSPARSE_GGUF:-smollm2}
mkdir -p "$OUT/$STAGE"
LOG="$OUT/$STAGE/run.log"
# Token sparse on the layers the sensitivity profile finds safe (KL <= 1e-3 on the embedded
# model), a block-sparse method on the other layers; local rows.
SAFE=${SAFE:-3-6;9-13;15-16;18-29}
REC_FP="token_sparse+flexprefill:coverage=0.02,dropped_rows=local,sparse_layers=$SAFE"
REC_XA="token_sparse+xattention:coverage=0.02,dropped_rows=local,sparse_layers=$SAFE"
SAFE_ONLY="token_sparse:coverage=0.02,dropped_rows=local,sparse_layers=$SAFE"
ALL_LAYERS="token_sparse:coverage=0.02,dropped_rows=local,sparse_layers=0-29"
# Tiers: the safe layers as above, a milder token sparse on the 7 others (0-2, 7, 8, 14, 17).
TIER_HALF="$SAFE_ONLY | token_sparse:keep_ratio=0.5,dropped_rows=local"
TIER_3Q="$SAFE_ONLY | token_sparse:keep_ratio=0.75,dropped_rows=local"
TIER_COV="$SAFE_ONLY | token_sparse:coverage=0.005,dropped_rows=local"
TIER_METHODS=${TIER_METHODS:-"$SAFE_ONLY,$TIER_HALF,$TIER_3Q,$TIER_COV"}
# Chunks take token sparse with zero rows: the paper's setting and a fixed key budget per chunk.
CHUNK_METHODS=${CHUNK_METHODS:-"token_sparse,token_sparse:keep_tokens=2048"}
# The accuracy runs: RULER 4K/8K (11 synthetic tasks x 10 samples), NIAH 1K-8K x 10 depths.
RULER_ARGS=(--model "$GGUF" --out "$OUT/eval" --tasks synthetic --lengths 4096,8192 --samples 10 --batch-size 128
            --no-report --no-progress)
NIAH_ARGS=(--model "$GGUF" --out "$OUT/eval" --lengths 1024,2048,3072,4096,5120,6144,7168,8192 --depths 10
           --haystack essay --batch-size 128 --no-report --no-progress)
EVAL_METHODS=${EVAL_METHODS:-"dense,flexprefill,xattention,token_sparse+xattention:keep_ratio=0.5,dropped_rows=local,$ALL_LAYERS,$REC_FP,$REC_XA"}

{
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'transformers', transformers.__version__)"
case "$STAGE" in
kernels)
    timeout 150 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider
    timeout 300 $PY -m tokensparse.cli bench attention --lengths 131072 --batch 1 --inputs realistic --budget-ms 300 \
        --methods "dense,token_sparse:keep_ratio=0.5,token_sparse:keep_ratio=0.5,dropped_rows=local,token_sparse:keep_ratio=0.25,token_sparse:keep_ratio=0.25,dropped_rows=local,flexprefill,xattention,token_sparse+flexprefill:keep_ratio=0.5,dropped_rows=local,token_sparse+xattention:keep_ratio=0.5,dropped_rows=local,token_sparse+xattention:coverage=0.005,dropped_rows=local" \
        --out "$OUT/kernels/attention.json"
    timeout 120 $PY -m tokensparse.cli bench overhead --lengths 16384,65536 \
        --methods "token_sparse:keep_ratio=0.5,token_sparse:keep_ratio=0.5,dropped_rows=local,token_sparse:coverage=0.02,dropped_rows=local,flexprefill,xattention,token_sparse+flexprefill:coverage=0.02,dropped_rows=local" \
        --out "$OUT/kernels/overhead.json"
    ;;
prefill)
    timeout 360 $PY -m tokensparse.cli bench prefill --model "$GGUF" --rope-scaling 16 \
        --lengths 4096,8192,16384,32768,65536,131072 --min-lengths "${GATES:-0,auto}" --budget-ms "${BUDGET_MS:-1}" \
        --methods "token_sparse,$ALL_LAYERS,$SAFE_ONLY,$REC_FP,$REC_XA" --out "$OUT/prefill/smollm2.json"
    timeout 190 $PY -m tokensparse.cli bench prefill --model llama-3.1-8b-random --lengths 32768,131072 \
        --methods "token_sparse:keep_ratio=0.25,sparse_layers=2-31,token_sparse:keep_ratio=0.25,sparse_layers=2-31,dropped_rows=local" \
        --out "$OUT/prefill/llama8b.json"
    ;;
ruler)
    timeout 560 $PY -m tokensparse.cli eval ruler "${RULER_ARGS[@]}" --methods "$EVAL_METHODS"
    ;;
niah)
    timeout 400 $PY -m tokensparse.cli eval niah "${NIAH_ARGS[@]}" --methods "$EVAL_METHODS"
    ;;
chunked)
    timeout 100 $PY -m pytest -q -m gpu tests/gpu/test_gpu_chunk.py -p no:cacheprovider
    KEEP="token_sparse:keep_tokens=8192"
    timeout 300 $PY -m tokensparse.cli bench prefill --model "$GGUF" --rope-scaling 16 --chunk-size 8192 \
        --lengths 32768,65536,131072 --reps 3 \
        --methods "$KEEP,sparse_layers=2-29,$KEEP,sparse_layers=$SAFE,$KEEP,sparse_layers=0-29,token_sparse:keep_tokens=4096,sparse_layers=2-29" \
        --out "$OUT/chunked/smollm2_128k.json"
    # 1M: one timed run each (chunked dense takes minutes); the 128K row first warms every kernel.
    timeout 330 $PY -m tokensparse.cli bench prefill --model "$GGUF" --rope-scaling 128 --chunk-size 16384 \
        --lengths 131072,1048576 --warmup 0 --reps 1 \
        --methods "$KEEP,sparse_layers=2-29,$KEEP,sparse_layers=0-29" --out "$OUT/chunked/smollm2_1m.json"
    ;;
chunked_ruler)
    timeout 300 $PY -m tokensparse.cli eval ruler "${RULER_ARGS[@]}" --methods "dense,$CHUNK_METHODS"
    timeout 280 $PY -m tokensparse.cli eval ruler "${RULER_ARGS[@]}" --methods "$CHUNK_METHODS" --chunk-size 1024
    ;;
chunked_niah)
    timeout 250 $PY -m tokensparse.cli eval niah "${NIAH_ARGS[@]}" --methods "dense,$CHUNK_METHODS"
    timeout 250 $PY -m tokensparse.cli eval niah "${NIAH_ARGS[@]}" --methods "$CHUNK_METHODS" --chunk-size 1024
    ;;
tiers)
    timeout 420 $PY -m tokensparse.cli bench prefill --model "$GGUF" --rope-scaling 16 \
        --lengths 4096,8192,16384,32768,49152,65536,131072 --min-lengths 0,auto --rounds 2 --budget-ms 300 \
        --methods "$TIER_METHODS,$REC_FP" --out "$OUT/tiers/smollm2.json"
    ;;
tiers_ruler)
    timeout 560 $PY -m tokensparse.cli eval ruler "${RULER_ARGS[@]}" --methods "dense,$TIER_METHODS"
    ;;
tiers_niah)
    timeout 400 $PY -m tokensparse.cli eval niah "${NIAH_ARGS[@]}" --methods "dense,$TIER_METHODS"
    ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
} 2>&1 | tee "$LOG"
# The device returns at most 8 files: one archive of the stage.
(cd "$OUT" && tar czf "../$STAGE.tgz" . && rm -rf ./* && mv "../$STAGE.tgz" .)
