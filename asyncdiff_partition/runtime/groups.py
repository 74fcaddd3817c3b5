"""Batch groups of ranks: sub-process-groups for the segment schedule, and the ε all-gather across groups.

Example (every rank, after :func:`asyncdiff_partition.runtime.comm.init`)::

    mine = make_groups(batch_parallel=2, group_size=2)   # world 4: ranks {0, 1} and {2, 3}
    AsyncDenoiser(captured, plan, group=mine.group)       # the segment schedule inside the group
    eps = mine.all_gather(eps_slice)                      # every rank: the whole batch's ε

Group g holds the global ranks ``[g n, (g + 1) n)`` (n = N + S - 1 slots), slot = rank within the
group. The ranks holding the same slot in every group form a *column*; ε of a group is on every
rank of the group (the schedule broadcasts it), so one all-gather per column gives every rank
the whole ε. Besides :mod:`~asyncdiff_partition.runtime.comm` this is the only module that
talks to ``torch.distributed``; it reuses comm's bounded waits and :class:`~asyncdiff_partition.
runtime.comm.PeerError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from asyncdiff_partition.runtime import comm

__all__ = ["GroupComm", "Groups", "make_groups"]


class GroupComm:
    """comm's transfer functions bound to one process group, in group-local ranks.

    Has the functions :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` calls on
    :mod:`~asyncdiff_partition.runtime.comm` (``rank``, ``world_size``, ``device``, ``isend``,
    ``irecv``, ``wait``, ``broadcast``, ``barrier``), so a denoiser given ``group=`` runs its
    schedule among these ranks only.
    """

    def __init__(self, ranks: Sequence[int], handle: Any):
        self.ranks, self.handle = list(ranks), handle
        self._rank = self.ranks.index(comm.rank())

    def rank(self) -> int:
        return self._rank

    def world_size(self) -> int:
        return len(self.ranks)

    def device(self) -> torch.device:
        return comm.device()

    def isend(self, tensors: Sequence[Tensor], dst: int, tag: int = 0) -> list[Any]:
        peer = self.ranks[dst]
        return [_call(f"sending to rank {peer}", dist.isend, t, peer, group=self.handle, tag=tag) for t in tensors]

    def irecv(self, tensors: Sequence[Tensor], src: int, tag: int = 0) -> list[Any]:
        peer = self.ranks[src]
        return [_call(f"receiving from rank {peer}", dist.irecv, t, peer, group=self.handle, tag=tag) for t in tensors]

    def wait(self, works: Sequence[Any], what: str, timeout: float | None = None) -> None:
        comm.wait(works, what, timeout)

    def broadcast(self, tensor: Tensor, src: int, what: str = "broadcast") -> None:
        if len(self.ranks) == 1:
            return
        peer = self.ranks[src]
        work = _call(f"{what} from rank {peer}", dist.broadcast, tensor, peer, group=self.handle, async_op=True)
        comm.wait([work], f"{what} from rank {peer}")

    def barrier(self, what: str = "barrier") -> None:
        if len(self.ranks) == 1:
            return
        token = torch.zeros(1, device=comm.device())
        work = _call(what, dist.all_reduce, token, group=self.handle, async_op=True)
        comm.wait([work], f"{what} (ranks {self.ranks})")


@dataclass
class Groups:
    """This rank's batch group and column (module docstring)."""

    index: int  # g, this rank's batch group
    group: GroupComm  # the N + S - 1 ranks of group g
    column: GroupComm  # the B ranks holding this rank's slot in every group

    def all_gather(self, tensor: Tensor, what: str = "ε") -> Tensor:
        """The column's tensors concatenated on dim 0 in group order; identical on every rank."""
        if self.column.world_size() == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.column.world_size())]
        work = _call(f"all-gather of {what}", dist.all_gather, parts, tensor, group=self.column.handle, async_op=True)
        comm.wait([work], f"all-gather of {what} (ranks {self.column.ranks})")
        return torch.cat(parts)


def make_groups(batch_parallel: int, group_size: int) -> Groups:
    """Create every batch group and column (collective: every rank calls it, in the same order).

    Raises:
        ValueError: the world is not ``batch_parallel * group_size`` ranks.
    """
    world = comm.world_size()
    if batch_parallel * group_size != world:
        raise ValueError(f"{batch_parallel} groups of {group_size} ranks need {batch_parallel * group_size} ranks, "
                         f"this run has {world}")
    me = comm.rank()
    rows = [list(range(g * group_size, (g + 1) * group_size)) for g in range(batch_parallel)]
    columns = [list(range(j, world, group_size)) for j in range(group_size)]
    handles = {}
    for ranks in rows + columns:  # new_group is collective: every rank creates every group
        key = tuple(ranks)
        if key not in handles:
            handles[key] = dist.group.WORLD if len(ranks) == world else dist.new_group(ranks)
    row = next(r for r in rows if me in r)
    column = next(c for c in columns if me in c)
    return Groups(me // group_size, GroupComm(row, handles[tuple(row)]), GroupComm(column, handles[tuple(column)]))


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - gloo and NCCL raise several kinds
        text = " ".join(str(error).split())[:300] or type(error).__name__
        raise comm.PeerError(f"rank {comm.rank()}: {what} failed ({type(error).__name__}: {text})") from error
