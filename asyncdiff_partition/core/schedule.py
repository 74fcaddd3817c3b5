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

Note [phases]
~~~~~~~~~~~~~
The warm-up generalises to a per-step *exactness mask* (``exact``, one bool per step): an
exact step runs the chain of a warm-up step, every other step the asynchronous schedule.
Exact steps before the first asynchronous one are ``warmup`` steps, later ones ``exact``
steps (hybrid parallelism, Hybridiff arXiv 2602.21760: the same ranks switch between exact and
asynchronous phases). Both hand-overs are exact by construction: an asynchronous step after
an exact step reads the *latest* values, which that exact step made; an exact step after
asynchronous steps recomputes the whole chain and reads nothing stale. With stride 2 a round
needs two consecutive asynchronous steps; an asynchronous step that has no partner before the
next exact step is a ``tail``. Stride 1, N = 2, T = 6, async window [2, 4)::

    step phase   slot 0        slot 1              ε(s)
    0    warmup  f0(x0,t0) ->  f1(x0,t0, 0@0)      slot 1 @0
    1    warmup  f0(x1,t1) ->  f1(x1,t1, 0@1)      slot 1 @1
    2    async   f0(x2,t2)     f1(x2,t2, 0@1)      slot 1 @2
    3    async   f0(x3,t3)     f1(x3,t3, 0@2)      slot 1 @3
    4    exact   f0(x4,t4) ->  f1(x4,t4, 0@4)      slot 1 @4
    5    exact   f0(x5,t5) ->  f1(x5,t5, 0@5)      slot 1 @5

Step s of the table, and :func:`readers` of step s (which the runtime needs before step s
sends), depend on the mask only up to step s + :func:`decided_ahead` (stride 1: s + 1; stride 2:
s + 3, because a round at s is read by step s + 2, whose extra slot computes only if s + 3 is
asynchronous too). A policy that decides the mask while sampling (:mod:`asyncdiff_partition.
runtime.policy`) must therefore fix step s + decided_ahead before step s starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = [
    "PHASES",
    "ScheduleError",
    "Step",
    "Work",
    "check_extrapolation",
    "check_stride",
    "check_timestep_input",
    "decided_ahead",
    "exact_mask",
    "make_schedule",
    "n_slots",
    "readers",
    "slot_segment",
    "world_size",
]


PHASES = ("warmup", "async", "round", "reuse", "tail", "exact")


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
        return self.phase in ("warmup", "exact")


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


def world_size(n_segments: int, stride: int, batch_parallel: int = 1) -> int:
    """Ranks a hybrid plan uses: B batch groups of N + S - 1 slots each (the one place of this rule)."""
    return batch_parallel * n_slots(n_segments, stride)


def decided_ahead(stride: int) -> int:
    """How far past step s the exactness mask must be fixed before step s runs (Note [phases])."""
    return 2 * stride - 1


def exact_mask(steps: int, *, warmup: int, async_steps: Sequence[int] | None = None) -> list[bool]:
    """The exactness mask of a fixed policy: async in ``[start, end)`` (default ``[W, T)``), else exact.

    A window reaching past the last step ends there.

    Example:
        >>> exact_mask(5, warmup=1, async_steps=(2, 4))
        [True, True, False, False, True]
    """
    start, end = (min(warmup, steps), steps) if async_steps is None else async_steps
    if start > end or start < 0:
        raise ScheduleError(f"async_steps must be [start, end) with 0 <= start <= end, got [{start}, {end}); "
                            f"e.g. async_steps=[1, {steps}]")
    return [not (start <= s < end) for s in range(steps)]


def slot_segment(slot: int, n_segments: int) -> int:
    """The segment a slot runs: its own index, the last segment for the stride-2 extra slot."""
    return min(slot, n_segments - 1)


def make_schedule(
    n_segments: int,
    steps: int,
    *,
    warmup: int,
    stride: int = 1,
    time_shift: bool = False,
    exact: Sequence[bool] | None = None,
) -> list[Step]:
    """The table of Notes [schedule] and [phases]: one :class:`Step` per denoising step.

    Example:
        >>> [s.phase for s in make_schedule(2, 6, warmup=1, stride=2)]
        ['warmup', 'round', 'reuse', 'round', 'reuse', 'tail']

    Args:
        n_segments: N >= 1.
        steps: T >= 0.
        warmup: W >= 0 (W = 0 runs like W = 1: the first step has nothing stale to read).
        stride: 1, or 2 for stride denoising (one extra slot).
        time_shift: condition the async phases on the previous step's timestep.
        exact: the exactness mask, one bool per step (Note [phases]); default exact for the
            first W steps. Step 0 is always exact (nothing stale to read yet).

    Raises:
        ScheduleError: an argument out of range, or a mask of another length than ``steps``.
    """
    if n_segments < 1 or steps < 0 or warmup < 0 or isinstance(stride, bool) or stride not in (1, 2):
        raise ScheduleError(
            f"need n_segments >= 1, steps >= 0, warmup >= 0 and stride 1 or 2; got n_segments={n_segments}, "
            f"steps={steps}, warmup={warmup}, stride={stride}"
        )
    if exact is None:
        exact = [s < warmup for s in range(steps)]
    elif len(exact) != steps:
        raise ScheduleError(f"the exactness mask has {len(exact)} entries for {steps} steps; give one per step")
    exact = [True, *exact[1:]] if steps else []
    last = n_segments - 1
    shift = 1 if time_shift else 0

    def main(t: int) -> tuple[Work, ...]:
        return tuple(Work(k, k, t) for k in range(n_segments))

    table: list[Step] = []
    s = 0
    while s < steps:
        if exact[s]:
            began = any(not step.chained for step in table)
            table.append(Step(s, "exact" if began else "warmup", main(s), (last, s)))
            s += 1
        elif stride == 2 and s + 1 < steps and not exact[s + 1]:
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


def check_extrapolation(factor: float, stride: int) -> None:
    """The plan field ``extrapolation`` (λ, runtime/extrapolation.py): in [0, 1], and 0 with stride 2.

    Raises:
        ScheduleError: it does not.
    """
    if not 0.0 <= factor <= 1.0:
        raise ScheduleError(f"extrapolation must be between 0 (plain stale values) and 1, got {factor}")
    if factor and stride != 1:
        raise ScheduleError(f"extrapolation needs stride 1 (stride {stride} reads values two steps old); "
                            f"make the plan with extrapolation 0 or stride 1")


def check_timestep_input(timestep_input: str, names: Sequence[str], *, stride: int, time_shift: bool) -> None:
    """Stride 2 and time_shift rewrite the timestep input: it must be one of the model inputs."""
    if (stride == 2 or time_shift) and timestep_input not in names:
        raise ScheduleError(
            f"stride 2 and time_shift set the timestep input {timestep_input!r}, but the model inputs are "
            f"{list(names)}; pass timestep_input=<the timestep's placeholder name>"
        )
