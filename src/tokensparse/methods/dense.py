"""``dense``: the model's own attention, unchanged (the reference every method is measured against)."""

from __future__ import annotations

from .registry import Method, register_method

DENSE = register_method(Method("dense", description="the model's own attention (no sparsity)"))

__all__ = ["DENSE"]
