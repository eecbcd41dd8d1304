"""The engine-independent logic of the serving integration (runs without vLLM)."""

import json

import pytest
import torch

import tokensparse
from tokensparse import TokenSparseConfig
from tokensparse.integrations.serving import (
    RequestRunner,
    RequestSpan,
    ServingSettings,
    layer_index,
    probe_block_order,
    read_paged,
    read_records,
    span_rows,
    split_batch,
    sub_batch_offsets,
)
from tokensparse.plan import LayerEntry
from tokensparse.methods import parse_method


def test_split_batch_gives_each_request_its_rows_and_prefix():
    # a decode step (1 token, 40 cached), a whole prompt of 5, a chunk of 3 after 7 cached
    spans = split_batch(torch.tensor([0, 1, 6, 9]), torch.tensor([41, 5, 10]))
    assert spans == [RequestSpan(0, 0, 1, 41), RequestSpan(1, 1, 6, 5), RequestSpan(2, 6, 9, 10)]
    assert [(s.query_len, s.context_len) for s in spans] == [(1, 40), (5, 0), (3, 7)]
    assert span_rows(spans[1:]).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sub_batch_offsets([spans[0], spans[2]]) == ([0, 1, 4], [41, 10])


def test_split_batch_skips_empty_requests_and_padding_rows():
    spans = split_batch(torch.tensor([0, 4, 4, 8, 8]), torch.tensor([4, 9, 8]), num_tokens=6)
    assert spans == [RequestSpan(0, 0, 4, 4), RequestSpan(2, 4, 6, 8)]


def test_split_batch_errors_name_the_argument():
    with pytest.raises(ValueError, match="query_start_loc needs"):
        split_batch(torch.tensor([0, 3]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"seq_lens\[0\]"):
        split_batch(torch.tensor([0, 3]), torch.tensor([2]))


@pytest.mark.parametrize(
    "name, index",
    [("model.layers.7.self_attn.attn", 7), ("language_model.model.layers.12.attn", 12), ("3.attn", 3),
     ("model.decoder.attn", None), ("model.1.sub.2", None)],
)
def test_layer_index_from_vllm_layer_names(name, index):
    assert layer_index(name) == index


def _paged(seq: torch.Tensor, block_size: int, order: list[int], num_blocks: int = 8):
    """seq (L, Hkv, D) written into a (num_blocks, Hkv, block_size, D) cache at blocks ``order``."""
    length, heads, dim = seq.shape
    cache = torch.full((num_blocks, heads, block_size, dim), float("nan"))
    for i, block in enumerate(order):
        part = seq[i * block_size:(i + 1) * block_size]
        cache[block, :, : part.shape[0]] = part.transpose(0, 1)
    return cache


def test_read_paged_follows_the_block_table_and_stops_at_length():
    seq = torch.randn(37, 3, 8)
    row = torch.tensor([5, 0, 7, 2, 1, 1])  # trailing entries unused
    cache = _paged(seq, 16, [5, 0, 7])
    out = read_paged(cache, row, 37)
    assert out.shape == (3, 37, 8)
    torch.testing.assert_close(out, seq.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(read_paged(cache, row, 20), seq[:20].transpose(0, 1), rtol=0, atol=0)
    # FlashAttention's (num_blocks, block_size, Hkv, D)
    flash = cache.transpose(1, 2).contiguous()
    torch.testing.assert_close(read_paged(flash, row, 37, layout="bnhd"), seq.transpose(0, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="blocks"):
        read_paged(cache, row[:2], 37)
    with pytest.raises(ValueError, match="layout"):
        read_paged(cache, row, 37, layout="nhd")


def _transposed_write(key, value, key_cache, value_cache):
    """A cache write that keeps keys transposed inside a block, as vLLM's CPU kernels do."""
    block_size, dim = key.shape[0], key.shape[-1]
    key_cache[0, 0].copy_(key[:, 0].t().reshape(block_size, dim))
    value_cache[0, 0].copy_(value[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_finds_a_transposed_key_layout_and_read_paged_undoes_it(dtype):
    block_size, dim = 32, 64
    key_order, value_order = probe_block_order(_transposed_write, block_size, dim, dtype)
    assert value_order is None and key_order is not None
    seq = torch.randn(70, 2, dim).to(dtype)
    plain = _paged(seq.float(), block_size, [3, 1, 4]).to(dtype)
    # the same cache with each block's keys transposed (D, block_size) in memory
    stored = plain.clone()
    for b in range(stored.shape[0]):
        for h in range(stored.shape[1]):
            stored[b, h] = plain[b, h].t().reshape(block_size, dim)
    out = read_paged(stored, torch.tensor([3, 1, 4]), 70, block_order=key_order)
    torch.testing.assert_close(out, seq.transpose(0, 1), rtol=0, atol=0)


def test_probe_refuses_a_write_that_loses_positions():
    def broken(key, value, key_cache, value_cache):
        key_cache.zero_()
        value_cache.zero_()

    with pytest.raises(ValueError, match="once"):
        probe_block_order(broken, 16, 32, torch.float32)


def test_settings_from_the_environment():
    settings = ServingSettings.from_env({"TOKENSPARSE_METHOD": "token_sparse:coverage=0.02,sparse_layers=2-5",
                                         "TOKENSPARSE_MIN_LENGTH": "4096"})
    assert settings.method.label == "token_sparse:coverage=0.02,sparse_layers=2;3;4;5"
    plan = settings.plan(8)
    assert plan.sparse_layers == (2, 3, 4, 5)
    assert plan.entry(3).min_length == 4096 and plan.entry(1) is None
    assert ServingSettings.from_env({}).method.label == "token_sparse:coverage=0.005"
    assert ServingSettings.from_env({"TOKENSPARSE_MIN_LENGTH": "auto"}).min_length == "auto"
    with pytest.raises(ValueError, match="TOKENSPARSE_METHOD"):
        ServingSettings.from_env({"TOKENSPARSE_METHOD": "token_sparse:covrage=1"})
    with pytest.raises(ValueError, match="TOKENSPARSE_MIN_LENGTH"):
        ServingSettings.from_env({"TOKENSPARSE_MIN_LENGTH": "-3"})


def test_a_profile_from_the_environment_places_the_first_tier():
    """TOKENSPARSE_PROFILE reaches the specs whose layers come from a profile (the recommended tiers)."""
    from tokensparse.profile import shipped_profiles

    (path,) = [p for p in shipped_profiles() if p.name == "smollm2_sensitivity.json"]
    tiers = "token_sparse:coverage=0.01,dropped_rows=local | token_sparse:coverage=0.005,dropped_rows=local"
    plan = ServingSettings.from_env({"TOKENSPARSE_METHOD": tiers, "TOKENSPARSE_PROFILE": str(path)}).plan(30)
    first = [i for i, e in enumerate(plan.layers) if e.spec.config.coverage == 0.01]
    assert first == [3, 4, 5, 6, 9, 10, 11, 12, 13, 15, 16, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    named = ServingSettings.from_env({"TOKENSPARSE_METHOD": "token_sparse:sparse_layers=1", "TOKENSPARSE_PROFILE": str(path)})
    assert named.plan(30).sparse_layers == (1,)  # a spec that names its layers ignores the profile
    with pytest.raises(ValueError, match="TOKENSPARSE_PROFILE must be the path of a profile JSON"):
        ServingSettings.from_env({"TOKENSPARSE_PROFILE": "sensitivity"})
    with pytest.raises(ValueError, match="30 layers"):
        ServingSettings.from_env({"TOKENSPARSE_METHOD": tiers, "TOKENSPARSE_PROFILE": str(path)}).plan(12)


def _runner(spec: str, min_length: int = 0, record=None) -> RequestRunner:
    return RequestRunner(LayerEntry(parse_method(spec), min_length), layer=4, record=record)


def test_gate_decides_per_request():
    runner = _runner("token_sparse:min_tokens=64,window=32", min_length=200)
    assert not runner.wants(RequestSpan(0, 0, 1, 500))       # decode
    assert not runner.wants(RequestSpan(0, 0, 150, 150))     # below the gate
    assert runner.wants(RequestSpan(0, 0, 300, 300))         # a whole prompt
    assert runner.wants(RequestSpan(0, 0, 100, 400))         # a chunk after 300 cached
    composition = _runner("token_sparse+xattention:min_tokens=64,window=32")
    assert composition.wants(RequestSpan(0, 0, 300, 300))
    assert not composition.wants(RequestSpan(0, 0, 100, 400))  # a composition takes no chunks
    assert not _runner("token_sparse:coverage=0,min_tokens=64,window=32").wants(RequestSpan(0, 0, 300, 300))


def test_a_flat_batch_gives_each_request_what_the_op_gives_it_alone(tmp_path):
    torch.manual_seed(0)
    config = TokenSparseConfig(coverage=0.05, min_tokens=64, window=32, backend="torch")
    runner = _runner("token_sparse:coverage=0.05,min_tokens=64,window=32,backend=torch", record=tmp_path / "r.jsonl")
    heads, kv_heads, dim = 6, 2, 16
    lengths = [300, 20, 257]
    spans = split_batch(torch.tensor([0, 300, 320, 577]), torch.tensor(lengths))
    query = torch.randn(577, heads, dim)
    key = torch.randn(577, kv_heads, dim)
    value = torch.randn(577, kv_heads, dim)
    for span in spans:
        rows = slice(span.query_start, span.query_end)
        if not runner.wants(span):
            assert span.seq_len == 20
            continue
        out = runner.run(query[rows], key[rows], value[rows], dim ** -0.5, span)
        alone = tokensparse.token_sparse_attention(
            query[rows].transpose(0, 1)[None], key[rows].transpose(0, 1)[None], value[rows].transpose(0, 1)[None],
            config=config)
        torch.testing.assert_close(out, alone[0].transpose(0, 1), rtol=0, atol=0)
    records = read_records(tmp_path / "r.jsonl")
    assert [(r["request"], r["seq_len"], r["layer"]) for r in records] == [(0, 300, 4), (2, 257, 4)]
    assert all(len(r["num_kept"]) == heads and not r["dense"] for r in records)
    json.dumps(records)


def test_a_chunk_reads_its_prefix_from_the_pages_and_matches_the_chunk_op():
    torch.manual_seed(1)
    config = TokenSparseConfig(budget="keep_tokens", keep_tokens=64, min_tokens=32, window=32, backend="torch")
    runner = _runner("token_sparse:keep_tokens=64,min_tokens=32,window=32,backend=torch")
    heads, kv_heads, dim, block = 4, 2, 16, 16
    full_k, full_v = torch.randn(400, kv_heads, dim), torch.randn(400, kv_heads, dim)
    query = torch.randn(100, heads, dim)  # the chunk: positions 300..399
    span = RequestSpan(0, 0, 100, 400)
    order = [9, 2, 5, 0, 11, 7, 1, 3, 4, 6, 8, 10, 12, 13, 14, 15, 16, 17, 18, 19]
    k_cache, v_cache = _paged(full_k, block, order, 26), _paged(full_v, block, order, 26)
    row = torch.tensor(order + [0] * 6)
    prefix_k = read_paged(k_cache, row, span.context_len).transpose(0, 1)
    prefix_v = read_paged(v_cache, row, span.context_len).transpose(0, 1)
    keys, values = torch.cat([prefix_k, full_k[300:]]), torch.cat([prefix_v, full_v[300:]])
    assert runner.wants(span)
    out = runner.run(query, keys, values, dim ** -0.5, span)
    expect = tokensparse.token_sparse_attention(
        query.transpose(0, 1)[None], full_k.transpose(0, 1)[None], full_v.transpose(0, 1)[None], config=config)
    torch.testing.assert_close(out, expect[0].transpose(0, 1), rtol=0, atol=0)
