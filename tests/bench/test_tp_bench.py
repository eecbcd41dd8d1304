"""The tensor-parallel bench's one-command entry point, on 2 gloo ranks with a tiny model."""

import json
import os
import subprocess
import sys

import pytest
import torch

import tokensparse
from tokensparse.bench.prefill import tiny_config

dist = pytest.importorskip("torch.distributed")
COVERAGE = "token_sparse:coverage=0.3,window=16,min_tokens=16,kernel_size=3"


@pytest.mark.parametrize("split", ["memory", "checkpoint"])
def test_tp_bench_runs_and_checks_budgets(tmp_path, split):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    src = os.path.dirname(os.path.dirname(tokensparse.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tokensparse.bench.tp", "--out", str(tmp_path / "out"), "--model", "tiny-random",
               "--lengths", "240", "--check-length", "240", "--methods", COVERAGE, "--warmup", "0", "--reps", "1"]
    if split == "checkpoint":
        command += ["--checkpoint-dir", str(tmp_path / "model")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    data = json.loads((tmp_path / "out" / "tp_bench.json").read_text())

    assert data["meta"]["tp_size"] == 2 and data["meta"]["split_by"] == split
    (row,) = data["results"]
    label = next(k for k in row["modes"] if k != "dense")
    check = row["exactness"][label]
    assert check["exact"] and min(check["budgets_checked_by_rank"]) >= 1
    entry = row["modes"][label]
    assert len(entry["ttft_ms_by_rank"]) == 2 and entry["exchange_ms"] > 0 and entry["mean_kept_share"] < 1
    # Each rank holds its shard only: well under the whole model's weights.
    whole = sum(p.numel() * 4 for p in __import__("transformers").LlamaForCausalLM(tiny_config()).parameters())
    assert max(data["meta"]["weight_bytes_by_rank"]) < 0.8 * whole
