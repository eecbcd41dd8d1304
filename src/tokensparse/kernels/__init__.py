"""Kernels for the stages of Token Sparse Attention, and their dispatch.

Each stage has a PyTorch reference in :mod:`tokensparse.kernels.reference`;
Triton kernels with the same signatures run on CUDA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference


@dataclass(frozen=True)
class StageOps:
    """The stage functions one backend provides (signatures as in ``reference``)."""

    name: str
    window_mass: Callable[..., torch.Tensor]
    gather_kept: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scatter_kept: Callable[..., torch.Tensor]


TORCH_OPS = StageOps(
    name="torch",
    window_mass=reference.window_mass_ref,
    gather_kept=reference.gather_kept_ref,
    scatter_kept=reference.scatter_kept_ref,
)


def ops_for(tensor: torch.Tensor, backend: str) -> StageOps:
    """Stage functions for ``backend`` ("auto", "torch" or "triton") on ``tensor``'s device."""
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        raise NotImplementedError("backend='triton' is not available in this build; use 'torch' or 'auto'")
    if backend == "auto":
        return TORCH_OPS
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
