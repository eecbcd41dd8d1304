"""The public Token Sparse Attention op.

Layout at this boundary is SDPA's: query (B, H, L, D), key/value (B, Hkv, L, D),
output (B, H, L, Dv). :func:`attend_selected` can also write transformers'
(B, L, H, Dv) directly.

The attention that runs on the kept tokens is dense causal SDPA unless the
caller passes ``inner``, any attention with the :data:`InnerAttention`
signature (a composition such as Token Sparse + FlexPrefill passes the
block-sparse method's op; this module imports no other method).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .config import TokenSparseConfig
from .kernels import ops_for
from .ops import check_inputs, dense_causal_attention
from .local_attention import fill_dropped_rows
from .selection import TokenSelection, select_tokens


class InnerAttention(Protocol):
    """A causal attention that can run on the kept tokens instead of dense SDPA.

    ``inner(query, key, value, *, scale, seq_lens=None, key_padding_mask=None)``
    with query (B, H, L, D), key/value (B, Hkv, L, D), returning (B, H, L, Dv).
    ``seq_lens`` (B, H): valid rows of each head with padding at the end (the
    compressed sequences); ``key_padding_mask`` (B, L): left padding (a whole
    sequence that drops nothing). At most one of the two is given.
    """

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float | None,
        seq_lens: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def token_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    coverage: float | None = None,
    window: int | None = None,
    kernel_size: int | None = None,
    min_tokens: int | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
    config: TokenSparseConfig | None = None,
    inner: InnerAttention | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenSelection]:
    """Causal attention over the tokens each head selects; a drop-in for causal SDPA.

    Every head keeps its own most-attended prefix tokens (scored by the last
    ``window`` queries) plus the window, attends densely over them, and writes
    zeros in the rows of the tokens it did not keep.

    Args:
        query: (B, H, L, D) floating point, after RoPE.
        key: (B, Hkv, L, D), H a multiple of Hkv (GQA; K/V are never repeated).
        value: (B, Hkv, L, Dv).
        coverage: tau, share of window attention mass that may be dropped
            (default 0.005).
        window: W, trailing queries that score the prefix (default 128).
        kernel_size: odd width of the score smoothing (default 7).
        min_tokens: floor on prefix tokens kept per head (default 1024).
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: optional (B, L) bool, True for real tokens, padding on
            the left. Padded positions are never scored or kept, and their output
            rows are zero.
        backend: "auto" (default: Triton kernels on CUDA tensors, PyTorch
            elsewhere), "triton" or "torch" (the reference path).
        config: a full :class:`TokenSparseConfig` (budget modes, dropped rows);
            cannot be combined with the keyword settings above.
        inner: the attention run on the kept tokens (and on sequences that drop
            nothing), see :class:`InnerAttention`; default dense causal SDPA.
        return_stats: also return the :class:`TokenSelection` (kept counts and
            indices per batch item and head, dropped window mass).

    Returns:
        (B, H, L, Dv) output, and the selection if ``return_stats``.
        Sequences with ``L <= window + min_tokens`` run dense.
    """
    config = _resolve_config(
        config, coverage=coverage, window=window, kernel_size=kernel_size, min_tokens=min_tokens, backend=backend
    )
    check_inputs(query, key, value, key_padding_mask)
    selection = select_tokens(query, key, config, scale=scale, key_padding_mask=key_padding_mask)
    if selection.kept_idx is None:
        attend = dense_causal_attention if inner is None else inner
        out = attend(query, key, value, scale=scale, key_padding_mask=key_padding_mask)
    else:
        out = attend_selected(
            query, key, value, selection, scale=scale, backend=config.backend, config=config, inner=inner
        )
    return (out, selection) if return_stats else out


def attend_selected(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: TokenSelection,
    *,
    scale: float | None = None,
    backend: str = "auto",
    layout: str = "bhld",
    config: TokenSparseConfig | None = None,
    inner: InnerAttention | None = None,
) -> torch.Tensor:
    """Compress, attend causally on the kept tokens, decompress.

    Args:
        query: (B, H, L, D); key, value: (B, Hkv, L, D / Dv).
        selection: from :func:`select_tokens`, with ``kept_idx`` set.
        scale: softmax scale, default 1 / sqrt(D).
        backend: stage kernels to use ("auto", "torch", "triton").
        layout: "bhld" returns (B, H, L, Dv); "blhd" returns (B, L, H, Dv).
        config: only ``dropped_rows`` and ``local_block`` are read.
        inner: the attention run on the compressed sequences (each head's
            valid length given as ``seq_lens``) instead of dense causal SDPA.

    Returns:
        The output, zero in rows a head did not keep (or, with
        ``config.dropped_rows == "local"``, their sink + local attention).
    """
    if selection.kept_idx is None:
        raise ValueError("selection.kept_idx is None (every sequence runs dense); use dense attention")
    out = _attend_kept(query, key, value, selection, scale=scale, backend=backend, layout=layout, inner=inner)
    if config is None or config.dropped_rows == "zero":
        return out
    fill_dropped_rows(
        out.transpose(1, 2) if layout == "blhd" else out, query, key, value, selection.kept_idx, config.local_block,
        scale=scale, seq_lens=selection.seq_lens, backend=backend,
    )
    return out


def _attend_kept(query, key, value, selection, *, scale, backend, layout, inner) -> torch.Tensor:
    ops = ops_for(query, backend)
    if inner is not None:
        q_c, k_c, v_c = ops.gather_kept(query, key, value, selection.kept_idx)
        out_c = inner(q_c, k_c, v_c, scale=scale, seq_lens=selection.num_kept)
        return ops.scatter_kept(out_c, selection.kept_idx, query.shape[2], layout)
    if ops.attend_kept is not None:
        # Fused path (Triton): compress, attend and decompress a few heads at a time.
        return ops.attend_kept(query, key, value, selection.kept_idx, scale=scale, layout=layout)
    q_c, k_c, v_c = ops.gather_kept(query, key, value, selection.kept_idx)
    # Kept indices are ascending, so causal attention on the compact sequence is
    # causal attention on the original positions restricted to the kept set;
    # padding entries sit at the end, where no valid row can see them.
    out_c = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True, scale=scale)
    return ops.scatter_kept(out_c, selection.kept_idx, query.shape[2], layout)


def _resolve_config(config: TokenSparseConfig | None, **overrides: int | float | str | None) -> TokenSparseConfig:
    given = {name: value for name, value in overrides.items() if value is not None}
    if config is None:
        return TokenSparseConfig(**given)
    if not isinstance(config, TokenSparseConfig):
        raise ValueError(f"config must be a TokenSparseConfig, got {type(config).__name__}")
    if given:
        raise ValueError(f"pass either config or {sorted(given)}, not both")
    return config


__all__ = ["InnerAttention", "token_sparse_attention", "attend_selected"]
