"""``poison_uninitialized_memory``: uninitialised memory is NaN / max int while a test
that asks for it runs, so an output element a kernel fails to write shows up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def poison_uninitialized_memory():
    """torch.empty returns NaN (floats) or the max value (ints) while a test runs."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
