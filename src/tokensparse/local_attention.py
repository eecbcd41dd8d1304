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

:func:`fill_dropped_rows` (from :mod:`tokensparse.kernels.local_rows`) writes
that attention in place into the rows a head dropped, leaving the kept rows of
Token Sparse Attention's output as they are: a Triton kernel with the fixed
pattern on CUDA, a banded PyTorch version elsewhere. :func:`sink_local_attention`
computes it for every row into a new tensor. :func:`sink_local_pattern` is the
same pattern as block lists for :mod:`tokensparse.kernels.block_sparse` (tests
check the kernels against its dense expansion).
"""

from __future__ import annotations

import torch

from .kernels import block_sparse, ops_for, ops_for_chunk
from .kernels.local_rows import fill_dropped_rows_torch


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
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    return fill_dropped_rows(out, query, key, value, None, block_size, scale=scale, seq_lens=seq_lens, backend=backend)


def fill_dropped_rows(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor | None,
    block_size: int,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sink + local attention written in place into the rows of ``out`` that ``kept_idx`` does not list.

    Args:
        out: (B, H, Lq, Dv), any strides (the ``.transpose(1, 2)`` of a (B, Lq, H, Dv)
            tensor works); kept rows are left untouched bit for bit.
        query: (B, H, Lq, D), Lq <= L: a whole prompt, or a chunk after a cached
            prefix (row i at position L - Lq + i; the PyTorch version runs it);
            key: (B, Hkv, L, D); value: (B, Hkv, L, Dv).
        kept_idx: (B, H, K) kept positions (entries equal to L are padding), or
            None to write every row.
        block_size: the pattern's block, a positive multiple of 16.
        scale: softmax scale, default 1 / sqrt(D).
        seq_lens: optional (B,) real tokens per sequence, padding on the left.
        backend: "auto", "triton" or "torch", chosen by :func:`tokensparse.kernels.ops_for`.

    Returns:
        ``out``. No output-sized buffer is allocated (the Triton kernel skips
        kept rows by a (B, H, L + 1) bool mask).
    """
    ops = ops_for(query, backend) if query.shape[2] == key.shape[2] else ops_for_chunk(query, backend)
    return ops.fill_dropped_rows(out, query, key, value, kept_idx, block_size, scale=scale, seq_lens=seq_lens)


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
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    return fill_dropped_rows_torch(out, query, key, value, None, block_size, scale=scale, seq_lens=seq_lens)


__all__ = ["sink_local_attention", "sink_local_attention_torch", "sink_local_pattern", "fill_dropped_rows"]
