"""An independent float64 implementation of Token Sparse Attention for tests.

Written from SPEC.md with explicit loops over batch items and heads, sharing no
code with the library, so that a bug in the library cannot hide in both.
"""

from __future__ import annotations

import math
from fractions import Fraction

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


# ---------------------------------------------------------------- a chunk after a cached prefix
def reference_chunk(q, k, v, config, lens=None, scale=None):
    """Token Sparse Attention of a chunk after a cached prefix, float64, one sequence and head at a time.

    Written from the description of issue 14, sharing no code with the library.
    q: (B, H, Lq, D), the last Lq positions; k/v: (B, Hkv, Lk, D), Lq <= Lk;
    lens: real tokens per sequence (left padding), default all Lk; config: a
    TokenSparseConfig (window, kernel_size, min_tokens, max_tokens, budget and
    its parameters are read).

    Rules: a chunk shorter than the window, or a sequence of at most window +
    min_tokens real tokens, runs dense. Otherwise the last ``window`` queries
    score every key causally; the prefix is the real keys before the window; the
    budget mode picks a count per head, each head keeps its top-scored prefix
    keys (ties to the lower position) plus the window; a chunk row whose
    position a head kept attends over that head's kept keys at positions up to
    its own, every other row is zero. Padded rows are zero.

    Returns (out (B, H, Lq, Dv) float64, kept: per sequence None (dense) or H
    sorted lists of absolute key positions, dropped: per sequence H floats).
    """
    batch, num_heads, query_len, dim = q.shape
    seq_len = k.shape[2]
    lens = [seq_len] * batch if lens is None else list(lens)
    group = num_heads // k.shape[1]
    out = torch.zeros(batch, num_heads, query_len, v.shape[-1], dtype=torch.float64)
    kept_all, dropped_all = [], []
    for b, n in enumerate(lens):
        pad = seq_len - n
        kept, dropped = _chunk_selection_one(q[b], k[b, :, pad:], config, n, scale)
        for h in range(num_heads):
            for i in range(query_len):
                r = n - query_len + i  # the row's position among the real tokens
                if r < 0 or (kept is not None and r not in kept[h]):
                    continue
                keys = [j for j in (range(n) if kept is None else kept[h]) if j <= r]
                out[b, h, i] = _attend_row(q[b, h, i], k[b, :, pad:], v[b, :, pad:], h, group, keys, scale)
        kept_all.append(None if kept is None else [[p + pad for p in row] for row in kept])
        dropped_all.append(dropped)
    return out, kept_all, dropped_all


def _attend_row(q_row, k, v, head, group, keys, scale):
    """Softmax attention of query head ``head``'s row q_row (D,) over the listed key positions (GQA by h // group)."""
    kv = head // group
    scale = 1.0 / math.sqrt(q_row.shape[-1]) if scale is None else scale
    idx = torch.tensor(keys)
    logits = k[kv, idx].double() @ q_row.double() * scale
    return torch.softmax(logits, dim=0) @ v[kv, idx].double()


def _chunk_selection_one(q, k, config, n, scale):
    """Kept lists (positions among the n real keys) of one sequence, or None when it runs dense.

    q: (H, Lq, D) the chunk rows (the last Lq positions); k: (Hkv, n, D) the real keys.
    """
    num_heads, query_len, dim = q.shape
    group = num_heads // k.shape[0]
    window = config.window
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if query_len < window or n <= window + config.min_tokens:
        return None, [0.0] * num_heads
    prefix = n - window
    mass = torch.zeros(num_heads, n, dtype=torch.float64)
    for h in range(num_heads):
        for r in range(prefix, n):
            i = query_len - n + r  # chunk row of the window query at real position r
            logits = k[h // group, : r + 1].double() @ q[h, i].double() * scale
            mass[h, : r + 1] += torch.softmax(logits, dim=0) / window
    radius = config.kernel_size // 2
    scores = torch.zeros(num_heads, prefix, dtype=torch.float64)
    for j in range(prefix):
        lo, hi = max(0, j - radius), min(prefix, j + radius + 1)
        scores[:, j] = mass[:, lo:hi].sum(dim=1) / config.kernel_size
    keep = [_budget(config, scores, h, prefix) for h in range(num_heads)]
    if all(x == prefix for x in keep):
        return None, [0.0] * num_heads
    kept, dropped = [], []
    for h in range(num_heads):
        ranked = sorted(range(prefix), key=lambda j: (-float(scores[h, j]), j))[: keep[h]]
        kept.append(sorted(ranked) + list(range(prefix, n)))
        chosen = set(ranked)
        dropped.append(sum(float(mass[h, j]) for j in range(prefix) if j not in chosen))
    return kept, dropped


def _budget(config, scores, head, prefix):
    """Prefix keys one head keeps under the config's budget mode, floor and cap."""
    def coverage_count(dist):
        total = sum(dist)
        running, below = 0.0, 0
        for x in sorted(d / total for d in dist):
            running += x
            if running >= config.coverage:
                break
            below += 1
        return prefix if below == 0 else prefix - (below + 1)

    if config.budget == "coverage":
        keep = coverage_count(scores.mean(dim=0).tolist())
    elif config.budget == "head_coverage":
        keep = coverage_count(scores[head].tolist())
    elif config.budget == "keep_ratio":
        keep = math.ceil(Fraction(str(config.keep_ratio)) * prefix)
    else:
        keep = config.keep_tokens
    if config.max_tokens is not None:
        keep = min(keep, config.max_tokens)
    return min(max(keep, config.min_tokens), prefix)
