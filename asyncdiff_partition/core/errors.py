"""The root of every error this library raises on purpose.

Each stage keeps its own error class (``PlanError``, ``CaptureError``, ...); all of them derive
from :class:`AsyncDiffError`, and most also from ``ValueError`` or ``RuntimeError`` so that
callers who caught those before keep working. The CLI turns an ``AsyncDiffError`` (a mistake
the user can fix) into one ``error:`` line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["AsyncDiffError"]


class AsyncDiffError(Exception):
    """A mistake in the input (model, plan, profile, settings, environment) that the user can fix."""
