"""Sink + local attention: what a row a head dropped can get instead of zeros.

Token Sparse Attention writes zeros in the rows of the tokens a head did not
keep, so those tokens skip the layer's attention update. On small models that
is where accuracy goes (results/eval). Most of a calm layer's attention mass
sits on the first tokens and on a local band (bench/structure.py measures
0.44-0.49 and 0.47-0.54 on the embedded model), so a cheap stand-in is causal
attention over

* the first ``block_size`` tokens (attention sinks), and
* the tokens of the row's own block and of the previous block,

on a grid of ``block_size`` tokens aligned at the first real token: at most
``3 * block_size`` keys per row, so the cost is linear in the length (at 128K
and block 64 it is 0.3% of dense causal attention's FLOPs).

:func:`sink_local_attention` runs the block-sparse Triton kernel
(:mod:`tokensparse.kernels.block_sparse`) with that fixed pattern on CUDA, and
:func:`sink_local_attention_torch`, a banded PyTorch version, elsewhere; the
two are tested against each other and against a dense masked reference.
"""

from __future__ import annotations

import torch

from .kernels import TORCH_OPS, block_sparse, ops_for
from .padding import front_to_left, left_to_front


def sink_local_pattern(num_blocks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_idx (1, 1, NB, C) int32, block_cnt (1, 1, NB) int32): block 0, the previous and the own block."""
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=device)
    blocks = torch.arange(num_blocks, device=device)
    mask[:, 0] = True
    mask[blocks, blocks] = True
    mask[blocks[1:], blocks[1:] - 1] = True
    return block_sparse.lists_from_block_mask(mask[None, None])


def sink_local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention over the first block and the own and previous block of every row.

    Args:
        query: (B, H, L, D); key: (B, Hkv, L, D); value: (B, Hkv, L, Dv); GQA by indexing.
        block_size: the grid's block (a positive multiple of 16).
        scale: softmax scale, default 1 / sqrt(D).
        seq_lens: optional (B,) real tokens per sequence, padding on the left
            (as transformers pads); padded rows are zero and padded keys unseen.
        backend: "auto", "triton" or "torch", chosen by
            :func:`tokensparse.kernels.ops_for` ("auto": the Triton kernel on
            CUDA, the banded PyTorch version elsewhere).

    Returns:
        (B, H, L, Dv) in the query's dtype.
    """
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
    ops = ops_for(query, backend)
    if ops is TORCH_OPS:
        # The banded version, linear in L (the block-sparse reference is dense).
        return sink_local_attention_torch(query, key, value, block_size, scale=scale, seq_lens=seq_lens)
    batch, num_heads, seq_len, _ = query.shape
    block_idx, block_cnt = sink_local_pattern(block_sparse.num_blocks(seq_len, block_size), query.device)
    block_idx = block_idx.expand(batch, num_heads, -1, -1)
    block_cnt = block_cnt.expand(batch, num_heads, -1).contiguous()
    if seq_lens is None or not bool((seq_lens < seq_len).any()):
        return ops.block_sparse_attention(query, key, value, block_idx, block_cnt, block_size, scale=scale)
    # The kernel's grid starts at row 0: the real tokens go to the front (padding
    # at the end is what its per-head lengths handle), and the rows come back.
    lens = seq_lens[:, None].expand(batch, num_heads).contiguous()
    q, k, v = left_to_front(query, key, value, seq_lens=seq_lens)
    out = ops.block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, seq_lens=lens, scale=scale)
    return front_to_left(out, seq_lens, seq_len)


def sink_local_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch version of :func:`sink_local_attention` (same arguments), in float32.

    Banded: each query block meets only its three key blocks, so time and memory
    are linear in the length.
    """
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads, dim_v = key.shape[1], value.shape[-1]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    device = query.device
    lens = torch.full((batch,), seq_len, device=device) if seq_lens is None else seq_lens.to(device)
    nb = block_sparse.num_blocks(seq_len, block_size)
    # Work on the real tokens moved to the front and padded at the end to nb blocks.
    total = nb * block_size
    pos = torch.arange(total, device=device)
    q, k, v = left_to_front(query.to(acc), key.to(acc), value.to(acc), seq_lens=lens, length=total)
    q = q.view(batch, num_kv_heads, group, nb, block_size, head_dim)
    k = k.view(batch, num_kv_heads, nb, block_size, head_dim)
    v = v.view(batch, num_kv_heads, nb, block_size, dim_v)
    blocks = torch.arange(nb, device=device)
    prev = (blocks - 1).clamp(min=0)
    # Key slots per query block: [sink block, previous block, own block]; a slot that
    # repeats a later one (block 0 or 1) is masked so no key counts twice.
    k3 = torch.cat([k[:, :, :1].expand(-1, -1, nb, -1, -1), k[:, :, prev], k], dim=3)
    v3 = torch.cat([v[:, :, :1].expand(-1, -1, nb, -1, -1), v[:, :, prev], v], dim=3)
    slot_ok = torch.stack([blocks >= 2, blocks >= 1, torch.ones_like(blocks, dtype=torch.bool)], dim=-1)  # (nb, 3)
    key_pos = torch.cat([pos[:block_size].expand(nb, -1), (prev * block_size)[:, None] + pos[:block_size],
                         (blocks * block_size)[:, None] + pos[:block_size]], dim=-1)  # (nb, 3 * bs)
    query_pos = (blocks * block_size)[:, None] + pos[:block_size]  # (nb, bs)
    allowed = slot_ok.repeat_interleave(block_size, dim=-1)[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    allowed = allowed[None] & (key_pos[None, :, None, :] < lens[:, None, None, None])  # (B, nb, bs, 3bs)
    logits = torch.einsum("bkgnqd,bknsd->bkgnqs", q, k3) * scale
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bkgnqs,bknsd->bkgnqd", probs, v3).reshape(batch, num_heads, total, dim_v)
    # Back to the caller's positions; rows past a sequence's length (NaN for an
    # empty one, whose keys are all masked) are dropped there.
    return front_to_left(out.to(query.dtype), lens, seq_len)


__all__ = ["sink_local_attention", "sink_local_attention_torch", "sink_local_pattern"]
