"""Tile sweep of the block-sparse attention kernel.

The kernel's default CUDA tiles (``kernels.block_sparse._CUDA_TILES``) are the
fastest of this sweep on the H200 (results/flexprefill/h200, made by
scripts/gpu_flexprefill.py). The sweep passes ``tiles=`` to
:func:`tokensparse.kernels.block_sparse.block_sparse_attention` and never
changes the defaults: a faster config found on another GPU is a number to read,
and a change of the default is a code change.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..kernels import triton_runnable
from ..kernels.block_sparse import block_sparse_attention
from .timing import time_fn

Tiles = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

# The H200 sweep's candidates (results/flexprefill/h200/results.json, "tile_sweep").
CUDA_TILE_CANDIDATES: tuple[Tiles, ...] = (
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
    (128, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
)


def sweep_block_sparse_tiles(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size: int,
    *,
    candidates: Sequence[Tiles] = CUDA_TILE_CANDIDATES,
    seq_lens: torch.Tensor | None = None,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 20,
    budget_ms: float = 1500.0,
) -> list[dict[str, Any]]:
    """Time the block-sparse kernel on one pattern with every tile config.

    Args:
        query, key, value, block_idx, block_cnt, block_size, seq_lens: as
            :func:`tokensparse.kernels.block_sparse.block_sparse_attention`
            (e.g. a FlexPrefill pattern from ``flexprefill.estimate_pattern``).
        candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) configs to time.
        warmup, min_reps, max_reps, budget_ms: passed to
            :func:`tokensparse.bench.timing.time_fn` for each config.

    Returns:
        One entry per candidate, in order: ``{"tiles": [...], "ms": median,
        "min_ms", "max_ms", "reps"}``; ``{"tiles", "skipped": why}`` for a tile
        larger than ``block_size``; ``{"tiles", "error": "Type: message"}`` for a
        config that does not compile or launch on this GPU (shared memory,
        registers). :func:`best_tiles` picks the fastest.

    Raises:
        ValueError: the kernel cannot run on ``query``'s device (a CPU tensor
            without ``TRITON_INTERPRET=1``, or no Triton).
    """
    if not triton_runnable(query):
        raise ValueError("the tile sweep runs the Triton kernel: it needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU")
    entries: list[dict[str, Any]] = []
    for tiles in candidates:
        entry: dict[str, Any] = {"tiles": list(tiles)}
        if tiles[0] > block_size or tiles[1] > block_size:
            # The launcher would clamp the tile to the block: the same config as a smaller one.
            entry["skipped"] = f"a tile is larger than block_size={block_size}"
            entries.append(entry)
            continue

        def run(tiles: Tiles = tiles) -> torch.Tensor:
            return block_sparse_attention(
                query, key, value, block_idx, block_cnt, block_size, seq_lens=seq_lens, tiles=tiles
            )

        try:
            timing = time_fn(run, query.device, warmup=warmup, min_reps=min_reps, max_reps=max_reps,
                             budget_ms=budget_ms)
        except Exception as err:  # recorded, not hidden: the config does not fit this GPU
            entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        else:
            entry.update(ms=timing.median_ms, min_ms=timing.min_ms, max_ms=timing.max_ms, reps=timing.reps)
        entries.append(entry)
    return entries


def best_tiles(entries: Sequence[dict[str, Any]]) -> Tiles | None:
    """The fastest timed config of :func:`sweep_block_sparse_tiles`'s entries (None if none ran)."""
    timed = [e for e in entries if "ms" in e]
    if not timed:
        return None
    return tuple(min(timed, key=lambda e: e["ms"])["tiles"])  # type: ignore[return-value]
