"""Kernels for the stages of Token Sparse Attention, and their dispatch.

Each stage has a PyTorch reference in :mod:`tokensparse.kernels.reference`
(top-k: :func:`tokensparse.selection.top_k_per_head`); Triton kernels with the
same signatures run on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``
when forced with ``backend="triton"``. Triton is imported only when a Triton
backend is asked for, so the package works without it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOps:
    """The stage functions one backend provides (signatures as in ``reference``).

    ``top_k`` (signature of :func:`tokensparse.selection.top_k_per_head`) and
    ``attend_kept`` (compress + attend + decompress, see
    :func:`tokensparse.kernels.pipeline.attend_kept`) are optional: ``None``
    means the caller's PyTorch path.
    """

    name: str
    window_mass: Callable[..., torch.Tensor]
    gather_kept: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scatter_kept: Callable[..., torch.Tensor]
    top_k: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    attend_kept: Callable[..., torch.Tensor] | None = None


TORCH_OPS = StageOps(
    name="torch",
    window_mass=reference.window_mass_ref,
    gather_kept=reference.gather_kept_ref,
    scatter_kept=reference.scatter_kept_ref,
)


@functools.cache
def _triton_ops() -> StageOps | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from .gather import gather_kept
    from .pipeline import attend_kept
    from .scatter import scatter_kept
    from .topk import top_k_per_head
    from .window_mass import window_mass

    return StageOps(
        name="triton",
        window_mass=_with_fallback(window_mass, reference.window_mass_ref),
        gather_kept=_with_fallback(gather_kept, reference.gather_kept_ref),
        scatter_kept=_with_fallback(scatter_kept, reference.scatter_kept_ref),
        top_k=top_k_per_head,
        attend_kept=attend_kept,
    )


def _with_fallback(kernel: Callable, ref: Callable) -> Callable:
    """float64 inputs (no Triton dot) go to the reference; everything else to the kernel."""

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            return ref(*args, **kwargs)
        return kernel(*args, **kwargs)

    return run


def triton_available() -> bool:
    """True when Triton imports (its kernels may still need a GPU or ``TRITON_INTERPRET=1``)."""
    return _triton_ops() is not None


def ops_for(tensor: torch.Tensor, backend: str) -> StageOps:
    """Stage functions for ``backend`` ("auto", "torch" or "triton") on ``tensor``'s device.

    "auto" gives the Triton kernels for CUDA tensors when Triton imports, the
    PyTorch references otherwise; "triton" always gives the kernels (on the CPU
    they need ``TRITON_INTERPRET=1``) and raises if Triton is missing.
    """
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        ops = _triton_ops()
        if ops is None:
            raise ValueError("backend='triton' needs the triton package (pip install 'tokensparse[triton]')")
        return ops
    if backend == "auto":
        if tensor.device.type == "cuda":
            ops = _triton_ops()
            if ops is not None:
                return ops
        return TORCH_OPS
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
