"""Ranks that stay up: N worker processes in one process group, running the commands the launching process sends.

Example::

    pool = RankPool(2, make_handler, (folder,), timeout_s=60)   # processes start, each builds its handler
    replies = pool.call(("sample", kwargs))                      # {rank: reply}; every rank gets every command
    pool.close()                                                  # every process ended, none left behind

Note [persistent ranks]
~~~~~~~~~~~~~~~~~~~~~~~
:func:`~asyncdiff_partition.runtime.launch.launch` runs one function on its ranks and returns; a
service keeps its ranks. A pool starts N processes itself, with the start method ``launch`` uses
(spawn, or the fork server of Note [forkserver]); each is given its rank, the world size and a free
rendezvous port as arguments (not through the launching process's environment), joins the process
group, connects back to the launching process over an authenticated connection on 127.0.0.1 and
builds its handler. Every command goes to every rank and every rank answers, in order. A handler
that raises answers with the error and its rank stays up, unless the error is a peer's
(:class:`~asyncdiff_partition.runtime.comm.PeerError`: the process group is broken), then the rank
exits. A rank whose launching process goes away (its connection closes) exits; the launching
process ends its ranks at :meth:`RankPool.close`, at interpreter exit and when the pool is
garbage collected: none is left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.launch import DEBUG_ENV, process_context

__all__ = ["RankError", "RankPool"]

_STOP = "__stop__"
_POLL_S = 0.05


class RankError(AsyncDiffError, RuntimeError):
    """A rank of a pool failed a command, died or stopped answering; ``rank`` and ``error`` name the cause.

    ``broken`` is True when the pool cannot take another command (a rank is gone, or the process
    group is broken): start a new one.
    """

    def __init__(self, message: str, rank: int, error: str, broken: bool):
        super().__init__(message)
        self.rank, self.error, self.broken = rank, error, broken


class RankPool:
    """``nproc`` ranks that stay up, each with the handler ``setup(*args)`` built in it (Note [persistent ranks]).

    Args:
        nproc: ranks (one process each).
        setup: a module-level function run in every rank after it joined the process group; it
            returns the handler, called with each command and returning that rank's reply.
        args: its arguments (pickled).
        timeout_s: the process group's bound on every wait between ranks.
        start_timeout_s: bound on the start of every rank, its handler's set-up included.
        start_method: ``spawn`` or ``forkserver`` (default: as :func:`~asyncdiff_partition.runtime.launch.launch`).

    Raises:
        RankError: a rank failed to start or to build its handler.
    """

    def __init__(self, nproc: int, setup: Callable[..., Callable[[Any], Any]], args: tuple = (), *,
                 timeout_s: float = 60.0, start_timeout_s: float = 600.0, start_method: str | None = None):
        authkey = secrets.token_bytes(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        context, environment = process_context(start_method, setup)
        port = _free_port()
        self.nproc = nproc
        self.processes = [context.Process(
            target=_rank_main, daemon=True, name=f"asyncdiff-rank-{rank}",
            args=(rank, nproc, port, self.listener.address, authkey, setup, tuple(args), float(timeout_s), environment))
            for rank in range(nproc)]
        self.connections: dict[int, Connection] = {}
        self.closed = False
        self._finalizer = weakref.finalize(self, _end, self.processes, self.connections, self.listener)
        for process in self.processes:
            process.start()
        try:
            self._accept(start_timeout_s)
            self._collect(start_timeout_s, "starting")
        except BaseException:
            self.close()
            raise

    def _accept(self, timeout_s: float) -> None:
        """Each rank connects and says which it is; a rank that dies first is an error at once."""
        accepted: list[Connection] = []

        def accept() -> None:
            with contextlib.suppress(OSError):
                while len(accepted) < self.nproc:
                    accepted.append(self.listener.accept())

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and time.monotonic() < deadline:
            dead = [r for r, p in enumerate(self.processes) if p.exitcode is not None]
            if dead:
                raise RankError(f"rank {dead[0]} exited with code {self.processes[dead[0]].exitcode} while starting",
                                dead[0], f"exit code {self.processes[dead[0]].exitcode}", True)
            thread.join(_POLL_S)
        if len(accepted) < self.nproc:
            raise RankError(f"only {len(accepted)} of {self.nproc} ranks connected within {timeout_s:.0f} s", len(accepted),
                            "no connection", True)
        for connection in accepted:
            rank = connection.recv()
            self.connections[rank] = connection

    def call(self, message: Any, *, timeout_s: float | None = None, ranks: list[int] | None = None) -> dict[int, Any]:
        """Send ``message`` to every rank (or to ``ranks``); their replies, by rank.

        Raises:
            RankError: a rank's handler raised (the cause first: a rank's own error before its
                peers' lost waits), a rank died, or none answered within ``timeout_s``.
        """
        self.send(message, ranks)
        return self.collect(ranks, timeout_s=timeout_s)

    def send(self, message: Any, ranks: list[int] | None = None) -> None:
        """Send ``message`` to every rank (or to ``ranks``) without waiting; :meth:`collect` takes the replies.

        Every rank answers every message, in order: collect before sending a rank another message.
        """
        if self.closed:
            raise RankError("the ranks were closed; start new ones", 0, "closed", True)
        for rank in range(self.nproc) if ranks is None else ranks:
            try:
                self.connections[rank].send(message)
            except OSError as error:
                raise RankError(f"rank {rank} cannot be reached: {error}", rank, str(error), True) from None

    def collect(self, ranks: list[int] | None = None, *, timeout_s: float | None = None) -> dict[int, Any]:
        """The replies of every rank (or of ``ranks``) to the message sent last (:meth:`send`).

        Raises:
            RankError: as :meth:`call`.
        """
        try:
            return self._collect(timeout_s, "running a command", ranks)
        except RankError:
            raise
        except BaseException:  # interrupted while the ranks work: their answers would come out of step
            self.close()
            raise

    def _collect(self, timeout_s: float | None, what: str, ranks: list[int] | None = None) -> dict[int, Any]:
        replies: dict[int, tuple] = {}
        wanted = list(range(self.nproc)) if ranks is None else list(ranks)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(replies) < len(wanted):
            for rank in wanted:
                connection = self.connections[rank]
                if rank in replies:
                    continue
                try:
                    if connection.poll(_POLL_S / len(wanted)):
                        replies[rank] = connection.recv()
                        continue
                except (EOFError, OSError):
                    pass
                else:
                    if self.processes[rank].exitcode is None:
                        continue
                code = self.processes[rank].exitcode
                self.processes[rank].join(1)
                raise RankError(f"rank {rank} died while {what} (exit code {self.processes[rank].exitcode})", rank,
                                f"exit code {code}", True)
            if deadline is not None and time.monotonic() > deadline:
                silent = sorted(set(wanted) - set(replies))
                raise RankError(f"rank {silent[0]} did not answer within {timeout_s:.0f} s while {what}", silent[0],
                                "no answer", True)
        failed = {rank: reply for rank, reply in replies.items() if reply[0] == "error"}
        if failed:
            own = [r for r, reply in failed.items() if not reply[2]]
            rank = min(own) if own else min(failed)
            broken = any(reply[2] for reply in failed.values())
            others = sorted(set(failed) - {rank})
            tail = f" (then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)" if others else ""
            raise RankError(f"rank {rank} failed: {failed[rank][1]}{tail}", rank, failed[rank][1], broken)
        return {rank: reply[1] for rank, reply in sorted(replies.items())}

    def alive(self) -> bool:
        return not self.closed and all(p.exitcode is None for p in self.processes)

    def close(self, timeout_s: float = 10.0) -> None:
        """End every rank: a stop command, then SIGTERM, then SIGKILL; no process is left."""
        if self.closed:
            return
        self.closed = True
        _end(self.processes, self.connections, self.listener, timeout_s)
        self._finalizer.detach()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _end(processes: list[Any], connections: dict[int, Connection], listener: Listener, timeout_s: float = 10.0) -> None:
    for connection in connections.values():
        with contextlib.suppress(OSError, ValueError):
            connection.send(_STOP)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        with contextlib.suppress(ValueError, AssertionError):
            process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ValueError, AssertionError, AttributeError):
            if process.exitcode is None:
                process.terminate()
                process.join(2)
            if process.exitcode is None:
                process.kill()
                process.join(2)
    for connection in connections.values():
        with contextlib.suppress(OSError):
            connection.close()
    with contextlib.suppress(OSError):
        listener.close()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, address: Any, authkey: bytes, setup: Callable[..., Any],
               args: tuple, timeout_s: float, environment: dict[str, str] | None) -> None:
    """One rank: join the group, build the handler, answer commands until told to stop or orphaned."""
    if environment is not None:  # forked from the fork server: the launching process's environment
        os.environ.clear()
        os.environ.update(environment)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ[comm.TIMEOUT_ENV] = str(timeout_s)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    if not os.environ.get(DEBUG_ENV):
        warnings.filterwarnings("ignore")
    connection = Client(address, authkey=authkey)
    connection.send(rank)
    try:
        comm.init(timeout_s=timeout_s)
        handler = setup(*args)
    except BaseException as error:  # noqa: BLE001 - reported to the launching process
        _reply(connection, ("error", _describe(error), isinstance(error, comm.PeerError)))
        return
    _reply(connection, ("ok", None))
    try:
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                break  # the launching process went away
            if isinstance(message, str) and message == _STOP:
                break
            try:
                reply: tuple = ("ok", handler(message))
            except BaseException as error:  # noqa: BLE001 - every rank answers every command
                reply = ("error", _describe(error), isinstance(error, comm.PeerError))
            if not _reply(connection, reply) or (reply[0] == "error" and reply[2]):
                break
    finally:
        with contextlib.suppress(Exception):
            comm.shutdown()
        connection.close()


def _reply(connection: Connection, reply: tuple) -> bool:
    try:
        connection.send(reply)
    except (OSError, ValueError):
        return False
    except Exception as error:  # noqa: BLE001 - a reply that does not pickle
        return _reply(connection, ("error", f"the reply could not be sent back: {_describe(error)}", False))
    return True


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
