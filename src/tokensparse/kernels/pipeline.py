"""Compress, attend, decompress with the Triton kernels, a few heads at a time.

Compressed tensors are per query head, so for all heads at once they can be
larger than K and V themselves (GQA). Processing the heads in chunks bounds the
extra memory to about ``chunk_budget`` bytes (default: 3/16 of the query's size,
at least 128 MiB). Small chunks alone would cost time: each causal SDPA call ends
with a partly filled last wave (on the H200 at 128K, 50% kept, 16 calls of 2
heads took 7% longer than one call of 32). On CUDA the chunks therefore alternate
between two streams, each with half the budget, so that one chunk's SDPA fills
the SMs the other's tail leaves idle, and its gather and scatter (memory bound)
run beside the other's attention (compute bound). With one sequence in (B, H,
L, D) layout the compact q, k, v of a chunk are staged in the chunk's own rows of
the output (as many of them as fit: all three at up to a third kept), so only
SDPA's output needs new memory and the chunks can be larger.
"""

from __future__ import annotations

import contextlib

import torch

from . import sdpa
from .gather import gather_kept
from .scatter import scatter_kept_into

# Below this many bytes of compressed tensors, chunking only adds launches.
DEFAULT_MIN_CHUNK_BYTES = 128 * 2**20
NUM_STREAMS = 2
_streams: dict[int, list[torch.cuda.Stream]] = {}


def _side_streams(device: torch.device, count: int) -> list[torch.cuda.Stream]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    pool = _streams.setdefault(index, [])
    while len(pool) < count:
        pool.append(torch.cuda.Stream(device=index))
    return pool[:count]


def default_chunk_budget(query: torch.Tensor) -> int:
    """3/16 of the query's bytes, at least ``DEFAULT_MIN_CHUNK_BYTES``."""
    return max(query.numel() * query.element_size() * 3 // 16, DEFAULT_MIN_CHUNK_BYTES)


def heads_per_chunk(
    query: torch.Tensor, value: torch.Tensor, num_kept: int, chunk_budget: int, staged: int = 0
) -> int:
    """Query heads compressed together so their compact q, k, v, out fit ``chunk_budget`` bytes.

    ``staged``: how many of q, k, v live in the output's own rows (no new memory).
    """
    batch, num_heads, seq_len, head_dim = query.shape
    dims = (head_dim, head_dim, value.shape[-1])[staged:]
    per_head = batch * num_kept * (sum(dims) + value.shape[-1]) * query.element_size()
    return max(1, min(num_heads, chunk_budget // max(per_head, 1)))


def chunk_sizes(num_heads: int, step: int) -> list[int]:
    """Heads per chunk: at most ``step``, the first and the last a quarter of it.

    Nothing overlaps the first chunk's gather (the selection precedes it) or the
    last chunk's scatter and attention tail, so those two chunks are small.
    """
    edge = max(1, step // 4)
    if num_heads <= step or num_heads <= 2 * edge:
        return [num_heads]
    middle = num_heads - 2 * edge
    count = -(-middle // step)
    return [edge] + [middle // count + 1] * (middle % count) + [middle // count] * (count - middle % count) + [edge]


def _num_staged(out: torch.Tensor, layout: str, num_kept: int, head_dim: int) -> int:
    """How many of q, k, v a chunk can stage in its heads' rows of ``out`` (0-3).

    With one sequence in (B, H, L, D) layout a chunk's heads own one contiguous
    run of ``Hc * L * D`` output elements, written only by the chunk's scatter,
    after its SDPA has read q, k, v: there the compact tensors cost no memory.
    """
    batch, _, seq_len, v_dim = out.shape
    if layout != "bhld" or batch != 1 or v_dim != head_dim or not out.is_contiguous() or num_kept == 0:
        return 0
    return min(3, seq_len // num_kept)


def _staged_views(out, staged, head_start, count, num_kept):
    """The first ``staged`` of q, k, v as views into heads ``[head_start, +count)`` of ``out``."""
    _, _, seq_len, dim = out.shape
    region = out[:, head_start: head_start + count].reshape(-1)
    size = count * num_kept * dim
    return [region[i * size: (i + 1) * size].view(1, count, num_kept, dim) for i in range(staged)]


def attend_kept(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor,
    *,
    scale: float | None = None,
    layout: str = "bhld",
    chunk_budget: int | None = None,
    sdpa_backend: str | None = None,
    num_streams: int | None = None,
) -> torch.Tensor:
    """Causal attention of each head over its kept tokens, zeros in the other rows.

    Args:
        query: (B, H, L, D); key: (B, Hkv, L, D); value: (B, Hkv, L, Dv).
        kept_idx: (B, H, K) ascending positions, padding equal to L.
        scale: softmax scale, default 1 / sqrt(D).
        layout: "bhld" returns (B, H, L, Dv); "blhd" returns (B, L, H, Dv).
        chunk_budget: bytes of compressed tensors alive at once (default: 3/16
            of the query's bytes, at least 128 MiB).
        sdpa_backend: force an SDPA backend for the dense part (default: fastest).
        num_streams: CUDA streams the chunks alternate between, each with
            ``chunk_budget / num_streams`` bytes (default 2 on CUDA; 1 elsewhere).

    Returns:
        The output in ``layout``, contiguous.
    """
    batch, num_heads, seq_len, _ = query.shape
    v_dim = value.shape[-1]
    if layout == "bhld":
        out = query.new_empty(batch, num_heads, seq_len, v_dim)
    elif layout == "blhd":
        out = query.new_empty(batch, seq_len, num_heads, v_dim)
    else:
        raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
    if query.device.type != "cuda":
        num_streams = 1
    elif num_streams is None:
        num_streams = NUM_STREAMS
    if chunk_budget is None:
        chunk_budget = default_chunk_budget(query)
    num_kept = kept_idx.shape[-1]
    staged = _num_staged(out, layout, num_kept, query.shape[-1])
    step = heads_per_chunk(query, value, num_kept, chunk_budget // num_streams, staged)
    sizes = chunk_sizes(num_heads, step)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if len(starts) == 1:
        num_streams = 1
    streams = _side_streams(query.device, num_streams) if num_streams > 1 else []
    main = torch.cuda.current_stream(query.device) if streams else None
    for stream in streams:
        # The side streams start after the selection and stop before the caller
        # reads ``out``; buffers they allocate are reused only in their own order.
        stream.wait_stream(main)
    for i, (start, count) in enumerate(zip(starts, sizes)):
        with torch.cuda.stream(streams[i % num_streams]) if streams else contextlib.nullcontext():
            buffers = None
            if staged:
                views = _staged_views(out, staged, start, count, num_kept)
                fresh = [query.new_empty(1, count, num_kept, query.shape[-1]) for _ in range(3 - staged)]
                buffers = tuple(views + fresh)
            q_c, k_c, v_c = gather_kept(query, key, value, kept_idx, head_start=start, num_heads=count, out=buffers)
            out_c = sdpa.causal_attention(q_c, k_c, v_c, scale=scale, backend=sdpa_backend)
            del q_c, k_c, v_c
            scatter_kept_into(out, out_c, kept_idx, layout=layout, head_start=start)
            del out_c
    for stream in streams:
        main.wait_stream(stream)
    return out
