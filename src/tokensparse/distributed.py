"""Tensor parallelism: attention heads split over the ranks of a process group.

Under tensor parallelism each rank's attention receives only its own query
heads (q (B, H/N, L, D)). Token sparse's per-head choices need nothing from
the other ranks, and neither do the fixed budgets (``keep_ratio``,
``keep_tokens``) nor ``head_coverage``. The ``coverage`` budget is one count
per sequence computed from the scores averaged over *all* heads, so a rank
alone would pick a different count than one device does.

A :class:`HeadGroup` names the process group and the layer's total head
count. Inside ``with split_heads(group):`` the coverage budget
(:func:`tokensparse.selection.token_budget`, the one reader of the context)
all-gathers the ranks' float32 scores in rank order, (B, H/N, P) from each,
and reduces the full (B, H, P) tensor exactly as one device does. Every rank
then holds the bits a single device would compute from the same per-head
scores, so the budget is equal bitwise (an all-reduce of per-rank head sums
adds the heads in another order and could move the last bits of the
distribution, hence a count on a knife edge). The cost is one all-gather of
B * H/N * P float32 per rank and sparse layer, 8 MB at 128K tokens for
Llama-3.1-8B at TP=2.

:func:`tokensparse.enable` detects transformers' tensor parallelism by itself
(:func:`tokensparse.integrations.hf.tensor_parallel_group`); other callers
(a vLLM backend, a hand-made TP) wrap their prefill::

    with split_heads(HeadGroup(tp_group, num_heads=32)):
        out, selection = token_sparse_prefill(q_local, k_local, v_local, config)

This module imports torch only.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadGroup:
    """A layer's query heads split in equal, contiguous shards over a process group.

    Rank r of ``group`` holds heads ``[r * H / N, (r + 1) * H / N)``, as
    column-parallel q/k/v projections (transformers' ``colwise``, vLLM's
    ``QKVParallelLinear``) place them.

    Attributes:
        group: the tensor-parallel ``torch.distributed`` process group; ``None``
            for the default (world) group.
        num_heads: H, query heads of the layer over all ranks.
    """

    group: Any
    num_heads: int

    def __post_init__(self) -> None:
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"HeadGroup.num_heads must be a positive integer, got {self.num_heads!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("HeadGroup.group: torch.distributed is not initialized")
        if self.num_heads % self.size:
            raise ValueError(f"HeadGroup.num_heads: {self.num_heads} heads do not split over {self.size} ranks")

    @property
    def size(self) -> int:
        """N, ranks in the group."""
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This process's rank in the group (its shard of the heads)."""
        return dist.get_rank(self.group)

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.size

    def gather_heads(self, local: torch.Tensor) -> torch.Tensor:
        """All heads of every rank in head order: (B, H/N, ...) -> (B, H, ...), same dtype.

        A collective: every rank of the group must call it with the same shape.
        """
        if local.shape[1] != self.local_heads:
            raise ValueError(
                f"HeadGroup: this rank holds {local.shape[1]} heads, expected {self.num_heads} / {self.size}"
            )
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=1)


_CURRENT: ContextVar[HeadGroup | None] = ContextVar("tokensparse_head_group", default=None)


@contextlib.contextmanager
def split_heads(group: HeadGroup | None) -> Iterator[None]:
    """Run the enclosed selection with the heads split over ``group`` (``None``: one device)."""
    token = _CURRENT.set(group)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_head_group() -> HeadGroup | None:
    """The group set by the innermost :func:`split_heads`, or None."""
    return _CURRENT.get()


def all_heads(scores: torch.Tensor) -> torch.Tensor:
    """(B, h, P) scores of this rank's heads -> (B, H, P) of every head in the current group.

    Unchanged outside :func:`split_heads` and where ``h`` already equals the
    group's head count (a layer that is not split).
    """
    group = current_head_group()
    if group is None or scores.shape[1] == group.num_heads:
        return scores
    return group.gather_heads(scores)


__all__ = ["HeadGroup", "all_heads", "current_head_group", "split_heads"]
