"""Say something once per run: a per-sample condition is counted in the records, and the log names
it once instead of once per sample (a long evaluation would drown in repeats)."""

from __future__ import annotations

from loguru import logger

_said: set[str] = set()


def warn_once(key: str, message: str) -> bool:
    """Log ``message`` as a warning the first time ``key`` is seen in this process; ``True`` then."""
    if key in _said:
        return False
    _said.add(key)
    logger.warning(message)
    return True
