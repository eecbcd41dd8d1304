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
    assert "budget" not in keep["stages_ms"]  # a fixed budget runs no device op
    assert "budget" in next(e for e in row["sparse"] if e["budget"] == "coverage")["stages_ms"]
    assert keep["effective_tflops"] > 0 and keep["total_over_attend"] > 0
    assert "total_queued" not in keep  # queued timing is CUDA only
    assert keep["speedup_vs_default"] > 0
    assert (tmp_path / "attention.png").stat().st_size > 0
    assert "B=1 L=96" in capsys.readouterr().out


def test_bench_attention_cli_all_methods(tmp_path, capsys):
    out = tmp_path / "attention.json"
    code = main([
        "bench", "attention", "--device", "cpu", "--lengths", "200", "--batch", "1", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--keep-ratios", "0.5",
        "--window", "16", "--min-tokens", "16", "--coverage", "0.2", "--inputs", "realistic",
        "--methods", "dense,token_sparse,flexprefill,token_sparse+flexprefill",
        "--fp-block", "32", "--fp-min-budget", "32", "--fp-gamma", "0.5", "--warmup", "0", "--reps", "1", "--budget-ms", "1",
        "--out", str(out),
    ])
    assert code == 0
    row = json.loads(out.read_text())["results"][0]
    by_label = {e["label"]: e for e in row["sparse"]}
    assert set(by_label) == {
        "keep 0.5", "keep 0.5 + flexprefill", "flexprefill (realistic)",
        "coverage 0.2 (realistic)", "coverage 0.2 (realistic) + flexprefill",
    }
    fp = by_label["flexprefill (realistic)"]
    assert fp["method"] == "flexprefill" and 0 < fp["visited_share"] < 1  # 7 blocks, gamma 0.5: some are skipped
    assert fp["stages_ms"]["estimate"] > 0 and fp["stages_ms"]["kernel"] > 0
    assert fp["kernel_over_default_x_share"] > 0
    comp = by_label["keep 0.5 + flexprefill"]
    assert comp["method"] == "token_sparse+flexprefill" and comp["kept_share"] < 0.8
    assert comp["speedup_vs_default"] > 0
    printed = capsys.readouterr().out
    assert "flexprefill (realistic)" in printed and "kernel/(dense x share)" in printed


def test_bench_attention_rejects_unknown_method():
    import pytest

    from tokensparse.bench.attention import AttentionBenchConfig

    with pytest.raises(ValueError, match="methods: unknown"):
        AttentionBenchConfig(methods=("token_sparse", "xattention"))
    with pytest.raises(ValueError, match="coverage_inputs: unknown"):
        AttentionBenchConfig(coverage_inputs=("zeros",))


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
