"""The public Token Sparse Attention op.

Layout at this boundary is SDPA's: query (B, H, L, D), key/value (B, Hkv, L, D),
output (B, H, L, Dv). :func:`attend_selected` can also write transformers'
(B, L, H, Dv) directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TokenSparseConfig
from .kernels import ops_for
from .kernels.local_rows import fill_dropped_rows
from .selection import TokenSelection, select_tokens


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
        config: a full :class:`TokenSparseConfig` (budget modes, attention kind);
            cannot be combined with the keyword settings above.
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
    if selection.kept_idx is None and config.attention == "flexprefill":
        from .flexprefill import FlexPrefillConfig, flexprefill_attention

        out = flexprefill_attention(
            query, key, value, scale=scale, key_padding_mask=key_padding_mask,
            **FlexPrefillConfig.from_token_sparse(config).kwargs(),
        )
    elif selection.kept_idx is None:
        out = dense_causal_attention(query, key, value, scale=scale, key_padding_mask=key_padding_mask)
    else:
        out = attend_selected(query, key, value, selection, scale=scale, backend=config.backend, config=config)
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
) -> torch.Tensor:
    """Compress, attend causally on the kept tokens, decompress.

    Args:
        query: (B, H, L, D); key, value: (B, Hkv, L, D / Dv).
        selection: from :func:`select_tokens`, with ``kept_idx`` set.
        scale: softmax scale, default 1 / sqrt(D).
        backend: stage kernels to use ("auto", "torch", "triton").
        layout: "bhld" returns (B, H, L, Dv); "blhd" returns (B, L, H, Dv).
        config: only its attention settings are read: with
            ``attention="flexprefill"`` the compressed sequences run FlexPrefill
            (each head's pattern from its own last valid queries, see
            :mod:`tokensparse.flexprefill`) instead of dense causal SDPA.

    Returns:
        The output, zero in rows a head did not keep (or, with
        ``config.dropped_rows == "local"``, their sink + local attention).
    """
    if selection.kept_idx is None:
        raise ValueError("selection.kept_idx is None (every sequence runs dense); use dense attention")
    out = _attend_kept(query, key, value, selection, scale=scale, backend=backend, layout=layout, config=config)
    if config is None or config.dropped_rows == "zero":
        return out
    fill_dropped_rows(
        out.transpose(1, 2) if layout == "blhd" else out, query, key, value, selection.kept_idx, config.local_block,
        scale=scale, seq_lens=selection.seq_lens, backend=backend,
    )
    return out


def _attend_kept(query, key, value, selection, *, scale, backend, layout, config) -> torch.Tensor:
    ops = ops_for(query, backend)
    if config is not None and config.attention == "flexprefill":
        from .flexprefill import FlexPrefillConfig, flexprefill_attention

        fp_kwargs = {**FlexPrefillConfig.from_token_sparse(config).kwargs(), "backend": backend}
        q_c, k_c, v_c = ops.gather_kept(query, key, value, selection.kept_idx)
        out_c = flexprefill_attention(q_c, k_c, v_c, scale=scale, seq_lens=selection.num_kept, **fp_kwargs)
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


def dense_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal SDPA with GQA and optional left padding; padded rows are zero. (B, H, L, Dv)."""
    gqa = query.shape[1] != key.shape[1]
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    seq_len = query.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=query.device).tril()
    # A padded query row sees no real key; letting it see itself keeps the softmax
    # finite, and the row is zeroed below.
    mask = (causal & key_padding_mask[:, None, None, :]) | torch.eye(seq_len, dtype=torch.bool, device=query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~key_padding_mask[:, None, :, None], 0.0)


def check_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the argument if the inputs do not fit the op."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    batch, num_heads, seq_len, head_dim = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}"
        )
    if key.shape[2] != seq_len or value.shape[2] != seq_len:
        raise ValueError(
            "query, key and value must have one sequence length (causal prefill), got "
            f"query {seq_len}, key {key.shape[2]}, value {value.shape[2]}"
        )
    if key.shape[3] != head_dim:
        raise ValueError(f"key head_dim {key.shape[3]} must equal query head_dim {head_dim}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same number of heads, got {key.shape[1]} and {value.shape[1]}")
    if key.shape[1] == 0 or num_heads % key.shape[1] != 0:
        raise ValueError(
            f"query heads ({num_heads}) must be a multiple of key/value heads ({key.shape[1]})"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = real token)")
        if key_padding_mask.shape != (batch, seq_len):
            raise ValueError(
                f"key_padding_mask must have shape (B, L) = ({batch}, {seq_len}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, query on {query.device}")
        # Left padding means once a row turns True it stays True.
        if bool((key_padding_mask[:, 1:] < key_padding_mask[:, :-1]).any()):
            raise ValueError("key_padding_mask must be left padding (False... then True...) in every row")


def _resolve_config(config: TokenSparseConfig | None, **overrides: int | float | str | None) -> TokenSparseConfig:
    given = {name: value for name, value in overrides.items() if value is not None}
    if config is None:
        return TokenSparseConfig(**given)
    if not isinstance(config, TokenSparseConfig):
        raise ValueError(f"config must be a TokenSparseConfig, got {type(config).__name__}")
    if given:
        raise ValueError(f"pass either config or {sorted(given)}, not both")
    return config


__all__ = [
    "token_sparse_attention",
    "attend_selected",
    "dense_causal_attention",
    "check_inputs",
]
