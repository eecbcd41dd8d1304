"""The CUDA (FlashAttention) branch's logic, run on the CPU with a stand-in for the kernel.

vLLM's FlashAttention kernels need a GPU and vLLM's CUDA build, neither of which
is here; everything around them is plain PyTorch: the batch split, the gate,
the prefix read from FlashAttention's paged layout, and the sub-batch of
requests handed to the wrapped backend. The stand-in kernel attends causally
over the paged cache exactly as FlashAttention would, so the wrapped requests
and the sparse ones can both be checked.
"""

import math

import pytest
import torch

pytest.importorskip("vllm")

import tokensparse  # noqa: E402
from tokensparse import TokenSparseConfig  # noqa: E402
from tokensparse.integrations import vllm as plugin  # noqa: E402

pytestmark = pytest.mark.vllm

SPEC = "token_sparse:keep_tokens=64,min_tokens=32,window=32,backend=torch,sparse_layers=1"
CONFIG = TokenSparseConfig(budget="keep_tokens", keep_tokens=64, min_tokens=32, window=32, backend="torch",
                           sparse_layers=(1,))
HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 16, 16


def _paged_dense(query, kv_cache, meta, output):
    """The stand-in for FlashAttention: causal attention of each request over its pages."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(DIM, dim=-1)  # (blocks, block_size, Hkv, D)
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        rows = slice(starts[i], starts[i + 1])
        blocks = meta.block_table[i, : math.ceil(seq_len / BLOCK)]
        k = key_cache[blocks].reshape(-1, KV_HEADS, DIM)[:seq_len].transpose(0, 1)[None]
        v = value_cache[blocks].reshape(-1, KV_HEADS, DIM)[:seq_len].transpose(0, 1)[None]
        q = query[rows].transpose(0, 1)[None]
        q_len = q.shape[2]
        mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(seq_len - q_len)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        output[rows] = out[0].transpose(0, 1)
    return output


@pytest.fixture
def impl(monkeypatch):
    monkeypatch.setenv("TOKENSPARSE_METHOD", SPEC)
    plugin._settings.cache_clear()
    plugin._plan.cache_clear()
    _, impl_cls = plugin._flash_classes()
    impl = impl_cls.__new__(impl_cls)  # FlashAttentionImpl.__init__ needs CUDA
    impl.head_size, impl.scale, impl.num_heads, impl.num_kv_heads = DIM, DIM ** -0.5, HEADS, KV_HEADS
    sparse = plugin._SparsePrefill(impl, reason="set below")
    sparse.reason, sparse.num_layers = None, 4
    impl._tokensparse = sparse
    yield impl
    plugin._settings.cache_clear()
    plugin._plan.cache_clear()


def _batch(requests):
    """requests: (context_len, query_len) each -> flat query/key/value, the filled cache and the metadata."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    torch.manual_seed(0)
    kv_cache = torch.zeros(64, KV_HEADS, BLOCK, 2 * DIM)  # FlashAttention's (blocks, Hkv, block_size, 2 D)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(DIM, dim=-1)
    free = list(torch.randperm(64).tolist())
    queries, keys, values, table, starts = [], [], [], [], [0]
    full = []
    for context, q_len in requests:
        seq_len = context + q_len
        blocks = [free.pop() for _ in range(math.ceil(seq_len / BLOCK))]
        table.append(blocks + [0] * (32 - len(blocks)))
        k, v = torch.randn(seq_len, KV_HEADS, DIM), torch.randn(seq_len, KV_HEADS, DIM)
        for pos in range(seq_len):  # vLLM writes the cache (prefix and this step's tokens) before forward
            key_cache[blocks[pos // BLOCK], pos % BLOCK] = k[pos]
            value_cache[blocks[pos // BLOCK], pos % BLOCK] = v[pos]
        queries.append(torch.randn(q_len, HEADS, DIM))
        keys.append(k[context:])
        values.append(v[context:])
        full.append((k, v))
        starts.append(starts[-1] + q_len)
    lens = [c + q for c, q in requests]
    meta = FlashAttentionMetadata(
        num_actual_tokens=starts[-1], max_query_len=max(q for _, q in requests),
        query_start_loc=torch.tensor(starts, dtype=torch.int32), max_seq_len=max(lens),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_table=torch.tensor(table, dtype=torch.int32),
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long), scheduler_metadata=torch.zeros(3), max_num_splits=4,
    )
    return torch.cat(queries), torch.cat(keys), torch.cat(values), kv_cache, meta, full


class _Layer:
    def __init__(self, index):
        self.layer_name = f"model.layers.{index}.self_attn.attn"


def test_sparse_requests_run_the_op_and_the_rest_one_wrapped_sub_batch(impl):
    # a decode step, a whole prompt, a short prompt, a chunk after a 300-token cached prefix
    requests = [(120, 1), (0, 200), (0, 20), (300, 100)]
    query, key, value, kv_cache, meta, full = _batch(requests)
    calls = []

    def wrapped(layer, q, k, v, cache, m, out, *args):
        calls.append(m)
        return _paged_dense(q, cache, m, out)

    output = torch.full_like(query, float("nan"))
    plugin._forward(impl, wrapped, _Layer(1), query, key, value, kv_cache, meta, output, None, None)
    # one wrapped call, on the decode and the short prompt only, planned afresh
    assert len(calls) == 1
    sub = calls[0]
    assert sub.query_start_loc.tolist() == [0, 1, 21] and sub.seq_lens.tolist() == [121, 20]
    assert sub.block_table.tolist() == meta.block_table[[0, 2]].tolist()
    assert sub.num_actual_tokens == 21 and sub.scheduler_metadata is None and sub.max_num_splits == 0
    dense = _paged_dense(query, kv_cache, meta, torch.empty_like(query))
    starts = meta.query_start_loc.tolist()
    for i in (0, 2):
        torch.testing.assert_close(output[starts[i]:starts[i + 1]], dense[starts[i]:starts[i + 1]])
    for i in (1, 3):
        k, v = full[i]
        expect = tokensparse.token_sparse_attention(
            query[starts[i]:starts[i + 1]].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            config=CONFIG)
        torch.testing.assert_close(output[starts[i]:starts[i + 1]], expect[0].transpose(0, 1), rtol=0, atol=0)
        assert not torch.allclose(output[starts[i]:starts[i + 1]], dense[starts[i]:starts[i + 1]])


def test_layers_outside_the_plan_and_decode_steps_go_to_the_wrapped_backend_whole(impl):
    query, key, value, kv_cache, meta, _ = _batch([(0, 200), (50, 1)])
    calls = []

    def wrapped(layer, q, k, v, cache, m, out, *args):
        calls.append(m)
        return out

    output = torch.zeros_like(query)
    plugin._forward(impl, wrapped, _Layer(0), query, key, value, kv_cache, meta, output, None, None)
    assert calls == [meta]
    _, _, _, kv_cache, decode_meta, _ = _batch([(80, 1), (50, 1)])
    plugin._forward(impl, wrapped, _Layer(1), query[:2], key[:2], value[:2], kv_cache, decode_meta, output[:2],
                    None, None)
    assert calls[-1] is decode_meta
