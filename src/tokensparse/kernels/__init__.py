"""Kernels for the stages of Token Sparse Attention and block-sparse attention, and their dispatch.

Each kernel has a PyTorch reference with the same signature
(:mod:`tokensparse.kernels.reference`; block-sparse attention's in
:mod:`tokensparse.kernels.block_sparse`). :func:`ops_for` is the one place that
chooses between them, for every kernel:

* ``"torch"``: the references.
* ``"auto"``: the Triton kernels for CUDA tensors when Triton imports; the
  references for every other tensor, the CPU included even under
  ``TRITON_INTERPRET=1`` (the interpreter is for testing kernels, and slower
  than the references by orders of magnitude).
* ``"triton"``: the Triton kernels, on CUDA tensors or on the CPU under
  ``TRITON_INTERPRET=1``; anything else raises ``ValueError``.

Triton is imported only when a Triton backend is asked for, so the package
works without it. Nothing here imports a module above ``tokensparse.kernels``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from ._launch import interpreting
from .antidiagonal import antidiagonal_scores_ref
from .block_sparse import block_sparse_attention_ref
from .local_rows import fill_dropped_rows_torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOps:
    """The kernel functions one backend provides.

    Signatures are the references': ``reference.window_mass_ref``,
    ``gather_kept_ref``, ``scatter_kept_ref``, ``top_k_per_head_ref`` and
    ``block_sparse.block_sparse_attention_ref`` (keywords ``seq_lens``,
    ``scale``, ``out`` in common with the Triton launcher),
    ``local_rows.fill_dropped_rows_torch`` (writes ``out`` in place),
    ``antidiagonal.antidiagonal_scores_ref`` (XAttention's block scores;
    keywords as the Triton launcher's but ``tiles``). ``attend_kept``
    (compress + attend + decompress, see
    :func:`tokensparse.kernels.pipeline.attend_kept`) is optional: ``None``
    means the caller's PyTorch path.
    """

    name: str
    window_mass: Callable[..., torch.Tensor]
    gather_kept: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scatter_kept: Callable[..., torch.Tensor]
    top_k: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    block_sparse_attention: Callable[..., torch.Tensor]
    fill_dropped_rows: Callable[..., torch.Tensor]
    antidiagonal_scores: Callable[..., torch.Tensor]
    attend_kept: Callable[..., torch.Tensor] | None = None


TORCH_OPS = StageOps(
    name="torch",
    window_mass=reference.window_mass_ref,
    gather_kept=reference.gather_kept_ref,
    scatter_kept=reference.scatter_kept_ref,
    top_k=reference.top_k_per_head_ref,
    block_sparse_attention=block_sparse_attention_ref,
    fill_dropped_rows=fill_dropped_rows_torch,
    antidiagonal_scores=antidiagonal_scores_ref,
)


@functools.cache
def _triton_ops() -> StageOps | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from .antidiagonal import antidiagonal_scores
    from .block_sparse import block_sparse_attention
    from .gather import gather_kept
    from .local_rows import fill_dropped_rows_triton
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
        block_sparse_attention=block_sparse_attention,
        fill_dropped_rows=_with_fallback(fill_dropped_rows_triton, fill_dropped_rows_torch),
        antidiagonal_scores=_with_fallback(antidiagonal_scores, antidiagonal_scores_ref),
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


def triton_runnable(tensor: torch.Tensor) -> bool:
    """True when ``backend="triton"`` can run on ``tensor``: Triton imports, and the
    tensor is on CUDA or ``TRITON_INTERPRET=1`` runs the kernels on the CPU."""
    return triton_available() and (tensor.is_cuda or interpreting())


def ops_for(tensor: torch.Tensor, backend: str) -> StageOps:
    """Kernel functions for ``backend`` ("auto", "torch" or "triton") on ``tensor``'s device.

    The rule (the same for every kernel, see the module docstring): "auto" gives
    the Triton kernels for CUDA tensors when Triton imports and the PyTorch
    references otherwise; "triton" gives the kernels and raises ``ValueError``
    when Triton is missing or the tensor is neither on CUDA nor on the CPU under
    ``TRITON_INTERPRET=1``; "torch" gives the references.
    """
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        ops = _triton_ops()
        if ops is None:
            raise ValueError("backend='triton' needs the triton package (pip install 'tokensparse[triton]')")
        if not (tensor.is_cuda or interpreting()):
            # Without this check Triton fails deep inside its launcher with "0 active drivers".
            raise ValueError(
                "backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU; "
                f"got a {tensor.device.type} tensor (use backend='auto' or 'torch' there)"
            )
        return ops
    if backend == "auto":
        if tensor.is_cuda:
            ops = _triton_ops()
            if ops is not None:
                return ops
        return TORCH_OPS
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


@functools.cache
def _warn_chunk_fallback_once() -> None:
    logger.warning(
        "Token Sparse Attention after a cached prefix (query shorter than the keys): scoring and top-k run the "
        "Triton kernels, compress/attend/decompress the PyTorch stages (no Triton path yet; logged once)"
    )


def ops_for_chunk(tensor: torch.Tensor, backend: str) -> StageOps:
    """:func:`ops_for` for a chunk after a cached prefix (Lq < Lk).

    The scoring (``window_mass``, which takes Lq <= Lk) and ``top_k`` (which
    sees only key positions) are ``backend``'s; the other stages assume
    Lq == Lk, so the PyTorch references stand in for their Triton kernels, with
    a warning logged once per process where Triton was chosen. ``backend`` is
    checked as :func:`ops_for` does.
    """
    ops = ops_for(tensor, backend)
    if ops.name == TORCH_OPS.name:
        return TORCH_OPS
    _warn_chunk_fallback_once()
    return dataclasses.replace(TORCH_OPS, name="triton-chunk", window_mass=ops.window_mass, top_k=ops.top_k)
