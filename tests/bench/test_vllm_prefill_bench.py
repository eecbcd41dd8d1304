"""The vLLM prefill bench's checks and summary (the engines themselves run in tests/integrations/with_vllm)."""

import pytest

from tokensparse.bench.vllm_prefill import run_vllm_prefill_bench, summary_lines


def test_summary_gives_each_method_its_speedup_over_dense():
    data = {"results": [
        {"method": "dense", "length": 4096, "median_s": 4.0},
        {"method": "token_sparse:keep_ratio=0.25", "length": 4096, "median_s": 5.0},
        {"method": "dense", "length": 8100, "median_s": 12.0},
        {"method": "token_sparse:keep_ratio=0.25", "length": 8100, "median_s": 10.0},
    ]}
    assert summary_lines(data) == [
        "4096 tokens: dense: 4.00 s; token_sparse:keep_ratio=0.25: 5.00 s (0.80x)",
        "8100 tokens: dense: 12.00 s; token_sparse:keep_ratio=0.25: 10.00 s (1.20x)",
    ]


def test_bad_arguments_fail_before_any_engine_starts(tmp_path):
    with pytest.raises(ValueError, match="repeats"):
        run_vllm_prefill_bench(tmp_path, repeats=0)
    with pytest.raises(ValueError, match="covrage"):
        run_vllm_prefill_bench(tmp_path, methods=("dense", "token_sparse:covrage=0.1"))
