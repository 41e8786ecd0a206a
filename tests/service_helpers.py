"""Real servers on 127.0.0.1 for the service tests: in a background thread (most tests) or a
subprocess (the SIGTERM drain). Every wait is bounded."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.metrics import EngineMetrics
from seq2serve.engine.runtime import DecoderResult, OnnxBackend
from seq2serve.engine.scheduler import Engine, EngineLimits
from seq2serve.service.app import create_app
from seq2serve.service.settings import Settings

START_TIMEOUT_S = 60.0


class SlowBackend(OnnxBackend):
    """The real model, with every decoder step taking at least ``delay_s``: streams that
    last long enough to disconnect from, fill the queue with, or drain."""

    def __init__(self, bundle: Any, delay_s: float) -> None:
        super().__init__(bundle)
        self.delay_s = delay_s

    def decode(self, *args: Any, **kwargs: Any) -> DecoderResult:
        time.sleep(self.delay_s)
        return super().decode(*args, **kwargs)

    def step_in_place(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay_s)
        return super().step_in_place(*args, **kwargs)


def slow_engine(
    bundle_dir: Path, settings: Settings, delay_s: float, registry: CollectorRegistry
) -> Engine:
    bundle = load_bundle(bundle_dir, threads=1)
    limits = EngineLimits(
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
    )
    return Engine(SlowBackend(bundle, delay_s), bundle.tokenizer, limits, EngineMetrics(registry))


def free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it Nagle's algorithm and delayed ACKs add 40 ms to every request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_ready(base_url: str, timeout_s: float = START_TIMEOUT_S, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server at {base_url} died while starting")
        try:
            if httpx.get(base_url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {base_url} not ready within {timeout_s} s")


@dataclass
class RunningServer:
    base_url: str
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed "name{label=value,...}"."""
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out


@contextmanager
def running_server(
    settings: Settings,
    *,
    engine: Engine | None = None,
    registry: CollectorRegistry | None = None,
) -> Iterator[RunningServer]:
    """``create_app(settings, engine)`` under uvicorn in a thread, ready on return."""
    sock = free_socket()
    port = sock.getsockname()[1]
    app = create_app(settings, engine=engine, registry=registry)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, alive=thread.is_alive)
        yield RunningServer(base_url, settings, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"


def settings_for(bundle: Path, **overrides: Any) -> Settings:
    return Settings(model_dir=bundle, num_threads=1, **overrides)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """Parse a finished SSE body by hand: [{"event": ..., "data": ..., "comment": ...}]."""
    events: list[dict[str, Any]] = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                event["comment"] = value
            else:
                event[field] = event[field] + "\n" + value if field in event else value
        events.append(event)
    return events


def python() -> str:
    return sys.executable


def close(a: Any, b: Any) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=1e-4))
