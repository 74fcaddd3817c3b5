"""The switching-policy spec of a plan's ``phases``: which kinds and keys there are, checked (torch-free).

Example::

    check_phases({"kind": "adaptive", "threshold": 0.3})
    # {'kind': 'adaptive', 'threshold': 0.3, 'exit': None, 'patience': 1, 'final_exact': 0}

The policies themselves run in :mod:`~asyncdiff_partition.runtime.policy` (Notes [phases],
[adaptive phases]); the spec lives here so that plan files can be validated on load
(:mod:`~asyncdiff_partition.core.validation`) without importing the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["KINDS", "PhaseError", "check_phases"]

KINDS = ("warmup", "fixed", "adaptive")
_KEYS: dict[str, set[str]] = {"warmup": set(), "fixed": {"async_steps"}, "adaptive": {"threshold", "exit", "patience", "final_exact"}}


class PhaseError(AsyncDiffError, ValueError):
    """A switching policy that is malformed, or that cannot be measured on this batch."""


def check_phases(phases: Mapping[str, Any] | None) -> dict[str, Any]:
    """The policy spec, validated, with defaults filled in (None: exact warm-up, then async to the end).

    Raises:
        PhaseError: an unknown kind or key, or a value out of range.
    """
    if phases is not None and not isinstance(phases, Mapping):
        raise PhaseError(f"phases must be an object such as {{\"kind\": \"adaptive\", \"threshold\": 0.3}}, "
                         f"got {phases!r}")
    spec = dict(phases or {"kind": "warmup"})
    kind = spec.get("kind")
    if kind not in KINDS:
        raise PhaseError(f"phases kind must be one of {list(KINDS)}, got {kind!r}; e.g. "
                         f'{{"kind": "fixed", "async_steps": [1, 15]}}')
    unknown = set(spec) - _KEYS[kind] - {"kind"}
    if unknown:
        raise PhaseError(f"phases of kind {kind!r} take {sorted(_KEYS[kind])}, not {sorted(unknown)}")
    if kind == "fixed":
        window = spec.get("async_steps")
        if not (isinstance(window, list | tuple) and len(window) == 2 and 0 <= window[0] <= window[1]):
            raise PhaseError(f"fixed phases need async_steps [start, end) with 0 <= start <= end, got {window!r}")
        spec["async_steps"] = [int(window[0]), int(window[1])]
    if kind == "adaptive":
        spec.setdefault("exit", None)
        spec.setdefault("patience", 1)
        spec.setdefault("final_exact", 0)
        threshold, exit_ = spec.get("threshold"), spec["exit"]
        if not isinstance(threshold, int | float) or threshold <= 0:
            raise PhaseError(f"adaptive phases need a threshold > 0 on the guidance delta, got {threshold!r}")
        if exit_ is not None and exit_ < threshold:
            raise PhaseError(f"adaptive exit {exit_} is under the threshold {threshold}: it would switch off at "
                             f"once; use an exit >= threshold, or none")
        if spec["patience"] < 1 or spec["final_exact"] < 0:
            raise PhaseError(f"need patience >= 1 and final_exact >= 0, got {spec['patience']}, {spec['final_exact']}")
    return spec
