"""Chunked prefill in the benchmark: its mask-free attention, and `bench prefill --chunk-size`."""

from __future__ import annotations

import json

import pytest
import torch

import tokensparse
from tokensparse.bench.chunked import chunk_sdpa, chunk_sdpa_forward
from tokensparse.cli import main
from tokensparse.methods import parse_method

from tiny_models import tiny_llama


@pytest.mark.parametrize("query_len,key_len,heads,kv_heads", [(1, 37, 4, 2), (37, 37, 4, 4), (29, 101, 6, 2)])
def test_chunk_sdpa_is_causal_by_absolute_position(query_len, key_len, heads, kv_heads):
    torch.manual_seed(query_len)
    q = torch.randn(2, heads, query_len, 16, dtype=torch.float64)
    k = torch.randn(2, kv_heads, key_len, 16, dtype=torch.float64)
    v = torch.randn(2, kv_heads, key_len, 16, dtype=torch.float64)
    out, weights = chunk_sdpa_forward(torch.nn.Module(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, query_len, heads, 16)
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    positions = torch.arange(key_len - query_len, key_len)
    scores = scores.masked_fill(torch.arange(key_len)[None, :] > positions[:, None], float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_with_chunk_sdpa_equals_sdpa(padded):
    """Dense chunked prefill under the mask-free attention gives the stock SDPA logits."""
    model = tiny_llama()
    ids = torch.randint(1, 128, (2, 150))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :23] = 0
    _, expected = tokensparse.prefill(model, ids, chunk_size=64, attention_mask=mask)
    with chunk_sdpa(model):
        assert model.config._attn_implementation == "tokensparse_chunk_sdpa"
        _, got = tokensparse.prefill(model, ids, chunk_size=64, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sparse_chunked_prefill_with_chunk_sdpa_equals_sdpa():
    """A token sparse layer gets no mask under the chunk attention and gives the same logits."""
    spec = "token_sparse:keep_tokens=32,window=16,min_tokens=16,sparse_layers=1"
    model = tiny_llama()
    ids = torch.randint(1, 128, (1, 200))
    tokensparse.enable(model, spec)
    _, expected = tokensparse.prefill(model, ids, chunk_size=80)
    tokensparse.disable(model)
    with chunk_sdpa(model):
        tokensparse.enable(model, spec, record=True)
        _, got = tokensparse.prefill(model, ids, chunk_size=80)
        prefills = tokensparse.selection_report(model)
        tokensparse.disable(model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert [p[1].seq_lens for p in prefills] == [[80], [160], [200]]
    assert prefills[-1][1].num_kept[0][0] == 32 + 16  # keep_tokens + window of the 200 keys


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
