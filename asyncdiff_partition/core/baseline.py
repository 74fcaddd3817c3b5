"""AsyncDiff's published hand split as a plan of any profile: the baseline a balanced plan is compared with.

Example::

    hand = make_asyncdiff_plan(profile, 3, steps=50)     # AsyncDiff's SD 2.1 boundaries for N = 3
    format_plan(hand, title="AsyncDiff's hand split")
"""

from __future__ import annotations

from typing import Any

from asyncdiff_partition.core.plan import ASYNCDIFF_SD21_BOUNDARIES, Plan, PlanError, make_plan
from asyncdiff_partition.core.profile import Profile

__all__ = ["make_asyncdiff_plan"]


def make_asyncdiff_plan(profile: Profile, n_devices: int, **plan_options: Any) -> Plan:
    """AsyncDiff's hand split of the SD 2.1 UNet at ``n_devices``, as a plan of this profile.

    Args:
        profile: a profile of a model with SD 2.1's module names (any UNet2DConditionModel of that layout).
        n_devices: N; AsyncDiff published splits for 2, 3 and 4.
        plan_options: passed on to :func:`~asyncdiff_partition.core.plan.make_plan`.

    Raises:
        PlanError: no published split for ``n_devices``, or the profile lacks the split's modules.
    """
    if n_devices not in ASYNCDIFF_SD21_BOUNDARIES:
        raise PlanError(f"AsyncDiff's published SD 2.1 splits are for N = 2, 3, 4, not {n_devices}; "
                        "choose --devices 2, 3 or 4 or leave out --compare")
    return make_plan(profile, n_devices, boundaries=ASYNCDIFF_SD21_BOUNDARIES[n_devices], **plan_options)
