"""Hybrid parallelism on B x (N + S - 1) ranks: batch groups, each running the segment schedule on its slice.

Example (every rank runs the same loop; ``captured_slice`` is the denoiser captured at the
*sliced* batch, batch / B, and the plan was made from that capture's profile)::

    comm.init()
    plan = Plan.load("plan.json")                                       # plan.batch_parallel = B
    segments = ready_segments(captured_slice, plan, world_size=comm.world_size())
    denoiser = HybridDenoiser(segment_for_hybrid_rank(segments, plan), plan,
                              input_names=[s.name for s in captured_slice.inputs], latent="sample")
    denoiser.reset(scheduler.timesteps)
    for t in scheduler.timesteps:
        eps = denoiser(inputs_at_the_full_batch)       # the same whole ε on every rank
        x = scheduler.step(eps, t, x).prev_sample
    denoiser.phase_report()                           # which steps ran exact / async, and why

Rank r belongs to batch group r // (N + S - 1) (:mod:`~asyncdiff_partition.runtime.groups`). Each
group slices the denoiser batch (Note [batch slices], :mod:`~asyncdiff_partition.runtime.batch`),
runs an :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` among its own ranks on the
slice, and the groups all-gather ε every step, so every rank runs the same pipeline loop. One
:class:`~asyncdiff_partition.runtime.policy.PhasePolicy` per rank decides, from the gathered ε, which
steps run exact and which asynchronously (Notes [phases], [adaptive phases]); every rank sees the
same ε, so every rank decides the same. B = 2, N = 1 is plain CFG-parallel: exact, no stale values.
:class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` with ``batch_parallel=B`` and the
same ``phases`` gives the same ε at every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.plan import Plan
from asyncdiff_partition.core.schedule import n_slots, slot_segment
from asyncdiff_partition.fx.layout import ReadySegment, TensorSlot
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.batch import split_batch
from asyncdiff_partition.runtime.denoiser import AsyncDenoiser, check_agreement
from asyncdiff_partition.runtime.groups import make_groups
from asyncdiff_partition.runtime.policy import PhasePolicy, check_phases

__all__ = ["HybridDenoiser", "is_hybrid", "rank_denoiser", "rank_segment_index", "segment_for_hybrid_rank"]


def is_hybrid(plan: Plan) -> bool:
    """Whether a plan runs as batch groups or with a switching policy (:class:`HybridDenoiser`)."""
    return bool(plan.batch_parallel > 1 or plan.phases is not None)


def rank_segment_index(plan: Plan, rank: int, stride: int | None = None) -> int:
    """The segment rank ``rank`` runs: its slot within its batch group; the stride-2 extra slot runs the last."""
    return slot_segment(rank % n_slots(plan.n_devices, plan.stride if stride is None else stride), plan.n_devices)


def rank_denoiser(segment: ReadySegment, plan: Plan, **options: Any) -> AsyncDenoiser | HybridDenoiser:
    """The step denoiser of one rank, for any plan: the one factory of plain and batch-group ranks.

    ``options`` are :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser`'s keywords.
    """
    if is_hybrid(plan):
        return HybridDenoiser(segment, plan, **options)
    return AsyncDenoiser(segment, plan, **options)


def segment_for_hybrid_rank(segments: Sequence[ReadySegment], plan: Plan, rank: int | None = None,
                            stride: int | None = None) -> ReadySegment:
    """This rank's segment under a hybrid plan: its slot within its batch group (module docstring)."""
    return segments[rank_segment_index(plan, comm.rank() if rank is None else rank, stride)]


class HybridDenoiser:
    """This rank's part of a hybrid plan; implements ``StepDenoiser``.

    Args:
        segment: this rank's ready segment, made from the model captured at the sliced batch
            (batch / B rows; :func:`segment_for_hybrid_rank`).
        plan: the plan (``batch_parallel`` B, N, S, W, ``phases``).
        phases: the switching policy (default ``plan.phases``; None there: the warm-up).
        input_names, latent, warmup, stride, time_shift, timestep_input, timeout_s, example,
            compile: as for :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser`.
        batch_parallel: B (default ``plan.batch_parallel``).
        branches: guidance branches in the batch, for the adaptive policy's delta (default max(B, 2)).

    Raises:
        PlanError: the world is not B x (N + S - 1) ranks, or the plan does not fit the model.
        BatchSplitError: (when called) a denoiser batch that does not split into B groups of
            the captured rows, before any compute.
    """

    def __init__(
        self,
        segment: ReadySegment,
        plan: Plan,
        *,
        input_names: Sequence[str],
        latent: str,
        phases: Mapping[str, Any] | None = None,
        warmup: int | None = None,
        stride: int | None = None,
        time_shift: bool = False,
        timestep_input: str = "timestep",
        timeout_s: float | None = None,
        example: Mapping[str, Tensor] | None = None,
        compile: bool = False,
        batch_parallel: int | None = None,
        branches: int | None = None,
        stream: int = 0,
    ):
        self.batch_parallel = plan.batch_parallel if batch_parallel is None else batch_parallel
        stride = plan.stride if stride is None else stride
        warmup = plan.warmup if warmup is None else warmup
        plan.check_world_size(comm.world_size(), stride, batch_parallel=self.batch_parallel)
        self.groups = make_groups(self.batch_parallel, n_slots(plan.n_devices, stride))
        self.policy = PhasePolicy(plan.phases if phases is None else phases, warmup=warmup,
                                  stride=stride, branches=branches or max(self.batch_parallel, 2))
        self._latent = latent
        eps = next(iter(segment.layouts[OUTPUT].leaves), None)  # ε has the captured (sliced) rows
        self._rows = int(eps.shape[0]) if isinstance(eps, TensorSlot) and eps.shape else None
        check_agreement(segment, plan, timeout_s)  # every group's ranks, not only this group's (the inner one)
        self.inner = AsyncDenoiser(segment, plan, input_names=input_names, latent=latent, warmup=warmup,
                                   stride=stride, time_shift=time_shift, timestep_input=timestep_input,
                                   timeout_s=timeout_s, example=example, compile=compile, group=self.groups.group,
                                   phases=self.policy, stream=stream)
        self._gather_bytes: list[int] = []

    @property
    def rank(self) -> int:
        return comm.rank()

    @property
    def warmup(self) -> int:
        """W; may be changed between runs (takes effect at :meth:`reset`)."""
        return self.inner.warmup

    @warmup.setter
    def warmup(self, warmup: int) -> None:
        self.inner.warmup = self.policy.warmup = warmup

    def abandon(self) -> None:
        """End the current run where it is (every rank must)."""
        self.inner.abandon()

    @property
    def phases(self) -> dict[str, Any]:
        """The switching policy's spec; may be changed between runs (takes effect at :meth:`reset`)."""
        return self.policy.spec

    @phases.setter
    def phases(self, phases: Mapping[str, Any] | None) -> None:
        self.policy.spec = check_phases(phases)

    def reset(self, timesteps: Sequence[float | int]) -> None:
        """Start a sampling run over ``timesteps`` on every rank (see ``AsyncDenoiser.reset``)."""
        self.policy.reset(len(timesteps))
        self.inner.reset(timesteps)
        self._gather_bytes = []
        self._step = 0

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """ε of the next step for the whole batch, bit-identical on every rank.

        Raises:
            BatchSplitError: the batch does not split into B groups of the captured rows.
            ScheduleError, PeerError: as ``AsyncDenoiser.__call__``.
        """
        part = split_batch(inputs, self.batch_parallel, self.groups.index, latent=self._latent, rows=self._rows)
        eps = self.groups.all_gather(self.inner(part), what=f"ε of step {self._step}")
        sent = eps.numel() // self.batch_parallel * eps.element_size() if self.batch_parallel > 1 else 0
        self._gather_bytes.append(sent)
        self.policy.observe(self._step, eps)
        self._step += 1
        return eps

    def report(self) -> list[dict[str, Any]]:
        """``AsyncDenoiser.report`` of this rank with ``group``, ``mode`` and the all-gather's bytes added."""
        modes = self.policy.record()
        rows = self.inner.report()
        for row, sent in zip(rows, self._gather_bytes):
            row.update(group=self.groups.index, mode=modes[row["step"]]["mode"], gather_bytes=sent)
            row["bytes_sent"] += sent
        return rows

    def spans(self) -> list[dict[str, Any]]:
        return self.inner.spans()

    def phase_report(self) -> dict[str, Any]:
        """The switching policy and, per step, the mode, measured delta and reason (for the run report)."""
        return {"batch_parallel": self.batch_parallel, "policy": self.policy.spec, "steps": self.policy.record()}
