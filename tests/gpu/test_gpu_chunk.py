"""A chunk after a cached prefix on a GPU: the Triton-scored op against the PyTorch path.

    python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import pytest
import torch

from tokensparse import TokenSparseConfig, token_sparse_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("lens", [None, [20000, 13001]], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("budget", [{"budget": "keep_tokens", "keep_tokens": 2048}, {"coverage": 0.02}], ids=["keep", "cov"])
def test_chunk_triton_matches_torch(lens, budget):
    batch, heads, kv_heads, seq_len, query_len, dim = 2, 9, 3, 20000, 4096, 64
    gen = torch.Generator(device="cuda").manual_seed(seq_len)
    q = torch.randn(batch, heads, query_len, dim, generator=gen, device="cuda") * 2
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, device="cuda")
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen, device="cuda")
    mask = None
    if lens is not None:
        mask = torch.arange(seq_len, device="cuda")[None, :] >= (seq_len - torch.tensor(lens, device="cuda"))[:, None]
    outs, sels = {}, {}
    for backend in ("triton", "torch"):
        config = TokenSparseConfig(backend=backend, **budget)
        outs[backend], sels[backend] = token_sparse_attention(
            q, k, v, config=config, key_padding_mask=mask, return_stats=True
        )
    assert not outs["triton"].isnan().any()
    same = (sels["triton"].kept_idx == sels["torch"].kept_idx).float().mean().item()
    assert same > 0.99  # fp32 scores: ties aside, the same kept keys
    ref, got = outs["torch"].double(), outs["triton"].double()
    assert float((got - ref).norm() / ref.norm()) < 2e-2
