"""The benchmarks run end to end at tiny shapes on the CPU and write JSON and a plot."""

from __future__ import annotations

import json

import pytest

from tokensparse.cli import main
from tokensparse.methods import parse_method


def test_bench_attention_cli_tiny(tmp_path, capsys):
    out = tmp_path / "attention.json"
    code = main([
        "bench", "attention", "--device", "cpu", "--lengths", "96", "--batch", "1,2", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32",
        "--methods", "token_sparse:keep_ratio=0.5,window=16,min_tokens=16,token_sparse:coverage=0.2,window=16,min_tokens=16",
        "--inputs", "random,structured", "--warmup", "0", "--reps", "2",
        "--budget-ms", "1", "--out", str(out),
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["device"] == "cpu"
    assert [r["batch"] for r in data["results"]] == [1, 2]
    row = data["results"][0]
    assert row["dense"]["default"]["ms"] > 0
    labels = [e["label"] for e in row["sparse"]]
    assert labels[0] == parse_method("token_sparse:keep_ratio=0.5,window=16,min_tokens=16").label + " (random)"
    assert any("structured" in x for x in labels)
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
        "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--inputs", "realistic",
        "--methods", "dense,token_sparse:coverage=0.2,window=16,min_tokens=16,flexprefill:block_size=32,min_budget=32,gamma=0.5,"
        "token_sparse+flexprefill:keep_ratio=0.5,window=16,min_tokens=16,block_size=32,min_budget=32,gamma=0.5",
        "--warmup", "0", "--reps", "1", "--budget-ms", "1",
        "--out", str(out),
    ])
    assert code == 0
    row = json.loads(out.read_text())["results"][0]
    by_label = {e["label"]: e for e in row["sparse"]}
    fp_label = parse_method("flexprefill:gamma=0.5,min_budget=32,block_size=32").label + " (realistic)"
    comp_label = parse_method("token_sparse+flexprefill:keep_ratio=0.5,window=16,min_tokens=16,"
                              "gamma=0.5,min_budget=32,block_size=32").label + " (realistic)"
    coverage_label = parse_method("token_sparse:coverage=0.2,window=16,min_tokens=16").label + " (realistic)"
    assert set(by_label) == {coverage_label, fp_label, comp_label}
    fp = by_label[fp_label]
    assert fp["method"] == "flexprefill" and 0 < fp["visited_share"] < 1  # 7 blocks, gamma 0.5: some are skipped
    assert fp["stages_ms"]["estimate"] > 0 and fp["stages_ms"]["kernel"] > 0
    assert fp["kernel_over_default_x_share"] > 0
    comp = by_label[comp_label]
    assert comp["method"] == "token_sparse+flexprefill" and comp["kept_share"] < 0.8
    assert comp["speedup_vs_default"] > 0
    printed = capsys.readouterr().out
    assert fp_label in printed and "kernel/(dense x share)" in printed


def test_bench_attention_rejects_unknown_method():
    import pytest

    from tokensparse.bench.attention import AttentionBenchConfig

    with pytest.raises(ValueError, match="unknown method 'flash'"):
        AttentionBenchConfig(methods=("token_sparse", "flash"))
    with pytest.raises(ValueError, match="inputs: unknown"):
        AttentionBenchConfig(inputs=("zeros",))


def test_bench_prefill_cli_tiny_model(tmp_path):
    out = tmp_path / "prefill.json"
    code = main([
        "bench", "prefill", "--device", "cpu", "--model", "tiny-random", "--lengths", "160",
        "--methods", "token_sparse:window=16,min_tokens=16,token_sparse:keep_ratio=0.5,window=16,min_tokens=16",
        "--warmup", "0", "--reps", "1", "--out", str(out),
    ])
    assert code == 0
    data = json.loads(out.read_text())
    row = data["results"][0]
    modes = row["modes"]
    keep = parse_method("token_sparse:keep_ratio=0.5,window=16,min_tokens=16").label
    assert set(modes) == {"dense", parse_method("token_sparse:window=16,min_tokens=16").label, keep}
    assert modes[keep]["mean_kept_share"] < 0.9
    assert row["outside_attention_ms"] > 0 and all("attention_ms" in e for e in modes.values())
    assert modes["dense"]["speedup_vs_dense"] == 1.0
    assert (tmp_path / "prefill.png").stat().st_size > 0


def test_bench_prefill_length_gate(tmp_path):
    """Every method runs at each gate; above the prompt length the gate leaves every layer dense."""
    out = tmp_path / "prefill.json"
    spec = "token_sparse:keep_ratio=0.5,window=16,min_tokens=16"
    assert main([
        "bench", "prefill", "--device", "cpu", "--model", "tiny-random", "--lengths", "160", "--methods", spec,
        "--min-lengths", "0,1000", "--warmup", "0", "--reps", "1", "--out", str(out),
    ]) == 0
    modes = json.loads(out.read_text())["results"][0]["modes"]
    label = parse_method(spec).label
    assert set(modes) == {"dense", label, f"{label} @ 1000"}
    assert modes[label]["mean_kept_share"] < 0.9
    assert modes[f"{label} @ 1000"]["mean_kept_share"] == 1.0 and modes[f"{label} @ 1000"]["min_length"] == 1000


def test_bench_overhead_cli_tiny(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    spec = "token_sparse:keep_ratio=0.5,window=16,min_tokens=16"
    assert main([
        "bench", "overhead", "--device", "cpu", "--lengths", "200", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16", "--methods", spec, "--out", str(out),
    ]) == 0
    row = json.loads(out.read_text())["results"][0]
    entry = row["methods"][parse_method(spec).label]
    assert row["dense"]["lone_ms"] > 0 and entry["lone_ms"] > 0 and entry["host_ms"] > 0
    assert "over_dense_ms" in entry and "gpu_ms" not in entry  # GPU time and profiler counts are CUDA only
    assert (tmp_path / "overhead.png").stat().st_size > 0


def test_bench_prefill_rounds_and_tiers(tmp_path):
    """Modes take turns over rounds; a tiered spec records the kept share of every tier's layers."""
    out = tmp_path / "prefill.json"
    spec = "token_sparse:keep_ratio=0.25,window=16,min_tokens=16,sparse_layers=0 | token_sparse:keep_ratio=0.75"
    assert main([
        "bench", "prefill", "--device", "cpu", "--model", "tiny-random", "--lengths", "160", "--methods",
        spec + ",window=16,min_tokens=16", "--rounds", "3", "--warmup", "0", "--reps", "1", "--out", str(out),
    ]) == 0
    data = json.loads(out.read_text())
    modes = data["results"][0]["modes"]
    entry = modes[parse_method(spec + ",window=16,min_tokens=16").label]
    assert entry["time"]["reps"] == 3 and len(entry["time"]["round_medians_ms"]) == 3
    assert entry["ttft_ms"] == sorted(entry["time"]["round_medians_ms"])[1]
    shares = entry["kept_share_by_layer"]
    assert shares["0"] < 0.4 < 0.6 < shares["1"]
    assert len(modes["dense"]["time"]["round_medians_ms"]) == 3
    # --profile reaches the methods that read it; the others (flexprefill here) run without it
    assert main([
        "bench", "prefill", "--device", "cpu", "--model", "tiny-random", "--lengths", "160", "--methods",
        "flexprefill:block_size=32,min_budget=32", "--profile", "sensitivity", "--warmup", "0", "--reps", "1",
        "--out", str(out),
    ]) == 0
    with pytest.raises(ValueError, match="rounds"):
        from tokensparse.bench.prefill import PrefillBenchConfig

        PrefillBenchConfig(rounds=0)
