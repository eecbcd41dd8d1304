"""FlexPrefill: context-aware block-sparse attention for long prefill.

Written from the published description (Lai et al., "FlexPrefill: A
Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference",
arXiv 2502.20766). For every head, from the last block of queries:

1. **Estimate.** The softmax attention of the last ``block_size`` queries on all
   keys gives a *vertical* score (mean mass per key) and a *slash* score (mean
   mass per diagonal offset ``i - j``).
2. **Query-aware test.** The block-pooled estimate (mean query of that block
   against the mean key of every key block, weighted by the keys in the block)
   is compared with the true distribution of the same queries summed per key
   block, by the Jensen-Shannon distance ``sqrt(JSD)`` (natural log). Below
   ``tau`` the pooled estimate is trusted: the head becomes *query-aware* and
   keeps the fewest blocks of its pooled attention map (all query blocks,
   flattened, each row a softmax over key blocks) whose mass reaches ``gamma``
   of the total, plus each query block's ``min_budget / block_size`` best key
   blocks. Otherwise the head is *vertical-slash*.
3. **Vertical-slash budgets.** Key blocks are ranked by vertical mass and block
   diagonals by slash mass; each keeps the fewest that reach ``gamma`` of its
   mass, at least ``ceil(min_budget / block_size)``. Slash mass at offset
   ``o = s * block_size + r`` is shared between block diagonals ``s`` (weight
   ``(block_size - r) / block_size``, the rows of a query block where the line
   stays in diagonal ``s``) and ``s + 1`` (weight ``r / block_size``).
   Query block ``qb`` visits key block ``kb <= qb`` if ``kb`` is a kept vertical
   block or ``qb - kb`` a kept diagonal.
4. The first key block and the diagonal block are always visited. The
   block-sparse kernel (:mod:`tokensparse.kernels.block_sparse`) then visits
   only the chosen blocks.

Where the paper is silent this module chooses: budgets are counted in blocks on
block-summed scores (so the kept blocks provably hold ``gamma`` of the estimated
mass); the estimation queries are the last ``block_size`` positions (which may
straddle two grid blocks when the length is not a multiple of the block).

Compressed sequences (Token Sparse + FlexPrefill) have per-head valid lengths
``seq_lens`` with padding at the end: every head's estimate uses *its own* last
``block_size`` valid queries and only its valid keys, exactly as if the head's
sequence were alone (padding never enters the pattern or the output).

Layout at this boundary is SDPA's: query (B, H, L, D), key/value (B, Hkv, L, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.block_sparse import lists_from_block_mask, num_blocks
from .block_sparse import BlockLists, block_sparse_op, register_block_sparse

DEFAULT_GAMMA = 0.95
DEFAULT_TAU = 0.1
DEFAULT_MIN_BUDGET = 1024
DEFAULT_BLOCK = 128
_ESTIMATE_CHUNK_BYTES = 256 << 20  # fp32 estimation logits per step


@dataclass(frozen=True)
class FlexPrefillConfig:
    """Settings of FlexPrefill used alone (see :func:`flexprefill_attention`).

    Attributes:
        gamma: share of estimated attention mass the kept blocks hold, (0, 1].
        tau: Jensen-Shannon threshold for query-aware heads, >= 0.
        min_budget: minimum budget in tokens, >= 0.
        block_size: the pattern's block, a positive multiple of 16.
        backend: "auto", "triton" or "torch" for the block-sparse kernel.
    """

    gamma: float = DEFAULT_GAMMA
    tau: float = DEFAULT_TAU
    min_budget: int = DEFAULT_MIN_BUDGET
    block_size: int = DEFAULT_BLOCK
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_params(gamma=self.gamma, tau=self.tau, min_budget=self.min_budget, block_size=self.block_size)
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be one of 'auto', 'triton', 'torch', got {self.backend!r}")

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`flexprefill_attention`."""
        return {
            "gamma": self.gamma,
            "tau": self.tau,
            "min_budget": self.min_budget,
            "block_size": self.block_size,
            "backend": self.backend,
        }

    def runs_dense(self, seq_len: int) -> bool:
        """True when every causal block is visited whatever the inputs (L <= min budget)."""
        return seq_len <= max(self.min_budget, self.block_size)


@dataclass(frozen=True)
class BlockPattern(BlockLists):
    """The blocks every head visits (:class:`BlockLists`), and how FlexPrefill chose them.

    Attributes:
        query_aware: (B, H) bool, heads that used the pooled (query-aware) pattern.
        js_distance: (B, H) float32 Jensen-Shannon distance of the pooled estimate.
    """

    query_aware: torch.Tensor
    js_distance: torch.Tensor


def flexprefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    tau: float = DEFAULT_TAU,
    min_budget: int = DEFAULT_MIN_BUDGET,
    block_size: int = DEFAULT_BLOCK,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    layout: str = "bhld",
    return_pattern: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, BlockPattern]:
    """Causal FlexPrefill attention; a drop-in for causal SDPA.

    Args:
        query: (B, H, L, D) floating point, after RoPE.
        key: (B, Hkv, L, D), H a multiple of Hkv (GQA; K/V are never repeated).
        value: (B, Hkv, L, Dv).
        gamma: share of estimated attention mass the kept blocks must hold, (0, 1].
        tau: Jensen-Shannon distance below which a head is query-aware, >= 0
            (0 makes every head vertical-slash).
        min_budget: at least this many tokens (rounded up to blocks) of vertical
            blocks, of diagonals, and per query block for query-aware heads.
        block_size: the block of the pattern, a multiple of 16 (default 128).
        scale: softmax scale, default 1 / sqrt(D).
        seq_lens: optional (B, H) int valid rows of each head, padding at the end
            (compressed sequences); rows past it are zero. With GQA (Hkv < H)
            the heads of one KV group must share a length.
        key_padding_mask: optional (B, L) bool, True for real tokens, padding on
            the left (as transformers pads); padded rows are zero. Not with
            ``seq_lens``.
        backend: "auto" (the Triton kernel on CUDA, the PyTorch reference
            elsewhere), "triton" or "torch"; see :func:`tokensparse.kernels.ops_for`.
        layout: "bhld" returns (B, H, L, Dv); "blhd" returns (B, L, H, Dv).
        return_pattern: also return the :class:`BlockPattern`.

    Returns:
        The output in the query's dtype, and the pattern if ``return_pattern``.
    """
    check_params(gamma=gamma, tau=tau, min_budget=min_budget, block_size=block_size)
    return block_sparse_op(
        flexprefill_attention, estimate_pattern, query, key, value, scale=scale, seq_lens=seq_lens,
        key_padding_mask=key_padding_mask, backend=backend, layout=layout, return_pattern=return_pattern,
        gamma=gamma, tau=tau, min_budget=min_budget, block_size=block_size,
    )


def check_params(*, gamma: float, tau: float, min_budget: int, block_size: int) -> None:
    """Raise ``ValueError`` naming the parameter if a FlexPrefill setting is invalid."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0.0:
        raise ValueError(f"tau must be a number >= 0, got {tau!r}")
    if isinstance(min_budget, bool) or not isinstance(min_budget, int) or min_budget < 0:
        raise ValueError(f"min_budget must be an integer >= 0, got {min_budget!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size!r}")


# ---------------------------------------------------------------- pattern estimation
@torch.no_grad()
def estimate_pattern(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    tau: float = DEFAULT_TAU,
    min_budget: int = DEFAULT_MIN_BUDGET,
    block_size: int = DEFAULT_BLOCK,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    backend: str = "auto",
) -> BlockPattern:
    """Choose each head's blocks (see the module docstring). The estimate runs in
    PyTorch whatever ``backend`` (accepted for the block-sparse methods' common signature).

    Args:
        query: (B, H, L, D); key: (B, Hkv, L, D).
        gamma, tau, min_budget, block_size, scale: as :func:`flexprefill_attention`.
        seq_lens: optional (B, H) valid rows per head, padding at the end.

    Returns:
        A :class:`BlockPattern`. Estimation runs on the inputs' device in float32
        (float64 for float64 inputs).
    """
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    device = query.device
    scale = head_dim**-0.5 if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    if seq_lens is None:
        lens = torch.full((batch, num_heads), seq_len, dtype=torch.long, device=device)
    else:
        lens = seq_lens.to(device=device, dtype=torch.long)
        if lens.shape != (batch, num_heads):
            raise ValueError(f"seq_lens must have shape (B, H) = ({batch}, {num_heads}), got {tuple(lens.shape)}")
        if bool(((lens < 0) | (lens > seq_len)).any()):
            raise ValueError(f"seq_lens must lie in [0, {seq_len}]")
        if group > 1 and bool((lens.view(batch, num_kv_heads, group) != lens[:, ::group, None]).any()):
            raise ValueError("with GQA the query heads of one KV head must share a seq_lens value")
    nb = num_blocks(seq_len, block_size)
    padded = nb * block_size
    est_rows = min(block_size, seq_len)
    rows = torch.arange(est_rows, device=device)
    pos = lens[..., None] - est_rows + rows  # (B, H, bq) positions of the estimation queries
    row_w = (pos >= 0).to(acc)
    row_w = row_w / row_w.sum(dim=-1, keepdim=True).clamp(min=1.0)  # mean over the valid rows
    k_pos = torch.arange(seq_len, device=device)

    vertical = torch.empty(batch, num_heads, seq_len, dtype=acc, device=device)
    slash = torch.empty_like(vertical)
    q_est_mean = torch.empty(batch, num_heads, head_dim, dtype=acc, device=device)
    k_pool = torch.empty(batch, num_kv_heads, nb, head_dim, dtype=acc, device=device)
    # A few KV heads at a time (a group's queries share the keys, read once), as many
    # as keep the fp32 logits under _ESTIMATE_CHUNK_BYTES: compressed inputs have a KV
    # head per query head, and one head per step would be dozens of small launches.
    per_kv_head = batch * group * est_rows * seq_len * torch.finfo(acc).bits // 8
    step = max(1, min(num_kv_heads, _ESTIMATE_CHUNK_BYTES // max(per_kv_head, 1)))
    for k0 in range(0, num_kv_heads, step):
        k1 = min(k0 + step, num_kv_heads)
        heads = slice(k0 * group, k1 * group)
        p = pos[:, heads].clamp(min=0)  # (B, nH, bq)
        q_est = torch.gather(query[:, heads], 2, p[..., None].expand(-1, -1, -1, head_dim)).to(acc)
        k = key[:, k0:k1].to(acc)  # (B, nK, L, D)
        logits = torch.matmul(
            q_est.reshape(batch, k1 - k0, group * est_rows, head_dim), k.transpose(-1, -2)
        ).view(batch, (k1 - k0) * group, est_rows, seq_len) * scale  # (B, nH, bq, L)
        logits.masked_fill_(k_pos > p[..., None], float("-inf"))
        probs = torch.softmax(logits, dim=-1) * row_w[:, heads, :, None]
        vertical[:, heads] = probs.sum(dim=2)
        slash[:, heads] = _diagonal_sums(probs, lens[:, heads])
        q_est_mean[:, heads] = (q_est * row_w[:, heads, :, None]).sum(dim=2)
        kv_len = lens[:, k0 * group : k1 * group : group]  # shared by each group (checked above)
        k_valid = (k_pos < kv_len[..., None]).to(acc)  # (B, nK, L)
        k_pool[:, k0:k1] = _block_mean(k, k_valid, block_size, padded)
    del logits, probs

    nq = (lens + block_size - 1) // block_size  # (B, H) valid blocks
    blk = torch.arange(nb, device=device)
    key_count = (lens[..., None] - blk * block_size).clamp(min=0, max=block_size)  # (B, H, NB)
    v_block = F.pad(vertical, (0, padded - seq_len)).view(batch, num_heads, nb, block_size).sum(-1)
    s_block = _slash_to_diagonals(slash, block_size, nb, padded)

    # -- query-aware test: pooled estimate of the last rows vs their true block mass --
    k_pool_h = k_pool.repeat_interleave(group, dim=1) if group > 1 else k_pool  # (B, H, NB, D), small
    est_logits = torch.einsum("bhd,bhnd->bhn", q_est_mean, k_pool_h) * scale
    est_logits = est_logits + torch.log(key_count.to(acc))  # -inf on empty blocks
    estimate = torch.softmax(est_logits, dim=-1).nan_to_num(0.0)
    js = _js_distance(estimate, v_block)
    query_aware = (js < tau) & (nq > 0)

    # -- vertical-slash pattern for every head --
    min_blocks = -(-min_budget // block_size)
    n_v = torch.minimum(_coverage_count(v_block, gamma).clamp(min=min_blocks), nq)
    n_s = torch.minimum(_coverage_count(s_block, gamma).clamp(min=min_blocks), nq)
    keep_v = _top_mask(v_block, n_v)  # (B, H, NB) key blocks
    keep_s = _top_mask(s_block, n_s)  # (B, H, NB) block diagonals
    mask = keep_v[:, :, None, :] | _toeplitz(keep_s)  # (B, H, NQB, NKB)

    # -- query-aware heads: blocks of the pooled map --
    if bool(query_aware.any()):
        sel_b, sel_h = query_aware.nonzero(as_tuple=True)
        # Mean query of every block, for these heads only (B*H rows of L x D otherwise).
        q_valid = (k_pos[None, :] < lens[sel_b, sel_h][:, None]).to(acc)  # (N, L)
        q_pool = _block_mean(query[sel_b, sel_h][:, None].to(acc), q_valid[:, None], block_size, padded)[:, 0]
        pooled = torch.matmul(q_pool, k_pool_h[sel_b, sel_h].transpose(-1, -2)) * scale
        pooled = pooled + torch.log(key_count[sel_b, sel_h].to(acc))[:, None, :]
        causal = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
        row_ok = blk[None, :] < nq[sel_b, sel_h][:, None]  # (N, NQB)
        pooled = pooled.masked_fill(~causal, float("-inf"))
        pooled = torch.softmax(pooled, dim=-1).nan_to_num(0.0) * row_ok[..., None]
        flat = pooled.flatten(1)
        keep = _top_mask(flat, _coverage_count(flat, gamma)).view_as(pooled)
        if min_blocks > 0:
            top = torch.topk(pooled, min(min_blocks, nb), dim=-1).indices
            keep = keep.scatter(-1, top, True)
        mask[sel_b, sel_h] = keep

    diag = torch.eye(nb, dtype=torch.bool, device=device)
    mask = mask | diag | (blk == 0)[None, :]
    mask = mask & (blk[:, None] < nq[..., None, None])  # rows past the head's length: nothing
    block_idx, block_cnt = lists_from_block_mask(mask)
    return BlockPattern(block_idx, block_cnt, block_size, lens, query_aware, js.float())


def _block_mean(x: torch.Tensor, valid: torch.Tensor, block_size: int, padded: int) -> torch.Tensor:
    """(B, G, L, D) rows and (B, G or 1, L) weights -> (B, G, NB, D) mean of the valid rows per block."""
    batch, heads, seq_len, dim = x.shape
    nb = padded // block_size
    total = F.pad(x * valid[..., None], (0, 0, 0, padded - seq_len)).view(batch, heads, nb, block_size, dim).sum(3)
    count = F.pad(valid, (0, padded - seq_len)).view(valid.shape[0], valid.shape[1], nb, block_size).sum(-1)
    return total / count.clamp(min=1.0)[..., None]


def _diagonal_sums(probs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Slash score: (B, G, bq, L) probabilities of the rows at positions ``lens - bq + i``
    -> (B, G, L) summed mass per offset ``o = position - key``."""
    batch, heads, rows, seq_len = probs.shape
    # Skew so that column m of row i holds key m + i - bq: then every diagonal is a
    # column, and offset o of a head sits at column lens - o.
    z = F.pad(probs, (rows, rows)).contiguous()  # (B, G, bq, L + 2 bq)
    width = seq_len + 2 * rows
    skewed = z.as_strided(
        (batch, heads, rows, seq_len + rows), (heads * rows * width, rows * width, width + 1, 1)
    )
    per_column = skewed.sum(dim=2)  # (B, G, L + bq)
    offsets = torch.arange(seq_len, device=probs.device)
    column = (lens[..., None] - offsets).clamp(min=0)  # column 0 is always empty
    return torch.gather(per_column, -1, column)


def _slash_to_diagonals(slash: torch.Tensor, block_size: int, nb: int, padded: int) -> torch.Tensor:
    """(B, H, L) mass per offset -> (B, H, NB) expected mass per block diagonal."""
    batch, heads, seq_len = slash.shape
    per = F.pad(slash, (0, padded - seq_len)).view(batch, heads, nb, block_size)
    r = torch.arange(block_size, device=slash.device, dtype=slash.dtype)
    stay = (block_size - r) / block_size  # rows whose line stays in diagonal s
    lower = (per * stay).sum(-1)
    upper = (per * (1.0 - stay)).sum(-1)  # spills into diagonal s + 1
    return lower + F.pad(upper, (1, 0))[..., :nb]


def _coverage_count(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Fewest entries (largest first) whose sum reaches ``gamma`` of the row total. (...) int64."""
    values = torch.sort(scores.double(), dim=-1, descending=True).values
    before = values.cumsum(dim=-1) - values
    total = values.sum(dim=-1, keepdim=True)
    return (before < gamma * total).sum(dim=-1) * (total[..., 0] > 0)


def _top_mask(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bool mask of each row's ``count`` largest entries (ties to the lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranked = torch.arange(scores.shape[-1], device=scores.device) < count[..., None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, ranked)


def _toeplitz(diagonals: torch.Tensor) -> torch.Tensor:
    """(B, H, NB) bool per block distance -> (B, H, NB, NB) with [qb, kb] = diagonals[qb - kb] (False above)."""
    batch, heads, nb = diagonals.shape
    y = torch.cat([diagonals.new_zeros(batch, heads, nb - 1), diagonals], dim=-1).contiguous()
    # y[qb + kb'] with kb' = nb - 1 - kb is diagonals[qb - kb]; flip kb' back to kb.
    view = y.as_strided((batch, heads, nb, nb), (heads * (2 * nb - 1), 2 * nb - 1, 1, 1))
    return view.flip(-1)


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) between rows of p and q."""
    p = p.double()
    q = q.double()
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-300)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-300)
    m = 0.5 * (p + q)
    kl_p = torch.xlogy(p, p) - torch.xlogy(p, m)
    kl_q = torch.xlogy(q, q) - torch.xlogy(q, m)
    jsd = 0.5 * (kl_p.sum(-1) + kl_q.sum(-1))
    return jsd.clamp(min=0.0).sqrt()


# ---------------------------------------------------------------- registry entry
FLEXPREFILL = register_block_sparse(
    "flexprefill", FlexPrefillConfig, flexprefill_attention, estimate_pattern,
    "FlexPrefill block-sparse attention on every layer (gamma, tau, min_budget, block_size, backend)",
)


__all__ = [
    "FLEXPREFILL",
    "FlexPrefillConfig",
    "BlockPattern",
    "flexprefill_attention",
    "estimate_pattern",
    "check_params",
]
