"""Sink + local attention for dropped rows on a GPU (tokensparse.local_attention).

The Triton path against the banded PyTorch path at large shapes, left padding
included, and the whole op with ``dropped_rows="local"`` against the zero-row op
on the kept rows. Was scripts/gpu_local_check.py.

    python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import pytest
import torch

from tokensparse import TokenSparseConfig, token_sparse_attention
from tokensparse.local_attention import sink_local_attention, sink_local_attention_torch

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, dim, block, lens",
    [(1, 32, 8, 32768, 128, 64, None), (3, 9, 3, 4000, 64, 64, [4000, 2500, 3333])],
    ids=["llama_32k", "left_padded"],
)
def test_triton_path_matches_banded_torch_path(batch, heads, kv_heads, length, dim, block, lens):
    gen = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(batch, heads, length, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    seq_lens = None if lens is None else torch.tensor(lens, device="cuda")
    got = sink_local_attention(q, k, v, block, seq_lens=seq_lens, backend="triton")
    ref = sink_local_attention_torch(q, k, v, block, seq_lens=seq_lens)
    assert not got.isnan().any()
    assert _rel(got, ref) < 1e-2
    if lens is not None:
        for b, n in enumerate(lens):
            assert (got[b, :, : length - n] == 0).all(), "left padding rows must be zero"


def test_local_rows_fill_exactly_the_dropped_rows():
    gen = torch.Generator(device="cuda").manual_seed(1)
    length = 16384
    q = torch.randn(1, 32, length, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, length, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, length, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    config = TokenSparseConfig(budget="keep_ratio", keep_ratio=0.5)
    zero, sel = token_sparse_attention(q, k, v, config=config, return_stats=True)
    local = token_sparse_attention(q, k, v, config=config.replace(dropped_rows="local"))
    kept = torch.zeros(1, 32, length + 1, dtype=torch.bool, device="cuda").scatter_(2, sel.kept_idx, True)[..., :length]
    assert (~kept).any(), "keep 0.5 must drop rows"
    assert torch.equal(zero[kept], local[kept])
    assert (local[~kept].abs().sum(-1) > 0).all(), "every dropped row gets its local attention"
