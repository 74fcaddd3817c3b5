"""The asynchronous schedule on N ranks: one ready segment per rank, stale values sent point to point.

Example (every rank runs the same loop; see :func:`launch` for starting the ranks)::

    rank, world, device = comm.init()
    segment = shipped.load(slot_segment(rank, plan.n_devices))   # finished in the launching process
    denoiser = AsyncDenoiser(segment, plan, input_names=names, latent="sample", warmup=1)
    denoiser.reset(scheduler.timesteps)
    for t in scheduler.timesteps:
        eps = denoiser({"sample": x, "timestep": t.expand(2), "encoder_hidden_states": text})
        x = scheduler.step(eps, t, x).prev_sample
    comm.shutdown()

:class:`AsyncDenoiser` follows the table of Note [schedule] in :mod:`asyncdiff_partition.core.schedule`
(rank = slot) and gives the same ε as :class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule`
at every step. It is handed a finished :class:`~asyncdiff_partition.fx.layout.ReadySegment`
(torch or ONNX alike): it builds no op graph and splits nothing.

Note [transfers]
~~~~~~~~~~~~~~~~
Every rank runs the whole sampling loop, so every rank has the latent and the conditions; only
stale values travel. When the main slots compute at step s, the value v that segment p makes
goes to every slot that reads it (:func:`~asyncdiff_partition.core.schedule.readers`: later slots of
the same step in a warm-up chain, else every slot of the next step that computes) whose segment
consumes v, once, by ``isend``. A reader posts the matching ``irecv`` when step s starts, into
fresh buffers shaped from the segment's value layouts, and waits
for it only when it needs the value: at once in a warm-up chain, else at the start of the next
step that computes, so transfers overlap compute. Both sides walk the same table and the same
value order (graph position), so sends and receives match without any handshake; a value that
is a list or tuple of tensors (an ``aten.chunk`` result, say) travels as its tensor leaves.
ε goes from the slot the table names to every rank by ``broadcast`` at every step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.plan import Plan, PlanError
from asyncdiff_partition.core.schedule import (
    ScheduleError,
    Step,
    check_extrapolation,
    check_timestep_input,
    make_schedule,
    readers,
    slot_segment,
)
from asyncdiff_partition.fx.compile import compile_segment
from asyncdiff_partition.fx.device_move import move_module
from asyncdiff_partition.fx.layout import ReadySegment, TensorSlot, tensor_leaves
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.extrapolation import StaleHistory
from asyncdiff_partition.runtime.reference import SamplingRun, check_inputs, step_inputs

__all__ = ["STREAM_TAGS", "AsyncDenoiser", "check_agreement", "segment_for_rank"]

STREAM_TAGS = 1 << 20  # message tags per stream: more than any graph's node positions


def segment_for_rank(segments: Sequence[ReadySegment], rank: int | None = None) -> ReadySegment:
    """This rank's segment of a full list (rank r runs segment r; with stride 2 the extra rank
    runs the last one)."""
    return segments[slot_segment(comm.rank() if rank is None else rank, len(segments))]


def check_agreement(segment: ReadySegment, plan: Plan, timeout_s: float | None = None, *,
                    group: comm.Group | None = None) -> None:
    """Every rank (of ``group``) must run the same plan on the same model: compare fingerprints and placements.

    One small all-gather (bounded by the process group's timeout), so a rank that captured
    another model or read another plan is one clear error on every rank, not a hang.

    Raises:
        PlanError: the ranks disagree; the message names both sides.
    """
    mine = (plan.fingerprint, segment.fingerprint, segment.placement.digest())
    everyone = comm.all_gather_object(mine, "plan and placement of every rank", timeout_s, group=group)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs != first:
            raise PlanError(
                f"the ranks do not run the same plan: rank 0 has plan fingerprint {first[0]}, model {first[1]}, "
                f"placement {first[2]}, but rank {rank} has {theirs[0]}, {theirs[1]}, {theirs[2]}; start every rank "
                f"with the same plan file, model and input shapes"
            )


class AsyncDenoiser:
    """This rank's part of the asynchronous schedule; implements ``StepDenoiser``.

    Construct it on every rank after :func:`asyncdiff_partition.runtime.comm.init`, each with its
    own finished segment (:func:`~asyncdiff_partition.fx.ready.ready_segments` for torch,
    :func:`~asyncdiff_partition.onnx.segments.ready_onnx_segments` for ONNX, or a shipped file
    of :mod:`~asyncdiff_partition.fx.shipping`). Set-up checks that the segment is this rank's and
    was made for this plan and this world size, that every rank agrees (:func:`check_agreement`),
    and moves the module to this rank's device. It keeps nothing but the segment.

    ``warmup`` and ``time_shift`` may be changed between runs; they take effect at
    :meth:`reset`.

    Args:
        segment: this rank's ready segment (slot ``r`` runs segment ``min(r, N - 1)``), or all of
            them (:func:`~asyncdiff_partition.fx.ready.ready_segments`): this rank's is picked.
        plan: the plan; its N, and by default its stride and warm-up.
        input_names: every model input name, in order (``captured.inputs[i].name``).
        latent: the latent input's name (ε comes back on its device).
        warmup: W exact warm-up steps (default ``plan.warmup``).
        stride: 1 or 2 (default ``plan.stride``); the world size must be N + stride - 1.
        time_shift: condition async steps on the previous step's timestep.
        timestep_input: name of the timestep placeholder.
        timeout_s: bound on every wait for another rank (default: the process group's).
        example: model inputs by name to run the segment once at set-up (zeros for received
            values), so that the first step does not pay for first-time allocations (0.3-0.4 s
            per rank for SD 1.5 on CPU); None skips it.
        compile: run this rank's segment through ``torch.compile``
            (:func:`~asyncdiff_partition.fx.compile.compile_segment`; compiled at set-up by
            the warm-up run).
        group: run among these ranks only (a :class:`~asyncdiff_partition.runtime.comm.Group`, a
            hybrid plan's batch group, :mod:`~asyncdiff_partition.runtime.groups`); default all ranks.
        phases: an object whose ``mask`` is the exactness mask decided so far (Note [phases],
            :class:`~asyncdiff_partition.runtime.policy.PhasePolicy`); default the warm-up.
        extrapolation: λ of Note [extrapolation] (runtime/extrapolation.py); default
            ``plan.extrapolation``.
        stream: this denoiser's number among the step denoisers that run side by side in one
            loop (one per denoiser call position, Note [streams] in pipelines/wrap.py): the same
            on every rank; it keeps their messages apart.

    Raises:
        PlanError: another plan's or another rank's segment, the wrong world size, or ranks
            that disagree.
        ScheduleError: bad warm-up, or stride 2 / time_shift without a timestep input.
    """

    _inbox: list[tuple[int, str, int, list[Tensor], list[Any]]]  # posted receives: (step, value, source, buffers, works)

    def __init__(
        self,
        segment: ReadySegment | Sequence[ReadySegment],
        plan: Plan,
        *,
        input_names: Sequence[str],
        latent: str,
        warmup: int | None = None,
        stride: int | None = None,
        time_shift: bool = False,
        timestep_input: str = "timestep",
        timeout_s: float | None = None,
        example: Mapping[str, Tensor] | None = None,
        compile: bool = False,
        group: comm.Group | None = None,
        phases: Any = None,
        extrapolation: float | None = None,
        stream: int = 0,
    ):
        self._tag_base = stream * STREAM_TAGS
        if group is None and not comm.is_initialized():
            comm.init(timeout_s=timeout_s)  # under launch / torchrun: the process group of the environment
        if not isinstance(segment, ReadySegment):
            segment = segment_for_rank(list(segment))
        self._comm: Any = comm if group is None else group  # a batch group's ranks (runtime.groups)
        self.phases = phases  # a switching policy's mask (runtime.policy), re-read every step
        self.rank, self.world_size, self.device = self._comm.rank(), self._comm.world_size(), self._comm.device()
        self.n_segments = plan.n_devices
        self.stride = plan.stride if stride is None else stride
        self.warmup = plan.warmup if warmup is None else warmup
        self.time_shift, self.timestep_input, self.timeout_s = time_shift, timestep_input, timeout_s
        self._input_names = list(input_names)
        self._latent = latent
        if group is None and plan.batch_parallel > 1:
            raise PlanError(f"the plan has batch_parallel={plan.batch_parallel} batch groups; run it with "
                            f"runtime.hybrid.HybridDenoiser (AsyncDenoiser runs one group's schedule)")
        plan.check_world_size(self.world_size, self.stride, batch_parallel=1)  # this group's ranks
        plan.check_fingerprint(segment.fingerprint, where="the segment's model")
        expected = slot_segment(self.rank, self.n_segments)
        if segment.index != expected or list(segment.placement.boundaries) != list(plan.boundaries):
            raise PlanError(
                f"rank {self.rank} runs segment {expected} of boundaries {plan.boundaries}, but was handed segment "
                f"{segment.index} of boundaries {list(segment.placement.boundaries)}; give each rank "
                f"segment_for_rank(segments) of this plan's segments"
            )
        make_schedule(self.n_segments, 0, warmup=self.warmup, stride=self.stride)  # validates
        self.extrapolation = plan.extrapolation if extrapolation is None else extrapolation
        check_extrapolation(self.extrapolation, self.stride)
        check_timestep_input(timestep_input, self._input_names, stride=self.stride, time_shift=time_shift)
        check_agreement(segment, plan, timeout_s, group=group)
        if isinstance(segment.module, torch.nn.Module):
            move_module(segment.module, self.device)  # stand-ins stay one element (fx.device_move)
            if compile:
                segment = dataclasses.replace(segment, module=compile_segment(segment.module, self.device))
        # an ONNX segment runs where its session was made
        self._segment = segment
        self._layouts = segment.layouts
        if example:
            self._warm_up(example)
        self._run: SamplingRun | None = None
        self._clock = time.time() - time.perf_counter()  # perf_counter -> seconds since the epoch
        self._reset_state()

    def _warm_up(self, example: Mapping[str, Tensor]) -> None:
        segment = self._segment
        args = [example[name].to(self.device) for name in segment.inputs]
        for name in segment.receives:
            layout = self._layouts[name]
            args.append(layout.build([t.zero_() for t in layout.empty(self.device)]))
        with torch.no_grad():
            segment.module(*args)

    # --- StepDenoiser --------------------------------------------------------------------

    def reset(self, timesteps: Sequence[float | int]) -> None:
        """Start a sampling run over ``timesteps`` (the values the loop feeds the model, in order).

        Finishes the transfers of an unfinished previous run first (every rank must stop a
        run at the same step), then clears all state, the report and the spans, and waits
        for every rank: the run starts together, so a rank whose set-up took longer does not
        show up as the first step's cost on the others.
        """
        self._drain()
        self._comm.barrier("starting a sampling run")
        check_timestep_input(self.timestep_input, self._input_names, stride=self.stride, time_shift=self.time_shift)

        def remake() -> list[Step]:
            return make_schedule(self.n_segments, len(timesteps), warmup=self.warmup, stride=self.stride,
                                 time_shift=self.time_shift, exact=None if self.phases is None else self.phases.mask)

        self._run = SamplingRun(timesteps, remake(), remake=remake if self.phases is not None else None)
        self._reset_state()

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """ε of the next step; ``inputs`` by captured placeholder name, the same on every rank.

        Returns ε on the latent input's device (bit-identical on every rank).

        Raises:
            ScheduleError: no :meth:`reset`, too many steps, a timestep input other than the
                one given to :meth:`reset`, or a missing input.
            PeerError: another rank failed or did not answer in time.
        """
        run = self._run
        if run is None:
            raise ScheduleError("call reset(timesteps) before the first step of a run")
        step = run.advance(inputs, self.timestep_input)
        stats = {"step": step.index, "rank": self.rank, "compute_ms": 0.0, "wait_ms": 0.0, "comm_ms": 0.0,
                 "bytes_sent": 0}
        work = next((w for w in step.work if w.slot == self.rank), None)
        with torch.no_grad():
            if work is not None and not step.chained:
                self._collect(step.index - 1, stats)
            self._post_receives(run, step, stats)
            if work is not None:
                if step.chained:
                    self._collect(step.index, stats)
                feed = step_inputs(inputs, self.timestep_input, run.timestep_value(work, step))
                values = self._compute(feed, step, stats)
                self._send(run, step, values, stats)
                if (self.rank, step.index) in run.eps_sources:
                    self._kept[step.index] = values[OUTPUT]
            eps = self._broadcast_eps(step, stats)
            if step.index == len(run.table) - 1:
                self._drain(stats)
        self._report.append(stats)
        latent = inputs.get(self._latent)
        return eps.to(latent.device) if latent is not None else eps

    def abandon(self) -> None:
        """End the current run where it is (every rank must): finish its transfers, forget its state."""
        self._drain()
        self._run = None
        self._reset_state()

    # --- measurements ---------------------------------------------------------------------

    def report(self) -> list[dict[str, Any]]:
        """Per step of the current run: ``step, rank, compute_ms, wait_ms, comm_ms, bytes_sent``.

        ``wait_ms`` is time blocked on values from other ranks, ``comm_ms`` time spent posting
        and completing sends and in the ε broadcast (which includes waiting for its producer).
        """
        return [dict(r) for r in self._report]

    def spans(self) -> list[dict[str, Any]]:
        """Timed phases of the current run, for a Chrome trace.

        Each is ``{"name", "step", "rank", "start_s", "end_s"}``; names are ``post`` (posting
        receives), ``wait`` (for received values), ``compute``, ``send`` and ``broadcast`` (of ε);
        times are seconds since the epoch, so that the ranks of one machine line up.
        """
        return [dict(s) for s in self._spans]

    # --- one step -------------------------------------------------------------------------

    def _post_receives(self, run: SamplingRun, step: Step, stats: dict[str, Any]) -> None:
        """Post the receives of the values made at this step that this rank will read."""
        if not any(w.slot == self.rank for w in readers(run.table, step.index)):
            return
        begin = time.perf_counter()
        for name in self._segment.receives:
            src = self._segment.source(name)
            buffers = self._layouts[name].empty(self.device)
            works = self._comm.irecv(buffers, src, tag=self._tag_base + self._segment.tag(name))
            self._inbox.append((step.index, name, src, buffers, works))
        stats["comm_ms"] += self._span("post", stats, begin)

    def _collect(self, through: int, stats: dict[str, Any]) -> None:
        """Wait for the values made up to step ``through``; they become this rank's inputs."""
        if not any(made <= through for made, *_ in self._inbox):
            return
        begin = time.perf_counter()
        pending = []
        for made, name, src, buffers, works in self._inbox:
            if made > through:
                pending.append((made, name, src, buffers, works))
                continue
            self._comm.wait(works, f"value {name} of step {made} from rank {src}", self.timeout_s)
            self._history.put(name, self._layouts[name].build(buffers), made)
        self._inbox = pending
        stats["wait_ms"] += self._span("wait", stats, begin)

    def _compute(self, feed: Mapping[str, Tensor], step: Step, stats: dict[str, Any]) -> dict[str, Any]:
        segment = self._segment
        check_inputs(segment, feed, stats["step"])
        args = [feed[name].to(self.device) for name in segment.inputs]
        # a chained step reads the values made at this very step: the newest, never extrapolated
        history = self._history
        args += [history.newest(name) if step.chained else history.read(name, step.index) for name in segment.receives]
        begin = time.perf_counter()
        outputs = segment.module(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats["compute_ms"] += self._span("compute", stats, begin)
        return dict(zip(segment.outputs, outputs))

    def _send(self, run: SamplingRun, step: Step, values: dict[str, Any], stats: dict[str, Any]) -> None:
        """Send this rank's new values to the slots that read them (Note [transfers])."""
        reading = readers(run.table, step.index)
        begin = time.perf_counter()
        self._wait_sends()
        for name in self._segment.outputs:
            if name == OUTPUT:
                continue
            tensors = tensor_leaves(values[name])
            consumers = self._segment.placement.consumers(name)
            for dst in sorted({w.slot for w in reading if w.segment in consumers} - {self.rank}):
                self._sends.append((self._comm.isend(tensors, dst, tag=self._tag_base + self._segment.tag(name)), tensors, name, dst))
                stats["bytes_sent"] += sum(t.numel() * t.element_size() for t in tensors)
        stats["comm_ms"] += self._span("send", stats, begin)

    def _broadcast_eps(self, step: Step, stats: dict[str, Any]) -> Tensor:
        slot, made = step.eps
        begin = time.perf_counter()
        if slot == self.rank:
            eps = self._kept.pop(made).contiguous()
            stats["bytes_sent"] += eps.numel() * eps.element_size() * (self.world_size - 1)
        else:  # ε travels row-major whatever its layout
            (slot_of,) = [leaf for leaf in self._layouts[OUTPUT].leaves if isinstance(leaf, TensorSlot)]
            eps = torch.empty(slot_of.shape, dtype=slot_of.dtype, device=self.device)
        self._comm.broadcast(eps, slot, what=f"ε of step {step.index}")
        stats["comm_ms"] += self._span("broadcast", stats, begin)
        return eps

    # --- state ----------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._history = StaleHistory(self.extrapolation)  # the newest two received versions of each value
        self._inbox = []
        self._sends: list[tuple[list[Any], list[Tensor], str, int]] = []
        self._kept: dict[int, Tensor] = {}  # step -> this rank's model output, broadcast later
        self._report: list[dict[str, Any]] = []
        self._spans: list[dict[str, Any]] = []

    def _wait_sends(self) -> None:
        for works, _, name, dst in self._sends:
            self._comm.wait(works, f"value {name} to rank {dst}", self.timeout_s)
        self._sends = []

    def _drain(self, stats: dict[str, Any] | None = None) -> None:
        """Finish every transfer of the run (also of a run abandoned part way, on every rank)."""
        stats = stats if stats is not None else {"step": -1, "wait_ms": 0.0}
        self._wait_sends()
        if self._inbox:
            self._collect(self._inbox[-1][0], stats)

    def _span(self, name: str, stats: dict[str, Any], begin: float) -> float:
        end = time.perf_counter()
        self._spans.append({"name": name, "step": stats["step"], "rank": self.rank,
                            "start_s": self._clock + begin, "end_s": self._clock + end})
        return (end - begin) * 1e3
