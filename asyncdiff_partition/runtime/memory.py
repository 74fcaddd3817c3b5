"""How much memory this process holds: resident now and at its peak, and on CUDA the peak allocated.

Example::

    memory_counters(model=pipe.unet)   # {"param_bytes": ..., "rss": ..., "peak_rss": ..., "cuda_peak_allocated": ...}
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["memory_counters", "parameter_bytes", "peak_resident_bytes", "resident_bytes"]


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int | None:
    """This process's peak resident memory so far (Linux ``VmHWM``; None elsewhere).

    Not ``ru_maxrss``: a spawned worker inherits its parent's through ``execve``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parameter_bytes(module: Any) -> int:
    """Bytes of the parameters and buffers ``module`` really holds (weight stand-ins count one element)."""
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        stored = t.untyped_storage().nbytes() if t.numel() else 0
        total += min(stored, t.numel() * t.element_size())
    return total


def memory_counters(model: Any = None) -> dict[str, int | None]:
    """This process's memory: resident now and at peak; on CUDA the peak allocated; ``model``'s weights held."""
    import torch

    counters: dict[str, int | None] = {"rss": resident_bytes(), "peak_rss": peak_resident_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        counters["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated())
    if model is not None:
        counters["param_bytes"] = parameter_bytes(model)
    return counters
