"""`bench prefill --chunk-size`: chunked dense beside chunked sparse."""

from __future__ import annotations

import json

import pytest

from tokensparse.cli import main
from tokensparse.methods import parse_method


def test_bench_prefill_chunked_cli(tmp_path):
    out = tmp_path / "prefill.json"
    spec = "token_sparse:keep_tokens=32,window=16,min_tokens=16"
    assert main([
        "bench", "prefill", "--device", "cpu", "--model", "tiny-random", "--lengths", "100,230", "--methods", spec,
        "--chunk-size", "64", "--warmup", "0", "--reps", "1", "--out", str(out),
    ]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["chunk_size"] == 64 and data["meta"]["chunk_attention"] == "tokensparse_chunk_sdpa"
    label = parse_method(spec).label
    for row, starts in zip(data["results"], ([0, 64], [0, 64, 128, 192])):
        assert row["chunk_prefix_tokens"] == starts
        for entry in row["modes"].values():
            assert len(entry["chunk_ms"]) == len(starts) and min(entry["chunk_ms"]) > 0
        shares = row["modes"][label]["kept_share_by_chunk"]
        assert len(shares) == len(starts)
    # The last chunk of 230 tokens attends over 32 + 16 of them on every layer.
    assert data["results"][1]["modes"][label]["kept_share_by_chunk"][-1] == pytest.approx(48 / 230)
    assert (tmp_path / "prefill.png").stat().st_size > 0
    with pytest.raises(ValueError, match="chunk_size"):
        from tokensparse.bench.prefill import PrefillBenchConfig

        PrefillBenchConfig(chunk_size=0)


def test_short_label_writes_layer_runs_as_ranges():
    from tokensparse.bench.prefill import short_label

    label = parse_method("token_sparse:keep_tokens=64,sparse_layers=0-2;5;7-9").label
    assert "sparse_layers=0;1;2;5;7;8;9" in label
    assert short_label(label).endswith("sparse_layers=0-2;5;7-9")
    assert short_label("dense") == "dense"
