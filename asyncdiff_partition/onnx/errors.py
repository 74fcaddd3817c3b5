"""The ONNX backend's error: a model file it cannot use (shared by import and static shapes)."""

from __future__ import annotations

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["OnnxModelError"]


class OnnxModelError(AsyncDiffError, ValueError):
    """An ONNX file that cannot be used: unreadable, control flow, shapes not static, ..."""
