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

from asyncdiff_partition.core.errors import AsyncDiffError, UsageError
from asyncdiff_partition.runtime import staging

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "Group",
    "PeerError",
    "WorkersFailed",
    "all_gather",
    "all_gather_object",
    "barrier",
    "broadcast",
    "broadcast_object",
    "device",
    "init",
    "irecv",
    "is_initialized",
    "isend",
    "new_group",
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


def init(backend: str | None = None, timeout_s: float | None = None,
         device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """Join the process group described by the environment; return ``(rank, world, device)``.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as
    torchrun and elastic_launch set them. Calling it again returns the same triple.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: bound on every collective and transfer; default ``$ASYNCDIFF_TIMEOUT_S``
            or :data:`DEFAULT_TIMEOUT_S`.
        device: where this rank's tensors live; default ``cuda:LOCAL_RANK`` with NCCL, else
            CPU. A CUDA device with gloo (several ranks on one GPU) stages every transfer
            through host memory (:mod:`~asyncdiff_partition.runtime.staging`).

    Raises:
        RuntimeError: the environment does not describe a process group.
    """
    if _state:
        return _state["rank"], _state["world"], _state["device"]
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(
            f"comm.init needs {missing} in the environment; start the workers with torchrun or "
            f"asyncdiff_partition.runtime.launch.launch"
        )
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():  # someone else made the group: use it
        pass
    elif backend == "nccl":
        dist.init_process_group(backend, timeout=timeout, device_id=dev)
    else:
        dist.init_process_group(backend, timeout=timeout)
    _state.update(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, timeout_s=timeout_s,
                  staged=staging.use_staging(backend, dev))
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


def isend(tensors: Sequence[Tensor], dst: int, tag: int = 0, *, group: Any = None) -> list[Any]:
    """Start sending contiguous ``tensors`` to (global) rank ``dst``, in order; returns the works."""
    if _state.get("staged"):
        hosts = [staging.to_host(t) for t in tensors]
        return [staging.Landing(_call(f"sending to rank {dst}", dist.isend, h, dst, group=group, tag=tag), h)
                for h in hosts]
    return [_call(f"sending to rank {dst}", dist.isend, t, dst, group=group, tag=tag) for t in tensors]


def irecv(tensors: Sequence[Tensor], src: int, tag: int = 0, *, group: Any = None) -> list[Any]:
    """Start receiving into ``tensors`` from (global) rank ``src``, in order; returns the works."""
    if _state.get("staged"):
        return [staging.Landing(_call(f"receiving from rank {src}", dist.irecv, h, src, group=group, tag=tag), h, t)
                for h, t in ((staging.host_buffer(t), t) for t in tensors)]
    return [_call(f"receiving from rank {src}", dist.irecv, t, src, group=group, tag=tag) for t in tensors]


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


def broadcast(tensor: Tensor, src: int, what: str = "broadcast", *, group: Group | None = None) -> None:
    """Broadcast ``tensor`` from (global) rank ``src`` to all ranks (of ``group``), in place (blocking)."""
    if (world_size() if group is None else len(group.ranks)) == 1:
        return
    handle = None if group is None else group.handle
    if _state.get("staged"):
        host = staging.to_host(tensor) if rank() == src else staging.host_buffer(tensor)
        work = staging.Landing(_call(f"{what} from rank {src}", dist.broadcast, host, src, group=handle,
                                     async_op=True), host, None if rank() == src else tensor)
    else:
        work = _call(f"{what} from rank {src}", dist.broadcast, tensor, src, group=handle, async_op=True)
    wait([work], f"{what} from rank {src}")


def barrier(what: str = "barrier", *, group: Group | None = None) -> None:
    """Wait until every rank (of ``group``) gets here (bounded by the timeout; an all-reduce of one number)."""
    if (world_size() if group is None else len(group.ranks)) == 1:
        return
    token = torch.zeros(1, device="cpu" if _state.get("staged") else device())
    work = _call(what, dist.all_reduce, token, group=None if group is None else group.handle, async_op=True)
    wait([work], f"{what} ({'all ranks' if group is None else f'ranks {group.ranks}'})")


def all_gather(tensor: Tensor, what: str = "all-gather", *, group: Group | None = None) -> Tensor:
    """Every rank's (of ``group``) ``tensor`` concatenated on dim 0 in rank order; identical on every rank."""
    size = world_size() if group is None else len(group.ranks)
    if size == 1:
        return tensor
    staged = bool(_state.get("staged"))
    mine = staging.to_host(tensor.contiguous()) if staged else tensor.contiguous()
    parts = [torch.empty_like(mine) for _ in range(size)]
    work = _call(f"all-gather of {what}", dist.all_gather, parts, mine,
                 group=None if group is None else group.handle, async_op=True)
    wait([work], f"all-gather of {what} ({'all ranks' if group is None else f'ranks {group.ranks}'})")
    gathered = torch.cat(parts)
    return gathered.to(tensor.device) if staged else gathered


def all_gather_object(obj: Any, what: str = "all-gather", timeout: float | None = None, *,
                      group: Group | None = None) -> list[Any]:
    """Every rank's (of ``group``) ``obj`` (small and picklable), in rank order (bounded by the timeout).

    Each rank's pickle travels as a byte tensor: lengths first, then the padded bytes, so that
    every wait is one of :func:`wait`'s.
    """
    import pickle

    n = world_size() if group is None else len(group.ranks)
    if n == 1:
        return [obj]
    handle = None if group is None else group.handle
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device())
    sizes = [torch.zeros(1, dtype=torch.int64, device=device()) for _ in range(n)]
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device())
    wait([_call(what, dist.all_gather, sizes, size, group=handle, async_op=True)], f"{what} (sizes)", timeout)
    longest = int(max(int(t.item()) for t in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device())
    padded[: data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device()) for _ in range(n)]
    wait([_call(what, dist.all_gather, gathered, padded, group=handle, async_op=True)], what, timeout)
    return [pickle.loads(bytes(t[: int(n.item())].cpu().tolist())) for t, n in zip(gathered, sizes)]


class Group:
    """Some of the ranks as their own process group, with comm's transfer functions in group-local ranks.

    Made by :func:`new_group`. It has the functions
    :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` calls on this module (``rank``,
    ``world_size``, ``device``, ``isend``, ``irecv``, ``wait``, ``broadcast``, ``barrier``), so a
    denoiser given ``group=`` runs its schedule among these ranks only; ranks passed to it are
    positions in :attr:`ranks`.
    """

    def __init__(self, ranks: Sequence[int], handle: Any):
        self.ranks, self.handle = list(ranks), handle

    def rank(self) -> int:
        return self.ranks.index(rank())

    def world_size(self) -> int:
        return len(self.ranks)

    def device(self) -> torch.device:
        return device()

    def isend(self, tensors: Sequence[Tensor], dst: int, tag: int = 0) -> list[Any]:
        return isend(tensors, self.ranks[dst], tag, group=self.handle)

    def irecv(self, tensors: Sequence[Tensor], src: int, tag: int = 0) -> list[Any]:
        return irecv(tensors, self.ranks[src], tag, group=self.handle)

    def wait(self, works: Sequence[Any], what: str, timeout: float | None = None) -> None:
        wait(works, what, timeout)

    def broadcast(self, tensor: Tensor, src: int, what: str = "broadcast") -> None:
        broadcast(tensor, self.ranks[src], what, group=self)

    def barrier(self, what: str = "barrier") -> None:
        barrier(what, group=self)

    def all_gather(self, tensor: Tensor, what: str = "all-gather") -> Tensor:
        return all_gather(tensor, what, group=self)


def new_group(ranks: Sequence[int]) -> Group:
    """A :class:`Group` of ``ranks`` (collective: every rank calls it, for every group, in the same order)."""
    ranks = list(ranks)
    handle = dist.group.WORLD if len(ranks) == world_size() else dist.new_group(ranks)
    return Group(ranks, handle)


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
        raise UsageError("the process group is not set up; call asyncdiff_partition.runtime.comm.init() first")
    return _state[key]


def broadcast_object(obj: Any, src: int = 0, what: str = "broadcast") -> Any:
    """``obj`` from rank ``src`` on every rank (any picklable value; blocking, bounded by the timeout)."""
    if world_size() == 1:
        return obj
    box = [obj]
    on = device() if device().type == "cuda" else None
    _call(f"{what} from rank {src}", dist.broadcast_object_list, box, src, device=on)
    return box[0]
