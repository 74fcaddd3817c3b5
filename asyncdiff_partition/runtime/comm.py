"""Process group, transfers and worker processes: the only module that talks to ``torch.distributed``.

Example::

    rank, world, device = comm.init()             # env from torchrun / elastic_launch
    works = comm.isend([h], dst=1, tag=3)         # later: comm.wait(works, "h to rank 1")
    comm.broadcast(eps, src=world - 1)
    comm.shutdown()

NCCL when CUDA is present, gloo otherwise; the device comes from ``LOCAL_RANK`` (never from
the global rank, which differs from it on every node but the first). Every blocking call is
bounded by the process-group timeout; a transfer that fails or times out raises
:class:`PeerError`, naming the peer, so that a rank whose partner died exits with the reason.
:func:`run_workers` starts the worker processes through torch's elastic agent.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "PeerError",
    "WorkersFailed",
    "barrier",
    "broadcast",
    "broadcast_object",
    "device",
    "init",
    "irecv",
    "is_initialized",
    "isend",
    "rank",
    "run_workers",
    "shutdown",
    "timeout_s",
    "wait",
    "world_size",
]

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "ASYNCDIFF_TIMEOUT_S"  # set by launch.launch for its workers

_state: dict[str, Any] = {}


class PeerError(AsyncDiffError, RuntimeError):
    """A transfer with another rank failed or timed out (the other rank is usually the cause)."""


def init(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group described by the environment; return ``(rank, world, device)``.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as
    torchrun and elastic_launch set them. Calling it again returns the same triple.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: bound on every collective and transfer; default ``$ASYNCDIFF_TIMEOUT_S``
            or :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        RuntimeError: the environment does not describe a process group.
    """
    if _state:
        return _state["rank"], _state["world"], _state["device"]
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"comm.init needs {missing} in the environment; start the workers with torchrun or "
            f"asyncdiff_partition.runtime.launch.launch"
        )
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():  # someone else made the group: use it
        pass
    elif dev.type == "cuda":
        dist.init_process_group(backend, timeout=timeout, device_id=dev)
    else:
        dist.init_process_group(backend, timeout=timeout)
    _state.update(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, timeout_s=timeout_s)
    return _state["rank"], _state["world"], dev


def shutdown() -> None:
    """Leave the process group (no-op when not joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.clear()


def is_initialized() -> bool:
    return bool(_state)


def rank() -> int:
    return _require("rank")


def world_size() -> int:
    return _require("world")


def device() -> torch.device:
    return _require("device")


def timeout_s() -> float:
    return _require("timeout_s")


def isend(tensors: Sequence[Tensor], dst: int, tag: int = 0) -> list[Any]:
    """Start sending contiguous ``tensors`` to rank ``dst``, in order; returns the works."""
    return [_call(f"sending to rank {dst}", dist.isend, t, dst, tag=tag) for t in tensors]


def irecv(tensors: Sequence[Tensor], src: int, tag: int = 0) -> list[Any]:
    """Start receiving into ``tensors`` from rank ``src``, in order; returns the works."""
    return [_call(f"receiving from rank {src}", dist.irecv, t, src, tag=tag) for t in tensors]


def wait(works: Sequence[Any], what: str, timeout: float | None = None) -> None:
    """Wait for transfers; ``what`` names them in errors (``"value add_3 from rank 1"``).

    Raises:
        PeerError: a transfer failed (the peer died, say) or did not finish within ``timeout``
            seconds (default: the process group's timeout).
    """
    limit = datetime.timedelta(seconds=timeout if timeout is not None else timeout_s())
    for work in works:
        try:
            done = work.wait(limit)
        except Exception as error:  # noqa: BLE001 - gloo and NCCL raise several kinds
            raise _peer_error(f"waiting for {what}", error) from error
        if done is False:
            raise PeerError(f"rank {rank()}: {what} did not arrive within {limit.total_seconds():g} s")


def broadcast(tensor: Tensor, src: int, what: str = "broadcast") -> None:
    """Broadcast ``tensor`` from rank ``src`` to all ranks, in place (blocking)."""
    if world_size() == 1:
        return
    work = _call(f"{what} from rank {src}", dist.broadcast, tensor, src, async_op=True)
    wait([work], f"{what} from rank {src}")


def barrier(what: str = "barrier") -> None:
    """Wait until every rank gets here (bounded by the timeout; an all-reduce of one number)."""
    if world_size() == 1:
        return
    token = torch.zeros(1, device=device())
    work = _call(what, dist.all_reduce, token, async_op=True)
    wait([work], f"{what} (all ranks)")


class WorkersFailed(AsyncDiffError, RuntimeError):
    """Workers of :func:`run_workers` failed: ``failures`` maps global rank -> (exit code, message)."""

    def __init__(self, failures: dict[int, tuple[int, str]]):
        super().__init__(f"workers failed: {failures}")
        self.failures = failures


def run_workers(
    fn: Callable[..., Any],
    args: tuple,
    *,
    nproc: int,
    nnodes: int,
    endpoint: str,
    run_id: str,
    start_method: str = "spawn",
) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` processes on this node through torch's elastic agent.

    The agent sets the environment :func:`init` reads, rendezvouses with the other nodes' agents
    at ``endpoint`` (c10d backend, this node hosts it when the address is local), and stops
    every worker when one fails; no restarts.

    Returns:
        Global rank -> return value, for this node's workers.

    Raises:
        WorkersFailed: a worker raised or died.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, rdzv_backend="c10d",
        rdzv_endpoint=endpoint, run_id=run_id, max_restarts=0, monitor_interval=0.1,
        start_method=start_method,
    )
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as error:
        raise WorkersFailed({rank: (f.exitcode, _failure_text(f)) for rank, f in error.failures.items()}) from None


def _failure_text(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):  # the error file's {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    return " ".join(str(message).split())


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - gloo and NCCL raise several kinds
        raise _peer_error(what, error) from error


def _peer_error(what: str, error: BaseException) -> PeerError:
    text = " ".join(str(error).split())[:300] or type(error).__name__
    return PeerError(f"rank {_state.get('rank', '?')}: {what} failed ({type(error).__name__}: {text})")


def _require(key: str) -> Any:
    if not _state:
        raise RuntimeError("the process group is not set up; call asyncdiff_partition.runtime.comm.init() first")
    return _state[key]


def broadcast_object(obj: Any, src: int = 0, what: str = "broadcast") -> Any:
    """``obj`` from rank ``src`` on every rank (any picklable value; blocking, bounded by the timeout)."""
    if world_size() == 1:
        return obj
    box = [obj]
    on = device() if device().type == "cuda" else None
    _call(f"{what} from rank {src}", dist.broadcast_object_list, box, src, device=on)
    return box[0]
