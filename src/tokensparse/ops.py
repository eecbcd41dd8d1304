"""Ground-floor helpers every attention method shares: input checks and dense causal attention.

Layout is SDPA's: query (B, H, Lq, D), key/value (B, Hkv, Lk, D), H a multiple of
Hkv. Lq == Lk is a whole prompt; Lq < Lk is a chunk after a cached prefix (the
queries are the last Lq positions, causality by absolute position). It imports
only torch and :mod:`tokensparse.padding`, so any method may use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .padding import front_to_left, left_to_front


def dense_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal SDPA with GQA and optional left padding; padded rows are zero. (B, H, Lq, Dv).

    query (B, H, Lq, D) holds the last Lq of the Lk positions of key/value
    (Lq <= Lk): query row i sits at position Lk - Lq + i (bottom-right aligned
    causality). ``key_padding_mask``: (B, Lk).
    """
    gqa = query.shape[1] != key.shape[1]
    query_len, key_len = query.shape[2], key.shape[2]
    if query_len != key_len:
        return _dense_chunk_attention(query, key, value, scale=scale, key_padding_mask=key_padding_mask)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    seq_len = query.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=query.device).tril()
    # A padded query row sees no real key; letting it see itself keeps the softmax
    # finite, and the row is zeroed below.
    mask = (causal & key_padding_mask[:, None, None, :]) | torch.eye(seq_len, dtype=torch.bool, device=query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~key_padding_mask[:, None, :, None], 0.0)


def _dense_chunk_attention(query, key, value, *, scale, key_padding_mask) -> torch.Tensor:
    """:func:`dense_causal_attention` for Lq < Lk: an explicit bottom-right causal mask."""
    query_len, key_len = query.shape[2], key.shape[2]
    device = query.device
    query_pos = torch.arange(key_len - query_len, key_len, device=device)
    key_pos = torch.arange(key_len, device=device)
    mask = key_pos[None, :] <= query_pos[:, None]  # (Lq, Lk)
    if key_padding_mask is not None:
        # A padded query row sees no real key; letting it see itself keeps the
        # softmax finite, and the row is zeroed below.
        own = key_pos[None, :] == query_pos[:, None]
        mask = (mask & key_padding_mask[:, None, None, :]) | own
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if key_padding_mask is None:
        return out
    return out.masked_fill(~key_padding_mask[:, None, key_len - query_len :, None], 0.0)


def check_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    cached_prefix: bool = False,
) -> None:
    """Raise ``ValueError`` naming the argument if the inputs do not fit the op.

    query (B, H, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv),
    key_padding_mask (B, Lk). Lq must equal Lk unless ``cached_prefix`` (an op
    that takes a chunk after a cached prefix), which allows Lq <= Lk.
    """
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
    # Empty inputs are refused rather than passed through: the budget and scale
    # arithmetic has no meaning for them (SDPA would return an empty tensor).
    for name, t in (("query", query), ("key", key), ("value", value)):
        for dim, size in zip(("batch (B)", "heads (H)", "sequence length (L)", "head_dim (D)"), t.shape):
            if size == 0:
                raise ValueError(f"{name} has an empty {dim} dimension, shape {tuple(t.shape)}; every dimension must be >= 1")
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}"
        )
    key_len = key.shape[2]
    if value.shape[2] != key_len:
        raise ValueError(f"key and value must have one sequence length, got key {key_len}, value {value.shape[2]}")
    if cached_prefix and seq_len > key_len:
        raise ValueError(
            f"query length ({seq_len}) must be at most the key length ({key_len}): the queries are the last "
            "positions of the keys' sequence"
        )
    if not cached_prefix and key_len != seq_len:
        raise ValueError(
            "query, key and value must have one sequence length (causal prefill), got "
            f"query {seq_len}, key {key_len}, value {value.shape[2]}"
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
        if key_padding_mask.shape != (batch, key_len):
            raise ValueError(
                f"key_padding_mask must have shape (B, Lk) = ({batch}, {key_len}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, query on {query.device}")
        # Left padding means once a row turns True it stays True.
        if bool((key_padding_mask[:, 1:] < key_padding_mask[:, :-1]).any()):
            raise ValueError("key_padding_mask must be left padding (False... then True...) in every row")


# ---------------------------------------------------------------- left padding
def run_left_padded(attention, query, key, value, key_padding_mask, *, layout, return_pattern, **params):
    """Left-padded batches for a block-sparse op that takes ``seq_lens`` (FlexPrefill, XAttention):
    move each sequence's real tokens to the front (padding at the end, where
    ``seq_lens`` handles it exactly), run ``attention``, and put rows back.

    ``attention(q, k, v, seq_lens=..., layout=..., return_pattern=True, **params)``
    must return its output and pattern; the pattern returned here is the one of
    the front-moved sequences. GQA is kept (K/V are moved, not repeated).
    """
    batch, num_heads, seq_len, _ = query.shape
    real = key_padding_mask.sum(dim=-1)  # (B,)
    q_f, k_f, v_f = left_to_front(query, key, value, seq_lens=real)
    lens = real[:, None].expand(batch, num_heads).contiguous()
    out_f, pattern = attention(q_f, k_f, v_f, seq_lens=lens, layout=layout, return_pattern=True, **params)
    out = front_to_left(out_f, real, seq_len, dim=2 if layout == "bhld" else 1)
    return (out, pattern) if return_pattern else out


__all__ = ["check_inputs", "dense_causal_attention", "run_left_padded"]
