"""The Triton kernel of block-sparse causal attention (launcher and layouts:
:mod:`tokensparse.kernels.block_sparse`). Imported only when the kernel runs, so
the package imports without triton; TRITON_INTERPRET is read at this import."""

import triton
import triton.language as tl



@triton.jit
def _tile(
    acc, l_i, m_i, q, k_head, v_head, start_n, offs_m, seq_len,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = k_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_head + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    # -- load K, V (masks only where a tile can leave the valid rows or dims) --
    if MASK:
        row_ok = offs_n[:, None] < seq_len
        k = tl.load(k_ptrs, mask=row_ok & (offs_d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=row_ok & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        if BLOCK_DV == HEAD_DIM_V:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # -- compute qk --
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK:
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
    # -- online softmax, base 2 --
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, BlockIdx, BlockCnt, SeqLens,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ib, stride_ih, stride_iq,
    num_heads, group, total_len, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PATTERN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(PATTERN_BLOCK % BLOCK_M == 0)
    tl.static_assert(PATTERN_BLOCK % BLOCK_N == 0)
    TILES_PER_BLOCK: tl.constexpr = PATTERN_BLOCK // BLOCK_N
    # Heavy (late) query tiles first: they visit the most blocks.
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = h // group
    seq_len = tl.load(SeqLens + pid_bh)
    start_m = m_tile * BLOCK_M
    qb = start_m // PATTERN_BLOCK
    cnt = tl.load(BlockCnt + pid_bh * tl.cdiv(total_len, PATTERN_BLOCK) + qb)  # (B, H, NQB) contiguous
    cnt = tl.where(start_m < seq_len, cnt, 0)
    idx_base = BlockIdx + b * stride_ib + h * stride_ih + qb * stride_iq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # the CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
        q = q.to(tl.float32)
    k_head = K + b * stride_kb + kvh * stride_kh
    v_head = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # -- listed blocks below the last one: strictly under the diagonal, no masks --
    for i in range(0, (cnt - 1) * TILES_PER_BLOCK):
        kb = tl.load(idx_base + i // TILES_PER_BLOCK)
        start_n = kb * PATTERN_BLOCK + (i % TILES_PER_BLOCK) * BLOCK_N
        acc, l_i, m_i = _tile(
            acc, l_i, m_i, q, k_head, v_head, start_n, offs_m, seq_len,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False, UPCAST, DOT_PRECISION,
        )
    # -- the last listed block (the diagonal when kept): causal and length masks --
    kb = tl.load(idx_base + tl.maximum(cnt - 1, 0))
    lo = kb * PATTERN_BLOCK
    hi = tl.minimum(tl.minimum(lo + PATTERN_BLOCK, start_m + BLOCK_M), seq_len)
    hi = tl.where(cnt > 0, hi, lo)
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _tile(
            acc, l_i, m_i, q, k_head, v_head, start_n, offs_m, seq_len,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, UPCAST, DOT_PRECISION,
        )
    # -- normalise; rows past the head's length (or that saw nothing) are zero --
    row_ok = (offs_m < seq_len) & (l_i > 0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    acc = acc / l_safe[:, None]
    acc = tl.where(row_ok[:, None], acc, 0.0)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < total_len) & (offs_dv[None, :] < HEAD_DIM_V))
