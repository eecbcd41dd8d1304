"""Per-head top-k without a sort: radix select of the threshold, then compaction (Triton).

For every (batch, head) row of prefix scores the kernels find the ``keep``-th
largest score by an 8-round, 4-bit radix select on an order-preserving integer
key of the float32 score (histograms accumulated across the row's segments with
atomics, one launch per round, no host synchronisation), then write the kept
positions in ascending order by a prefix sum: every score above the threshold,
and of the scores equal to it the ones at the lowest positions. That is exactly
the set a stable descending sort takes (ties to the lower index), already in
causal order, followed by the window positions and the padding value L.
Reference: :func:`tokensparse.selection.top_k_per_head`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting

_ROUNDS = 8  # 4-bit digits of a 32-bit key
_BINS = 16
_MAX_SEGMENTS = 64


@triton.jit
def _order_key(x):
    """int32 whose signed order is the float order of ``x`` (-0.0 equals 0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _radix_state(Hist, row, num_rows, keep, ROUNDS_DONE: tl.constexpr):
    """Key prefix fixed by the first rounds, and how many of the matching keys to take."""
    bins = tl.arange(0, 16)
    prefix = keep * 0
    remaining = keep
    for r in tl.static_range(ROUNDS_DONE):
        hist = tl.load(Hist + (r * num_rows + row) * 16 + bins)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys with digit >= bin
        digit = tl.maximum(tl.sum((at_or_above >= remaining).to(tl.int32), 0) - 1, 0)
        remaining -= tl.sum(tl.where(bins == digit, at_or_above - hist, 0), 0)
        if r == 0:
            # The top digit was flipped (^ 8) so that negatives rank low.
            top = digit ^ 8
            prefix = prefix | (tl.where(top >= 8, top - 16, top) << 28)
        else:
            prefix = prefix | (digit << (28 - 4 * r))
    return prefix, remaining


@triton.jit
def _radix_hist_kernel(
    Scores, Keep, Pad, Hist,
    stride_sr, num_heads, num_rows, prefix_len, seg_len,
    ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    keep = tl.load(Keep + row).to(tl.int32)
    pad = tl.load(Pad + row // num_heads).to(tl.int32)
    prefix, _ = _radix_state(Hist, row, num_rows, keep, ROUND)
    SHIFT: tl.constexpr = 28 - 4 * ROUND
    bins = tl.arange(0, 16)
    acc = tl.zeros([16], tl.int32)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, prefix_len)
    for off in range(start, end, BLOCK):
        pos = off + tl.arange(0, BLOCK)
        ok = (pos < end) & (pos >= pad)
        key = _order_key(tl.load(Scores + row.to(tl.int64) * stride_sr + pos, mask=ok, other=0.0))
        digit = (key >> SHIFT) & 15
        if ROUND == 0:
            digit = digit ^ 8
        else:
            ok = ok & ((key >> (SHIFT + 4)) == (prefix >> (SHIFT + 4)))
        hit = (digit[:, None] == bins[None, :]) & ok[:, None]
        acc += tl.sum(hit.to(tl.int32), 0)
    tl.atomic_add(Hist + (ROUND * num_rows + row) * 16 + bins, acc)


@triton.jit
def _count_kernel(
    Scores, Keep, Pad, Hist, CountGt, CountEq,
    stride_sr, num_heads, num_rows, prefix_len, seg_len,
    ROUNDS: tl.constexpr, MAX_SEGMENTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    keep = tl.load(Keep + row).to(tl.int32)
    pad = tl.load(Pad + row // num_heads).to(tl.int32)
    threshold, _ = _radix_state(Hist, row, num_rows, keep, ROUNDS)
    n_gt = 0
    n_eq = 0
    start = seg * seg_len
    end = tl.minimum(start + seg_len, prefix_len)
    for off in range(start, end, BLOCK):
        pos = off + tl.arange(0, BLOCK)
        ok = (pos < end) & (pos >= pad)
        key = _order_key(tl.load(Scores + row.to(tl.int64) * stride_sr + pos, mask=ok, other=0.0))
        n_gt += tl.sum((ok & (key > threshold)).to(tl.int32), 0)
        n_eq += tl.sum((ok & (key == threshold)).to(tl.int32), 0)
    tl.store(CountGt + row * MAX_SEGMENTS + seg, n_gt)
    tl.store(CountEq + row * MAX_SEGMENTS + seg, n_eq)


@triton.jit
def _write_kernel(
    Scores, Keep, Pad, Hist, CountGt, CountEq, Out,
    stride_sr, stride_or, num_heads, num_rows, prefix_len, seg_len, num_segments,
    seq_len, window, width,
    ROUNDS: tl.constexpr, MAX_SEGMENTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    keep = tl.load(Keep + row).to(tl.int32)
    pad = tl.load(Pad + row // num_heads).to(tl.int32)
    threshold, take_eq = _radix_state(Hist, row, num_rows, keep, ROUNDS)
    take_eq = tl.where(keep > 0, take_eq, 0)
    out_row = Out + row.to(tl.int64) * stride_or

    # -- where this segment's kept entries start --
    segs = tl.arange(0, MAX_SEGMENTS)
    seg_ok = segs < num_segments
    n_gt = tl.load(CountGt + row * MAX_SEGMENTS + segs, mask=seg_ok, other=0)
    n_eq = tl.load(CountEq + row * MAX_SEGMENTS + segs, mask=seg_ok, other=0)
    eq_before = tl.cumsum(n_eq, 0) - n_eq
    taken = n_gt + tl.minimum(tl.maximum(take_eq - eq_before, 0), n_eq)
    taken = tl.where(keep > 0, taken, 0)
    write_at = tl.sum(tl.where(segs < seg, taken, 0), 0)
    eq_seen = tl.sum(tl.where(segs < seg, n_eq, 0), 0)

    # -- compact this segment's kept positions, ascending --
    start = seg * seg_len
    end = tl.minimum(start + seg_len, prefix_len)
    for off in range(start, end, BLOCK):
        pos = off + tl.arange(0, BLOCK)
        ok = (pos < end) & (pos >= pad)
        key = _order_key(tl.load(Scores + row.to(tl.int64) * stride_sr + pos, mask=ok, other=0.0))
        gt = ok & (key > threshold) & (keep > 0)
        eq = (ok & (key == threshold)).to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(eq, 0) - eq
        sel = gt | ((eq > 0) & (eq_rank < take_eq))
        sel_i = sel.to(tl.int32)
        dst = write_at + tl.cumsum(sel_i, 0) - 1
        tl.store(out_row + dst, pos.to(tl.int64), mask=sel_i != 0)
        write_at += tl.sum(sel_i, 0)
        eq_seen += tl.sum(eq, 0)

    # -- segment 0 appends the window positions and the padding value --
    if seg == 0:
        real_window = tl.minimum(seq_len - pad, window)
        for off in range(keep, width, BLOCK):
            t = off + tl.arange(0, BLOCK)
            val = tl.where(t - keep < real_window, seq_len - real_window + (t - keep), seq_len)
            tl.store(out_row + t, val.to(tl.int64), mask=t < width)


def top_k_per_head(
    scores: torch.Tensor,
    keep: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int,
    *,
    max_keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`tokensparse.selection.top_k_per_head` (same output).

    Args:
        scores: (B, H, P) float32 smoothed prefix scores, P = L - window.
        keep: (B, H) int64 prefix tokens to keep per head (<= real prefix tokens).
        seq_lens: (B,) int64 real tokens per sequence (left padding).
        window: W.
        max_keep: ``int(keep.max())`` if the caller knows it without a device
            sync; computed (one sync) otherwise.

    Returns:
        kept_idx: (B, H, max_keep + W) int64 ascending positions, padded with L.
        num_kept: (B, H) int64 valid entries of each row.
    """
    if scores.dtype != torch.float32:
        # The kernels rank float32 keys; other dtypes keep the reference's exact order.
        from ..selection import top_k_per_head as reference_top_k

        return reference_top_k(scores, keep, seq_lens, window, max_keep=max_keep)
    batch, num_heads, prefix_len = scores.shape
    seq_len = prefix_len + window
    if max_keep is None:
        max_keep = int(keep.max())
    width = max_keep + window
    rows = batch * num_heads
    flat = scores.reshape(rows, prefix_len)
    keep_rows = keep.reshape(rows).to(torch.int32).contiguous()
    pad = (seq_len - seq_lens).to(torch.int32).contiguous()
    block = 128 if interpreting() else 1024
    seg_len = max(block, triton.cdiv(triton.cdiv(max(prefix_len, 1), _MAX_SEGMENTS), block) * block)
    num_segments = max(1, triton.cdiv(prefix_len, seg_len))
    hist = torch.zeros(_ROUNDS, rows, _BINS, dtype=torch.int32, device=scores.device)
    count_gt = torch.empty(rows, _MAX_SEGMENTS, dtype=torch.int32, device=scores.device)
    count_eq = torch.empty_like(count_gt)
    out = torch.empty(batch, num_heads, width, dtype=torch.int64, device=scores.device)
    grid = (rows, num_segments)
    common = (flat.stride(0), num_heads, rows, prefix_len, seg_len)
    for r in range(_ROUNDS):
        _radix_hist_kernel[grid](flat, keep_rows, pad, hist, *common, ROUND=r, BLOCK=block, num_warps=4)
    _count_kernel[grid](
        flat, keep_rows, pad, hist, count_gt, count_eq, *common,
        ROUNDS=_ROUNDS, MAX_SEGMENTS=_MAX_SEGMENTS, BLOCK=block, num_warps=4,
    )
    _write_kernel[grid](
        flat, keep_rows, pad, hist, count_gt, count_eq, out,
        flat.stride(0), out.stride(1), num_heads, rows, prefix_len, seg_len, num_segments,
        seq_len, window, width,
        ROUNDS=_ROUNDS, MAX_SEGMENTS=_MAX_SEGMENTS, BLOCK=block, num_warps=4,
    )
    num_kept = keep + seq_lens.clamp(max=window)[:, None]
    return out, num_kept
