"""Step counting on a pipeline's schedulers: which scheduler step a denoiser call belongs to.

Example::

    clock = step_clock(pipe.scheduler)          # installed once, kept across runs
    run, step = clock.now()                      # inside the denoiser's call: the run and its step

Note [step clock]
~~~~~~~~~~~~~~~~~
A denoising step is what lies between two ``scheduler.step`` calls, however many denoiser calls
it makes (guidance passes, Heun's corrector, Wan 2.2's two transformers). The clock counts the
``step`` calls of one scheduler object since its current run began; a run begins when the
scheduler's ``timesteps`` becomes another object (every ``set_timesteps`` makes a new tensor) or
when a call comes after the run's last step. The count is kept on the scheduler itself (its
``step`` is wrapped on the instance), so sub-pipelines that share the scheduler object
(Kandinsky's combined pipelines) share the clock. A copy of the scheduler (``copy.deepcopy``,
pickling) gets the plain ``step`` back: only the object the clock was installed on counts.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

__all__ = ["StepClock", "is_scheduler", "remove_clock", "step_clock"]

_ATTR = "_asyncdiff_clock"


def is_scheduler(value: Any) -> bool:
    """A diffusers-style scheduler: ``set_timesteps`` and ``step``."""
    return callable(getattr(value, "set_timesteps", None)) and callable(getattr(value, "step", None))


class StepClock:
    """Counts one scheduler's ``step`` calls per run (Note [step clock]).

    Attributes:
        run: how many runs this clock has seen begin (the current run's id).
        count: ``step`` calls in the current run.
        listeners: called after every ``step`` with its arguments (the recording's hook).
    """

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.run = 0
        self.count = 0
        self._timesteps: Any = None
        self.listeners: list[Callable[..., None]] = []

    def now(self) -> tuple[int, int]:
        """``(run, step)`` of a call made now; starts a new run where Note [step clock] says."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is not self._timesteps or (timesteps is not None and self.count >= _length(timesteps)):
            self._timesteps, self.count, self.run = timesteps, 0, self.run + 1
        return self.run, self.count

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy of the scheduler has no clock (Note [step clock])

    def __reduce__(self) -> tuple[Any, ...]:
        return _none, ()

    def stepped(self, args: tuple, kwargs: dict) -> None:
        self.now()  # a step with no denoiser call before it still belongs to the current run
        self.count += 1
        for listener in list(self.listeners):
            listener(args, kwargs)


class _CountingStep:
    """The scheduler instance's ``step``: the class's own, then the clock."""

    def __init__(self, scheduler: Any, clock: StepClock):
        self._scheduler, self._clock = scheduler, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = type(self._scheduler).step(self._scheduler, *args, **kwargs)
        self._clock.stepped(args, kwargs)
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        copied = memo.get(id(self._scheduler))
        return types.MethodType(type(self._scheduler).step, copied) if copied is not None else self

    def __reduce__(self) -> tuple[Any, ...]:
        return _plain_step, (self._scheduler,)


def step_clock(scheduler: Any) -> StepClock:
    """The clock of ``scheduler``, installed on first use."""
    current = scheduler.__dict__.get("step")
    clock = scheduler.__dict__.get(_ATTR)
    if isinstance(current, _CountingStep) and clock is not None:
        return clock
    clock = StepClock(scheduler)
    scheduler.__dict__[_ATTR] = clock
    scheduler.__dict__["step"] = _CountingStep(scheduler, clock)
    return clock


def remove_clock(scheduler: Any) -> None:
    """Give ``scheduler`` its plain ``step`` back."""
    if isinstance(scheduler.__dict__.get("step"), _CountingStep):
        del scheduler.__dict__["step"]
    scheduler.__dict__.pop(_ATTR, None)


def _plain_step(scheduler: Any) -> Any:
    return types.MethodType(type(scheduler).step, scheduler)


def _none() -> None:
    return None


def _length(timesteps: Any) -> int:
    try:
        return len(timesteps)
    except TypeError:
        return 0
