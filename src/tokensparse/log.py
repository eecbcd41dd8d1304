"""One-time warnings: a cause is logged once per process, not once per layer or call."""

from __future__ import annotations

import logging

_warned: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning the first time it is seen."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("tokensparse: %s", message)


def reset_warnings() -> None:
    """Forget the warnings given so far (tests and tools)."""
    _warned.clear()


__all__ = ["warn_once", "reset_warnings"]
