"""What every block-sparse method shares: its pattern type, the attend-on-a-pattern tail of the op,
and its registry entry (alone on every layer, and as the inner attention of token sparse).

A block-sparse method is an estimator ``estimate(query, key, *, scale, seq_lens,
backend, **params) -> pattern`` plus the block-sparse kernel; FlexPrefill and
XAttention differ only in the estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..kernels import ops_for
from ..kernels.block_sparse import block_mask_from_lists, visited_share
from ..ops import check_inputs, run_left_padded
from .registry import Method, register_method


@dataclass(frozen=True)
class BlockLists:
    """The blocks every head visits.

    Attributes:
        block_idx: (B, H, NQB, C) int32 visited key blocks per query block,
            ascending; the first ``block_cnt`` entries are valid.
        block_cnt: (B, H, NQB) int32; 0 for query blocks past a head's length.
        block_size: the grid's block.
        seq_lens: (B, H) int64 valid rows of each head.
    """

    block_idx: torch.Tensor
    block_cnt: torch.Tensor
    block_size: int
    seq_lens: torch.Tensor

    @property
    def visited_share(self) -> torch.Tensor:
        """(B, H) float32 visited blocks over the causal blocks of each head."""
        return visited_share(self.block_cnt, self.seq_lens, self.block_size)

    def block_mask(self) -> torch.Tensor:
        """(B, H, NQB, NKB) bool, the pattern as a block mask."""
        return block_mask_from_lists(self.block_idx, self.block_cnt, self.block_cnt.shape[-1])


def block_sparse_op(
    attention: Callable[..., Any],
    estimate: Callable[..., BlockLists],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None,
    seq_lens: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    backend: str,
    layout: str,
    return_pattern: bool,
    **params: Any,
):
    """The body of a block-sparse op (``attention`` is the op itself, for left padding):
    estimate each head's pattern, then run the block-sparse kernel on it.

    ``params`` are the estimator's settings, already validated. Shapes and
    arguments as :func:`tokensparse.methods.flexprefill.flexprefill_attention`.
    """
    check_inputs(query, key, value, key_padding_mask)
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
    if key_padding_mask is not None:
        if seq_lens is not None:
            raise ValueError("pass seq_lens or key_padding_mask, not both")
        return run_left_padded(
            attention, query, key, value, key_padding_mask, layout=layout, return_pattern=return_pattern,
            scale=scale, backend=backend, **params,
        )
    pattern = estimate(query, key, scale=scale, seq_lens=seq_lens, backend=backend, **params)
    batch, num_heads, seq_len, _ = query.shape
    out = None
    if layout == "blhd":
        out = query.new_empty(batch, seq_len, num_heads, value.shape[-1]).transpose(1, 2)
    out = ops_for(query, backend).block_sparse_attention(
        query, key, value, pattern.block_idx, pattern.block_cnt, pattern.block_size,
        seq_lens=pattern.seq_lens, scale=scale, out=out,
    )
    if layout == "blhd":
        out = out.transpose(1, 2)
    return (out, pattern) if return_pattern else out


def register_block_sparse(
    name: str,
    config_type: type,
    attention: Callable[..., Any],
    estimate: Callable[..., BlockLists],
    description: str,
) -> Method:
    """Register a block-sparse method whose config has ``kwargs()`` (the op's settings
    and ``backend``) and ``runs_dense(seq_len)``."""

    def prefill(query, key, value, config, *, scale=None, key_padding_mask=None, layout="bhld"):
        if key_padding_mask is not None and bool(key_padding_mask.all()):
            key_padding_mask = None
        return attention(
            query, key, value, scale=scale, key_padding_mask=key_padding_mask, layout=layout, return_pattern=True,
            **config.kwargs(),
        )

    def inner(config):
        def attend(query, key, value, *, scale, seq_lens=None, key_padding_mask=None):
            return attention(
                query, key, value, scale=scale, seq_lens=seq_lens, key_padding_mask=key_padding_mask, **config.kwargs()
            )

        return attend

    return register_method(
        Method(
            name,
            config_type=config_type,
            prefill=prefill,
            runs_dense=lambda config, seq_len: config.runs_dense(seq_len),
            inner=inner,
            estimate=lambda query, key, config: estimate(query, key, **config.kwargs()),
            description=description,
        )
    )


__all__ = ["BlockLists", "block_sparse_op", "register_block_sparse"]
