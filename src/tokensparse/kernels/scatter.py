"""Decompress: write compressed attention rows back in place, zeros elsewhere (Triton).

One pass over the full output: each program owns a block of positions of one
head, reads where its positions start in the (ascending) kept-index row (one
``torch.searchsorted`` for all blocks beforehand, so no program waits on a chain
of dependent loads), matches the few candidates against its positions, and
writes either the compressed row or zeros. Every output element is written exactly
once, in the layout the caller asks for (``bhld`` as SDPA, ``blhd`` as
transformers). Reference: :func:`tokensparse.kernels.reference.scatter_kept_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_kernel_dtype, interpreting


@triton.jit
def _scatter_kept_kernel(
    Oc, Idx, Starts, Out,
    stride_cb, stride_ch, stride_ck, stride_cd,
    stride_ib, stride_ih, stride_ik,
    stride_ob, stride_oh, stride_ol, stride_od,
    num_chunk_heads, head_start, seq_len, num_kept, num_blocks,
    DIM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_l = tl.program_id(1)
    b = pid_bh // num_chunk_heads
    hc = pid_bh % num_chunk_heads
    h = head_start + hc
    p0 = pid_l * BLOCK_L

    # -- first kept entry >= p0 (entries ascend; padding L sorts last) --
    idx_row = Idx + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    lo = tl.load(Starts + pid_bh.to(tl.int64) * num_blocks + pid_l)

    # -- match positions p0 + i against kept entries lo + j --
    j = tl.arange(0, BLOCK_L)
    cand = tl.load(idx_row + (lo + j) * stride_ik, mask=(lo + j) < num_kept, other=-1)
    i = tl.arange(0, BLOCK_L)
    match = cand[None, :] == (p0 + i)[:, None]  # (positions, candidates)
    kept = tl.max(match.to(tl.int32), 1) > 0
    src = lo + tl.sum(tl.where(match, j[None, :], 0), 1)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    pos = p0 + i
    pos_ok = pos < seq_len
    rows = tl.load(
        Oc + b.to(tl.int64) * stride_cb + hc.to(tl.int64) * stride_ch
        + src.to(tl.int64)[:, None] * stride_ck + d[None, :] * stride_cd,
        mask=kept[:, None] & pos_ok[:, None] & d_ok[None, :], other=0.0,
    )
    out = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
           + pos.to(tl.int64)[:, None] * stride_ol + d[None, :] * stride_od)
    tl.store(out, rows, mask=pos_ok[:, None] & d_ok[None, :])


def scatter_kept_into(
    out: torch.Tensor,
    out_c: torch.Tensor,
    kept_idx: torch.Tensor,
    *,
    layout: str = "bhld",
    head_start: int = 0,
) -> torch.Tensor:
    """Write heads ``[head_start, head_start + Hc)`` of ``out`` from ``out_c``.

    Args:
        out: (B, H, L, Dv) for ``bhld`` or (B, L, H, Dv) for ``blhd``; every element
            of the covered heads is written (kept rows or zeros).
        out_c: (B, Hc, K, Dv) compressed rows.
        kept_idx: (B, H, K) ascending positions, padding equal to L.
        layout: layout of ``out``.
        head_start: first query head of ``out_c``.

    Returns:
        ``out``.
    """
    check_kernel_dtype("scatter_kept", out_c)
    if layout == "bhld":
        batch, _, seq_len, dim = out.shape
        strides = out.stride()
    elif layout == "blhd":
        batch, seq_len, _, dim = out.shape
        sb, sl, sh, sd = out.stride()
        strides = (sb, sh, sl, sd)
    else:
        raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
    num_heads = out_c.shape[1]
    num_kept = kept_idx.shape[-1]
    block_l = 32 if interpreting() else 64
    num_blocks = triton.cdiv(seq_len, block_l)
    rows = kept_idx[:, head_start: head_start + num_heads].contiguous()
    block_starts = torch.arange(0, seq_len, block_l, device=rows.device, dtype=rows.dtype)
    starts = torch.searchsorted(rows, block_starts.expand(batch, num_heads, num_blocks).contiguous())
    _scatter_kept_kernel[(batch * num_heads, num_blocks)](
        out_c, kept_idx, starts, out,
        *out_c.stride(), *kept_idx.stride(), *strides,
        num_heads, head_start, seq_len, num_kept, num_blocks,
        DIM=dim, BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(dim),
        num_warps=4,
    )
    return out


def scatter_kept(out_c: torch.Tensor, kept_idx: torch.Tensor, seq_len: int, layout: str = "bhld") -> torch.Tensor:
    """Triton version of :func:`~tokensparse.kernels.reference.scatter_kept_ref` (contiguous output)."""
    batch, num_heads, _, dim = out_c.shape
    if layout == "bhld":
        out = out_c.new_empty(batch, num_heads, seq_len, dim)
    elif layout == "blhd":
        out = out_c.new_empty(batch, seq_len, num_heads, dim)
    else:
        raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
    return scatter_kept_into(out, out_c, kept_idx, layout=layout)
