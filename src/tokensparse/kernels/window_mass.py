"""Scoring: mean softmax mass of the window queries on every key (Triton).

Two passes over the keys, both reading K straight from its (B, Hkv, L, D) layout
(no repeated K for GQA):

1. ``_window_stats_kernel``: for each query head, window row block and key chunk,
   the running max and sum of ``exp2`` of the scaled logits (the softmax
   statistics of a flash-attention forward, without V). A tiny PyTorch combine
   turns the per-chunk statistics into one log-sum-exp per window query. The
   heads of a group are adjacent in the grid, so their reads of the shared K
   chunk mostly hit L2.
2. ``_window_mass_kernel``: for each KV head and key block, loads the key tile
   once and, for every query head of the group and window row block, computes
   the transposed probabilities ``exp2(logit - lse)`` (keys x rows, as
   ``K Q^T``) and sums each key's row; the sum over window rows divided by W is
   the mean mass. Keys on the rows keep that sum inside a warp on the MMA
   accumulator layout (a column sum would cross warps on every row block).

Accumulation is float32. The sequence length, window and chunk length are
run-time arguments, so a new length does not compile a new kernel.
Reference: :func:`tokensparse.kernels.reference.window_mass_ref`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import check_kernel_dtype, dot_precision, interpreting

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634


@triton.jit
def _stats_step(
    q, k_base, Mask, b, stride_kl, stride_kd, stride_mb, stride_ml, start, hi, q_pos,
    m_i, l_i, qk_scale, d, d_ok,
    MASKED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    # -- compute qk --
    if MASKED:
        kt = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kl + d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        kt = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kl + d[:, None] * stride_kd,
                     mask=d_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong (triton 3.9); exact in fp32
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where((cols[None, :] <= q_pos[:, None]) & col_ok[None, :], s, float("-inf"))
    if HAS_MASK:
        real = tl.load(Mask + b.to(tl.int64) * stride_mb + cols * stride_ml, mask=col_ok, other=0)
        s = tl.where((real != 0)[None, :], s, float("-inf"))
    # -- online softmax statistics --
    m_new = tl.maximum(m_i, tl.max(s, 1))
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
    return m_new, l_i


@triton.jit
def _window_stats_kernel(
    Q, K, Mask, M_out, L_out,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_ml,
    num_heads, seq_len, q_shift, window, chunk_len, num_chunks, qk_scale,
    GROUP: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = h // GROUP

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < window
    q_pos = seq_len - window + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    # -- load the window query block once --
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(
        q_base + (q_pos - q_shift).to(tl.int64)[:, None] * stride_ql + d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh

    lo = pid_c * chunk_len
    # Causal: no row of this block sees keys past its last position.
    hi = tl.minimum(tl.minimum(lo + chunk_len, seq_len), seq_len - window + (pid_m + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Full key blocks below the window need no causal or bounds mask (every
    # window row sees them); only the blocks from ``mid`` on are masked.
    mid = lo + tl.maximum(tl.minimum(hi, seq_len - window) - lo, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, mid, BLOCK_N):
        m_i, l_i = _stats_step(q, k_base, Mask, b, stride_kl, stride_kd, stride_mb, stride_ml, start, hi, q_pos,
                               m_i, l_i, qk_scale, d, d_ok, False, HAS_MASK, BLOCK_N, DOT_PRECISION, UPCAST)
    for start in range(mid, hi, BLOCK_N):
        m_i, l_i = _stats_step(q, k_base, Mask, b, stride_kl, stride_kd, stride_mb, stride_ml, start, hi, q_pos,
                               m_i, l_i, qk_scale, d, d_ok, True, HAS_MASK, BLOCK_N, DOT_PRECISION, UPCAST)

    out = (pid_bh * num_chunks + pid_c).to(tl.int64) * window + rows
    tl.store(M_out + out, m_i, mask=row_ok)
    tl.store(L_out + out, l_i, mask=row_ok)


@triton.jit
def _lse_kernel(M_part, L_part, Lse, num_chunks, window, BLOCK_W: tl.constexpr):
    """Combine the per-chunk statistics of one head's window rows into log2-sum-exp2 (+inf: no key)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = rows < window
    base = bh.to(tl.int64) * num_chunks * window + rows
    m_max = tl.full([BLOCK_W], -1.0e30, tl.float32)
    for c in range(num_chunks):
        m_max = tl.maximum(m_max, tl.load(M_part + base + c * window, mask=row_ok, other=-1.0e30))
    total = tl.zeros([BLOCK_W], tl.float32)
    for c in range(num_chunks):
        m = tl.load(M_part + base + c * window, mask=row_ok, other=-1.0e30)
        total += tl.load(L_part + base + c * window, mask=row_ok, other=0.0) * tl.math.exp2(m - m_max)
    lse = tl.where(total > 0, m_max + tl.math.log2(total), float("inf"))
    tl.store(Lse + bh.to(tl.int64) * window + rows, lse, mask=row_ok)


@triton.jit
def _window_mass_kernel(
    Q, K, Mask, Lse, Out,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_ml,
    num_kv_heads, seq_len, q_shift, window, qk_scale, inv_window,
    GROUP: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bkv // num_kv_heads
    kvh = pid_bkv % num_kv_heads
    num_heads = num_kv_heads * GROUP

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seq_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    # -- load the key tile once for the whole GQA group --
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    k = tl.load(
        k_base + cols.to(tl.int64)[:, None] * stride_kl + d[None, :] * stride_kd,
        mask=col_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    col_allowed = col_ok
    if HAS_MASK:
        real = tl.load(Mask + b.to(tl.int64) * stride_mb + cols * stride_ml, mask=col_ok, other=0)
        col_allowed = col_allowed & (real != 0)

    # Window rows whose position is below this block's first key see none of it;
    # only a block that reaches into the window needs the causal mask.
    first_row = tl.maximum(pid_n * BLOCK_N - (seq_len - window), 0)
    row_lo = (first_row // BLOCK_M) * BLOCK_M
    causal = (pid_n + 1) * BLOCK_N > seq_len - window
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        lse_base = Lse + (b * num_heads + h).to(tl.int64) * window
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(row_lo, window, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < window
            q_pos = seq_len - window + rows
            q = tl.load(
                q_base + (q_pos - q_shift).to(tl.int64)[:, None] * stride_ql + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0,
            )
            # Rows past the window read lse = +inf, so their probabilities are 0.
            lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
            if UPCAST:
                q = q.to(tl.float32)
            # -- probabilities of this row block on the key tile, keys on rows --
            # (transposed so the sum over window rows stays within a warp)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
            if causal:
                p_t = tl.where(cols[:, None] <= q_pos[None, :], p_t, 0.0)
            acc += tl.sum(p_t, 1)
        # Padding keys and keys past L are dropped once per key, not per element.
        out = Out + (b * num_heads + h).to(tl.int64) * seq_len + cols
        tl.store(out, tl.where(col_allowed, acc * inv_window, 0.0), mask=col_ok)


@dataclass(frozen=True)
class LaunchConfig:
    """Block shape and launch settings of one pass (``waves``: pass-1 programs per SM)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    waves: int = 4


# Candidates tried once per (group, head_dim, dtype, window, length bucket) on a
# GPU; the fastest is kept. The interpreter uses the small fixed one.
# (64, 64, 4, 2) won pass 1 only at head_dim 64 on the H200 (20% there); 128 x 128
# tiles won nowhere.
STATS_CONFIGS = (LaunchConfig(64, 64, 4, 3, 4), LaunchConfig(128, 64, 8, 3, 2), LaunchConfig(64, 128, 8, 3, 4),
                 LaunchConfig(64, 64, 4, 2, 4))
# Pass 2 (keys on the MMA's rows): on the H200, 2 stages and 4 warps per 64-128
# keys were fastest; 3 stages or 8 warps on 128 x 128 cost up to 1.7x.
MASS_CONFIGS = (LaunchConfig(64, 128, 4, 2), LaunchConfig(64, 256, 8, 2), LaunchConfig(128, 128, 4, 2),
                LaunchConfig(64, 64, 4, 2))
_WIDE_HEAD = LaunchConfig(32, 64, 4, 2, 4)  # head_dim > 128
_INTERPRETER = LaunchConfig(32, 32, 4, 1, 4)
_picked: dict[tuple, LaunchConfig] = {}


def picked_configs() -> dict[str, str]:
    """The launch configs chosen so far (for benchmark reports)."""
    return {str(k): str(v) for k, v in _picked.items()}


def window_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    stats_config: LaunchConfig | None = None,
    mass_config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Triton version of :func:`~tokensparse.kernels.reference.window_mass_ref`.

    Args:
        query: (B, H, Lq, D) float16/bfloat16/float32, any strides: the last Lq
            positions of the keys' sequence (Lq <= Lk; only the last W rows are read).
        key: (B, Hkv, Lk, D), H a multiple of Hkv, any strides.
        window: W, 1 <= W <= Lq.
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: optional (B, Lk) bool, True for real tokens.
        stats_config, mass_config: force the launch settings of pass 1 / pass 2
            (default: the fastest candidate, measured once per shape class on a GPU).

    Returns:
        (B, H, Lk) float32 mean window softmax mass per key. Window rows that see
        no real key (padding) contribute nothing instead of NaN.
    """
    check_kernel_dtype("window_mass", query, key)
    batch, num_heads, query_len, head_dim = query.shape
    seq_len = key.shape[2]
    if not 1 <= window <= query_len <= seq_len:
        raise ValueError(f"window must be in [1, Lq={query_len}] and Lq <= Lk={seq_len}, got window {window}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    args = _Args(query, key, window, scale * _LOG2E, key_padding_mask)
    shape_class = (num_heads // key.shape[1], head_dim, query.dtype, window, key_padding_mask is not None,
                   seq_len.bit_length(), batch)
    stats_config = stats_config or _choose("stats", shape_class, STATS_CONFIGS, lambda c: _stats(args, c), query)
    lse = _stats(args, stats_config)
    mass_config = mass_config or _choose("mass", shape_class, MASS_CONFIGS, lambda c: _mass(args, lse, c), query)
    return _mass(args, lse, mass_config)


@dataclass(frozen=True)
class _Args:
    query: torch.Tensor
    key: torch.Tensor
    window: int
    qk_scale: float
    key_padding_mask: torch.Tensor | None


def _choose(pass_name, shape_class, candidates, run, query) -> LaunchConfig:
    if interpreting() or query.device.type != "cuda":
        return _INTERPRETER
    if query.shape[-1] > 128:
        return _WIDE_HEAD
    cache_key = (pass_name,) + shape_class
    if cache_key not in _picked:
        times = []
        for config in candidates:
            try:
                run(config)  # compile and warm up
            except triton.runtime.errors.OutOfResources:  # e.g. float32 tiles over shared memory
                times.append(math.inf)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                run(config)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        if min(times) == math.inf:
            raise RuntimeError(f"window_mass {pass_name} pass: no launch candidate fits this GPU for {shape_class}")
        _picked[cache_key] = candidates[times.index(min(times))]
        logger.info("window_mass %s pass for %s: %s (ms x3: %s)", pass_name, shape_class, _picked[cache_key], times)
    return _picked[cache_key]


def _mask_args(a: _Args):
    if a.key_padding_mask is None:
        return a.query, 0, 0  # never read
    mask = a.key_padding_mask.to(torch.int8)
    return mask, mask.stride(0), mask.stride(1)


def _stats(a: _Args, c: LaunchConfig) -> torch.Tensor:
    """Pass 1 and the combine: (B * H, W) log2-sum-exp2 of each window row."""
    query, key, window = a.query, a.key, a.window
    batch, num_heads, query_len, head_dim = query.shape
    seq_len = key.shape[2]
    mask, stride_mb, stride_ml = _mask_args(a)
    rows_blocks = triton.cdiv(window, c.block_m)
    # Enough key chunks to fill the GPU, each a multiple of the key block.
    target_programs = c.waves * _sm_count(query.device)
    num_chunks = max(1, min(triton.cdiv(seq_len, c.block_n), triton.cdiv(target_programs, batch * num_heads * rows_blocks)))
    chunk_len = triton.cdiv(triton.cdiv(seq_len, num_chunks), c.block_n) * c.block_n
    num_chunks = triton.cdiv(seq_len, chunk_len)
    m_part = torch.empty(batch * num_heads, num_chunks, window, device=query.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    _window_stats_kernel[(batch * num_heads, num_chunks, rows_blocks)](
        query, key, mask, m_part, l_part,
        *query.stride(), *key.stride(), stride_mb, stride_ml,
        num_heads, seq_len, seq_len - query_len, window, chunk_len, num_chunks, a.qk_scale,
        GROUP=num_heads // key.shape[1], HAS_MASK=a.key_padding_mask is not None, HEAD_DIM=head_dim,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=dot_precision(query.dtype), UPCAST=interpreting(),
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    lse = torch.empty(batch * num_heads, window, device=query.device, dtype=torch.float32)
    block_w = min(triton.next_power_of_2(window), 1024)
    _lse_kernel[(batch * num_heads, triton.cdiv(window, block_w))](
        m_part, l_part, lse, num_chunks, window, BLOCK_W=block_w, num_warps=4,
    )
    return lse


def _mass(a: _Args, lse: torch.Tensor, c: LaunchConfig) -> torch.Tensor:
    """Pass 2: (B, H, L) mean mass, the key tile read once for the whole group."""
    query, key, window = a.query, a.key, a.window
    batch, num_heads, query_len, head_dim = query.shape
    num_kv_heads, seq_len = key.shape[1], key.shape[2]
    mask, stride_mb, stride_ml = _mask_args(a)
    out = torch.empty(batch, num_heads, seq_len, device=query.device, dtype=torch.float32)
    _window_mass_kernel[(batch * num_kv_heads, triton.cdiv(seq_len, c.block_n))](
        query, key, mask, lse, out,
        *query.stride(), *key.stride(), stride_mb, stride_ml,
        num_kv_heads, seq_len, seq_len - query_len, window, a.qk_scale, 1.0 / window,
        GROUP=num_heads // num_kv_heads, HAS_MASK=a.key_padding_mask is not None, HEAD_DIM=head_dim,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=dot_precision(query.dtype), UPCAST=interpreting(),
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return out


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
