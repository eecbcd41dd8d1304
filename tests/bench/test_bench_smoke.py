"""The benchmarks run end to end at tiny shapes on the CPU and write JSON and a plot."""

from __future__ import annotations

import json

from tokensparse.cli import main


def test_bench_attention_cli_tiny(tmp_path, capsys):
    out = tmp_path / "attention.json"
    code = main([
        "bench", "attention", "--device", "cpu", "--lengths", "96", "--batch", "1,2", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--keep-ratios", "0.5",
        "--window", "16", "--min-tokens", "16", "--coverage", "0.2", "--warmup", "0", "--reps", "2",
        "--budget-ms", "1", "--out", str(out),
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["device"] == "cpu"
    assert [r["batch"] for r in data["results"]] == [1, 2]
    row = data["results"][0]
    assert row["dense"]["default"]["ms"] > 0
    labels = [e["label"] for e in row["sparse"]]
    assert labels[0] == "keep 0.5" and any("structured" in x for x in labels)
    keep = row["sparse"][0]
    assert 0.5 < keep["kept_share"] < 0.8  # half the prefix plus the window
    for stage in ("score", "select", "gather", "attend", "scatter"):
        assert keep["stages_ms"][stage] > 0
    assert keep["speedup_vs_default"] > 0
    assert (tmp_path / "attention.png").stat().st_size > 0
    assert "B=1 L=96" in capsys.readouterr().out


def test_bench_prefill_cli_tiny_model(tmp_path):
    out = tmp_path / "prefill.json"
    code = main([
        "bench", "prefill", "--device", "cpu", "--model", "tiny-random", "--lengths", "160",
        "--keep-ratios", "0.5", "--window", "16", "--min-tokens", "16", "--warmup", "0", "--reps", "1",
        "--out", str(out),
    ])
    assert code == 0
    data = json.loads(out.read_text())
    modes = data["results"][0]["modes"]
    assert set(modes) == {"dense", "coverage 0.005", "keep 0.5"}
    assert modes["keep 0.5"]["mean_kept_share"] < 0.9
    assert modes["dense"]["speedup_vs_dense"] == 1.0
    assert (tmp_path / "prefill.png").stat().st_size > 0
