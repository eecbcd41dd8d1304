"""Small launch helpers shared by the Triton kernels (no Triton import here)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact float32 products for float32 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_kernel_dtype(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}: Triton kernels take float16, bfloat16 or float32, got {t.dtype}")
