"""The public Token Sparse Attention op.

Layout at this boundary is SDPA's: query (B, H, Lq, D), key/value (B, Hkv, Lk, D),
output (B, H, Lq, Dv). :func:`attend_selected` can also write transformers'
(B, Lq, H, Dv) directly. Lq == Lk is a whole prompt; Lq < Lk is a chunk after a
cached prefix (chunked prefill, a second turn over a cached document): the
queries are the last Lq of the Lk positions and causality is by absolute
position (bottom-right aligned).

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
from .kernels import ops_for, ops_for_chunk, reference
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

    A chunk after a cached prefix (Lq < Lk; query row i at absolute position
    Lk - Lq + i): the chunk's last ``window`` queries score all Lk keys; the
    budget (every mode) and each head's top-k are over the Lk - ``window`` keys
    before the window, cached and new alike, so ``keep_tokens`` bounds the keys
    a chunk attends over whatever the prefix length. A chunk row is kept for a
    head when its position is in the head's kept set (kept prefix tokens inside
    the chunk, and the window); it attends over the head's kept keys at
    positions up to its own. Other rows are zero, or with
    ``dropped_rows="local"`` their sink + local attention by absolute position.
    Chunks shorter than ``window`` (decode-like calls) run dense. Not supported
    for Lq < Lk (a ``ValueError``): ``inner``. The Triton path covers Lq == Lk
    only; chunks run the PyTorch stages (a warning is logged once where Triton
    would have run). With Lq == Lk the op is the whole-prompt op, bit for bit.

    Args:
        query: (B, H, Lq, D) floating point, after RoPE: the last Lq positions,
            Lq <= Lk.
        key: (B, Hkv, Lk, D), H a multiple of Hkv (GQA; K/V are never repeated);
            cached positions first.
        value: (B, Hkv, Lk, Dv).
        coverage: tau, share of window attention mass that may be dropped
            (default 0.005).
        window: W, trailing queries that score the prefix (default 128).
        kernel_size: odd width of the score smoothing (default 7).
        min_tokens: floor on prefix tokens kept per head (default 1024).
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: optional (B, Lk) bool, True for real tokens, padding on
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
        (B, H, Lq, Dv) output, and the selection if ``return_stats`` (over the
        Lk key positions). Sequences with ``Lk <= window + min_tokens`` run dense.
    """
    config = _resolve_config(
        config, coverage=coverage, window=window, kernel_size=kernel_size, min_tokens=min_tokens, backend=backend
    )
    check_inputs(query, key, value, key_padding_mask, cached_prefix=True)
    check_chunk_support(query, key, inner)
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
        query: (B, H, Lq, D); key, value: (B, Hkv, Lk, D / Dv), Lq <= Lk
            (see :func:`token_sparse_attention` for a chunk after a cached prefix).
        selection: from :func:`select_tokens`, with ``kept_idx`` set.
        scale: softmax scale, default 1 / sqrt(D).
        backend: stage kernels to use ("auto", "torch", "triton").
        layout: "bhld" returns (B, H, Lq, Dv); "blhd" returns (B, Lq, H, Dv).
        config: only ``dropped_rows`` and ``local_block`` are read.
        inner: the attention run on the compressed sequences (each head's
            valid length given as ``seq_lens``) instead of dense causal SDPA.

    Returns:
        The output, zero in rows a head did not keep (or, with
        ``config.dropped_rows == "local"``, their sink + local attention).
    """
    if selection.kept_idx is None:
        raise ValueError("selection.kept_idx is None (every sequence runs dense); use dense attention")
    if query.shape[2] != key.shape[2]:
        check_chunk_support(query, key, inner)
        out = _attend_kept_chunk(query, key, value, selection.kept_idx, scale=scale, backend=backend, layout=layout)
    else:
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


def check_chunk_support(query: torch.Tensor, key: torch.Tensor, inner: InnerAttention | None) -> None:
    """Raise ``ValueError`` for what a chunk after a cached prefix (Lq < Lk) does not support yet."""
    if query.shape[2] == key.shape[2]:
        return
    if inner is not None:
        raise ValueError(
            f"an inner attention needs query and key of one length; got Lq={query.shape[2]} < Lk={key.shape[2]} "
            "(a chunk after a cached prefix runs dense SDPA on the kept tokens only)"
        )


def _attend_kept_chunk(query, key, value, kept_idx, *, scale, backend, layout) -> torch.Tensor:
    """Compress, attend and decompress a chunk: query (B, H, Lq, D) at the last Lq of Lk positions.

    A head's kept positions (``kept_idx``, K ascending slots, padding Lk last)
    are attended causally in slot order, which is position order: the plain
    causal SDPA of the whole-prompt op on K x K compact rows. Slots before the
    chunk have no query in this call; they read any chunk row and are written,
    with the padding, to the spare row Lq of the scatter. Computing those rows
    costs at most a K x K causal attention (K is the key budget) and needs no
    mask and no host sync, where attending only the chunk's rows would need a
    per-head bottom-right mask.
    """
    ops_for_chunk(query, backend)  # checks the backend; logs the Triton fallback once
    query_len, seq_len = query.shape[2], key.shape[2]
    # Row in the chunk of every kept slot; before the chunk or padding (Lk - offset == Lq): the spare row Lq.
    rows = kept_idx - (seq_len - query_len)
    rows = torch.where(rows >= 0, rows, query_len)
    q_c = torch.gather(query, 2, rows.clamp(max=query_len - 1)[..., None].expand(-1, -1, -1, query.shape[-1]))
    k_c, v_c = reference.gather_kv_ref(key, value, kept_idx)
    out_c = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True, scale=scale)
    return reference.scatter_kept_ref(out_c, rows, query_len, layout)


def _resolve_config(config: TokenSparseConfig | None, **overrides: int | float | str | None) -> TokenSparseConfig:
    given = {name: value for name, value in overrides.items() if value is not None}
    if config is None:
        return TokenSparseConfig(**given)
    if not isinstance(config, TokenSparseConfig):
        raise ValueError(f"config must be a TokenSparseConfig, got {type(config).__name__}")
    if given:
        raise ValueError(f"pass either config or {sorted(given)}, not both")
    return config


__all__ = ["InnerAttention", "token_sparse_attention", "attend_selected", "check_chunk_support"]
