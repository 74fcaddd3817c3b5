"""Batch groups of ranks: the sub-groups a hybrid plan's segment schedules run in, and the ε all-gather across them.

Example (every rank, after :func:`asyncdiff_partition.runtime.comm.init`)::

    mine = make_groups(batch_parallel=2, group_size=2)     # world 4: ranks {0, 1} and {2, 3}
    AsyncDenoiser(segment, plan, ..., group=mine.group)     # the segment schedule inside the group
    eps = mine.all_gather(eps_slice)                        # every rank: the whole batch's ε

Group g holds the global ranks ``[g n, (g + 1) n)`` (n = N + S - 1 slots), slot = rank within the
group. The ranks holding the same slot in every group form a *column*; ε of a group is on every
rank of the group (the schedule broadcasts it), so one all-gather per column gives every rank
the whole ε. The process groups themselves are :class:`~asyncdiff_partition.runtime.comm.Group`
(:mod:`~asyncdiff_partition.runtime.comm` is the one module that talks to ``torch.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from asyncdiff_partition.core.errors import UsageError
from asyncdiff_partition.runtime import comm

__all__ = ["Groups", "make_groups"]


@dataclass
class Groups:
    """This rank's batch group and column (module docstring)."""

    index: int  # g, this rank's batch group
    group: comm.Group  # the N + S - 1 ranks of group g
    column: comm.Group  # the B ranks holding this rank's slot in every group

    def all_gather(self, tensor: Tensor, what: str = "ε") -> Tensor:
        """The column's tensors concatenated on dim 0 in group order; identical on every rank."""
        return self.column.all_gather(tensor, what)


def make_groups(batch_parallel: int, group_size: int) -> Groups:
    """Create every batch group and column (collective: every rank calls it, in the same order).

    Raises:
        UsageError: the world is not ``batch_parallel * group_size`` ranks.
    """
    world = comm.world_size()
    if batch_parallel * group_size != world:
        raise UsageError(f"{batch_parallel} groups of {group_size} ranks need {batch_parallel * group_size} ranks, "
                         f"this run has {world}")
    me = comm.rank()
    rows = [list(range(g * group_size, (g + 1) * group_size)) for g in range(batch_parallel)]
    columns = [list(range(j, world, group_size)) for j in range(group_size)]
    made: dict[tuple[int, ...], comm.Group] = {}
    for ranks in rows + columns:  # new_group is collective: every rank creates every group
        if tuple(ranks) not in made:
            made[tuple(ranks)] = comm.new_group(ranks)
    row = next(r for r in rows if me in r)
    column = next(c for c in columns if me in c)
    return Groups(me // group_size, made[tuple(row)], made[tuple(column)])
