"""Run the service under uvicorn, with a graceful drain on SIGTERM.

uvicorn on its own stops listening the moment a signal arrives, so a readiness probe would
see a refused connection rather than a 503, and a request racing the signal would be refused
at the socket. Here SIGTERM (or a first Ctrl+C) starts a drain instead:

1. readiness turns 503 at once and new work is refused with 503, while the server still
   answers (so load balancers see the 503 and move traffic away);
2. in-flight requests, streams included, run to their end (at most ``drain_timeout_s``);
3. then uvicorn's own shutdown runs: connections close, the lifespan stops the engine;
4. the process exits 0 (the signal is handled, not re-raised).

A second signal during the drain stops at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from seq2serve.service.app import build_engine, create_app
from seq2serve.service.logs import configure_logging
from seq2serve.service.middleware import Traffic
from seq2serve.service.settings import Settings
from seq2serve.service.state import ServiceState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, traffic: Traffic, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.traffic = traffic
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler, on the event loop's thread: only flags are set here.
        if self.drain_deadline is not None:
            log.warning("second signal %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        self.traffic.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        log.info(
            "%s: draining (ready -> 503; waiting for %d in-flight request(s))",
            signal.Signals(sig).name,
            self.traffic.in_flight,
        )

    async def on_tick(self, counter: int) -> bool:
        deadline = self.drain_deadline
        if deadline is not None and not self.should_exit:
            if self.traffic.in_flight == 0:
                log.info("drained: no request in flight; shutting down")
                self.should_exit = True
            elif time.monotonic() >= deadline:
                log.warning(
                    "drain timeout (%.0f s) with %d request(s) in flight; shutting down",
                    self.drain_timeout_s,
                    self.traffic.in_flight,
                )
                self.should_exit = True
        return await super().on_tick(counter)


def make_server(settings: Settings, app: FastAPI | None = None) -> DrainingServer:
    """A configured (not yet running) server for ``app`` (default: ``create_app(settings)``)."""
    app = app or create_app(settings)
    state: ServiceState = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is configured by serve(): JSON lines
        access_log=False,  # the request middleware logs each request, with its request id
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        lifespan="on",
    )
    return DrainingServer(config, state.traffic, settings.drain_timeout_s)


def serve(settings: Settings, app: FastAPI | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return (what ``seq2serve serve`` runs).

    Raises ``BundleError`` naming the file before anything listens when the bundle cannot be
    served: its files, checksums, config or graphs. The model is loaded here, not in the
    lifespan, because uvicorn reports a lifespan failure as a traceback and exit code 3
    rather than the one line the command prints.
    """
    configure_logging(settings.log_level_number)
    if app is None:
        registry = CollectorRegistry()
        loaded = build_engine(settings, registry)
        app = create_app(settings, engine=loaded.engine, registry=registry)
    make_server(settings, app).run()
