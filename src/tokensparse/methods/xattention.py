"""XAttention: block-sparse attention chosen by antidiagonal scoring.

Written from the published description (Xu et al., "XAttention: Block Sparse
Attention with Antidiagonal Scoring", arXiv 2503.16428). For every head:

1. **Antidiagonal scores.** With stride ``S`` the queries are regrouped so that
   reshaped row ``r`` holds positions ``rS + S - 1, rS + S - 2, ..., rS`` side by
   side, and the keys so that reshaped row ``c`` holds ``cS, ..., cS + S - 1``:
   ``Q_r[r] . K_r[c]`` is the sum of the logits on the antidiagonal of the S x S
   tile (r, c). Logits ``Q_r K_r^T * scale / S`` are masked causally at this
   granularity (c <= r, so the diagonal tile counts), softmaxed per row, and
   summed over the (B/S x B/S) tiles of each (query block, key block) of the
   ``B x B`` grid. Each query block's row is normalised to sum 1. Computed by
   :mod:`tokensparse.kernels.antidiagonal` (a Triton kernel that never builds
   the logits, or the PyTorch reference; ``backend`` chooses).
2. **Threshold selection.** Per query block, the key blocks ranked by score
   (ties to the lower index) are kept until their cumulative score reaches
   ``threshold`` of the row: the ``i``-th ranked block is kept iff it and all
   lower-ranked blocks hold more than ``(1 - threshold)`` of the row (the same
   set in exact arithmetic, and exactly "every nonzero block" at threshold 1).
   The first key block (sink) and the diagonal block are always added (they do
   not count towards the threshold: selection runs on all blocks first).
3. The block-sparse kernel (:mod:`tokensparse.kernels.block_sparse`) visits only
   the chosen blocks; inside them attention is exact causal attention.

Lengths that are not a multiple of ``S`` or ``B``: the grids are aligned at
position 0 and positions past a head's valid length ``n`` are zero vectors in the
reshaped queries and keys. So the last reshaped row/column may be partial (it
holds ``n mod S`` real tokens, the rest contributes zero to its logits, and the
``/ S`` factor is unchanged); reshaped rows/columns at or past ``ceil(n / S)``
hold no real token and are dropped (rows not counted, and causality keeps such
columns from every counted row). The last
query/key block of the ``B`` grid may be partial in the same way; query blocks at
or past ``ceil(n / B)`` visit nothing.

Compressed sequences (Token Sparse + XAttention) have per-head valid lengths
``seq_lens`` with padding at the end: every head's scores use only its own valid
queries and keys, exactly as if the head's sequence were alone (whatever the
padding holds). With GQA the query heads of one KV head must share a length, as
in :mod:`tokensparse.flexprefill`.

Layout at this boundary is SDPA's: query (B, H, L, D), key/value (B, Hkv, L, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import ops_for
from ..kernels.antidiagonal import ESTIMATE_CHUNK_BYTES, estimate_steps
from ..kernels.block_sparse import lists_from_block_mask
from .block_sparse import BlockLists, block_sparse_op, register_block_sparse

DEFAULT_THRESHOLD = 0.9
DEFAULT_STRIDE = 8
DEFAULT_BLOCK = 128
_ESTIMATE_CHUNK_BYTES = ESTIMATE_CHUNK_BYTES  # the torch reference's logits per step


@dataclass(frozen=True)
class XAttentionConfig:
    """Settings of XAttention used alone (see :func:`xattention_attention`).

    Attributes:
        threshold: share of each query block's estimated mass the kept key blocks
            hold, (0, 1].
        stride: antidiagonal stride S, a positive integer dividing ``block_size``.
        block_size: the pattern's block, a positive multiple of 16 and of ``stride``.
        backend: "auto", "triton" or "torch" for the estimate and the block-sparse kernel.
    """

    threshold: float = DEFAULT_THRESHOLD
    stride: int = DEFAULT_STRIDE
    block_size: int = DEFAULT_BLOCK
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_params(threshold=self.threshold, stride=self.stride, block_size=self.block_size)
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be one of 'auto', 'triton', 'torch', got {self.backend!r}")

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`xattention_attention`."""
        return {
            "threshold": self.threshold,
            "stride": self.stride,
            "block_size": self.block_size,
            "backend": self.backend,
        }

    def runs_dense(self, seq_len: int) -> bool:
        """True when every causal block is visited whatever the inputs.

        With at most two blocks every causal block is the sink or a diagonal one.
        Threshold 1 is not dense for every input: a block whose estimated mass
        underflows to zero is dropped.
        """
        return seq_len <= 2 * self.block_size


@dataclass(frozen=True)
class XAttentionPattern(BlockLists):
    """The blocks every head visits (:class:`BlockLists`), and the stride of the scores.

    Attributes:
        stride: the antidiagonal stride the scores used.
    """

    stride: int


def xattention_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    stride: int = DEFAULT_STRIDE,
    block_size: int = DEFAULT_BLOCK,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    layout: str = "bhld",
    return_pattern: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, XAttentionPattern]:
    """Causal XAttention; a drop-in for causal SDPA.

    Args:
        query: (B, H, L, D) floating point, after RoPE.
        key: (B, Hkv, L, D), H a multiple of Hkv (GQA; K/V are never repeated).
        value: (B, Hkv, L, Dv).
        threshold: share of each query block's estimated mass the kept key blocks
            must hold, (0, 1]; 1 keeps every block with a nonzero estimate.
        stride: antidiagonal stride S (default 8), dividing ``block_size``.
        block_size: the block of the pattern, a multiple of 16 and of ``stride``
            (default 128).
        scale: softmax scale, default 1 / sqrt(D) (the estimate uses scale / S).
        seq_lens: optional (B, H) int valid rows of each head, padding at the end
            (compressed sequences); rows past it are zero. With GQA (Hkv < H)
            the heads of one KV group must share a length.
        key_padding_mask: optional (B, L) bool, True for real tokens, padding on
            the left (as transformers pads); padded rows are zero. Not with
            ``seq_lens``.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, PyTorch
            otherwise), "triton" or "torch".
        layout: "bhld" returns (B, H, L, Dv); "blhd" returns (B, L, H, Dv).
        return_pattern: also return the :class:`XAttentionPattern`.

    Returns:
        The output in the query's dtype, and the pattern if ``return_pattern``.
    """
    check_params(threshold=threshold, stride=stride, block_size=block_size)
    return block_sparse_op(
        xattention_attention, estimate_xattention_pattern, query, key, value, scale=scale, seq_lens=seq_lens,
        key_padding_mask=key_padding_mask, backend=backend, layout=layout, return_pattern=return_pattern,
        threshold=threshold, stride=stride, block_size=block_size,
    )


def check_params(*, threshold: float, stride: int, block_size: int) -> None:
    """Raise ``ValueError`` naming the parameter if an XAttention setting is invalid."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    _check_grid(stride, block_size)


def _check_grid(stride: int, block_size: int) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size!r}")
    if block_size % stride:
        raise ValueError(f"block_size ({block_size}) must be a multiple of stride ({stride})")


# ---------------------------------------------------------------- pattern estimation
@torch.no_grad()
def estimate_xattention_pattern(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    stride: int = DEFAULT_STRIDE,
    block_size: int = DEFAULT_BLOCK,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    backend: str = "auto",
) -> XAttentionPattern:
    """Choose each head's blocks (see the module docstring).

    Args:
        query: (B, H, L, D); key: (B, Hkv, L, D).
        threshold, stride, block_size, scale: as :func:`xattention_attention`.
        seq_lens: optional (B, H) valid rows per head, padding at the end.
        backend: who computes the scores, chosen by :func:`tokensparse.kernels.ops_for`
            ("auto": the Triton kernel on CUDA, the PyTorch reference elsewhere).

    Returns:
        An :class:`XAttentionPattern`. Estimation runs on the inputs' device in
        float32 (float64 for float64 inputs).
    """
    check_params(threshold=threshold, stride=stride, block_size=block_size)
    lens = head_lengths(seq_lens, query, key)
    scores = _block_scores(query, key, lens, stride, block_size, scale, backend)
    mask = select_blocks(scores, threshold, lens, block_size)
    block_idx, block_cnt = lists_from_block_mask(mask)
    return XAttentionPattern(block_idx, block_cnt, block_size, lens, stride)


def head_lengths(seq_lens: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(B, H) int64 valid rows per head (L where ``seq_lens`` is None), checked."""
    batch, num_heads, seq_len, _ = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    if seq_lens is None:
        return torch.full((batch, num_heads), seq_len, dtype=torch.long, device=query.device)
    lens = seq_lens.to(device=query.device, dtype=torch.long)
    if lens.shape != (batch, num_heads):
        raise ValueError(f"seq_lens must have shape (B, H) = ({batch}, {num_heads}), got {tuple(lens.shape)}")
    if bool(((lens < 0) | (lens > seq_len)).any()):
        raise ValueError(f"seq_lens must lie in [0, {seq_len}]")
    if group > 1 and bool((lens.view(batch, num_kv_heads, group) != lens[:, ::group, None]).any()):
        raise ValueError("with GQA the query heads of one KV head must share a seq_lens value")
    return lens


@torch.no_grad()
def antidiagonal_block_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    stride: int = DEFAULT_STRIDE,
    block_size: int = DEFAULT_BLOCK,
    scale: float | None = None,
    seq_lens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Estimated attention mass of every (query block, key block) of each head.

    Args:
        query: (B, H, L, D); key: (B, Hkv, L, D).
        stride, block_size, scale: as :func:`xattention_attention`.
        seq_lens: optional (B, H) valid rows per head, padding at the end.
        backend: as :func:`estimate_xattention_pattern`.

    Returns:
        (B, H, NQB, NKB) float32 (float64 for float64 inputs), NQB = NKB =
        ceil(L / block_size): each valid query block's row sums to 1 and is zero
        above the diagonal; rows past a head's length are zero.
    """
    _check_grid(stride, block_size)
    return _block_scores(query, key, head_lengths(seq_lens, query, key), stride, block_size, scale, backend)


def _block_scores(query, key, lens, stride, block_size, scale, backend) -> torch.Tensor:
    """:func:`antidiagonal_block_scores` on checked arguments, ``lens`` (B, H) int64."""
    return ops_for(query, backend).antidiagonal_scores(
        query, key, stride=stride, block_size=block_size, seq_lens=lens, scale=scale,
        chunk_bytes=_ESTIMATE_CHUNK_BYTES,
    )


def _estimate_steps(batch, group, num_kv_heads, reshaped_len, tile, acc) -> tuple[int, int]:
    """The reference's (KV heads, reshaped rows) per step at this module's budget."""
    return estimate_steps(batch, group, num_kv_heads, reshaped_len, tile, acc, _ESTIMATE_CHUNK_BYTES)


def select_blocks(scores: torch.Tensor, threshold: float, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Threshold selection plus the sink and diagonal blocks.

    Args:
        scores: (B, H, NQB, NKB) nonnegative block scores, zero above the diagonal.
        threshold: share of each row's total the kept blocks reach, (0, 1].
        seq_lens: (B, H) valid rows per head; query blocks past it keep nothing.
        block_size: the grid's block.

    Returns:
        (B, H, NQB, NKB) bool block mask, causal.
    """
    nb = scores.shape[-1]
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True)
    # The i-th ranked block is kept iff it and all after it hold more than
    # (1 - threshold) of the row: "the fewest blocks reaching threshold", written so
    # that threshold 1 keeps exactly the nonzero blocks (a sum of nonnegative terms
    # is zero only if all are).
    rest = ranked.values.flip(-1).cumsum(dim=-1).flip(-1)
    keep_ranked = rest > (1.0 - threshold) * rest[..., :1]
    mask = torch.zeros_like(keep_ranked).scatter_(-1, ranked.indices, keep_ranked)
    blk = torch.arange(nb, device=scores.device)
    mask |= (blk[:, None] == blk[None, :]) | (blk == 0)[None, :]
    nq = (seq_lens + block_size - 1) // block_size
    mask &= blk[:, None] >= blk[None, :]
    return mask & (blk[:, None] < nq[..., None, None])


# ---------------------------------------------------------------- registry entry
XATTENTION = register_block_sparse(
    "xattention", XAttentionConfig, xattention_attention, estimate_xattention_pattern,
    "XAttention block-sparse attention on every layer (threshold, stride, block_size, backend)",
)


__all__ = [
    "XATTENTION",
    "XAttentionConfig",
    "XAttentionPattern",
    "xattention_attention",
    "estimate_xattention_pattern",
    "antidiagonal_block_scores",
    "select_blocks",
    "check_params",
]
