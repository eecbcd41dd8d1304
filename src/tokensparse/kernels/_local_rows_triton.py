"""The Triton kernel of sink + local attention written into the rows a head dropped
(launcher, layouts and reference: :mod:`tokensparse.kernels.local_rows`). Imported
only when the kernel runs, so the package imports without triton."""

import triton
import triton.language as tl


@triton.jit
def _local_rows_fwd(
    Q, K, V, Out, Kept, SeqLens,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_kept_b, stride_kept_h,
    num_kv_heads, group, total_len, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PATTERN_BLOCK: tl.constexpr, ROWS: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEPT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(PATTERN_BLOCK % ROWS == 0)
    tl.static_assert(PATTERN_BLOCK % BLOCK_N == 0)
    # One program: ROWS positions of every query head of one KV group (GQA packed
    # into the tile's rows, row r = head r // ROWS, position r % ROWS), so each K/V
    # tile is loaded once for the whole group and the dots are GROUP_PAD x taller.
    tile = tl.program_id(0)
    b = (tl.program_id(1) // num_kv_heads).to(tl.int64)
    kvh = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    seq_len = tl.load(SeqLens + b)
    pad = total_len - seq_len
    # Tiles are aligned at the first real token (the pattern's grid); the first
    # ``pad_tiles`` tiles hold padding only (t < 0), written as zeros.
    pad_tiles = tl.cdiv(pad, ROWS)
    t0 = (tile - pad_tiles) * ROWS
    offs_r = tl.arange(0, GROUP_PAD * ROWS)
    head_ok = (offs_r // ROWS) < group
    h = kvh * group + offs_r // ROWS  # (M,) query head of each row
    offs_t = t0 + offs_r % ROWS  # real-token index of each row
    pos = pad + offs_t  # its position in the padded sequence
    in_seq = head_ok & (pos >= 0) & (offs_t < seq_len)

    # -- rows to write: every row not kept (padding included) --
    if HAS_KEPT:
        kept = tl.load(Kept + b * stride_kept_b + h * stride_kept_h + pos, mask=in_seq, other=1)
        write = in_seq & (kept == 0)
    else:
        write = in_seq
    real = write & (offs_t >= 0)
    busy = tl.max(real.to(tl.int32), 0) > 0

    # -- key tiles: the sink block (when it is neither the own nor the previous
    # block), then the contiguous previous + own blocks up to the diagonal --
    qb = tl.maximum(t0, 0) // PATTERN_BLOCK
    num_sink = tl.where(busy & (qb >= 2), PATTERN_BLOCK // BLOCK_N, 0)
    lo = tl.maximum(qb - 1, 0) * PATTERN_BLOCK
    hi = tl.minimum(t0 + ROWS, seq_len)
    num_band = tl.where(busy, tl.cdiv(hi - lo, BLOCK_N), 0)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_row = pos.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + offs_row[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=real[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # the CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
        q = q.to(tl.float32)
    k_head = K + b * stride_kb + kvh * stride_kh + pad.to(tl.int64) * stride_kn
    v_head = V + b * stride_vb + kvh * stride_vh + pad.to(tl.int64) * stride_vn

    m_i = tl.full([GROUP_PAD * ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD * ROWS], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD * ROWS, BLOCK_DV], dtype=tl.float32)
    for i in range(0, num_sink + num_band):
        start_n = tl.where(i < num_sink, i * BLOCK_N, lo + (i - num_sink) * BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        k_ptrs = k_head + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_head + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # -- compute qk; causal (a no-op below the diagonal, cheaper than a branch) --
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where((offs_n[None, :] <= offs_t[:, None]) & key_ok[None, :], qk, float("-inf"))
        # -- online softmax, base 2 --
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij

    # -- normalise; padding rows get zeros; only the rows to write are stored --
    l_safe = tl.where(real & (l_i > 0), l_i, 1.0)
    acc = tl.where(real[:, None], acc / l_safe[:, None], 0.0)
    o_ptrs = Out + b * stride_ob + h[:, None] * stride_oh + offs_row[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=write[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
