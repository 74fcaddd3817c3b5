"""Process-wide counts of the compiler's expensive steps (op graphs built, placements, splits).

Example::

    before = counters.counts()
    ...                                      # a rank's set-up
    counters.since(before)                   # {"op_graphs": 0, "splits": 0, ...}

A run report records them per rank, so that a test can show that ranks receive finished
segments and build nothing of their own.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["NAMES", "count", "counts", "since"]

NAMES = ("op_graphs", "placements", "splits")

_counts: Counter[str] = Counter()


def count(name: str) -> None:
    """One more ``name`` (one of :data:`NAMES`) in this process."""
    _counts[name] += 1


def counts() -> dict[str, int]:
    """Every count of this process so far (zero for names never counted)."""
    return {name: _counts[name] for name in NAMES}


def since(before: dict[str, int]) -> dict[str, int]:
    """Counts made after ``before`` (an earlier :func:`counts`)."""
    now = counts()
    return {name: now[name] - before.get(name, 0) for name in NAMES}
