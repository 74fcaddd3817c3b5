"""Other libraries' loggers kept quiet for a while, unless ``$ASYNCDIFF_DEBUG`` asks for everything.

Example::

    with quiet_loggers("torch.export"):
        torch.export.export(...)      # its own warnings stay out of the user's output
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["DEBUG_ENV", "quiet_loggers"]

DEBUG_ENV = "ASYNCDIFF_DEBUG"  # set (by --debug): keep every library's logs and warnings


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.CRITICAL) -> Iterator[None]:
    """Within the block the named loggers drop records up to ``level``; with ``$ASYNCDIFF_DEBUG`` nothing changes."""
    if os.environ.get(DEBUG_ENV):
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level + 1)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)
