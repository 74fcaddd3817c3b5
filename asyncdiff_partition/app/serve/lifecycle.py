"""The service's life: set up before listening, serve with uvicorn, drain on SIGTERM, end every rank.

Example::

    serve(ServeOptions(model="sd-tiny", parallel=ParallelConfig(devices=2)).checked())   # until SIGTERM

Note [drain]
~~~~~~~~~~~~
On SIGTERM (or SIGINT) the service takes no new request (503, so that a load balancer sends it
elsewhere), lets the requests queued or running finish for ``drain_s`` at most, then uvicorn
stops (open connections get a few seconds more) and the engine ends its ranks. A second signal
stops at once. The process exits within ``drain_s`` + a few seconds, no rank left behind.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from asyncdiff_partition.app.serve.options import ServeOptions
from asyncdiff_partition.app.serve.service import Service

__all__ = ["serve"]

_GRACE_S = 5.0  # open connections after the drain (uvicorn's graceful shutdown)


def serve(options: ServeOptions, *, echo: Callable[[str], None] = print, cache_dir: str | None = None) -> None:
    """Set up (pipeline loaded, ranks started), then answer HTTP requests until a signal (Note [drain])."""
    import uvicorn

    from asyncdiff_partition.app.serve.routes import make_app

    _check_port(options.host, options.port)  # before any rank starts
    service = Service(options, cache_dir=cache_dir)
    try:
        service.start()
        config = uvicorn.Config(make_app(service), host=options.host, port=options.port, log_level="warning",
                                timeout_graceful_shutdown=int(_GRACE_S), lifespan="off")
        server = _DrainingServer(config, service, options.drain_s, echo)
        setup = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in service.runner.setup.items()) \
            if service.runner else ""
        echo(f"serving {service.model_id} on http://{options.host}:{options.port} with {options.parallel.devices} "
             f"device(s), batching {options.batching} ({setup})")
        server.run()
    finally:
        service.close()
    echo("stopped")


def _check_port(host: str, port: int) -> None:
    import socket

    from asyncdiff_partition.core.errors import ConfigError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or --host") from None


class _DrainingServer:
    """uvicorn's server whose first exit signal drains the service first (Note [drain])."""

    def __init__(self, config: Any, service: Service, drain_s: float, echo: Callable[[str], None]):
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                outer.signalled(self, sig, frame)

        self.server = Server(config)
        self.service, self.drain_s, self.echo = service, drain_s, echo
        self.draining: threading.Thread | None = None

    def run(self) -> None:
        self.server.run()

    def signalled(self, server: Any, sig: int, frame: Any) -> None:
        # Not uvicorn's own handle_exit: it would raise the signal again once the server stopped, and the
        # default SIGTERM action would end this process before the engine ends its ranks.
        if self.draining is not None:  # a second signal: stop now
            server.should_exit = server.force_exit = True
            return
        self.service.begin_drain()

        def drain() -> None:
            deadline = time.monotonic() + self.drain_s
            while not self.service.idle() and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(Exception):
                self.echo("drained" if self.service.idle() else f"drain bound {self.drain_s:g} s reached")
            server.should_exit = True

        self.draining = threading.Thread(target=drain, name="asyncdiff-serve-drain", daemon=True)
        self.draining.start()
