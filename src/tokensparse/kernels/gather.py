"""Compress: gather the kept Q rows and their K/V rows per query head (Triton).

K and V are read straight from their (B, Hkv, L, D) layout: query head h reads
KV head h // G, so repeated K/V never exist in memory. Output tensors are
contiguous (B, Hc, K, D), ready for SDPA; a head range ``[head_start,
head_start + Hc)`` lets callers compress a few heads at a time to bound memory,
and ``out`` lets them place the results in buffers of their own.
Reference: :func:`tokensparse.kernels.reference.gather_kept_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_kernel_dtype, interpreting


@triton.jit
def _gather_rows(src_base, idx, rows_ok, stride_l, stride_d, dst_base, k_off, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    m = rows_ok[:, None] & d_ok[None, :]
    x = tl.load(src_base + idx[:, None] * stride_l + d[None, :] * stride_d, mask=m)
    tl.store(dst_base + k_off.to(tl.int64)[:, None] * DIM + d[None, :], x, mask=m)


@triton.jit
def _gather_kept_kernel(
    Q, K, V, Idx, Qc, Kc, Vc,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ib, stride_ih, stride_ik,
    stride_cb, stride_ch, stride_vcb, stride_vch,
    num_chunk_heads, head_start, seq_len, num_kept,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = pid_bh // num_chunk_heads
    hc = pid_bh % num_chunk_heads
    h = head_start + hc
    kvh = h // GROUP

    k_off = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_ok = k_off < num_kept
    idx = tl.load(
        Idx + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + k_off * stride_ik,
        mask=rows_ok, other=0,
    )
    # Padding entries (== L) copy row L - 1, as the reference does.
    idx = tl.minimum(idx, seq_len - 1).to(tl.int64)
    # Outputs: rows of one head contiguous, (batch, head) strides from the caller.
    qk_out = b.to(tl.int64) * stride_cb + hc.to(tl.int64) * stride_ch
    v_out = b.to(tl.int64) * stride_vcb + hc.to(tl.int64) * stride_vch
    _gather_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, idx, rows_ok,
                 stride_ql, stride_qd, Qc + qk_out, k_off, HEAD_DIM, BLOCK_D)
    _gather_rows(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh, idx, rows_ok,
                 stride_kl, stride_kd, Kc + qk_out, k_off, HEAD_DIM, BLOCK_D)
    _gather_rows(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh, idx, rows_ok,
                 stride_vl, stride_vd, Vc + v_out, k_off, V_DIM, BLOCK_DV)


def gather_kept(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor,
    *,
    head_start: int = 0,
    num_heads: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`~tokensparse.kernels.reference.gather_kept_ref`.

    Args:
        query: (B, H, L, D); key: (B, Hkv, L, D); value: (B, Hkv, L, Dv); any strides.
        kept_idx: (B, H, K) integer positions, padding entries equal to L.
        head_start, num_heads: compress only query heads
            ``[head_start, head_start + num_heads)`` (default: all).
        out: buffers to write q, k, v into, shaped as the result; each head's
            rows contiguous, any batch and head strides (q and k sharing them).

    Returns:
        q, k: (B, Hc, K, D) and v: (B, Hc, K, Dv), contiguous, Hc = num_heads.
    """
    check_kernel_dtype("gather_kept", query, key, value)
    batch, total_heads, seq_len, head_dim = query.shape
    group = total_heads // key.shape[1]
    v_dim = value.shape[-1]
    num_heads = total_heads - head_start if num_heads is None else num_heads
    num_kept = kept_idx.shape[-1]
    shape = (batch, num_heads, num_kept)
    if out is None:
        q_c = query.new_empty(*shape, head_dim)
        k_c = key.new_empty(*shape, head_dim)
        v_c = value.new_empty(*shape, v_dim)
    else:
        q_c, k_c, v_c = out
        want = (shape + (head_dim,), shape + (head_dim,), shape + (v_dim,))
        if tuple(tuple(t.shape) for t in out) != want:
            raise ValueError(f"out: expected shapes {want}, got {[tuple(t.shape) for t in out]}")
        if q_c.stride()[:2] != k_c.stride()[:2] or any(t.stride()[2:] != (t.shape[-1], 1) for t in out):
            raise ValueError("out: each head's rows must be contiguous and q, k must share strides")
    if num_kept == 0 or num_heads == 0:
        return q_c, k_c, v_c
    block_k = 32 if interpreting() else 64
    _gather_kept_kernel[(batch * num_heads, triton.cdiv(num_kept, block_k))](
        query, key, value, kept_idx, q_c, k_c, v_c,
        *query.stride(), *key.stride(), *value.stride(), *kept_idx.stride(),
        q_c.stride(0), q_c.stride(1), v_c.stride(0), v_c.stride(1),
        num_heads, head_start, seq_len, num_kept,
        GROUP=group, HEAD_DIM=head_dim, V_DIM=v_dim,
        BLOCK_K=block_k, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_DV=triton.next_power_of_2(v_dim),
        num_warps=4,
    )
    return q_c, k_c, v_c
