"""XAttention's antidiagonal block scores (the estimation stage): Triton kernel
launcher and PyTorch reference.

Layouts (any strides): query (B, H, L, D); key (B, Hkv, L, D), H a multiple of
Hkv, query head h reads KV head h // (H // Hkv) (never repeated). seq_lens (B, H)
int, optional: valid rows of each head, padding at the end (default L).

The definition, with stride S and block B (S divides B, T = B / S reshaped rows
per block), for each head with valid length n:

* reshaped query row r concatenates positions rS + S - 1, ..., rS (reversed),
  reshaped key row c positions cS, ..., cS + S - 1; positions at or past n are
  zero vectors. So logit (r, c) = sum over i < S of q[rS + S-1-i] . k[cS + i],
  times ``scale / S`` (scale defaults to 1 / sqrt(D));
* causal at the reshaped granularity (c <= r), softmax per row; rows at or past
  ceil(n / S) count nothing;
* score (qb, kb) = sum of the probabilities of the T x T tile of reshaped rows
  of query block qb and columns of key block kb, on a grid aligned at 0
  (NQB = NKB = ceil(L / B)); each query block's row is then divided by its total
  (rows with total 0 stay 0).

The kernel never builds the reshaped tensors or the logits: one program owns
BLOCK_R reshaped rows (whole query blocks) of one head and makes two passes over
the visible columns, BLOCK_C at a time; each tile's logits are S ``tl.dot`` of
(BLOCK_R, D) x (D, BLOCK_C) strided slices of Q and K. Pass 1 keeps each row's
running max and sum of exp (float32); pass 2 recomputes the logits, forms the
probabilities and writes the sums of each (query block, key block) tile. Every
score is written by exactly one program (no atomics), and memory beyond the
(B, H, NQB, NKB) float32 output is O(1).
"""

from __future__ import annotations

import functools
import math

import torch

from ._launch import check_kernel_dtype, dot_precision, interpreting
from .block_sparse import num_blocks

ESTIMATE_CHUNK_BYTES = 256 << 20  # the reference's reshaped fp32 logits per step

# Tile shapes (BLOCK_R, BLOCK_C, num_warps, num_stages): reshaped rows per program,
# reshaped columns per step. The kernel is tensor-core bound (S * D multiply-adds
# per logit, a few flops of softmax), shaped like a GEMM whose reduction dim is S * D
# = 1024 at S = 8, D = 128; so the CUDA tiles are a Hopper GEMM's. Not tuned on a GPU yet;
# the fallbacks, tried in turn when shared memory runs out, are for float32 inputs and
# GPUs with less shared memory.
_CUDA_TILES = ((128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2))
_INTERPRETER_TILES = (32, 32, 4, 1)
_MAX_KERNEL_TILE = 128  # largest T = block_size / stride the kernel takes


def kernel_supports(stride: int, block_size: int) -> bool:
    """True when the Triton kernel handles this grid: T = block_size / stride is a power
    of two <= 128 (tiles of whole blocks are reshaped to sum per block). Other grids
    run the reference."""
    tile = block_size // stride
    return tile & (tile - 1) == 0 and tile <= _MAX_KERNEL_TILE


def check_grid(query: torch.Tensor, key: torch.Tensor, stride: int, block_size: int) -> None:
    """Raise ``ValueError`` if the shapes or the (stride, block_size) grid do not fit."""
    if query.dim() != 4 or key.dim() != 4 or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(
            f"query (B, H, L, D) and key (B, Hkv, L, D) expected, got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]})")
    if stride < 1 or block_size < 1 or block_size % stride:
        raise ValueError(f"block_size ({block_size}) must be a positive multiple of stride ({stride})")


def _lengths(seq_lens: torch.Tensor | None, query: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    batch, num_heads, seq_len, _ = query.shape
    if seq_lens is None:
        return torch.full((batch, num_heads), seq_len, dtype=dtype, device=query.device)
    if tuple(seq_lens.shape) != (batch, num_heads):
        raise ValueError(f"seq_lens must have shape (B, H) = ({batch}, {num_heads}), got {tuple(seq_lens.shape)}")
    return seq_lens.to(device=query.device, dtype=dtype).contiguous()


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"out must be {shape} {dtype}, got {tuple(out.shape)} {out.dtype}")


def normalise_rows_(scores: torch.Tensor) -> torch.Tensor:
    """Divide each query block's row of (B, H, NQB, NKB) nonnegative ``scores`` by its
    total, in place; rows with total 0 stay 0."""
    total = scores.sum(dim=-1, keepdim=True)
    return scores.div_(total.clamp_(min=torch.finfo(scores.dtype).tiny))


# ---------------------------------------------------------------- reference
@torch.no_grad()
def antidiagonal_scores_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    stride: int,
    block_size: int,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """The normalised block scores (module docstring), materialising the reshaped
    logits ``chunk_bytes`` (default :data:`ESTIMATE_CHUNK_BYTES`) at a time.

    Half-precision inputs multiply in their own dtype (tensor cores) and softmax in
    float32. With GQA the query heads of one KV head must share a ``seq_lens`` value
    (the keys are masked with the group's first head's length).

    Returns:
        (B, H, NQB, NKB) float32 (float64 for float64 inputs), ``out`` if given.
    """
    check_grid(query, key, stride, block_size)
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    lens = _lengths(seq_lens, query, torch.long)
    scale = head_dim**-0.5 if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    mm_dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else acc
    nb = num_blocks(seq_len, block_size)
    if out is not None:
        _check_out(out, (batch, num_heads, nb, nb), acc)
    tile = block_size // stride  # reshaped rows (and columns) per block
    reshaped_len = nb * tile
    reshaped_valid = (lens + stride - 1) // stride  # (B, H) reshaped rows holding a real token
    scores = torch.zeros(batch, num_heads, nb, nb, dtype=acc, device=query.device)
    budget = ESTIMATE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    kv_step, row_step = estimate_steps(batch, group, num_kv_heads, reshaped_len, tile, acc, budget)
    for k0 in range(0, num_kv_heads, kv_step):
        k1 = min(k0 + kv_step, num_kv_heads)
        heads = slice(k0 * group, k1 * group)
        k_r = _strided_rows(key[:, k0:k1], lens[:, heads][:, ::group], stride, nb * block_size, mm_dtype, reverse=False)
        q_r = _strided_rows(query[:, heads], lens[:, heads], stride, nb * block_size, mm_dtype, reverse=True)
        q_r = q_r.view(batch, k1 - k0, group, reshaped_len, -1)
        for r0 in range(0, reshaped_len, row_step):
            r1 = min(r0 + row_step, reshaped_len)
            probs = _reshaped_softmax(
                q_r[..., r0:r1, :], k_r[:, :, :r1], r0, reshaped_valid[:, heads], scale / stride, acc
            )  # (B, nH, r1 - r0, r1)
            scores[:, heads, r0 // tile : r1 // tile, : r1 // tile] = probs.view(
                batch, (k1 - k0) * group, (r1 - r0) // tile, tile, r1 // tile, tile
            ).sum(dim=(3, 5))
    normalise_rows_(scores)
    return scores if out is None else out.copy_(scores)


def estimate_steps(batch, group, num_kv_heads, reshaped_len, tile, acc, chunk_bytes) -> tuple[int, int]:
    """(KV heads, reshaped query rows) per step of the reference, so the logits of one
    step stay under ``chunk_bytes``. Rows go in whole blocks, so every tile sum is complete."""
    row_bytes = batch * group * reshaped_len * torch.finfo(acc).bits // 8
    head_bytes = row_bytes * reshaped_len
    if head_bytes <= chunk_bytes:
        # Several KV heads a step: compressed inputs have a KV head per query head,
        # and one head a step would be dozens of small launches.
        return max(1, min(num_kv_heads, chunk_bytes // max(head_bytes, 1))), reshaped_len
    blocks = max(1, chunk_bytes // (row_bytes * tile))
    return 1, blocks * tile


def _strided_rows(x, lens, stride, padded, acc, *, reverse) -> torch.Tensor:
    """(B, n, L, D) rows and (B, n) lengths -> (B, n, padded / S, S * D) in ``acc``:
    reshaped row r concatenates positions rS .. rS + S - 1 (reversed if ``reverse``),
    with positions at or past the head's length set to zero."""
    batch, heads, seq_len, dim = x.shape
    full = x.new_zeros(batch, heads, padded, dim, dtype=acc)
    full[:, :, :seq_len] = x
    pos = torch.arange(padded, device=x.device)
    full.masked_fill_((pos >= lens[..., None])[..., None], 0.0)
    full = full.view(batch, heads, padded // stride, stride, dim)
    if reverse:
        full = full.flip(3)
    return full.reshape(batch, heads, padded // stride, stride * dim)


def _reshaped_softmax(q_r, k_r, row0, reshaped_valid, scale, acc) -> torch.Tensor:
    """Causal softmax of reshaped query rows ``row0 ..`` over reshaped key rows.

    q_r: (B, nK, G, R, S*D); k_r: (B, nK, C, S*D) with C = row0 + R (later columns are
    above the diagonal); reshaped_valid: (B, nK * G). Returns (B, nK * G, R, C); rows
    at or past a head's reshaped length, and so every column past it, are zero.
    """
    batch, kv_heads, group, rows, width = q_r.shape
    cols = k_r.shape[2]
    logits = torch.matmul(q_r.reshape(batch, kv_heads, group * rows, width), k_r.transpose(-1, -2)).to(acc)
    logits = logits.view(batch, kv_heads * group, rows, cols).mul_(scale)
    r = torch.arange(row0, row0 + rows, device=q_r.device)
    c = torch.arange(cols, device=q_r.device)
    logits.masked_fill_(c[None, :] > r[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # Columns past the head's length are seen only by rows past it (c <= r), which
    # count nothing, so the causal mask is the only column mask needed.
    return probs.masked_fill_((r >= reshaped_valid[..., None])[..., None], 0.0)


# ---------------------------------------------------------------- launcher
@torch.no_grad()
def antidiagonal_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    stride: int,
    block_size: int,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """The normalised block scores (module docstring) by the Triton kernel.

    Runs the kernel on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``,
    when :func:`kernel_supports` the grid (T = block_size / stride a power of two
    <= 128); other grids run :func:`antidiagonal_scores_ref`.
    ``kernels.ops_for(query, backend).antidiagonal_scores`` chooses between this
    and the reference (float64 inputs go to the reference).

    Args:
        query, key, seq_lens: see the module docstring; float16, bfloat16 or float32.
        stride, block_size: the grid, S dividing B.
        scale: default 1 / sqrt(D); the logits use ``scale / stride``.
        out: optional (B, H, NQB, NKB) float32 destination, every element written.
        chunk_bytes: the reference's memory budget, used only when the grid falls
            back to it (the kernel keeps no logits).
        tiles: (BLOCK_R, BLOCK_C, num_warps, num_stages), BLOCK_R and BLOCK_C powers
            of two >= 16, raised to T when T is larger. Default on CUDA: (128, 128,
            8, 3), then (128, 64, 8, 2) and (64, 64, 4, 2) while shared memory runs
            out; small tiles under the interpreter.

    Returns:
        (B, H, NQB, NKB) float32, ``out`` if given.
    """
    check_grid(query, key, stride, block_size)
    if not kernel_supports(stride, block_size):
        return antidiagonal_scores_ref(
            query, key, stride=stride, block_size=block_size, seq_lens=seq_lens, scale=scale, out=out,
            chunk_bytes=chunk_bytes,
        )
    check_kernel_dtype("antidiagonal_scores", query, key)
    if not (query.is_cuda or interpreting()):
        raise ValueError(
            "antidiagonal_scores runs the Triton kernel: it needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU "
            "(kernels.ops_for(query, backend).antidiagonal_scores picks the reference elsewhere)"
        )
    import triton  # here, so that the checks above and the reference need no triton

    batch, num_heads, seq_len, head_dim = query.shape
    nb = num_blocks(seq_len, block_size)
    if out is None:
        out = torch.empty(batch, num_heads, nb, nb, dtype=torch.float32, device=query.device)
    else:
        _check_out(out, (batch, num_heads, nb, nb), torch.float32)
    scale = head_dim**-0.5 if scale is None else scale
    args = (query, key, out, _lengths(seq_lens, query, torch.int32), stride, block_size, scale)
    if tiles is None and query.is_cuda:
        for i, candidate in enumerate(_CUDA_TILES):
            try:
                _launch(*args, candidate)
                break
            except triton.runtime.errors.OutOfResources:
                if i == len(_CUDA_TILES) - 1:
                    raise
    else:
        _launch(*args, _INTERPRETER_TILES if tiles is None else tiles)
    return normalise_rows_(out)


def _launch(query, key, out, lens, stride, block_size, scale, tiles) -> None:
    import triton

    batch, num_heads, seq_len, head_dim = query.shape
    block_r, block_c, num_warps, num_stages = tiles
    for name, size in (("BLOCK_R", block_r), ("BLOCK_C", block_c)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    tile = block_size // stride
    block_r, block_c = max(block_r, tile), max(block_c, tile)  # whole blocks per program / step
    nb = out.shape[-1]
    grid = (triton.cdiv(nb * tile, block_r), batch * num_heads)
    _kernel()[grid](
        query, key, out, lens,
        *query.stride(), *key.stride(), *out.stride(),
        num_heads, num_heads // key.shape[1], nb, scale / stride * math.log2(math.e),
        STRIDE=stride,
        TILE=tile,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        UPCAST=(not query.is_cuda) and query.dtype == torch.bfloat16,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )


@functools.cache
def _kernel():
    """The @triton.jit kernel, imported on first use (keeps ``import triton`` lazy)."""
    from ._antidiagonal_triton import _antidiagonal_block_sums

    return _antidiagonal_block_sums


__all__ = [
    "antidiagonal_scores",
    "antidiagonal_scores_ref",
    "estimate_steps",
    "kernel_supports",
    "normalise_rows_",
    "ESTIMATE_CHUNK_BYTES",
]
