"""Per-head top-k without a sort: radix select of the threshold, then compaction (Triton).

For every (batch, head) row of prefix scores the kernels find the ``keep``-th
largest score by a 4-round, 8-bit radix select on an order-preserving integer
key of the float32 score (a 256-bin ``tl.histogram`` per block, accumulated
across the row's segments with atomics, one launch per round, no host
synchronisation), then write the kept positions in ascending order by a prefix
sum: every score above the threshold, and of the scores equal to it the ones at
the lowest positions. That is exactly the set a stable descending sort takes
(ties to the lower index), already in causal order, followed by the window
positions and the padding value L.
Reference: :func:`tokensparse.kernels.reference.top_k_per_head_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting
from .reference import top_k_per_head_ref

# Wider digits mean fewer rounds, i.e. fewer full passes over the scores; 8 bits
# keep the per-block histogram (256 bins) cheap in registers and shared memory.
_DIGIT_BITS = 8
_ROUNDS = 32 // _DIGIT_BITS
_BINS = 1 << _DIGIT_BITS
_MAX_SEGMENTS = 64


@triton.jit
def _order_key(x):
    """int32 whose signed order is the float order of ``x`` (-0.0 equals 0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _radix_state(Hist, row, num_rows, keep, ROUNDS_DONE: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """Key prefix fixed by the first rounds, and how many of the matching keys to take.

    Only the counts of bins above a candidate digit decide the outcome, so bin 0
    may over-count (the histogram kernel parks excluded elements there).
    """
    BINS: tl.constexpr = 1 << DIGIT_BITS
    bins = tl.arange(0, BINS)
    prefix = keep * 0
    remaining = keep
    for r in tl.static_range(ROUNDS_DONE):
        hist = tl.load(Hist + (r * num_rows + row) * BINS + bins)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys with digit >= bin
        digit = tl.maximum(tl.sum((at_or_above >= remaining).to(tl.int32), 0) - 1, 0)
        remaining -= tl.sum(tl.where(bins == digit, at_or_above - hist, 0), 0)
        if r == 0:
            # The top digit was flipped (^ BINS // 2) so that negatives rank low;
            # undo it and sign-extend so the prefix is the key's signed top bits.
            top = digit ^ (BINS // 2)
            prefix = prefix | (tl.where(top >= BINS // 2, top - BINS, top) << (32 - DIGIT_BITS))
        else:
            prefix = prefix | (digit << (32 - DIGIT_BITS * (r + 1)))
    return prefix, remaining


@triton.jit
def _row_budget(Keep, SeqLens, row, num_heads, seq_len):
    """Prefix tokens the row keeps, and its sequence's left padding (int32)."""
    keep = tl.load(Keep + row).to(tl.int32)
    pad = (seq_len - tl.load(SeqLens + row // num_heads)).to(tl.int32)
    return keep, pad


@triton.jit
def _block_keys(Scores, row, stride_sr, off, end, pad, BLOCK: tl.constexpr):
    """Positions ``off + [0, BLOCK)`` of a row, which of them count (inside the
    segment, past the left padding), and their order keys."""
    pos = off + tl.arange(0, BLOCK)
    ok = (pos < end) & (pos >= pad)
    key = _order_key(tl.load(Scores + row.to(tl.int64) * stride_sr + pos, mask=ok, other=0.0))
    return pos, ok, key


@triton.jit
def _radix_hist_kernel(
    Scores, Keep, SeqLens, Hist,
    stride_sr, num_heads, num_rows, prefix_len, seg_len, seq_len,
    ROUND: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    keep, pad = _row_budget(Keep, SeqLens, row, num_heads, seq_len)
    prefix, _ = _radix_state(Hist, row, num_rows, keep, ROUND, DIGIT_BITS)
    BINS: tl.constexpr = 1 << DIGIT_BITS
    SHIFT: tl.constexpr = 32 - DIGIT_BITS * (ROUND + 1)
    bins = tl.arange(0, BINS)
    acc = tl.zeros([BINS], tl.int32)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, prefix_len)
    for off in range(start, end, BLOCK):
        pos, ok, key = _block_keys(Scores, row, stride_sr, off, end, pad, BLOCK)
        digit = (key >> SHIFT) & (BINS - 1)
        if ROUND == 0:
            digit = digit ^ (BINS // 2)
        else:
            ok = ok & ((key >> (SHIFT + DIGIT_BITS)) == (prefix >> (SHIFT + DIGIT_BITS)))
        # Excluded elements go to bin 0 rather than through tl.histogram's mask=
        # (not in every Triton release): _radix_state never reads bin 0's count.
        acc += tl.histogram(tl.where(ok, digit, 0), BINS)
    tl.atomic_add(Hist + (ROUND * num_rows + row) * BINS + bins, acc)


@triton.jit
def _count_kernel(
    Scores, Keep, SeqLens, Hist, CountGt, CountEq,
    stride_sr, num_heads, num_rows, prefix_len, seg_len, seq_len,
    DIGIT_BITS: tl.constexpr, MAX_SEGMENTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    keep, pad = _row_budget(Keep, SeqLens, row, num_heads, seq_len)
    threshold, _ = _radix_state(Hist, row, num_rows, keep, 32 // DIGIT_BITS, DIGIT_BITS)
    n_gt = 0
    n_eq = 0
    start = seg * seg_len
    end = tl.minimum(start + seg_len, prefix_len)
    for off in range(start, end, BLOCK):
        pos, ok, key = _block_keys(Scores, row, stride_sr, off, end, pad, BLOCK)
        n_gt += tl.sum((ok & (key > threshold)).to(tl.int32), 0)
        n_eq += tl.sum((ok & (key == threshold)).to(tl.int32), 0)
    tl.store(CountGt + row * MAX_SEGMENTS + seg, n_gt)
    tl.store(CountEq + row * MAX_SEGMENTS + seg, n_eq)


@triton.jit
def _write_kernel(
    Scores, Keep, SeqLens, Hist, CountGt, CountEq, Out,
    stride_sr, stride_or, num_heads, num_rows, prefix_len, seg_len, num_segments,
    seq_len, window, width,
    DIGIT_BITS: tl.constexpr, MAX_SEGMENTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    keep, pad = _row_budget(Keep, SeqLens, row, num_heads, seq_len)
    threshold, take_eq = _radix_state(Hist, row, num_rows, keep, 32 // DIGIT_BITS, DIGIT_BITS)
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
        pos, ok, key = _block_keys(Scores, row, stride_sr, off, end, pad, BLOCK)
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
    """Triton version of :func:`tokensparse.kernels.reference.top_k_per_head_ref` (same output).

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
        return top_k_per_head_ref(scores, keep, seq_lens, window, max_keep=max_keep)
    batch, num_heads, prefix_len = scores.shape
    seq_len = prefix_len + window
    if max_keep is None:
        max_keep = int(keep.max())
    width = max_keep + window
    rows = batch * num_heads
    flat = scores.reshape(rows, prefix_len)
    keep_rows = keep.reshape(rows).contiguous()
    seq_lens = seq_lens.contiguous()
    block = 128 if interpreting() else 1024
    seg_len = max(block, triton.cdiv(triton.cdiv(max(prefix_len, 1), _MAX_SEGMENTS), block) * block)
    num_segments = max(1, triton.cdiv(prefix_len, seg_len))
    hist = torch.zeros(_ROUNDS, rows, _BINS, dtype=torch.int32, device=scores.device)
    count_gt = torch.empty(rows, _MAX_SEGMENTS, dtype=torch.int32, device=scores.device)
    count_eq = torch.empty_like(count_gt)
    out = torch.empty(batch, num_heads, width, dtype=torch.int64, device=scores.device)
    grid = (rows, num_segments)
    common = (flat.stride(0), num_heads, rows, prefix_len, seg_len, seq_len)
    for r in range(_ROUNDS):
        _radix_hist_kernel[grid](
            flat, keep_rows, seq_lens, hist, *common, ROUND=r, DIGIT_BITS=_DIGIT_BITS, BLOCK=block, num_warps=4,
        )
    _count_kernel[grid](
        flat, keep_rows, seq_lens, hist, count_gt, count_eq, *common,
        DIGIT_BITS=_DIGIT_BITS, MAX_SEGMENTS=_MAX_SEGMENTS, BLOCK=block, num_warps=4,
    )
    _write_kernel[grid](
        flat, keep_rows, seq_lens, hist, count_gt, count_eq, out,
        flat.stride(0), out.stride(1), num_heads, rows, prefix_len, seg_len, num_segments,
        seq_len, window, width,
        DIGIT_BITS=_DIGIT_BITS, MAX_SEGMENTS=_MAX_SEGMENTS, BLOCK=block, num_warps=4,
    )
    num_kept = keep + seq_lens.clamp(max=window)[:, None]
    return out, num_kept
