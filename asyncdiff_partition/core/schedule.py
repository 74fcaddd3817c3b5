"""The asynchronous schedule (AsyncDiff, arXiv 2406.06911, Sec. 3.2-3.3) and its single-process reference.

Example::

    segments = split_graph(captured, place(build_op_graph(captured), plan.boundaries))
    denoiser = ReferenceSchedule(segments, warmup=1, stride=1)
    denoiser.reset(scheduler.timesteps)
    for t in scheduler.timesteps:
        eps = denoiser({"sample": x, "timestep": t.expand(2), "encoder_hidden_states": text})
        x = scheduler.step(eps, t, x).prev_sample

:func:`make_schedule` is the one place that decides, for every step, which *slot* computes
which segment with which timestep and which stale values, and where ε comes from.
:class:`ReferenceSchedule` evaluates that table in one process; the distributed runtime
(:mod:`asyncdiff_partition.runtime.denoiser`, one slot per rank) reads the same table and must give the
same ε at every step.

Note [schedule]
~~~~~~~~~~~~~~~
N segments, T steps, W warm-up steps, stride S; slot k < N runs segment k, and with S = 2
one extra slot N runs the last segment again. ``k@s`` = the values segment k made at step s;
``t_i`` = timesteps[i]; x_s = the latent the loop passes at step s. Every async step reads
the *latest* values the main slots 0..N-1 made (``@prev`` = the previous step that computed).

Stride 1 (N = 3, T = 5, W = 2)::

    step phase   slot 0        slot 1                slot 2                ε(s)
    0    warmup  f0(x0,t0) ->  f1(x0,t0, 0@0) ->     f2(x0,t0, 0@0 1@0)    slot 2 @0
    1    warmup  f0(x1,t1) ->  f1(x1,t1, 0@1) ->     f2(x1,t1, 0@1 1@1)    slot 2 @1
    2    async   f0(x2,t2)     f1(x2,t2, 0@1)        f2(x2,t2, 0@1 1@1)    slot 2 @2
    3    async   f0(x3,t3)     f1(x3,t3, 0@2)        f2(x3,t3, 0@2 1@2)    slot 2 @3
    4    async   f0(x4,t4)     f1(x4,t4, 0@3)        f2(x4,t4, 0@3 1@3)    slot 2 @4

Stride 2 (N = 2, world 3, T = 6, W = 1)::

    step phase   slot 0 (seg 0)  slot 1 (seg 1)     slot 2 (seg 1)     ε(s)
    0    warmup  f0(x0,t0) ->    f1(x0,t0, 0@0)     .                  slot 1 @0
    1    round   f0(x1,t2)       f1(x1,t2, 0@0)     f1(x1,t1, 0@0)     slot 2 @1
    2    reuse   .               .                  .                  slot 1 @1
    3    round   f0(x3,t4)       f1(x3,t4, 0@1)     f1(x3,t3, 0@1)     slot 2 @3
    4    reuse   .               .                  .                  slot 1 @3
    5    tail    f0(x5,t5)       f1(x5,t5, 0@3)     .                  slot 1 @5

Edge cases, decided here:

* The first step has no previous step to read, so it is always a warm-up step: W = 0 runs
  exactly like W = 1 (AsyncDiff needs W >= 1 too). W >= T runs every step as a warm-up step,
  which reproduces the unsplit model exactly; N = 1 with stride 1 is the unsplit model.
* Stride 2 pairs the steps after the warm-up: (W, W+1), (W+2, W+3), ... The first round
  reads the values of the last warm-up step. If an odd number of steps remains, the last
  step is a *tail*: slots 0..N-1 compute it like a stride-1 async step (t_s, latest values)
  and the extra slot rests.
* ``time_shift`` moves every timestep of the async phases (async, round, tail) one step back
  (t_i -> t_{i-1}), as AsyncDiff's ``time_shift`` does: a segment is then conditioned on the
  step its stale inputs come from. Warm-up steps keep t_s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["PHASES", "ScheduleError", "Step", "Work", "check_stride", "check_timestep_input", "make_schedule", "n_slots",
           "readers", "slot_segment"]


PHASES = ("warmup", "async", "round", "reuse", "tail")


class ScheduleError(AsyncDiffError, ValueError):
    """Bad schedule arguments, or a denoiser called out of order."""


@dataclass(frozen=True)
class Work:
    """One segment evaluation: ``slot`` runs ``segment`` conditioned on ``timesteps[timestep]``."""

    slot: int
    segment: int
    timestep: int


@dataclass(frozen=True)
class Step:
    """What happens at step ``index`` (see Note [schedule]).

    Attributes:
        index: the step.
        phase: one of :data:`PHASES`.
        work: the evaluations of this step, in slot order. In a ``warmup`` step they run as
            a chain: each segment reads this step's values. Otherwise every segment reads
            the latest values that slots 0..N-1 made at an earlier step.
        eps: ``(slot, step)``: ε of this step is the model output that slot computed at that
            step (an earlier step only in a ``reuse`` step).
    """

    index: int
    phase: str
    work: tuple[Work, ...]
    eps: tuple[int, int]

    @property
    def chained(self) -> bool:
        return self.phase == "warmup"


def check_stride(stride: object) -> int:
    """The one stride rule: 1, or 2 for AsyncDiff's stride denoising.

    Raises:
        ScheduleError: any other value.
    """
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ScheduleError(f"stride must be 1 or 2 (2: stride denoising with one extra rank); got {stride!r}")
    return int(stride)


def n_slots(n_segments: int, stride: int) -> int:
    """Slots (ranks) a schedule uses: N, plus one for stride 2. The one world-size rule."""
    return n_segments + check_stride(stride) - 1


def slot_segment(slot: int, n_segments: int) -> int:
    """The segment a slot runs: its own index, the last segment for the stride-2 extra slot."""
    return min(slot, n_segments - 1)


def make_schedule(n_segments: int, steps: int, *, warmup: int, stride: int = 1, time_shift: bool = False) -> list[Step]:
    """The table of Note [schedule]: one :class:`Step` per denoising step.

    Example:
        >>> [s.phase for s in make_schedule(2, 6, warmup=1, stride=2)]
        ['warmup', 'round', 'reuse', 'round', 'reuse', 'tail']

    Args:
        n_segments: N >= 1.
        steps: T >= 0.
        warmup: W >= 0 (W = 0 runs like W = 1: the first step has nothing stale to read).
        stride: 1, or 2 for stride denoising (one extra slot).
        time_shift: condition the async phases on the previous step's timestep.

    Raises:
        ScheduleError: an argument out of range.
    """
    if n_segments < 1 or steps < 0 or warmup < 0 or isinstance(stride, bool) or stride not in (1, 2):
        raise ScheduleError(
            f"need n_segments >= 1, steps >= 0, warmup >= 0 and stride 1 or 2; got n_segments={n_segments}, "
            f"steps={steps}, warmup={warmup}, stride={stride}"
        )
    last = n_segments - 1
    shift = 1 if time_shift else 0

    def main(t: int) -> tuple[Work, ...]:
        return tuple(Work(k, k, t) for k in range(n_segments))

    w = min(max(warmup, 1), steps)
    table = [Step(s, "warmup", main(s), (last, s)) for s in range(w)]
    s = w
    while s < steps:
        if stride == 2 and s + 1 < steps:
            extra = Work(n_segments, last, s - shift)
            table.append(Step(s, "round", main(s + 1 - shift) + (extra,), (n_segments, s)))
            table.append(Step(s + 1, "reuse", (), (last, s)))
            s += 2
        else:
            table.append(Step(s, "async" if stride == 1 else "tail", main(s - shift), (last, s)))
            s += 1
    return table


def readers(table: Sequence[Step], index: int) -> list[Work]:
    """The evaluations that read the values slots 0..N-1 make at step ``index``.

    In a warm-up step, the later main slots of the same step; then, if the next step that
    computes is not a warm-up step, all of its evaluations. The runtime sends each value to
    exactly these slots (a slot that appears twice receives once).
    """
    step = table[index]
    if not step.work:
        return []
    found = list(step.work) if step.chained else []
    following = next((later for later in table[index + 1:] if later.work), None)
    if following is not None and not following.chained:
        found.extend(following.work)
    return found


def check_timestep_input(timestep_input: str, names: Sequence[str], *, stride: int, time_shift: bool) -> None:
    """Stride 2 and time_shift rewrite the timestep input: it must be one of the model inputs."""
    if (stride == 2 or time_shift) and timestep_input not in names:
        raise ScheduleError(
            f"stride 2 and time_shift set the timestep input {timestep_input!r}, but the model inputs are "
            f"{list(names)}; pass timestep_input=<the timestep's placeholder name>"
        )
