"""Starting the ranks: ``entrypoint(*args)`` on N new processes through torch's elastic agent.

A worker that raises is written down (rank, error, time) in a folder the workers share, so the
launching process can name the rank whose failure came first, not the peers that only lost it.

    results = launch(run_worker, (config,), nproc=2, timeout_s=60)   # {rank: return value}
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.files import write_json_atomic
from asyncdiff_partition.runtime import comm

__all__ = ["LaunchError", "is_launched_externally", "launch"]


class LaunchError(AsyncDiffError, RuntimeError):
    """A worker of :func:`launch` failed; ``rank`` and ``error`` name the first (root) failure."""

    def __init__(self, message: str, rank: int, error: str, failures: dict[int, str]):
        super().__init__(message)
        self.rank, self.error, self.failures = rank, error, failures


def is_launched_externally() -> bool:
    """True inside a worker that an outside ``torchrun`` (or any elastic agent) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(
    entrypoint: Callable[..., Any],
    args: tuple = (),
    nproc: int = 1,
    *,
    nnodes: int = 1,
    timeout_s: float = 60.0,
    rdzv_endpoint: str = "127.0.0.1:0",
    rdzv_id: str | None = None,
    start_method: str = "spawn",
) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` on ``nproc`` new processes of this node (torch elastic agent).

    Each worker finds its rank and peers in the environment (:func:`asyncdiff_partition.runtime.comm.init`),
    with ``timeout_s`` as the process group's bound on every wait. When one worker raises, the
    agent stops the others and this raises :class:`LaunchError` with one line naming the
    rank and the error that came first; errors of ranks that only lost their peer
    (:class:`~asyncdiff_partition.runtime.comm.PeerError`) count as consequences, not causes.

    Example:
        >>> launch(my_worker, (plan_path,), nproc=3)  # doctest: +SKIP
        {0: ..., 1: ..., 2: ...}

    Args:
        entrypoint: a module-level function (it is pickled by name for ``spawn``).
        args: its arguments (pickled; a :class:`CapturedModel` can be among them).
        nproc: processes on this node.
        nnodes: nodes; with more than one, every node runs ``launch`` with the same
            ``rdzv_endpoint`` (a fixed port) and ``rdzv_id``.
        timeout_s: process-group timeout for the workers.
        rdzv_endpoint: ``host:port`` of the rendezvous; port 0 picks a free port (one node only).
        rdzv_id: rendezvous id shared by the nodes; default a fresh one (one node only).
        start_method: ``spawn`` (default), ``fork`` or ``forkserver``.

    Returns:
        Global rank -> the entrypoint's return value, for this node's workers.

    Raises:
        ConfigError: bad arguments.
        LaunchError: a worker failed.
    """
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"need nproc >= 1 and nnodes >= 1, got nproc={nproc}, nnodes={nnodes}")
    host, _, port = rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"rdzv_endpoint must be host:port, got {rdzv_endpoint!r}")
    if nnodes > 1 and (port == "0" or rdzv_id is None):
        raise ConfigError("with several nodes, give every node the same rdzv_endpoint with a fixed port and the same rdzv_id")
    if port == "0":
        port = str(_free_port(host))
    errors = tempfile.mkdtemp(prefix="asyncdiff-launch-")
    try:
        return comm.run_workers(
            _worker, (entrypoint, tuple(args), errors, float(timeout_s)), nproc=nproc, nnodes=nnodes,
            endpoint=f"{host}:{port}", run_id=rdzv_id or uuid.uuid4().hex, start_method=start_method,
        )
    except comm.WorkersFailed as failed:
        raise _launch_error(failed.failures, errors) from None
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _worker(entrypoint: Callable[..., Any], args: tuple, errors: str, timeout_s: float) -> Any:
    """Runs in each worker: the entrypoint, with its failure written down for :func:`launch`."""
    os.environ[comm.TIMEOUT_ENV] = str(timeout_s)
    try:
        result = entrypoint(*args)
    except BaseException as error:
        rank = int(os.environ.get("RANK", "-1"))
        record = {"rank": rank, "error": f"{type(error).__name__}: {' '.join(str(error).split())}",
                  "time": time.time(), "peer": isinstance(error, comm.PeerError)}
        path = os.path.join(errors, f"rank{rank}.json")
        write_json_atomic(path, record)
        raise
    comm.shutdown()
    return result


def _launch_error(failures: dict[int, tuple[int, str]], errors: str) -> LaunchError:
    records = []
    for name in os.listdir(errors):
        if name.endswith(".json"):
            with open(os.path.join(errors, name), encoding="utf-8") as file:
                records.append(json.load(file))
    if records:  # causes before consequences, then the earliest
        first = min(records, key=lambda r: (r["peer"], r["time"]))
        rank, error = first["rank"], first["error"]
    else:  # died without raising (a signal, os._exit): what the agent saw
        rank = min(failures)
        code, text = failures[rank]
        error = f"exit code {code}" + (f" ({text})" if text and "elastic/errors.html" not in text else "")
    others = sorted((set(failures) | {r["rank"] for r in records}) - {rank})
    tail = f" (then {'rank' if len(others) == 1 else 'ranks'} {', '.join(map(str, others))} failed too)" if others else ""
    return LaunchError(f"rank {rank} failed: {error}{tail}", rank, error,
                       {r: text for r, (_, text) in failures.items()})


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
