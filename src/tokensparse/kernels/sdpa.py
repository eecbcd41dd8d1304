"""Dense causal attention on compressed tensors: the fastest SDPA backend that accepts them.

Compressed K/V are per query head, (B, H, K, D), so this is plain MHA. On CUDA
the first call for a (dtype, head_dim, device) tries cuDNN, then flash, then
PyTorch's default choice, and remembers the first that accepts the shapes;
:func:`last_backend` says which one ran. Elsewhere PyTorch picks.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_PREFERENCE = ("cudnn", "flash", "default")
_chosen: dict[tuple, str] = {}
_last: list[str] = ["none"]


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa_with(backend: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` restricted to one backend ("default": PyTorch picks).

    Raises RuntimeError when the backend does not accept the inputs.
    """
    if backend == "default":
        return F.scaled_dot_product_attention(query, key, value, **kwargs)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_backend_enum(backend)]):
        return F.scaled_dot_product_attention(query, key, value, **kwargs)


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None, backend: str | None = None
) -> torch.Tensor:
    """Causal SDPA on (B, H, K, D) tensors with Lq == Lk; returns (B, H, K, Dv).

    ``backend`` forces one ("cudnn", "flash", "efficient", "math", "default");
    ``None`` picks the fastest that accepts the inputs (cuDNN before flash on CUDA).
    """
    if backend is not None:
        _last[0] = backend
        return sdpa_with(backend, query, key, value, is_causal=True, scale=scale)
    if query.device.type != "cuda":
        _last[0] = "default"
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    signature = (query.dtype, query.shape[-1], value.shape[-1], query.device.index)
    chosen = _chosen.get(signature)
    if chosen is not None:
        _last[0] = chosen
        return sdpa_with(chosen, query, key, value, is_causal=True, scale=scale)
    for name in _PREFERENCE:
        try:
            out = sdpa_with(name, query, key, value, is_causal=True, scale=scale)
        except RuntimeError as err:  # this backend refuses these inputs; try the next
            logger.info("SDPA backend %s refused %s: %s", name, signature, str(err).splitlines()[0])
            continue
        _chosen[signature] = name
        _last[0] = name
        logger.info("compressed attention uses SDPA backend %s for %s", name, signature)
        return out
    raise RuntimeError("no SDPA backend accepted the compressed tensors")


def last_backend() -> str:
    """Name of the SDPA backend the last :func:`causal_attention` call used."""
    return _last[0]
