"""An independent float64 implementation of Token Sparse Attention for tests.

Written from SPEC.md with explicit loops over batch items and heads, sharing no
code with the library, so that a bug in the library cannot hide in both.
"""

from __future__ import annotations

import math

import torch


def reference_selection(q, k, *, coverage, window, kernel_size, min_tokens, scale=None):
    """Kept positions per head for ONE unpadded sequence.

    q: (H, n, D), k: (Hkv, n, D). Returns None when the sequence runs dense,
    else a list of H sorted position lists (prefix kept + window).
    """
    num_heads, n, dim = q.shape
    group = num_heads // k.shape[0]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if n <= window + min_tokens:
        return None
    prefix = n - window
    mass = torch.zeros(num_heads, n, dtype=torch.float64)
    for h in range(num_heads):
        logits = q[h, prefix:].double() @ k[h // group].double().T * scale  # (W, n)
        for i in range(window):
            logits[i, prefix + i + 1 :] = -math.inf
        mass[h] = torch.softmax(logits, dim=-1).mean(dim=0)
    radius = kernel_size // 2
    pooled = torch.zeros(num_heads, prefix, dtype=torch.float64)
    for j in range(prefix):
        lo, hi = max(0, j - radius), min(prefix, j + radius + 1)
        pooled[:, j] = mass[:, lo:hi].sum(dim=1) / kernel_size
    avg = pooled.mean(dim=0)
    dist = avg / avg.sum()
    running = torch.cumsum(torch.sort(dist).values, dim=0)
    below = int((running < coverage).sum())
    if below == 0:
        return None
    keep = max(min_tokens, prefix - (below + 1))
    kept = []
    for h in range(num_heads):
        order = sorted(range(prefix), key=lambda j: (-float(pooled[h, j]), j))[:keep]
        kept.append(sorted(order) + list(range(prefix, n)))
    return kept, mass


def reference_attention(q, k, v, kept, scale=None):
    """Causal attention of each head over its kept positions, float64; other rows zero.

    q: (H, n, D), k/v: (Hkv, n, D); kept: list of H position lists or None (dense).
    """
    num_heads, n, dim = q.shape
    group = num_heads // k.shape[0]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(num_heads, n, v.shape[-1], dtype=torch.float64)
    for h in range(num_heads):
        rows = list(range(n)) if kept is None else kept[h]
        idx = torch.tensor(rows)
        qh = q[h, idx].double()
        kh = k[h // group, idx].double()
        vh = v[h // group, idx].double()
        logits = qh @ kh.T * scale
        allowed = idx[None, :] <= idx[:, None]
        logits = logits.masked_fill(~allowed, -math.inf)
        out[h, idx] = torch.softmax(logits, dim=-1) @ vh
    return out
