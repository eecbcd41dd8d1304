"""Where the kernel tests run: the CPU under TRITON_INTERPRET=1 (CI) or a GPU."""

from __future__ import annotations

import os

import pytest
import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

ON_GPU = torch.cuda.is_available()
CAN_RUN = HAVE_TRITON and (ON_GPU or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
DEVICE = "cuda" if ON_GPU else "cpu"

requires_kernels = pytest.mark.skipif(
    not CAN_RUN, reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (and the triton package)"
)
