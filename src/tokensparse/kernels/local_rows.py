"""Sink + local attention written in place into the rows a head did not keep.

Token Sparse Attention leaves zeros in the rows of the tokens a head dropped;
with ``dropped_rows="local"`` those rows get causal attention over

* the first ``block_size`` real tokens (attention sinks), and
* the real tokens of the row's own and previous block,

on a grid of ``block_size`` tokens aligned at the first real token (see
:mod:`tokensparse.local_attention`). :func:`fill_dropped_rows` writes exactly
those rows of an existing output and leaves the kept rows untouched, so no
second output-sized buffer exists: on CUDA a Triton kernel that computes the
fixed pattern itself (no block lists), skips the kept rows by a (B, H, L + 1)
bool mask built from ``kept_idx`` (1/256 of a bf16 output at head_dim 128),
and reads left-padded inputs at an offset instead of shifted copies;
elsewhere a banded PyTorch version, a chunk of rows at a time.

Layouts (any strides, so (B, L, H, D) tensors seen through ``.transpose(1, 2)``
work for the inputs and for ``out``): query (B, H, L, D); key (B, Hkv, L, D);
value (B, Hkv, L, Dv); out (B, H, L, Dv). H is a multiple of Hkv: query head h
reads KV head h // (H // Hkv) (K/V are never repeated).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._launch import check_kernel_dtype, dot_precision

# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M rows per program, spread over the
# heads of a KV group; BLOCK_N keys per step, capped at the pattern block. The CUDA
# default was the fastest of 19 on the H200 at 128K, Llama-3.1-8B shapes, block 64
# (1.56-1.69 ms at keep 0.5 / 0.25; one head per program with 64 rows: 2.0-2.2 ms).
_CUDA_TILES = (128, 32, 4, 3)
_INTERPRETER_TILES = (16, 16, 4, 1)
# Float32 logits per chunk of the PyTorch path (64 MiB).
_TORCH_CHUNK_ELEMENTS = 2**24


def fill_dropped_rows_triton(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor | None,
    block_size: int,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Write sink + local attention into every row of ``out`` that ``kept_idx`` does not list (Triton).

    Reached through :func:`tokensparse.kernels.ops_for` (``fill_dropped_rows``);
    :func:`fill_dropped_rows_torch` is its reference, with the same arguments
    but ``tiles``.

    Args:
        out: (B, H, L, Dv) destination, any strides (e.g. the ``.transpose(1, 2)``
            of a (B, L, H, Dv) tensor). Rows listed in ``kept_idx`` are left
            untouched bit for bit; every other row is written: its sink + local
            attention, or zeros at padded positions.
        query: (B, H, L, D); key: (B, Hkv, L, D); value: (B, Hkv, L, Dv).
        kept_idx: (B, H, K) int64 kept positions per head, entries equal to L
            are padding (as :class:`tokensparse.selection.TokenSelection` gives);
            ``None`` writes every row.
        block_size: the pattern's block, a positive multiple of 16.
        scale: softmax scale, default 1 / sqrt(D).
        seq_lens: optional (B,) real tokens per sequence, padding on the left
            (as transformers pads); padded keys are never seen.
        tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) for the Triton kernel:
            a program covers about BLOCK_M rows, the same positions of every
            head of one KV group; BLOCK_N keys per step. Powers of two >= 16,
            BLOCK_N capped at ``block_size``.

    Returns:
        ``out``, written in place.
    """
    _check(out, query, key, value, kept_idx, block_size)
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"the Triton local-rows kernel takes a whole prompt (query rows {query.shape[2]} == keys "
            f"{key.shape[2]}); a chunk after a cached prefix runs fill_dropped_rows_torch"
        )
    check_kernel_dtype("fill_dropped_rows", query, key, value, out)
    batch, _, seq_len, head_dim = query.shape
    if seq_lens is None:
        lens = torch.full((batch,), seq_len, dtype=torch.int32, device=query.device)
    else:
        lens = seq_lens.to(device=query.device, dtype=torch.int32).contiguous()
    kept = None if kept_idx is None else kept_row_mask(kept_idx, seq_len)
    if tiles is None:
        tiles = _CUDA_TILES if query.is_cuda else _INTERPRETER_TILES
    scale = head_dim**-0.5 if scale is None else scale
    _launch(out, query, key, value, kept, lens, block_size, scale, tiles)
    return out


def kept_row_mask(kept_idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, H, L + 1) bool, True at the positions ``kept_idx`` lists; column L takes its padding."""
    batch, num_heads, _ = kept_idx.shape
    kept = torch.zeros(batch, num_heads, seq_len + 1, dtype=torch.bool, device=kept_idx.device)
    return kept.scatter_(2, kept_idx, True)


def _check(out, query, key, value, kept_idx, block_size) -> None:
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
    batch, num_heads, seq_len, _ = query.shape
    expected = (batch, num_heads, seq_len, value.shape[-1])
    if tuple(out.shape) != expected:
        raise ValueError(f"out must be (B, H, L, Dv) = {expected}, got {tuple(out.shape)}")
    if kept_idx is not None and tuple(kept_idx.shape[:2]) != (batch, num_heads):
        raise ValueError(f"kept_idx must be (B, H, K) with (B, H) = {(batch, num_heads)}, got {tuple(kept_idx.shape)}")
    if num_heads % key.shape[1]:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({key.shape[1]})")
    if seq_len > key.shape[2]:
        raise ValueError(f"query ({seq_len} rows) must not be longer than key ({key.shape[2]})")


# ---------------------------------------------------------------- launcher
def _launch(out, query, key, value, kept, lens, block_size, scale, tiles) -> None:
    import triton

    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    block_m, block_n, num_warps, num_stages = tiles
    for name, tile in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"{name}={tile} must be a power of two >= 16")
    # Tiles must not straddle pattern blocks: powers of two dividing block_size.
    block_divisor = block_size & -block_size
    block_n = min(block_n, block_divisor)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # A tile is ``rows`` positions of every head of a KV group: about BLOCK_M rows in
    # all, at least the 16 that tl.dot needs.
    rows = min(block_divisor, max(block_m // group_pad, 16 // min(group_pad, 16)))
    # One spare tile: with left padding the tiles start a partial tile before position 0.
    grid = (triton.cdiv(seq_len, rows) + 1, batch * num_kv_heads)
    kept_arg = lens if kept is None else kept.view(torch.uint8)
    kept_strides = (0, 0) if kept is None else (kept.stride(0), kept.stride(1))
    _kernel()[grid](
        query, key, value, out, kept_arg, lens,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *kept_strides,
        num_kv_heads, group, seq_len, scale * math.log2(math.e),
        HEAD_DIM=head_dim,
        HEAD_DIM_V=value.shape[-1],
        BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        BLOCK_DV=triton.next_power_of_2(max(value.shape[-1], 16)),
        PATTERN_BLOCK=block_size,
        ROWS=rows,
        GROUP_PAD=group_pad,
        BLOCK_N=block_n,
        HAS_KEPT=kept is not None,
        UPCAST=(not query.is_cuda) and query.dtype == torch.bfloat16,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )


@functools.cache
def _kernel():
    """The @triton.jit kernel, imported on first use (keeps ``import triton`` lazy)."""
    from ._local_rows_triton import _local_rows_fwd

    return _local_rows_fwd


# ---------------------------------------------------------------- reference
def fill_dropped_rows_torch(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor | None,
    block_size: int,
    *,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """PyTorch version of :func:`fill_dropped_rows` (same arguments), in float32.

    Banded: each block of query rows meets only its three key blocks, and rows
    run ``chunk_rows`` at a time (default: about 64 MiB of logits), so memory is
    bounded whatever the length. Also takes a chunk after a cached prefix:
    query and ``out`` with Lq <= L rows, row i at key position L - Lq + i (the
    grid stays aligned at the sequence's first real token). Returns ``out``,
    written in place through the mask of rows to write.
    """
    _check(out, query, key, value, kept_idx, block_size)
    batch, num_heads, query_len, head_dim = query.shape
    seq_len = key.shape[2]
    offset = seq_len - query_len  # key position of query row 0
    scale = head_dim**-0.5 if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    if chunk_rows is None:
        chunk_rows = _TORCH_CHUNK_ELEMENTS // (num_heads * 3 * block_size)
    chunk_rows = max(block_size, chunk_rows // block_size * block_size)
    write = None if kept_idx is None else ~kept_row_mask(kept_idx, seq_len)[..., offset:seq_len]
    lens = [seq_len] * batch if seq_lens is None else [int(n) for n in seq_lens.tolist()]
    for b, n in enumerate(lens):
        pad = seq_len - n
        first_row = min(max(pad - offset, 0), query_len)  # query rows before it are padding
        _write_rows(out[b, :, :first_row], torch.zeros((), dtype=out.dtype, device=out.device), write, b, 0)
        # Real-token indices r of the rows, from the block holding the first one; rows
        # before the chunk (r < offset - pad) have no query: zeros in, dropped after.
        first_real = offset + first_row - pad
        for r0 in range(first_real // block_size * block_size, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            row0, row1 = r0 + pad - offset, r1 + pad - offset  # query rows of [r0, r1)
            q = query[b, :, max(row0, 0): row1]
            if row0 < 0:
                q = F.pad(q, (0, 0, -row0, 0))
            rows = _banded_rows(q, key[b, :, pad:], value[b, :, pad:], r0 // block_size, block_size, scale, acc)
            _write_rows(out[b, :, max(row0, 0): row1], rows[:, max(-row0, 0):].to(out.dtype), write, b, max(row0, 0))
    return out


def _write_rows(dest: torch.Tensor, rows: torch.Tensor, write: torch.Tensor | None, b: int, start: int) -> None:
    """``dest`` (H, R, Dv), a view of ``out``: its rows to write get ``rows`` (broadcast)."""
    if dest.shape[1] == 0:
        return
    if write is None:
        dest.copy_(rows.expand_as(dest))
        return
    sel = write[b, :, start: start + dest.shape[1], None]
    dest.copy_(torch.where(sel, rows, dest))


def _banded_rows(q, k, v, first_block, block_size, scale, acc) -> torch.Tensor:
    """Sink + local attention of real-token rows starting at block ``first_block``.

    q: (H, R, D) rows ``first_block * block_size + [0, R)``; k: (Hkv, n, D) and
    v: (Hkv, n, Dv), the sequence's real tokens. Returns (H, R, Dv) in ``acc``.
    """
    num_heads, rows, head_dim = q.shape
    num_kv_heads, n, _ = k.shape
    nbc = -(-rows // block_size)
    device = q.device
    lo = max(first_block - 1, 0)  # first key block of the band (the previous block of the first row)

    def blocks(t: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Blocks ``[first, first + count)`` of ``t`` (Hkv, n, d), zero past n: (Hkv, count, bs, d)."""
        part = t[:, first * block_size: (first + count) * block_size].to(acc)
        part = F.pad(part, (0, 0, 0, count * block_size - part.shape[1]))
        return part.view(t.shape[0], count, block_size, t.shape[-1])

    band_k = blocks(k, lo, first_block + nbc - lo)
    band_v = blocks(v, lo, first_block + nbc - lo)
    own = torch.arange(nbc, device=device) + first_block - lo
    prev = (own - 1).clamp(min=0)
    # Key slots per query block: [sink block, previous block, own block]; a slot that
    # repeats a later one (block 0 or 1) is masked so no key counts twice.
    k3 = torch.cat([blocks(k, 0, 1).expand(-1, nbc, -1, -1), band_k[:, prev], band_k[:, own]], dim=2)
    v3 = torch.cat([blocks(v, 0, 1).expand(-1, nbc, -1, -1), band_v[:, prev], band_v[:, own]], dim=2)
    qb = torch.arange(nbc, device=device) + first_block
    offs = torch.arange(block_size, device=device)
    slot_ok = torch.stack([qb >= 2, qb >= 1, torch.ones_like(qb, dtype=torch.bool)], dim=-1)  # (nbc, 3)
    key_pos = torch.cat([offs.expand(nbc, -1), ((qb - 1) * block_size)[:, None] + offs,
                         (qb * block_size)[:, None] + offs], dim=-1)  # (nbc, 3 * bs)
    query_pos = (qb * block_size)[:, None] + offs  # (nbc, bs)
    allowed = slot_ok.repeat_interleave(block_size, dim=-1)[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    allowed &= (key_pos < n)[:, None, :]  # (nbc, bs, 3 * bs)

    group = num_heads // num_kv_heads
    qp = F.pad(q.to(acc), (0, 0, 0, nbc * block_size - rows)).view(num_kv_heads, group, nbc, block_size, head_dim)
    logits = torch.einsum("kgnqd,knsd->kgnqs", qp, k3) * scale
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.einsum("kgnqs,knsd->kgnqd", probs, v3)
    return out.reshape(num_heads, nbc * block_size, -1)[:, :rows]


__all__ = ["fill_dropped_rows_triton", "fill_dropped_rows_torch", "kept_row_mask"]
