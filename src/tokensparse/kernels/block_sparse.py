"""Block-sparse causal attention: Triton kernel, launcher, PyTorch reference.

Layouts (any strides, so a (B, L, H, D) tensor viewed with ``.transpose(1, 2)``
works for inputs and for ``out``):
    query (B, H, L, D); key (B, Hkv, L, D); value (B, Hkv, L, Dv); H a multiple
    of Hkv, query head h reads KV head h // (H // Hkv) (native GQA, K/V are never
    repeated).

The pattern, on a grid of ``block_size`` x ``block_size`` blocks aligned at
position 0 (the last block may be partial):
    block_idx (B, H, NQB, C) int32: for query block qb, the key blocks it visits,
        strictly ascending, every entry <= qb; the first ``block_cnt[b, h, qb]``
        entries are valid, the rest are ignored.
    block_cnt (B, H, NQB) int32.
    seq_lens (B, H) int64, optional: valid rows of each head (compressed
        sequences padded at the end); rows at or past it are written as zeros and
        keys at or past it are never read. Default: every head has L rows.

Inside a visited block attention is causal; a block not listed contributes
nothing. The kernel visits only the listed blocks: every listed block but the
last runs without masks (it lies strictly below the diagonal), the last one with
the causal and length masks.
"""

from __future__ import annotations

import functools
import math

import torch

from ._launch import dot_precision, interpreting

# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages). The CUDA default is the
# fastest of the tile sweep on the H200 (results/flexprefill/h200;
# tokensparse.bench.tiles.sweep_block_sparse_tiles reruns it); GPUs with less
# shared memory fall back to the smaller tiles.
_CUDA_TILES = (128, 128, 8, 3)
_CUDA_FALLBACK_TILES = (128, 64, 8, 3)
_INTERPRETER_TILES = (64, 128, 4, 1)


# ---------------------------------------------------------------- pattern formats
def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def lists_from_block_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, NQB, NKB) bool block mask -> (block_idx (B, H, NQB, C) int32, block_cnt int32).

    Entries above the diagonal (kb > qb) are dropped. C = max(1, largest count).
    """
    nqb, nkb = mask.shape[-2:]
    causal = torch.ones(nqb, nkb, dtype=torch.bool, device=mask.device).tril()
    mask = mask & causal
    cnt = mask.sum(dim=-1, dtype=torch.int32)
    width = max(1, int(cnt.max())) if cnt.numel() else 1  # one host sync
    # A stable sort of "not kept" puts the kept block indices first, ascending.
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :width]
    return order.to(torch.int32).contiguous(), cnt.contiguous()


def block_mask_from_lists(block_idx: torch.Tensor, block_cnt: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """Inverse of :func:`lists_from_block_mask`: (B, H, NQB, NKB) bool."""
    width = block_idx.shape[-1]
    valid = torch.arange(width, device=block_idx.device) < block_cnt[..., None].long()
    mask = torch.zeros(*block_cnt.shape, num_key_blocks + 1, dtype=torch.bool, device=block_idx.device)
    idx = torch.where(valid, block_idx.long(), num_key_blocks)
    mask.scatter_(-1, idx, True)
    return mask[..., :num_key_blocks]


def visited_share(block_cnt: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H) float32: visited blocks over the causal blocks of each head's valid rows."""
    nq = (seq_lens + block_size - 1) // block_size
    causal = (nq * (nq + 1) // 2).clamp(min=1)
    return block_cnt.sum(dim=-1).float() / causal.float()


# ---------------------------------------------------------------- reference
def block_sparse_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size: int,
    *,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Dense attention with the block pattern expanded to a token mask.

    Same layouts, meaning and checks as :func:`block_sparse_attention` (whose
    place it takes in ``kernels.TORCH_OPS``); computes in float32 (float64 for
    float64 inputs), ``chunk`` query rows at a time per KV head group, so memory
    stays bounded at long lengths. Returns (B, H, L, Dv) in the query's dtype
    (``out`` if given), zero in rows at or past ``seq_lens``.
    """
    check_pattern(query, block_idx, block_cnt, block_size)
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = head_dim**-0.5 if scale is None else scale
    device = query.device
    if seq_lens is None:
        seq_lens = torch.full((batch, num_heads), seq_len, dtype=torch.long, device=device)
    nkb = num_blocks(seq_len, block_size)
    bmask = block_mask_from_lists(block_idx, block_cnt, nkb)  # (B, H, NQB, NKB)
    k_pos = torch.arange(seq_len, device=device)
    k_blk = k_pos // block_size
    result = torch.zeros(batch, num_heads, seq_len, value.shape[-1], dtype=query.dtype, device=device)
    for b in range(batch):
        for kvh in range(num_kv_heads):
            heads = slice(kvh * group, (kvh + 1) * group)
            k = key[b, kvh].to(acc)
            v = value[b, kvh].to(acc)
            for start in range(0, seq_len, chunk):
                q_pos = torch.arange(start, min(start + chunk, seq_len), device=device)
                q = query[b, heads, q_pos].to(acc)  # (G, C, D)
                logits = torch.matmul(q, k.T) * scale  # (G, C, L)
                allowed = bmask[b, heads][:, q_pos // block_size][:, :, k_blk]  # (G, C, L)
                allowed = allowed & (k_pos[None, None, :] <= q_pos[None, :, None])
                allowed = allowed & (k_pos[None, None, :] < seq_lens[b, heads, None, None])
                valid_row = (q_pos[None, :] < seq_lens[b, heads, None]) & allowed.any(dim=-1)
                logits = logits.masked_fill(~allowed, float("-inf"))
                probs = torch.softmax(logits.masked_fill(~valid_row[..., None], 0.0), dim=-1)
                rows = torch.matmul(probs, v).masked_fill(~valid_row[..., None], 0.0)
                result[b, heads, start : start + q_pos.numel()] = rows.to(query.dtype)
    if out is None:
        return result
    return out.copy_(result)


def check_pattern(query: torch.Tensor, block_idx: torch.Tensor, block_cnt: torch.Tensor, block_size: int) -> None:
    """Raise ``ValueError`` if the pattern does not fit the query (shapes as in the module docstring)."""
    batch, num_heads, seq_len, _ = query.shape
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a multiple of 16, got {block_size}")
    nqb = num_blocks(seq_len, block_size)
    if block_idx.shape[:3] != (batch, num_heads, nqb) or block_cnt.shape != (batch, num_heads, nqb):
        raise ValueError(
            f"block_idx/block_cnt must be (B, H, NQB[, C]) = ({batch}, {num_heads}, {nqb}), "
            f"got {tuple(block_idx.shape)} and {tuple(block_cnt.shape)}"
        )


# ---------------------------------------------------------------- launcher
def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size: int,
    *,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Causal attention over the listed key blocks of every query block (the Triton kernel).

    Always runs the kernel: on CUDA tensors, or on the CPU under
    ``TRITON_INTERPRET=1``. ``kernels.ops_for(query, backend).block_sparse_attention``
    chooses between it and :func:`block_sparse_attention_ref`.

    Args:
        query, key, value, block_idx, block_cnt, seq_lens: see the module docstring.
        block_size: the pattern's block, a multiple of 16.
        scale: softmax scale, default 1 / sqrt(D).
        out: optional (B, H, L, Dv) destination (any strides, e.g. the transpose
            of a (B, L, H, Dv) tensor); a new contiguous tensor otherwise.
        tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) for the kernel;
            BLOCK_M and BLOCK_N powers of two >= 16 dividing ``block_size``.
            Default: the H200's best on CUDA (a smaller fallback where shared
            memory runs out), small tiles under the interpreter.

    Returns:
        (B, H, L, Dv) in the query's dtype (``out`` if given).
    """
    check_pattern(query, block_idx, block_cnt, block_size)
    if not (query.is_cuda or interpreting()):
        raise ValueError(
            "block_sparse_attention runs the Triton kernel: it needs a CUDA tensor, or TRITON_INTERPRET=1 on "
            "the CPU (kernels.ops_for(query, backend).block_sparse_attention picks the reference elsewhere)"
        )
    import triton  # here, so that the checks above and the reference need no triton

    batch, num_heads, seq_len, head_dim = query.shape
    scale = head_dim**-0.5 if scale is None else scale
    if seq_lens is None:
        lens = torch.full((batch, num_heads), seq_len, dtype=torch.int32, device=query.device)
    else:
        lens = seq_lens.to(device=query.device, dtype=torch.int32).contiguous()
    if out is None:
        out = torch.empty(batch, num_heads, seq_len, value.shape[-1], dtype=query.dtype, device=query.device)
    block_idx = block_idx.to(torch.int32).contiguous()
    block_cnt = block_cnt.to(torch.int32).contiguous()
    if tiles is None and query.is_cuda:
        try:
            return _launch(query, key, value, out, block_idx, block_cnt, lens, block_size, scale, _CUDA_TILES)
        except triton.runtime.errors.OutOfResources:
            return _launch(query, key, value, out, block_idx, block_cnt, lens, block_size, scale, _CUDA_FALLBACK_TILES)
    tiles = _INTERPRETER_TILES if tiles is None else tiles
    return _launch(query, key, value, out, block_idx, block_cnt, lens, block_size, scale, tiles)


def _launch(query, key, value, out, block_idx, block_cnt, lens, block_size, scale, tiles) -> torch.Tensor:
    import triton

    batch, num_heads, seq_len, head_dim = query.shape
    block_m, block_n, num_warps, num_stages = tiles
    block_m = min(block_m, block_size)
    block_n = min(block_n, block_size)
    for name, tile in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if tile < 16 or tile & (tile - 1) or block_size % tile:
            raise ValueError(f"{name}={tile} must be a power of two >= 16 dividing block_size={block_size}")
    grid = (triton.cdiv(seq_len, block_m), batch * num_heads)
    kernel = _kernel()
    kernel[grid](
        query, key, value, out, block_idx, block_cnt, lens,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        num_heads, num_heads // key.shape[1], seq_len, scale * math.log2(math.e),
        HEAD_DIM=head_dim,
        HEAD_DIM_V=value.shape[-1],
        BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        BLOCK_DV=triton.next_power_of_2(max(value.shape[-1], 16)),
        PATTERN_BLOCK=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=(not query.is_cuda) and query.dtype == torch.bfloat16,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# ---------------------------------------------------------------- kernel
@functools.cache
def _kernel():
    """The @triton.jit kernel, imported on first use (keeps ``import triton`` lazy)."""
    from ._block_sparse_triton import _block_sparse_fwd

    return _block_sparse_fwd


__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "lists_from_block_mask",
    "block_mask_from_lists",
    "visited_share",
    "num_blocks",
    "check_pattern",
]
