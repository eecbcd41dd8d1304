"""Plain PyTorch references for the stages that the Triton kernels implement.

These run on any device and define the numbers the kernels must reproduce.
Layouts: query (B, H, L, D); key and value (B, Hkv, L, D) with H a multiple of
Hkv (query head h reads KV head h // (H // Hkv)); indices (B, H, K) int64.
"""

from __future__ import annotations

import torch


def window_mass_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax attention of the last ``window`` queries on every key.

    Args:
        query: (B, H, Lq, D), the last Lq positions of the keys' sequence
            (Lq == Lk for a whole prompt; only the last ``window`` rows are read).
        key: (B, Hkv, Lk, D).
        window: W, number of trailing queries that score (1 <= W <= Lq).
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: optional (B, Lk) bool, True for real tokens.

    Returns:
        (B, H, Lk) float32 (float64 for float64 inputs): for key j, the mean over
        the W window queries (at positions Lk - W .. Lk - 1) of their causal
        softmax probability on j. Each row sums to 1 over the keys; padded keys get 0.
    """
    batch, num_heads, query_len, head_dim = query.shape
    seq_len = key.shape[2]
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = head_dim**-0.5 if scale is None else scale

    q_pos = torch.arange(seq_len - window, seq_len, device=query.device)
    k_pos = torch.arange(seq_len, device=query.device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (W, Lk)
    if key_padding_mask is not None:
        allowed = allowed[None, None] & key_padding_mask[:, None, None, :]  # (B, 1, W, Lk)

    out = torch.empty(batch, num_heads, seq_len, dtype=acc, device=query.device)
    # One KV head at a time: its whole query group shares the keys, so K is read
    # once per group and never repeated across the group in memory.
    for kv_head in range(num_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        q_win = query[:, heads, query_len - window :, :].to(acc)  # (B, G, W, D)
        k = key[:, kv_head : kv_head + 1, :, :].to(acc)  # (B, 1, Lk, D)
        logits = torch.matmul(q_win, k.transpose(-1, -2)) * scale  # (B, G, W, Lk)
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out[:, heads] = probs.mean(dim=2)
    return out


def gather_kept_ref(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kept_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress: rows of the kept tokens of every query head.

    Args:
        query: (B, H, L, D); key, value: (B, Hkv, L, D) (value may have its own Dv).
        kept_idx: (B, H, K) int64 positions; entries equal to L are padding.

    Returns:
        q, k: (B, H, K, D) and v: (B, H, K, Dv). Padding rows hold copies of row
        L - 1; they sit at the end of every causal sequence, so valid rows never
        attend to them.
    """
    seq_len = query.shape[2]
    idx = kept_idx.clamp(max=seq_len - 1)
    q_c = torch.gather(query, 2, idx[..., None].expand(-1, -1, -1, query.shape[-1]))
    k_c, v_c = gather_kv_ref(key, value, kept_idx)
    return q_c, k_c, v_c


def gather_kv_ref(key: torch.Tensor, value: torch.Tensor, kept_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress K/V alone: rows of the kept keys of every query head (the K/V half of :func:`gather_kept_ref`).

    Args:
        key, value: (B, Hkv, Lk, D) (value may have its own Dv).
        kept_idx: (B, H, K) int64 key positions, H a multiple of Hkv; entries
            equal to Lk are padding (they read row Lk - 1).

    Returns:
        k: (B, H, K, D) and v: (B, H, K, Dv).
    """
    batch, num_heads, _ = kept_idx.shape
    num_kv_heads, seq_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    idx = kept_idx.clamp(max=seq_len - 1)
    # Address K/V rows as (kv_head * L + position) in a flat (B, Hkv * L, D) view,
    # so each query head reads its KV head's rows without repeating K/V to H heads.
    kv_of_head = torch.arange(num_heads, device=kept_idx.device) // group
    flat_idx = (kv_of_head[None, :, None] * seq_len + idx).reshape(batch, -1)  # (B, H * K)

    def take(x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        rows = torch.gather(x.reshape(batch, num_kv_heads * seq_len, dim), 1, flat_idx[..., None].expand(-1, -1, dim))
        return rows.view(batch, num_heads, -1, dim)

    return take(key), take(value)


def scatter_kept_ref(
    out_c: torch.Tensor, kept_idx: torch.Tensor, seq_len: int, layout: str = "bhld"
) -> torch.Tensor:
    """Decompress: put compressed rows back in place, zeros elsewhere.

    Args:
        out_c: (B, H, K, Dv) attention output on the compressed sequences.
        kept_idx: (B, H, K) int64 positions; entries equal to ``seq_len`` are padding.
        seq_len: L.
        layout: ``"bhld"`` returns (B, H, L, Dv) as SDPA does; ``"blhd"`` returns
            (B, L, H, Dv) as transformers' attention functions do (contiguous).

    Returns:
        The full output, zero in rows a head did not keep.
    """
    batch, num_heads, _, dim = out_c.shape
    # One spare row absorbs the padding entries, so no masking is needed.
    if layout == "bhld":
        full = out_c.new_zeros(batch, num_heads, seq_len + 1, dim)
        full.scatter_(2, kept_idx[..., None].expand(-1, -1, -1, dim), out_c)
        return full[:, :, :seq_len]
    if layout == "blhd":
        full = out_c.new_zeros(batch, seq_len + 1, num_heads, dim)
        idx = kept_idx.transpose(1, 2)[..., None].expand(-1, -1, -1, dim)
        full.scatter_(1, idx, out_c.transpose(1, 2))
        return full[:, :seq_len]
    raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")


def top_k_per_head_ref(
    scores: torch.Tensor,
    keep: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int,
    *,
    max_keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's top-``keep`` prefix positions by its own score, plus the window.

    Ties go to the lower position (a stable descending sort), so the result is
    deterministic.

    Args:
        scores: (B, H, P) smoothed prefix scores, P = L - window.
        keep: (B, H) int64 prefix tokens to keep per head.
        seq_lens: (B,) int64 real tokens per sequence (left padding).
        window: W.
        max_keep: ``int(keep.max())`` when the caller knows it on the host;
            otherwise it is read from the device (one host sync).

    Returns:
        kept_idx: (B, H, max(keep) + W) int64 ascending positions, padded with L.
        num_kept: (B, H) int64 valid entries of each row.
    """
    batch, num_heads, prefix = scores.shape
    seq_len = prefix + window
    pad = seq_len - seq_lens  # left padding of each sequence
    positions = torch.arange(prefix, device=scores.device)
    is_pad = positions[None, :] < pad[:, None]  # (B, P)
    ranked = scores.masked_fill(is_pad[:, None, :], float("-inf"))
    if max_keep is None:
        max_keep = int(keep.max())  # sizes the compact tensors: one host sync per call
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :max_keep]
    rank = torch.arange(max_keep, device=scores.device)
    prefix_idx = torch.where(rank[None, None, :] < keep[..., None], order, seq_len)

    window_pos = torch.arange(prefix, seq_len, device=scores.device)
    window_idx = torch.where(window_pos[None, :] < pad[:, None], seq_len, window_pos[None, :])  # (B, W)
    kept_idx = torch.cat([prefix_idx, window_idx[:, None, :].expand(batch, num_heads, window)], dim=-1)
    kept_idx = torch.sort(kept_idx, dim=-1).values
    num_kept = keep + seq_lens.clamp(max=window)[:, None]
    return kept_idx, num_kept
