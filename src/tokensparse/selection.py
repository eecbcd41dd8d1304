"""Token selection: scoring, budget and per-head top-k.

Selection is separate from attention: :func:`select_tokens` returns a
:class:`TokenSelection` (index tensors and counts) that the attention consumes,
so each stage can be tested alone and swapped for a faster kernel.

Layouts: query (B, H, Lq, D), key (B, Hkv, Lk, D), key_padding_mask (B, Lk) bool
with True for real tokens and padding on the left, as transformers produces.
Lq == Lk is a whole prompt; Lq < Lk is a chunk after a cached prefix, whose
queries are the last Lq positions. Either way the last ``window`` queries score
all Lk keys, and the budget and top-k are over the Lk - ``window`` keys before
the window (the prefix, cached and new tokens alike), where tokens can be dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TokenSparseConfig
from .distributed import all_heads
from .kernels import ops_for, ops_for_chunk, reference

# The PyTorch reference of the per-head top-k lives beside the other kernel
# references; this name stays for callers that import it from here.
top_k_per_head = reference.top_k_per_head_ref


@dataclass(frozen=True)
class TokenSelection:
    """What each head of each sequence keeps.

    A call that runs dense (a batch too short for the method, coverage 0, or
    ``keep_ratio`` 1) still returns a full selection: ``kept_idx`` is ``None``
    (there is nothing to gather), ``dense`` is all True, ``num_kept`` equals the
    real length of each sequence for every head (so ``kept_share`` is 1) and
    ``dropped_mass`` is 0. Code that reads the selection needs no special case
    beyond ``kept_idx``.

    Attributes:
        kept_idx: (B, H, K) int64 kept positions, ascending; the first
            ``num_kept[b, h]`` entries are valid and the rest equal ``seq_len``
            (padding that sorts last). Window tokens are always included.
            ``None`` when every sequence runs dense.
        num_kept: (B, H) int64 tokens each head attends over (prefix kept plus
            window; all real tokens for a dense sequence).
        seq_lens: (B,) int64 real tokens of each sequence (without padding).
        dense: (B,) bool, sequences that run dense (nothing dropped).
        dropped_mass: (B, H) float32, share of the window queries' attention mass
            that falls on tokens the head did not keep (0 for dense sequences).
        seq_len: Lk, the padded length of the batch (of the keys, for a chunk
            after a cached prefix: ``kept_idx`` and ``num_kept`` count keys).
    """

    kept_idx: torch.Tensor | None
    num_kept: torch.Tensor
    seq_lens: torch.Tensor
    dense: torch.Tensor
    dropped_mass: torch.Tensor
    seq_len: int

    @property
    def kept_share(self) -> torch.Tensor:
        """(B, H) float32 share of each sequence's real tokens a head keeps."""
        return self.num_kept.float() / self.seq_lens.clamp(min=1)[:, None].float()

    @property
    def all_dense(self) -> bool:
        return bool(self.dense.all())


def static_dense(config: TokenSparseConfig, seq_len: int, query_len: int | None = None) -> bool:
    """True when a call of ``seq_len`` keys runs dense whatever its values are.

    ``query_len``: the queries of a chunk after a cached prefix (default
    ``seq_len``); a chunk shorter than the window has no full window to score
    with, so it runs dense.
    """
    if query_len is not None and query_len < config.window:
        return True
    if seq_len <= config.window + config.min_tokens:
        return True
    if config.budget in ("coverage", "head_coverage") and config.coverage == 0.0:
        return True
    return config.budget == "keep_ratio" and config.keep_ratio == 1.0 and config.max_tokens is None


def smooth_scores(mass: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average pool along the sequence: (B, H, P) -> (B, H, P), zeros padded and counted."""
    if kernel_size == 1:
        return mass
    return F.avg_pool1d(mass, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)


_RATIO_SLACK = 1.0 - 1e-12


def token_budget(
    scores: torch.Tensor, prefix_lens: torch.Tensor, config: TokenSparseConfig
) -> torch.Tensor:
    """Prefix tokens each head keeps.

    Args:
        scores: (B, H, P) smoothed scores of the prefix positions, padded positions
            (the first ``P - prefix_lens[b]``) zero.
        prefix_lens: (B,) int64 real prefix tokens of each sequence (may be <= 0).
        config: budget mode, coverage, floor and cap.

    Under tensor parallelism (inside :func:`tokensparse.distributed.split_heads`)
    ``scores`` holds this rank's heads; the ``coverage`` mode gathers every
    rank's heads and averages them as one device does, so each rank returns
    the single-device count for its heads. The other modes need nothing from
    the other ranks.

    Returns:
        (B, H) int64 in [0, prefix_lens]; ``prefix_lens[b]`` means nothing dropped.
        Sequences with ``prefix_lens <= min_tokens`` keep everything.
    """
    batch, num_heads, prefix = scores.shape
    lens = prefix_lens.clamp(min=0)
    real = torch.arange(prefix, device=scores.device)[None, :] >= (prefix - lens)[:, None]  # (B, P)

    if config.budget in ("coverage", "head_coverage"):
        # Budget arithmetic in float64: the count n is a threshold on a running sum
        # and must not move with rounding (it is (B, P) or (B, H, P), cheap either way).
        if config.budget == "coverage":
            # One distribution per sequence, from every head of the layer (all ranks').
            dist = all_heads(scores).double().mean(dim=1, keepdim=True)
        else:
            dist = scores.double()
        dist = dist.masked_fill(~real[:, None, :], 0.0)
        dist = dist / dist.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
        # Padded positions sort last with an infinite running sum, so they never count.
        dist = dist.masked_fill(~real[:, None, :], float("inf"))
        running = torch.sort(dist, dim=-1).values.cumsum(dim=-1)
        below = (running < config.coverage).sum(dim=-1)  # n, (B, 1) or (B, H)
        keep = torch.where(below > 0, lens[:, None] - (below + 1), lens[:, None])
        keep = keep.expand(batch, num_heads)
    elif config.budget == "keep_ratio":
        # A relative slack of 1e-12 keeps products that are whole in decimal
        # (100 * 0.55 = 55.000000000000007 in float64) from rounding up by one.
        keep = torch.ceil(lens.double() * config.keep_ratio * _RATIO_SLACK).long()[:, None].expand(batch, num_heads)
    else:  # keep_tokens
        keep = torch.full((batch, num_heads), config.keep_tokens, device=scores.device, dtype=torch.long)

    if config.max_tokens is not None:
        keep = keep.clamp(max=config.max_tokens)
    keep = keep.clamp(min=config.min_tokens)
    keep = torch.minimum(keep, lens[:, None])
    # Too short for the method: the whole sequence runs dense.
    return torch.where((lens <= config.min_tokens)[:, None], lens[:, None], keep)


def select_tokens(
    query: torch.Tensor,
    key: torch.Tensor,
    config: TokenSparseConfig,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> TokenSelection:
    """Score the prefix tokens with the window queries and pick each head's tokens.

    Args:
        query: (B, H, Lq, D), after RoPE: the last Lq positions (Lq <= Lk).
        key: (B, Hkv, Lk, D), after RoPE, not repeated for GQA.
        config: window, kernel size, budget mode and its parameters.
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: optional (B, Lk) bool, True for real tokens (left padding).

    Returns:
        A :class:`TokenSelection` over the Lk key positions (dense when
        Lq < window). Inputs are not validated here; use
        :func:`tokensparse.token_sparse_attention` for checked entry.
    """
    batch, num_heads, query_len, _ = query.shape
    seq_len = key.shape[2]
    window = config.window
    device = query.device
    if key_padding_mask is None:
        seq_lens = torch.full((batch,), seq_len, dtype=torch.long, device=device)
    else:
        seq_lens = key_padding_mask.sum(dim=-1)

    if static_dense(config, seq_len, query_len):
        return _dense_selection(seq_lens, num_heads, seq_len)

    ops = ops_for(query, config.backend) if query_len == seq_len else ops_for_chunk(query, config.backend)
    mass = ops.window_mass(query, key, window, scale, key_padding_mask)  # (B, H, L)
    prefix_mass = mass[..., : seq_len - window]
    scores = smooth_scores(prefix_mass, config.kernel_size)
    if key_padding_mask is not None:
        # Pooling spills real scores onto the padding next to them; a sequence
        # alone has no such positions, so they must not count.
        scores = scores.masked_fill(~key_padding_mask[:, None, : seq_len - window], 0.0)
    max_keep = fixed_budget(config, seq_len, key_padding_mask)
    fixed = max_keep is not None
    if not fixed:
        prefix_lens = (seq_lens - window).clamp(min=0)
        keep = token_budget(scores, prefix_lens, config)
        dense = (keep == prefix_lens[:, None]).all(dim=1)
        # The budget depends on the scores: read its maximum and whether every
        # sequence runs dense in one host sync (the compact tensors' size).
        max_keep, all_dense = torch.stack([keep.max(), dense.all().long()]).tolist()
    else:
        # Every head keeps the same count (what token_budget would compute), so
        # no device op is spent on it.
        all_dense = max_keep == seq_len - window
        keep = torch.full((batch, num_heads), max_keep, dtype=torch.long, device=device)
        dense = torch.full((batch,), all_dense, dtype=torch.bool, device=device)
    if all_dense:
        return _dense_selection(seq_lens, num_heads, seq_len)

    kept_idx, num_kept = ops.top_k(scores, keep, seq_lens, window, max_keep=max_keep)
    if fixed:
        # Every head keeps max_keep prefix tokens, which sort before the window.
        kept_prefix = torch.gather(prefix_mass, 2, kept_idx[..., :max_keep])
    else:
        # Entries past a head's prefix tokens (window, padding) point past the prefix and read 0.
        kept_prefix = torch.gather(F.pad(prefix_mass, (0, 1)), 2, kept_idx.clamp(max=seq_len - window))
    dropped = (prefix_mass.sum(-1) - kept_prefix.sum(-1)).clamp(min=0).float()
    return TokenSelection(kept_idx, num_kept, seq_lens, dense, dropped, seq_len)


def fixed_budget(config: TokenSparseConfig, seq_len: int, key_padding_mask: torch.Tensor | None) -> int | None:
    """Prefix tokens every head keeps, computed on the host, where the budget does not depend on the scores.

    Fixed budgets (``keep_ratio``, ``keep_tokens``) without padding give every
    head the same count, a function of L alone; :func:`token_budget` computes
    the same value on the device. ``None`` where only the device knows.
    """
    if key_padding_mask is not None or config.budget not in ("keep_ratio", "keep_tokens"):
        return None
    prefix = max(seq_len - config.window, 0)
    if prefix <= config.min_tokens:
        return prefix
    if config.budget == "keep_ratio":
        keep = math.ceil(prefix * config.keep_ratio * _RATIO_SLACK)  # the same float64 product as token_budget
    else:
        keep = config.keep_tokens
    if config.max_tokens is not None:
        keep = min(keep, config.max_tokens)
    return min(max(keep, config.min_tokens), prefix)


def _dense_selection(seq_lens: torch.Tensor, num_heads: int, seq_len: int) -> TokenSelection:
    batch = seq_lens.shape[0]
    device = seq_lens.device
    return TokenSelection(
        kept_idx=None,
        num_kept=seq_lens[:, None].expand(batch, num_heads).clone(),
        seq_lens=seq_lens,
        dense=torch.ones(batch, dtype=torch.bool, device=device),
        dropped_mass=torch.zeros(batch, num_heads, dtype=torch.float32, device=device),
        seq_len=seq_len,
    )
