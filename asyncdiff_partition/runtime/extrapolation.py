"""Extrapolated stale values: an asynchronous step reads v(s-1) + λ (v(s-1) - v(s-2)) instead of v(s-1).

Example::

    history = StaleHistory(factor=0.5)             # the plan's ``extrapolation``
    history.put("add_7", value, made=3)            # every version a segment receives, with its step
    history.read("add_7", step=4)                  # what step 4 computes with

Note [extrapolation]
~~~~~~~~~~~~~~~~~~~~
An asynchronous step s reads the values its upstream segments made at step s - 1 (Note
[schedule] in core/schedule.py). Those values move smoothly along the sampling trajectory, so
the last two versions predict the one the sequential model would read at step s:
v̂(s) = v(s-1) + λ (v(s-1) - v(s-2)), with λ in [0, 1] (0: AsyncDiff's plain stale read; 1: a
straight line through the last two versions). Measured on the digits model, N = 2, S = 1,
W = 1, T = 20, 200 samples: the latency-optimal cut gains 5 dB PSNR at λ = 0.5 and its
Fréchet ratio falls from 1.60x to about 1.05x, while λ = 1 overshoots (benchmarks/fidelity/).
λ is a plan field chosen on a calibration batch (evaluation/evaluate.py); the default 0 keeps
the plain read.

The rule applies only where the two versions were made at steps s - 1 and s - 2 (so the first
asynchronous step after W = 1 reads plainly, and a step after an exact phase extrapolates from
the exact values), and only to floating-point tensors. Stride 2 is refused: its rounds read
values two steps old. The reference schedule and the ranks both read through
:class:`StaleHistory`, so they agree bit for bit. Cost: each rank keeps one more version of the
values it receives, and one multiply-add per value and step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from asyncdiff_partition.core.schedule import check_extrapolation

__all__ = ["StaleHistory", "check_extrapolation", "extrapolate"]  # check_extrapolation: core/schedule.py


def extrapolate(newest: Any, older: Any, factor: float) -> Any:
    """``newest + factor * (newest - older)`` for floating-point tensors, leaf by leaf; other leaves as they are."""
    if isinstance(newest, Tensor):
        return newest + factor * (newest - older) if newest.is_floating_point() else newest
    if isinstance(newest, (tuple, list)):
        return type(newest)(extrapolate(a, b, factor) for a, b in zip(newest, older))
    if isinstance(newest, dict):
        return {key: extrapolate(value, older[key], factor) for key, value in newest.items()}
    return newest


class StaleHistory:
    """The newest two versions of every value read across a cut, each with the step that made it.

    Args:
        factor: λ of Note [extrapolation]; 0 reads the newest version as it is.
    """

    def __init__(self, factor: float = 0.0):
        self.factor = factor
        self._newest: dict[str, tuple[int, Any]] = {}
        self._older: dict[str, tuple[int, Any]] = {}

    def put(self, name: str, value: Any, made: int) -> None:
        """A new version of ``name``, made at step ``made``."""
        if name in self._newest:
            self._older[name] = self._newest[name]
        self._newest[name] = (made, value)

    def newest(self, name: str) -> Any:
        """The newest version as it is (what a chained step, which made it, reads)."""
        return self._newest[name][1]

    def read(self, name: str, step: int) -> Any:
        """What an asynchronous step ``step`` computes with (Note [extrapolation])."""
        made, value = self._newest[name]
        older = self._older.get(name)
        if not self.factor or older is None or made != step - 1 or older[0] != step - 2:
            return value
        return extrapolate(value, older[1], self.factor)
