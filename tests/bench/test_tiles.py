"""The block-sparse tile sweep at tiny shapes (the kernel under TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from tokensparse.bench.tiles import best_tiles, sweep_block_sparse_tiles
from tokensparse.kernels import block_sparse, triton_runnable


def _case():
    q = torch.randn(1, 2, 70, 16)
    k = torch.randn(1, 1, 70, 16)
    v = torch.randn(1, 1, 70, 16)
    nb = block_sparse.num_blocks(70, 32)
    mask = (torch.rand(1, 2, nb, nb) < 0.5) | torch.eye(nb, dtype=torch.bool)
    return (q, k, v, *block_sparse.lists_from_block_mask(mask), 32)


@pytest.mark.skipif(not triton_runnable(torch.empty(0)), reason="needs TRITON_INTERPRET=1 (and triton) on the CPU")
def test_sweep_times_each_config_and_leaves_the_defaults():
    defaults = block_sparse._CUDA_TILES
    candidates = [(16, 16, 4, 1), (32, 16, 4, 1), (64, 32, 4, 1), (16, 24, 4, 1)]
    entries = sweep_block_sparse_tiles(*_case(), candidates=candidates, warmup=0, min_reps=1, max_reps=1, budget_ms=0)
    assert [e["tiles"] for e in entries] == [list(t) for t in candidates]
    assert entries[0]["ms"] > 0 and entries[1]["ms"] > 0 and entries[0]["reps"] == 1
    assert "skipped" in entries[2]  # BLOCK_M 64 > block_size 32
    assert entries[3]["error"].startswith("ValueError: BLOCK_N=24")  # recorded, the sweep goes on
    assert best_tiles(entries) in {candidates[0], candidates[1]}
    assert block_sparse._CUDA_TILES == defaults


def test_sweep_refuses_a_device_the_kernel_cannot_run_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensor, or TRITON_INTERPRET=1"):
        sweep_block_sparse_tiles(*_case(), candidates=[(16, 16, 4, 1)])
    assert best_tiles([{"tiles": [16, 16, 4, 1], "error": "x"}]) is None
