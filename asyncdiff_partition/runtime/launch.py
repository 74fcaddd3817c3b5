"""Starting the ranks: ``entrypoint(*args)`` on N new processes through torch's elastic agent.

A worker that raises is written down (rank, error, time) in a folder the workers share, so the
launching process can name the rank whose failure came first, not the peers that only lost it.
A watchdog thread bounds the end of a failed run (Note [grace]); SIGINT / SIGTERM become
:class:`Interrupted` (Note [signals]).

    results = launch(run_worker, (config,), nproc=2, timeout_s=60)   # {rank: return value}
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.files import write_json_atomic
from asyncdiff_partition.core.quiet import DEBUG_ENV, quiet_loggers
from asyncdiff_partition.runtime import comm

__all__ = ["GRACE_S", "Interrupted", "LaunchError", "handle_interrupts", "is_launched_externally", "launch",
           "process_context"]

# Note [grace]
# When one rank fails, torch's elastic agent (2.13) stops the others with SIGTERM and waits a
# hard-coded 30 s before SIGKILL (LocalElasticAgent._stop_workers ignores shutdown_timeout).
# A stopped or wedged rank (SIGSTOP, a stuck collective) sits out all 30 s. So the launching
# process watches the ranks itself: from the moment one rank has failed (it wrote its error, or
# its process is gone without having finished) every rank still alive gets GRACE_S seconds,
# then SIGKILL. A hung rank therefore ends the run within the process-group timeout (its peers'
# wait) + GRACE_S + a poll. The same bound is handed to the agent for its own signal path
# (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
GRACE_S = 3
_POLL_S = 0.1

# Note [signals]
# Ctrl-C reaches the whole process group; ``kill`` reaches the launching process alone. Workers
# keep the default action for SIGINT and SIGTERM (they die at once, even inside a blocking
# gloo wait, where a Python handler would not run), and the agent forwards a signal it gets to
# them. In the launching process SIGINT / SIGTERM raise Interrupted (handle_interrupts), so
# that temp folders are removed on the way out; while the agent runs, its own handler raises
# SignalException, which launch turns into Interrupted too.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Note [forkserver]
# With ``start_method="forkserver"`` one server process, started by the first such launch of
# this process, imports torch, diffusers and transformers once; that launch and every later one
# fork their ranks from it, which saves each rank those imports (about 10 s for a diffusers
# pipeline on the 2-core development machine; the test suite launches this way, see
# tests/conftest.py). The server is started before the launch's temp folder exists (its socket
# must outlive the launch) and keeps the environment it was started with, so each worker
# rebuilds the launching process's environment of the moment, plus what the agent set for it
# (RANK, MASTER_ADDR, ...: the keys whose values differ from the server's). Variables read only
# while torch is imported (OMP_NUM_THREADS at import, for one) keep the server's values. A
# rank's death reaches the agent through the server, so when a rank is killed the agent may see
# its peer's PeerError first; the error line then is that peer's, naming the rank it waited for
# (spawn names the killed rank and its exit code).
_PRELOAD = ("torch", "torch.distributed", "diffusers", "transformers", __name__)
_START_METHODS = ("spawn", "fork", "forkserver")
START_ENV = "ASYNCDIFF_START_METHOD"  # how launch starts workers when not told: spawn (default), fork, forkserver
_server_environment: dict[str, str] | None = None
_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run", "torch.multiprocessing")


class LaunchError(AsyncDiffError, RuntimeError):
    """A worker of :func:`launch` failed; ``rank`` and ``error`` name the first (root) failure."""

    def __init__(self, message: str, rank: int, error: str, failures: dict[int, str]):
        super().__init__(message)
        self.rank, self.error, self.failures = rank, error, failures


class Interrupted(AsyncDiffError):
    """SIGINT or SIGTERM arrived; ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__("interrupted")
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def is_launched_externally() -> bool:
    """True inside a worker that an outside ``torchrun`` (or any elastic agent) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only).

    Example:
        >>> with handle_interrupts():  # doctest: +SKIP
        ...     run_plan(config)       # Ctrl-C: temp folders removed, then Interrupted
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch(
    entrypoint: Callable[..., Any],
    args: tuple = (),
    nproc: int = 1,
    *,
    nnodes: int = 1,
    timeout_s: float = 60.0,
    rdzv_endpoint: str = "127.0.0.1:0",
    rdzv_id: str | None = None,
    start_method: str | None = None,
) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` on ``nproc`` new processes of this node (torch elastic agent).

    Each worker finds its rank and peers in the environment (:func:`asyncdiff_partition.runtime.comm.init`),
    with ``timeout_s`` as the process group's bound on every wait. When one worker raises, the
    agent stops the others and this raises :class:`LaunchError` with one line naming the
    rank and the error that came first; errors of ranks that only lost their peer
    (:class:`~asyncdiff_partition.runtime.comm.PeerError`) count as consequences, not causes.
    A failed run ends within ``timeout_s`` + :data:`GRACE_S` + a poll (Note [grace]). Torch's
    logs and warnings are hidden unless ``$ASYNCDIFF_DEBUG`` is set.

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
        start_method: ``spawn``, ``fork`` or ``forkserver`` (Note [forkserver]); default
            ``$ASYNCDIFF_START_METHOD``, else ``spawn``.

    Returns:
        Global rank -> the entrypoint's return value, for this node's workers.

    Raises:
        ConfigError: bad arguments.
        LaunchError: a worker failed.
        Interrupted: SIGINT or SIGTERM reached this process; every worker is ended.
    """
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"need nproc >= 1 and nnodes >= 1, got nproc={nproc}, nnodes={nnodes}")
    start_method = start_method or os.environ.get(START_ENV) or "spawn"
    if start_method not in _START_METHODS:
        raise ConfigError(f"start method must be one of {', '.join(_START_METHODS)}, got {start_method!r}")
    host, _, port = rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"rdzv_endpoint must be host:port, got {rdzv_endpoint!r}")
    if nnodes > 1 and (port == "0" or rdzv_id is None):
        raise ConfigError("with several nodes, give every node the same rdzv_endpoint with a fixed port and the same rdzv_id")
    if port == "0":
        port = str(_free_port(host))
    folder = tempfile.mkdtemp(prefix="asyncdiff-launch-")
    watchdog = _Watchdog(folder)
    handlers = {sig: signal.getsignal(sig) for sig in (*_SIGNALS, signal.SIGHUP, signal.SIGQUIT)}
    environment = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(GRACE_S)}
    if not os.environ.get(DEBUG_ENV):  # the ranks' and multiprocessing's resource tracker's warnings
        environment["PYTHONWARNINGS"] = "ignore"
    try:
        with _quiet(), _environment(**environment):
            environments = (dict(os.environ), _start_forkserver(entrypoint)) if start_method == "forkserver" else None
            with _temp_dir(folder):
                watchdog.start()
                return comm.run_workers(
                    _worker, (entrypoint, tuple(args), folder, float(timeout_s), environments), nproc=nproc, nnodes=nnodes,
                    endpoint=f"{host}:{port}", run_id=rdzv_id or uuid.uuid4().hex, start_method=start_method,
                )
    except comm.WorkersFailed as failed:
        _end_partial_line()
        raise _launch_error(failed.failures, folder, watchdog.killed) from None
    except Exception as error:  # the agent's SignalException (Note [signals]), known by its sigval
        if getattr(error, "sigval", None) is None:
            raise
        _end_partial_line()
        raise Interrupted(error.sigval) from None  # type: ignore[attr-defined]
    finally:
        watchdog.stop()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():  # the agent leaves its own handlers installed
                if handler is not None:
                    signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def process_context(start_method: str | None, entrypoint: Callable[..., Any]) -> tuple[Any, dict[str, str] | None]:
    """The multiprocessing context :func:`launch` would start ``entrypoint``'s workers with, and, under
    the fork server, the environment a worker must take back (Note [forkserver]); for ranks started
    without the elastic agent (runtime.ranks).

    Raises:
        ConfigError: an unknown start method.
    """
    import multiprocessing

    start_method = start_method or os.environ.get(START_ENV) or "spawn"
    if start_method not in _START_METHODS:
        raise ConfigError(f"start method must be one of {', '.join(_START_METHODS)}, got {start_method!r}")
    environment = None
    if start_method == "forkserver":
        _start_forkserver(entrypoint)
        environment = dict(os.environ)
    return multiprocessing.get_context(start_method), environment


def _end_partial_line() -> None:
    """A rank may die in the middle of a line (a progress bar): the error line starts on its own."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write("\r\033[K" if sys.stderr.isatty() else "\n")
        sys.stderr.flush()


def _start_forkserver(entrypoint: Callable[..., Any]) -> dict[str, str]:
    """Start this process's fork server unless it runs; the environment it was started with (Note [forkserver])."""
    global _server_environment
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver  # the module-level server multiprocessing's own API starts
    before = server._forkserver_pid  # private: None, or the pid of the server started last
    forkserver.set_forkserver_preload([*_PRELOAD, entrypoint.__module__])
    forkserver.ensure_running()
    if _server_environment is None or server._forkserver_pid != before:
        _server_environment = dict(os.environ)
    return _server_environment


def _worker(entrypoint: Callable[..., Any], args: tuple, folder: str, timeout_s: float,
            environments: tuple[dict[str, str], dict[str, str]] | None = None) -> Any:
    """Runs in each worker: the entrypoint, with its pid, failure or success written down for :func:`launch`."""
    if environments is not None:  # forked from the fork server: the launcher's environment + the agent's keys
        launcher, server = environments
        agent = {key: value for key, value in os.environ.items() if server.get(key) != value}
        os.environ.clear()
        os.environ.update({**launcher, **agent})
    for sig in _SIGNALS:  # Note [signals]: die at once, quietly
        signal.signal(sig, signal.SIG_DFL)
    if not os.environ.get(DEBUG_ENV):
        warnings.filterwarnings("ignore")
    os.environ[comm.TIMEOUT_ENV] = str(timeout_s)
    rank = int(os.environ.get("RANK", "-1"))
    _write(folder, f"pid{rank}", {"pid": os.getpid()})
    try:
        result = entrypoint(*args)
    except BaseException as error:
        _write(folder, f"rank{rank}", {"rank": rank, "error": f"{type(error).__name__}: {' '.join(str(error).split())}",
                                       "time": time.time(), "peer": isinstance(error, comm.PeerError)})
        raise
    comm.shutdown()
    _write(folder, f"done{rank}", {"rank": rank})
    return result


def _write(folder: str, name: str, record: dict[str, Any]) -> None:
    write_json_atomic(os.path.join(folder, f"{name}.json"), record)


def _read(folder: str, prefix: str) -> dict[int, dict[str, Any]]:
    """The records ``<prefix><rank>.json`` in ``folder``, by rank (half-written ones skipped)."""
    records = {}
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".json") and name[len(prefix):-5].lstrip("-").isdigit():
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as file:
                    records[int(name[len(prefix):-5])] = json.load(file)
            except (OSError, ValueError):
                continue
    return records


class _Watchdog(threading.Thread):
    """Note [grace]: once a rank has failed, SIGKILL every rank still alive GRACE_S seconds later."""

    def __init__(self, folder: str):
        super().__init__(name="asyncdiff-launch-watchdog", daemon=True)
        self.folder, self.killed = folder, set[int]()
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        failed_at: float | None = None
        while not self._stopped.wait(_POLL_S):
            pids = {rank: record["pid"] for rank, record in _read(self.folder, "pid").items()}
            done = _read(self.folder, "done")
            alive = {rank: pid for rank, pid in pids.items() if _alive(pid)}
            if failed_at is None and (_read(self.folder, "rank") or set(pids) - set(alive) - set(done)):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at >= GRACE_S:
                for rank, pid in alive.items():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        self.killed.add(rank)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            return file.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _launch_error(failures: dict[int, tuple[int, str]], folder: str, killed: set[int]) -> LaunchError:
    """One line naming the cause: a rank's own error, else a rank that died, else a peer's wait."""
    records = _read(folder, "rank")
    causes = [r for r in records.values() if not r["peer"]]
    died = sorted(r for r, (code, _) in failures.items()
                  if r not in records and r not in killed and code != -signal.SIGTERM)
    hung = sorted(r for r in killed if r not in records)
    if causes:
        first = min(causes, key=lambda r: r["time"])
        rank, error, head = first["rank"], first["error"], f"rank {first['rank']} failed"
    elif died:
        rank = died[0]
        code, text = failures[rank]
        error = f"exit code {code}" + (f" ({text})" if text and "elastic/errors.html" not in text else "")
        head = f"rank {rank} failed"
    elif records:  # only peers that gave up waiting: the rank they waited for stopped answering
        first = min(records.values(), key=lambda r: r["time"])
        rank, error = first["rank"], first["error"]
        head = f"rank {rank} failed"
        if hung:
            head = (f"rank {', '.join(map(str, hung))} stopped answering (killed {GRACE_S} s after its peers gave up); "
                    f"rank {rank} failed")
    else:
        rank = min(failures)
        code, text = failures[rank]
        error = f"exit code {code}" + (f" ({text})" if text and "elastic/errors.html" not in text else "")
        head = f"rank {rank} failed"
    others = sorted((set(failures) | set(records)) - {rank} - set(hung))
    tail = f" (then {'rank' if len(others) == 1 else 'ranks'} {', '.join(map(str, others))} failed too)" if others else ""
    return LaunchError(f"{head}: {error}{tail}", rank, error, {r: text for r, (_, text) in failures.items()})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Torch's elastic logs (tracebacks of failed workers, shutdown notes) only with $ASYNCDIFF_DEBUG."""
    with quiet_loggers(*_LOGGERS), warnings.catch_warnings():
        if not os.environ.get(DEBUG_ENV):
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _temp_dir(folder: str) -> Iterator[None]:
    """The agent's log folders (``torchelastic_*``, never removed by torch) go inside ``folder``."""
    previous = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = previous


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
