"""Resource checks before any rank starts: processes vs devices, temp-folder space, writable outputs.

Example::

    check_resources(world=3, ship_bytes=plan_ship_bytes(plan), out_dir="run", oversubscribe=False)

Everything here is cheap and runs in the launching process, so that a run that cannot finish
(more ranks than devices, a temp folder too small for the shipped segments, an ``--out`` that
cannot be written) fails with one line before the capture, the shipping and the sampling.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.summary import format_bytes

__all__ = ["PreflightError", "check_devices", "check_resources", "check_run", "check_temp_space", "check_writable",
           "devices_present", "plan_ship_bytes"]

# The shipped files hold the segments' weights plus the pickled graphs: a margin over the weights.
_SHIP_MARGIN = 1.1
_SHIP_EXTRA_BYTES = 16 << 20


class PreflightError(AsyncDiffError, RuntimeError):
    """The machine cannot run what was asked (devices, disk, permissions)."""


def devices_present() -> tuple[int, str]:
    """(count, what): visible CUDA devices when CUDA is available (ranks use NCCL), else usable CPU cores."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    try:
        return len(os.sched_getaffinity(0)), "CPU cores"
    except AttributeError:  # not Linux
        return os.cpu_count() or 1, "CPU cores"


def check_devices(world: int, *, oversubscribe: bool = False, present: tuple[int, str] | None = None) -> None:
    """Refuse more ranks than devices on this node unless ``oversubscribe``.

    Raises:
        PreflightError: ``world`` > the devices present.
    """
    count, what = present or devices_present()
    if world > count and not oversubscribe:
        raise PreflightError(
            f"the run needs {world} processes but this machine has {count} {what} (one rank per device); "
            f"make a plan for fewer devices, or pass --oversubscribe to start them anyway (slower)"
        )


def plan_ship_bytes(plan: Any) -> int:
    """About how many bytes shipping the plan's segments writes to the temp folder."""
    weights = sum(int(segment.param_bytes) for segment in plan.segments)
    return int(weights * _SHIP_MARGIN) + _SHIP_EXTRA_BYTES


def check_temp_space(needed: int, folder: str | None = None) -> None:
    """Refuse to ship ``needed`` bytes into a temp folder with less room.

    Raises:
        PreflightError: naming both sizes and the ``TMPDIR`` fix.
    """
    folder = folder or tempfile.gettempdir()
    try:
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise PreflightError(f"temp folder {folder!r} cannot be used ({error.strerror or error}); "
                             f"point TMPDIR at a writable folder") from None
    if free < needed:
        raise PreflightError(
            f"shipping the segments to the ranks writes about {format_bytes(needed)} to the temp folder {folder!r}, "
            f"which has {format_bytes(free)} free; free some space or point TMPDIR at a folder with room "
            f"(TMPDIR=/path/with/room asyncdiff-partition run ...)"
        )


def check_writable(folder: str | os.PathLike[str], what: str = "--out") -> None:
    """Create ``folder`` if needed, then write and remove a probe file in it.

    Raises:
        PreflightError: the folder cannot be made or written, with the reason.
    """
    path = Path(folder)
    probe = path / f".asyncdiff-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PreflightError(f"{what} folder {str(path)!r} is not writable ({reason}); choose another with {what}") from None


def check_resources(*, world: int, ship_bytes: int | None, out_dir: str | os.PathLike[str],
                    trace: str | os.PathLike[str] | None = None, oversubscribe: bool = False) -> None:
    """All checks of a run before any rank starts.

    Args:
        world: ranks this process will start (1 for a single-process run).
        ship_bytes: bytes shipped through the temp folder (None: nothing is shipped).
        out_dir: the run's output folder.
        trace: the trace file, whose folder must be writable too.
        oversubscribe: allow more ranks than devices.

    Raises:
        PreflightError: the first check that fails.
    """
    check_devices(world, oversubscribe=oversubscribe)
    check_writable(out_dir)
    if trace is not None:
        check_writable(Path(trace).parent or ".", "--trace")
    if ship_bytes is not None:
        check_temp_space(ship_bytes)


def check_run(config: Any, plan: Any, world: int) -> None:
    """:func:`check_resources` for a ``run`` (a :class:`~asyncdiff_partition.app.job.RunConfig`):
    a reference run or a rank of an outside launch starts and ships nothing."""
    from asyncdiff_partition.runtime.launch import is_launched_externally

    launching = not config.reference and not is_launched_externally()
    check_resources(world=world if launching else 1, ship_bytes=plan_ship_bytes(plan) if launching else None,
                    out_dir=config.out_dir, trace=config.trace, oversubscribe=config.oversubscribe)
