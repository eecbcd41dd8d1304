"""The Triton kernel of XAttention's antidiagonal block scores (launcher, layouts
and reference: :mod:`tokensparse.kernels.antidiagonal`). Imported only when the
kernel runs, so the package imports without triton; TRITON_INTERPRET is read at
this import."""

import triton
import triton.language as tl


@triton.jit
def _reshaped_logits(
    q_head, k_head, offs_r, offs_c, seq_len, stride_qm, stride_qd, stride_kn, stride_kd, qk_scale,
    STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_R, BLOCK_C) logits of reshaped rows ``offs_r`` and columns ``offs_c``, in
    base 2 (times scale / S * log2 e): sum over i < S of q[rS + S-1-i] . k[cS + i],
    positions at or past ``seq_len`` read as zero vectors."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    # A loop (not unrolled) over the S antidiagonal offsets: Triton pipelines its loads
    # like the K loop of a GEMM whose reduction dim is S * D.
    for i in range(STRIDE):
        q_pos = offs_r * STRIDE + (STRIDE - 1 - i)
        k_pos = offs_c * STRIDE + i
        # int64 row offsets: position x row stride passes 2^31 past 1M tokens in (B, L, H, D).
        q = tl.load(
            q_head + q_pos.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=(q_pos[:, None] < seq_len) & d_ok, other=0.0,
        )
        k = tl.load(
            k_head + k_pos.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=(k_pos[:, None] < seq_len) & d_ok, other=0.0,
        )
        if UPCAST:  # the CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=DOT_PRECISION)
    # Causal at the reshaped granularity: column c is visible to row c and later rows.
    return tl.where(offs_c[None, :] <= offs_r[:, None], acc * qk_scale, float("-inf"))


@triton.jit
def _antidiagonal_block_sums(
    Q, K, Scores, SeqLens,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sb, stride_sh, stride_sq, stride_sk,
    num_heads, group, num_blocks, qk_scale,
    STRIDE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_R reshaped rows (BLOCK_R / TILE whole query blocks) of one
    (batch, head). Writes the unnormalised block sums of those query blocks'
    rows of ``Scores``, every key block, zeros included."""
    tl.static_assert(BLOCK_R % TILE == 0)
    tl.static_assert(BLOCK_C % TILE == 0)
    NQ: tl.constexpr = BLOCK_R // TILE  # query blocks per program
    NK: tl.constexpr = BLOCK_C // TILE  # key blocks per column step
    # Heavy (late) row blocks first: they see the most columns.
    r_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = h // group
    seq_len = tl.load(SeqLens + pid_bh)
    valid_rows = (seq_len + STRIDE - 1) // STRIDE  # reshaped rows holding a real token
    r0 = r_tile * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    q_head = Q + b * stride_qb + h * stride_qh
    k_head = K + b * stride_kb + kvh * stride_kh
    # Valid rows see columns c <= r < valid_rows; later columns only invalid rows.
    hi = tl.minimum(r0 + BLOCK_R, valid_rows)

    # -- pass 1: each row's max and sum of exp over its visible columns (base 2) --
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        logits = _reshaped_logits(
            q_head, k_head, offs_r, offs_c, seq_len, stride_qm, stride_qd, stride_kn, stride_kd, qk_scale,
            STRIDE, HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_C, UPCAST, DOT_PRECISION,
        )
        # Column 0 lies in the first tile and every row sees it, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(logits - m_new[:, None]), 1)
        m_i = m_new

    # -- pass 2: probabilities tile by tile, summed per (query block, key block) --
    row_ok = offs_r < valid_rows
    inv_l = tl.where(row_ok, 1.0 / tl.where(row_ok, l_i, 1.0), 0.0)  # invalid rows count nothing
    offs_qb = r0 // TILE + tl.arange(0, NQ)
    s_rows = Scores + b * stride_sb + h * stride_sh + offs_qb[:, None] * stride_sq
    qb_ok = offs_qb[:, None] < num_blocks
    for c0 in range(0, hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        logits = _reshaped_logits(
            q_head, k_head, offs_r, offs_c, seq_len, stride_qm, stride_qd, stride_kn, stride_kd, qk_scale,
            STRIDE, HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_C, UPCAST, DOT_PRECISION,
        )
        probs = tl.math.exp2(logits - m_i[:, None]) * inv_l[:, None]
        sums = tl.sum(tl.sum(tl.reshape(probs, (NQ, TILE, NK, TILE)), 3), 1)  # (NQ, NK)
        offs_kb = c0 // TILE + tl.arange(0, NK)
        tl.store(s_rows + offs_kb[None, :] * stride_sk, sums, mask=qb_ok & (offs_kb[None, :] < num_blocks))
    # -- key blocks no valid row of this program sees: zero --
    zeros = tl.zeros([NQ, NK], dtype=tl.float32)
    first_zero = tl.cdiv(hi, BLOCK_C) * BLOCK_C
    for c0 in range(first_zero, num_blocks * TILE, BLOCK_C):
        offs_kb = c0 // TILE + tl.arange(0, NK)
        tl.store(s_rows + offs_kb[None, :] * stride_sk, zeros, mask=qb_ok & (offs_kb[None, :] < num_blocks))
