"""Gloo transfers of CUDA tensors staged through host memory (several ranks on one GPU).

NCCL refuses two ranks on one device, and gloo's point-to-point transport reads and writes
host memory. So a process group of ``gloo`` ranks whose tensors live on a CUDA device (the
device check's two ranks on one GPU, or a GPU shared by more ranks than it has NCCL slots)
is *staged*: :mod:`~asyncdiff_partition.runtime.comm` sends a host copy of every tensor,
receives into a host buffer that is copied to the device tensor when the transfer is waited
for, and broadcasts through a host copy. This module holds those copies and the rule of
when to stage; comm stays the only module that talks to ``torch.distributed``.

    backend  device  staged
    nccl     cuda    no
    gloo     cpu     no   (``ASYNCDIFF_STAGE=1`` stages anyway: tests take this path on CPU)
    gloo     cuda    yes
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["STAGE_ENV", "Landing", "host_buffer", "to_host", "use_staging"]

STAGE_ENV = "ASYNCDIFF_STAGE"


def use_staging(backend: str, device: torch.device) -> bool:
    """Whether a group of this backend with tensors on this device stages through host memory."""
    if backend != "gloo":
        return False
    return device.type != "cpu" or os.environ.get(STAGE_ENV, "") == "1"


def to_host(tensor: Tensor) -> Tensor:
    """A host copy of ``tensor`` to send (always a copy: the caller may reuse its tensor)."""
    return tensor.detach().to("cpu", copy=True)


def host_buffer(tensor: Tensor) -> Tensor:
    """An empty host tensor to receive what will be copied into ``tensor``."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")


class Landing:
    """A transfer into (or from) a host copy; :meth:`wait` finishes it and lands the data.

    Behaves as the work it wraps for :func:`~asyncdiff_partition.runtime.comm.wait`. The host
    tensor is kept alive until the transfer is waited for. With ``target``, the received
    host data is copied into it (on its device) once the transfer is done.
    """

    def __init__(self, work: Any, host: Tensor, target: Tensor | None = None):
        self.work, self.host, self.target = work, host, target

    def wait(self, timeout: datetime.timedelta | None = None) -> Any:
        done = self.work.wait(timeout) if timeout is not None else self.work.wait()
        if done is not False and self.target is not None:
            self.target.copy_(self.host)
            self.target = None  # land once
        return done
