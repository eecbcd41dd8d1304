"""The local-rows benchmark runs end to end at tiny shapes on the CPU and returns JSON-ready numbers."""

from __future__ import annotations

import json

import pytest

from tokensparse.bench.local_rows import run_local_rows_bench


@pytest.mark.parametrize("left_pad", [0, 24])
def test_local_rows_bench_tiny_cpu(left_pad):
    lines = []
    data = run_local_rows_bench(
        (160,), keep_ratios=(0.5,), num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32", local_block=16,
        left_pad=left_pad, window=16, min_tokens=16, backend="torch", warmup=0, min_reps=1, budget_ms=1,
        device="cpu", progress=lines.append,
    )
    json.dumps(data)
    assert data["meta"]["device"] == "cpu" and data["config"]["left_pad"] == left_pad
    (row,) = data["results"]
    assert row["seq_len"] == 160 and row["dense"]["ms"] > 0
    (entry,) = row["sparse"]
    assert 0.5 < entry["kept_share"] < 0.8
    for rows in ("zero", "local"):
        assert entry[rows]["ms"] > 0 and entry[rows]["memory"] is None  # peak memory is CUDA only
        assert "queued_ms" not in entry[rows]
    assert entry["fill_ms"] > 0
    assert entry["local_minus_zero_ms"] == entry["local"]["ms"] - entry["zero"]["ms"]
    assert ("legacy" in entry) == (left_pad == 0)
    if left_pad == 0:
        assert entry["legacy"]["fill_ms"] > 0 and entry["legacy"]["ms"] > 0
    assert len(lines) == 2 and "keep 0.5" in lines[1]
