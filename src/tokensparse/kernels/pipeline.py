"""Compress, attend, decompress with the Triton kernels, a few heads at a time.

Compressed tensors are per query head, so for all heads at once they can be
larger than K and V themselves (GQA). Processing the heads in chunks bounds the
extra memory to about ``chunk_budget`` bytes (default: 3/16 of the query's size,
at least 128 MiB) while each SDPA call still has enough rows to fill the GPU.
Smaller chunks cost time: each SDPA call ends with a partly filled last wave.
"""

from __future__ import annotations

import torch

from . import sdpa
from .gather import gather_kept
from .scatter import scatter_kept_into

# Below this many bytes of compressed tensors, chunking only adds launches.
DEFAULT_MIN_CHUNK_BYTES = 128 * 2**20


def heads_per_chunk(
    query: torch.Tensor, value: torch.Tensor, num_kept: int, chunk_budget: int | None = None
) -> int:
    """Query heads compressed together so their compact q, k, v, out fit ``chunk_budget`` bytes."""
    batch, num_heads, seq_len, head_dim = query.shape
    per_head = batch * num_kept * (2 * head_dim + 2 * value.shape[-1]) * query.element_size()
    if chunk_budget is None:
        chunk_budget = max(query.numel() * query.element_size() * 3 // 16, DEFAULT_MIN_CHUNK_BYTES)
    return max(1, min(num_heads, chunk_budget // max(per_head, 1)))


def attend_kept(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor,
    *,
    scale: float | None = None,
    layout: str = "bhld",
    chunk_budget: int | None = None,
    sdpa_backend: str | None = None,
) -> torch.Tensor:
    """Causal attention of each head over its kept tokens, zeros in the other rows.

    Args:
        query: (B, H, L, D); key: (B, Hkv, L, D); value: (B, Hkv, L, Dv).
        kept_idx: (B, H, K) ascending positions, padding equal to L.
        scale: softmax scale, default 1 / sqrt(D).
        layout: "bhld" returns (B, H, L, Dv); "blhd" returns (B, L, H, Dv).
        chunk_budget: bytes of compressed tensors alive at once (default: 3/16
            of the query's bytes, at least 128 MiB).
        sdpa_backend: force an SDPA backend for the dense part (default: fastest).

    Returns:
        The output in ``layout``, contiguous.
    """
    batch, num_heads, seq_len, _ = query.shape
    v_dim = value.shape[-1]
    if layout == "bhld":
        out = query.new_empty(batch, num_heads, seq_len, v_dim)
    elif layout == "blhd":
        out = query.new_empty(batch, seq_len, num_heads, v_dim)
    else:
        raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
    step = heads_per_chunk(query, value, kept_idx.shape[-1], chunk_budget)
    for start in range(0, num_heads, step):
        count = min(step, num_heads - start)
        q_c, k_c, v_c = gather_kept(query, key, value, kept_idx, head_start=start, num_heads=count)
        out_c = sdpa.causal_attention(q_c, k_c, v_c, scale=scale, backend=sdpa_backend)
        del q_c, k_c, v_c
        scatter_kept_into(out, out_c, kept_idx, layout=layout, head_start=start)
        del out_c
    return out
