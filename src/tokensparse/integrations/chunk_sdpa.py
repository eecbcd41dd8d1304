"""Mask-free causal SDPA for chunked prefill: ``chunk_sdpa(model)``.

transformers' SDPA path gives every chunk after a cached prefix a materialised
(B, 1, Lq, Lk) boolean mask (64 GiB for a 64K chunk over a 1M prefix) and runs
the masked SDPA kernels. Without padding the mask says nothing but "causal by
absolute position", which SDPA's lower-right causal bias states exactly and
lets the flash kernel run. :data:`CHUNK_SDPA` registers that attention and a
mask builder that builds nothing without padding (with padding both defer to
transformers' SDPA). Switch a model to it with :func:`chunk_sdpa` and enable
tokensparse inside: the token sparse layers then get ``attention_mask=None``
(bottom-right causal, no padding) too. ``bench prefill --chunk-size`` runs
dense and sparse this way.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

CHUNK_SDPA = "tokensparse_chunk_sdpa"


def chunk_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA by absolute position: query (B, H, Lq, D) are the last Lq of Lk keys.

    Returns ((B, Lq, H, Dv), None) as transformers expects.
    """
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    query_len, key_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if query_len == 1:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    elif query_len == key_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(query_len, key_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def chunk_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask without padding (the attention is causal by position); transformers' SDPA mask with it."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_chunk_sdpa() -> str:
    """Register :data:`CHUNK_SDPA` with transformers' attention and mask interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CHUNK_SDPA, chunk_sdpa_forward)
    AttentionMaskInterface.register(CHUNK_SDPA, chunk_sdpa_mask)
    return CHUNK_SDPA


@contextlib.contextmanager
def chunk_sdpa(model: Any) -> Iterator[None]:
    """Run ``model`` with :data:`CHUNK_SDPA` inside the block (enable tokensparse inside it, not around)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_chunk_sdpa())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
