"""Mask-free causal SDPA for chunked prefill (tokensparse.integrations.chunk_sdpa)."""

from __future__ import annotations

import pytest
import torch

import tokensparse
from tokensparse.integrations.chunk_sdpa import chunk_sdpa, chunk_sdpa_forward

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
