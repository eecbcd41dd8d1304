"""Sink + local attention for dropped rows: banded PyTorch path and the block-sparse
kernel path against a dense masked float64 reference."""

import pytest
import torch

from tokensparse.kernels.local_rows import fill_dropped_rows_torch
from tokensparse.local_attention import sink_local_attention, sink_local_attention_torch


def dense_sink_local_ref(q, k, v, block, lens):
    """Float64, one row at a time over real tokens (left padding), by the definition."""
    batch, heads, seq_len, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, seq_len, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        pad = seq_len - int(lens[b])
        for h in range(heads):
            for t in range(int(lens[b])):
                keys = [s for s in range(t + 1) if s // block in (0, t // block, t // block - 1)]
                idx = torch.tensor(keys) + pad
                logits = (q[b, h, pad + t].double() @ k[b, h // group, idx].double().T) * q.shape[-1] ** -0.5
                out[b, h, pad + t] = torch.softmax(logits, -1) @ v[b, h // group, idx].double()
    return out


@pytest.mark.parametrize("seq_len,block,heads,kv_heads,lens", [
    (77, 16, 2, 2, None),          # partial last block, MHA
    (100, 32, 4, 1, [100, 61]),    # GQA 4, left padding
    (40, 16, 3, 3, [40]),          # fewer than 3 blocks
])
def test_torch_path_matches_definition(seq_len, block, heads, kv_heads, lens):
    g = torch.Generator().manual_seed(seq_len)
    batch = 1 if lens is None else len(lens)
    q = torch.randn(batch, heads, seq_len, 16, generator=g)
    k = torch.randn(batch, kv_heads, seq_len, 16, generator=g)
    v = torch.randn(batch, kv_heads, seq_len, 8, generator=g)
    seq_lens = None if lens is None else torch.tensor(lens)
    got = sink_local_attention_torch(q, k, v, block, seq_lens=seq_lens)
    ref = dense_sink_local_ref(q, k, v, block, seq_lens if seq_lens is not None else torch.tensor([seq_len]))
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seq_len,query_len,block,kv_heads,lens", [
    (100, 37, 16, 2, None),          # the chunk starts inside a block
    (100, 64, 32, 1, [100, 61]),     # GQA 4, left padding, one sequence's chunk starts in its padding
    (90, 90, 16, 2, [90, 50]),       # the whole prompt
    (120, 5, 16, 2, [7, 120]),       # a short chunk, mostly padding for one sequence
])
def test_torch_path_takes_a_chunk_after_a_cached_prefix(seq_len, query_len, block, kv_heads, lens):
    """Rows of a chunk (query row i at key position L - Lq + i) get the whole prompt's local rows."""
    g = torch.Generator().manual_seed(seq_len + query_len)
    batch = 1 if lens is None else len(lens)
    q = torch.randn(batch, 4, seq_len, 16, generator=g)
    k = torch.randn(batch, kv_heads, seq_len, 16, generator=g)
    v = torch.randn(batch, kv_heads, seq_len, 8, generator=g)
    seq_lens = None if lens is None else torch.tensor(lens)
    got = sink_local_attention_torch(q[:, :, -query_len:], k, v, block, seq_lens=seq_lens)
    ref = dense_sink_local_ref(q, k, v, block, seq_lens if seq_lens is not None else torch.tensor([seq_len]))
    torch.testing.assert_close(got.double(), ref[:, :, -query_len:], atol=2e-5, rtol=2e-5)
    # Small row chunks cross the chunk's first block: the same rows.
    out = torch.full_like(got, float("nan"))
    fill_dropped_rows_torch(out, q[:, :, -query_len:], k, v, None, block, seq_lens=seq_lens, chunk_rows=block)
    torch.testing.assert_close(out, got)


def test_triton_kernel_refuses_a_chunk():
    from tokensparse.kernels.local_rows import fill_dropped_rows_triton

    q, k = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match="takes a whole prompt"):
        fill_dropped_rows_triton(torch.empty(1, 2, 10, 16), q, k, k, None, 16)
    with pytest.raises(ValueError, match="must not be longer than key"):
        fill_dropped_rows_torch(torch.empty(1, 2, 40, 16), k.expand(1, 2, 40, 16), q, q, None, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_torch_path(dtype):
    from tokensparse.kernels import triton_runnable

    if not triton_runnable(torch.empty(0)):
        pytest.skip("the Triton kernel needs TRITON_INTERPRET=1 on the CPU (scripts/test.sh sets it)")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 90, 32, generator=g).to(dtype)
    k = torch.randn(2, 2, 90, 32, generator=g).to(dtype)
    v = torch.randn(2, 2, 90, 32, generator=g).to(dtype)
    lens = torch.tensor([90, 57])
    got = sink_local_attention(q, k, v, 32, seq_lens=lens, backend="triton")
    ref = sink_local_attention_torch(q, k, v, 32, seq_lens=lens)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    assert (got[1, :, :33] == 0).all()  # padded rows


def test_bad_block_size():
    x = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 16"):
        sink_local_attention(x, x, x, 24)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_dropped_rows_local_fills_exactly_the_dropped_rows(layout):
    from tokensparse import TokenSparseConfig
    from tokensparse.attention import attend_selected
    from tokensparse.selection import select_tokens

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 300, 16, generator=g)
    k = torch.randn(2, 2, 300, 16, generator=g)
    v = torch.randn(2, 2, 300, 16, generator=g)
    padding = torch.ones(2, 300, dtype=torch.bool)
    padding[1, :70] = False  # left padding
    config = TokenSparseConfig(window=16, min_tokens=16, budget="keep_ratio", keep_ratio=0.5, backend="torch")
    selection = select_tokens(q, k, config, key_padding_mask=padding)
    zero = attend_selected(q, k, v, selection, backend="torch", layout=layout, config=config)
    local = attend_selected(
        q, k, v, selection, backend="torch", layout=layout, config=config.replace(dropped_rows="local", local_block=32)
    )
    if layout == "blhd":
        zero, local = zero.transpose(1, 2), local.transpose(1, 2)
    kept = torch.zeros(2, 4, 301, dtype=torch.bool).scatter_(2, selection.kept_idx, True)[..., :300]
    expected = sink_local_attention_torch(q, k, v, 32, seq_lens=torch.tensor([300, 230]))
    assert torch.equal(local[kept], zero[kept])
    torch.testing.assert_close(local[~kept], expected[~kept])
    assert (~kept[1, :, 70:]).any() and (local[1, :, :70] == 0).all()  # some real rows dropped; padding stays zero


def test_config_checks_dropped_rows():
    from tokensparse import TokenSparseConfig

    with pytest.raises(ValueError, match="dropped_rows must be one of"):
        TokenSparseConfig(dropped_rows="mean")
    with pytest.raises(ValueError, match="local_block must be a positive multiple of 16"):
        TokenSparseConfig(dropped_rows="local", local_block=40)
