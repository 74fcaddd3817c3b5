"""The single-process reference of the asynchronous schedule, and the step bookkeeping every runtime shares.

Example::

    segments = split_graph(captured, place(build_op_graph(captured), plan.boundaries))
    denoiser = ReferenceSchedule(segments, warmup=1, stride=1)       # or ready_segments(captured, plan)
    denoiser.reset(scheduler.timesteps)
    for t in scheduler.timesteps:
        eps = denoiser({"sample": x, "timestep": t.expand(2), "encoder_hidden_states": text})
        x = scheduler.step(eps, t, x).prev_sample

:class:`ReferenceSchedule` evaluates the table of Note [schedule] (:mod:`asyncdiff_partition.core.schedule`)
in one process; every distributed runtime must give the same ε at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, cast

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.schedule import (
    ScheduleError,
    Step,
    Work,
    check_extrapolation,
    check_timestep_input,
    make_schedule,
)
from asyncdiff_partition.fx.compile import compile_segment, module_device
from asyncdiff_partition.fx.layout import RunnableSegment, is_dense
from asyncdiff_partition.runtime.batch import split_batch
from asyncdiff_partition.runtime.extrapolation import StaleHistory
from asyncdiff_partition.runtime.policy import PhasePolicy

__all__ = ["ReferenceSchedule", "SamplingRun", "StepDenoiser", "UnsplitDenoiser", "check_inputs", "step_inputs"]


class StepDenoiser(Protocol):
    """One noise prediction per denoising step, in order, for one sampling run."""

    def reset(self, timesteps: Sequence[float | int]) -> None:
        """Start a sampling run over these timesteps (in loop order); clears all state."""

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """ε for the next step, from the model inputs by captured placeholder name."""


def _compiled(segment: RunnableSegment) -> Any:
    """``segment`` (a dataclass: a split or a ready segment) with its torch module compiled."""
    module = segment.module
    if not isinstance(module, torch.nn.Module):  # an ONNX segment: onnxruntime already optimises it
        return segment
    return replace(cast(Any, segment), module=compile_segment(module, module_device(module)))


def step_inputs(inputs: Mapping[str, Tensor], timestep_input: str, value: float | int | None) -> dict[str, Tensor]:
    """``inputs`` with the timestep input set to ``value`` everywhere (same shape and dtype)."""
    feed = dict(inputs)
    if value is not None and timestep_input in feed:
        feed[timestep_input] = torch.full_like(feed[timestep_input], value)
    return feed


class UnsplitDenoiser:
    """The captured model run whole as a step denoiser: the sequential baseline schedules are checked against."""

    def __init__(self, captured: Any):
        self.captured = captured

    def reset(self, timesteps: Sequence[float | int]) -> None:
        pass

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.captured.graph_module(*[inputs[spec.name] for spec in self.captured.inputs])


class ReferenceSchedule:
    """The schedule of Note [schedule] evaluated in one process: the oracle for every runtime.

    Implements :class:`StepDenoiser`. All segments run here, one after the other; the values
    a segment would receive over the network are read from this object's state instead.

    Args:
        segments: in order: split ones (:func:`~asyncdiff_partition.fx.split.split_graph`,
            :func:`~asyncdiff_partition.onnx.segments.split_onnx`) or ready ones.
        warmup: W, exact warm-up steps.
        stride: 1, or 2 (AsyncDiff's stride denoising; the runtime needs N + 1 ranks).
        time_shift: condition the async phases on the previous step's timestep.
        timestep_input: name of the timestep placeholder (``captured.inputs[i].name``).
        phases: the switching policy (Note [phases], :mod:`~asyncdiff_partition.runtime.policy`);
            default exact for the first W steps, then asynchronous.
        batch_parallel: B groups, each running the schedule on its slice of the batch (Note
            [batch slices]); the segments are then captured at the sliced batch.
        latent_input: name of the latent placeholder (slices the batch when B > 1).
        compile: run every segment through ``torch.compile`` on its device
            (:func:`~asyncdiff_partition.fx.compile.compile_segment`; compiled at first use).
        extrapolation: λ, the plan field (Note [extrapolation] in runtime/extrapolation.py); 0
            reads stale values as they are.

    Raises:
        ScheduleError: bad arguments, or stride 2 / time_shift without a timestep input.
    """

    def __init__(
        self,
        segments: Sequence[RunnableSegment],
        *,
        warmup: int,
        stride: int = 1,
        time_shift: bool = False,
        timestep_input: str = "timestep",
        phases: Mapping[str, Any] | None = None,
        batch_parallel: int = 1,
        latent_input: str = "sample",
        compile: bool = False,
        extrapolation: float = 0.0,
    ):
        if not segments:
            raise ScheduleError("need at least one segment")
        make_schedule(len(segments), 0, warmup=warmup, stride=stride)  # validates the arguments
        check_extrapolation(extrapolation, stride)
        self.extrapolation = extrapolation
        names = sorted({name for segment in segments for name in segment.inputs})
        check_timestep_input(timestep_input, names, stride=stride, time_shift=time_shift)
        self.segments = [_compiled(s) for s in segments] if compile else list(segments)
        self.warmup, self.stride, self.time_shift = warmup, stride, time_shift
        self.timestep_input = timestep_input
        self.batch_parallel, self.latent_input = batch_parallel, latent_input
        self.policy = PhasePolicy(phases, warmup=warmup, stride=stride, branches=max(batch_parallel, 2))
        self._run: SamplingRun | None = None

    def reset(self, timesteps: Sequence[float | int]) -> None:
        """Start a sampling run over ``timesteps`` (the values the loop feeds the model, in order).

        ``warmup`` may be changed between runs; it takes effect here.
        """
        make_schedule(len(self.segments), 0, warmup=self.warmup, stride=self.stride)  # validates
        self.policy.warmup = self.warmup
        self.policy.reset(len(timesteps))

        def remake() -> list[Step]:
            return make_schedule(len(self.segments), len(timesteps), warmup=self.warmup, stride=self.stride,
                                 time_shift=self.time_shift, exact=self.policy.mask)

        self._run = SamplingRun(timesteps, remake(), remake=remake)
        # per batch group: (slot, step) -> model output still to be used, and the two newest
        # versions of every stale output of slots 0..N-1 (Note [extrapolation])
        self._kept: list[dict[tuple[int, int], Tensor]] = [{} for _ in range(self.batch_parallel)]
        self._history = [StaleHistory(self.extrapolation) for _ in range(self.batch_parallel)]

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """ε of the next step, from the model inputs by captured placeholder name.

        Raises:
            ScheduleError: no :meth:`reset`, too many steps, a timestep input other than the
                one given to :meth:`reset`, or a missing input.
        """
        run = self._run
        if run is None:
            raise ScheduleError("call reset(timesteps) before the first step of a run")
        step = run.advance(inputs, self.timestep_input)
        eps = torch.cat([
            self._group_step(run, step, split_batch(inputs, self.batch_parallel, g, latent=self.latent_input), g)
            for g in range(self.batch_parallel)
        ])
        self.policy.observe(step.index, eps)
        return eps

    def _group_step(self, run: SamplingRun, step: Step, inputs: Mapping[str, Tensor], group: int) -> Tensor:
        kept, history = self._kept[group], self._history[group]
        n = len(self.segments)
        made: dict[str, Any] = {}
        for work in step.work:
            segment = self.segments[work.segment]
            check_inputs(segment, inputs, step.index)
            feed = step_inputs(inputs, self.timestep_input, run.timestep_value(work, step))
            if step.chained:  # this step's values where made already, else the newest
                received = [made[name] if name in made else history.newest(name) for name in segment.receives]
            else:
                received = [history.read(name, step.index) for name in segment.receives]
            args = [feed[name] for name in segment.inputs] + received
            with torch.no_grad():  # stale values must not keep autograd graphs alive across steps
                values = dict(zip(segment.outputs, segment.module(*args)))
            if OUTPUT in values and (work.slot, step.index) in run.eps_sources:
                kept[(work.slot, step.index)] = values[OUTPUT]
            if work.slot < n:
                made.update((k, as_sent(v)) for k, v in values.items() if k != OUTPUT)
        for name, value in made.items():
            history.put(name, value, step.index)
        return kept.pop(step.eps)


def as_sent(value: Any) -> Any:
    """A value as another rank receives it (Note [memory order] in fx/layout.py): dense tensors as
    they are, other views as row-major copies; the oracle reads what the ranks read."""
    return pytree.tree_map(lambda x: x if not isinstance(x, Tensor) or is_dense(x) else x.contiguous(), value)


def check_inputs(segment: RunnableSegment, inputs: Mapping[str, Tensor], step: int) -> None:
    """Every model input the segment reads must be there, by captured placeholder name."""
    missing = [name for name in segment.inputs if name not in inputs]
    if missing:
        raise ScheduleError(
            f"step {step}: segment {segment.index} needs model inputs {missing}; got {sorted(inputs)} "
            f"(pass the inputs by captured placeholder name, captured.inputs[i].name)"
        )


class SamplingRun:
    """Bookkeeping of one sampling run shared by the reference and the runtime: step counter,
    timestep values, and the check that the loop feeds the timesteps given to reset()."""

    def __init__(self, timesteps: Sequence[Any], table: list[Step], remake: Callable[[], list[Step]] | None = None):
        self.timesteps = [t.item() if isinstance(t, Tensor) else t for t in timesteps]  # None: not checked
        self.table = table
        self.next = 0
        self.eps_sources = {step.eps for step in table}
        self.remake = remake  # a policy's table as decided so far (Note [phases]), re-read every step

    def replan(self, table: list[Step]) -> None:
        """Follow a table that a switching policy has decided further; the steps run so far must not change."""
        if table[: self.next] != self.table[: self.next]:
            raise ScheduleError(f"a switching policy changed steps already run (before step {self.next}); "
                                f"it must fix step s + decided_ahead(stride) before step s runs")
        self.table = table
        self.eps_sources = {step.eps for step in table}

    def advance(self, inputs: Mapping[str, Tensor], timestep_input: str) -> Step:
        if self.next >= len(self.table):
            raise ScheduleError(
                f"step {self.next + 1} of a run of {len(self.table)} timesteps; call reset(timesteps) to start a new run"
            )
        if self.remake is not None:
            self.replan(self.remake())
        step = self.table[self.next]
        given = inputs.get(timestep_input)
        value = self.timesteps[step.index]
        if given is not None and value is not None:
            # The loop may compute its own form (t / 1000) in the input's dtype: a few ulps apart.
            expected = torch.full_like(given, value)
            rtol = 4 * torch.finfo(given.dtype).eps if given.dtype.is_floating_point else 0.0
            if not torch.allclose(given, expected, rtol=rtol, atol=0.0):
                raise ScheduleError(
                    f"step {step.index}: the {timestep_input!r} input is {given.flatten()[:4].tolist()} but "
                    f"reset() was given timesteps[{step.index}] = {self.timesteps[step.index]}; pass reset() the "
                    f"timestep values the loop feeds the model, in order, and call once per step"
                )
        self.next += 1
        return step

    def timestep_value(self, work: Work, step: Step) -> float | int | None:
        """The value to write into the timestep input, None where the loop's own is right."""
        if work.timestep == step.index:
            return None
        value = self.timesteps[work.timestep]
        if value is None:
            raise ScheduleError(f"step {step.index} needs the timestep value of step {work.timestep} (stride 2 or "
                                "time_shift), but the loop's timestep values are unknown; give reset() the values")
        return value
