"""The root of every error this library raises on purpose, and the errors shared by several stages.

Each stage keeps its own error class (``PlanError``, ``CaptureError``, ...); all of them derive
from :class:`AsyncDiffError`, and most also from ``ValueError``, ``TypeError`` or
``RuntimeError`` so that callers who caught those before keep working. The CLI turns an
``AsyncDiffError`` (a mistake the user can fix) into one ``error:`` line; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["PlanError", "AsyncDiffError", "ConfigError", "UnsupportedError", "UsageError"]


class AsyncDiffError(Exception):
    """A mistake in the input (model, plan, profile, settings, environment) that the user can fix."""


class ConfigError(AsyncDiffError, ValueError):
    """A setting out of range or inconsistent with another (steps, batch, sizes, options)."""


class UnsupportedError(AsyncDiffError, TypeError):
    """A model, pipeline or call shape that this library does not handle; the message says what does."""


class UsageError(AsyncDiffError, RuntimeError):
    """An object used out of order (a run before its set-up, a step without a schedule)."""


class PlanError(AsyncDiffError, ValueError):
    """A plan that cannot be made, or a plan file that does not fit (its stage: core/plan.py;
    defined here so that the plan file's validator raises it without importing the plan)."""
