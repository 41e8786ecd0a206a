"""The server as a process, started through ``serve()``. SIGTERM drains: readiness turns 503
at once, new work is refused with 503, the streams in flight finish with their final event,
and the process exits 0. Logs are JSON, one object a line, with request ids. A bad bundle is
refused at start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from seq2serve.bench import serve_command
from seq2serve.reliability import bad_bundles
from tests.service_helpers import free_socket, wait_ready

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent

SERVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from seq2serve.service.app import create_app
    from seq2serve.service.server import serve
    from seq2serve.service.settings import Settings
    from tests.service_helpers import slow_engine

    bundle, port = Path(sys.argv[1]), int(sys.argv[2])
    settings = Settings(
        model_dir=bundle, host="127.0.0.1", port=port, num_threads=1, drain_timeout_s=20
    )
    registry = CollectorRegistry()
    # 30 ms a decoder step: 40-token streams last over a second, long enough to drain.
    engine = slow_engine(bundle, settings, delay_s=0.03, registry=registry)
    serve(settings, create_app(settings, engine=engine, registry=registry))
    """
)

TOKENS = 40


def test_sigterm_drains_streams_then_exits_0(tiny_bundle, tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    with free_socket() as sock:
        port = sock.getsockname()[1]
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_bundle), str(port)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # for tests.service_helpers
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, alive=lambda: proc.poll() is None)
        body = {"inputs": "1234", "parameters": {"max_new_tokens": TOKENS}, "stream": True}
        first = [threading.Event() for _ in range(3)]
        results: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in range(3)]

        def consume(i: int) -> None:
            payload = {**body, "inputs": f"{1234 + i}"}
            with (
                httpx.Client(timeout=30) as client,
                connect_sse(client, "POST", url + "/v1/generate", json=payload) as source,
            ):
                for event in source.iter_sse():
                    results[i].append((time.monotonic(), event.json()))
                    first[i].set()

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert all(e.wait(20) for e in first), "streams did not start"

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ready = httpx.get(url + "/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "draining"
        refused = httpx.post(url + "/v1/generate", json={**body, "stream": False}, timeout=5)
        assert refused.status_code == 503
        assert httpx.get(url + "/health", timeout=5).status_code == 200

        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        for events in results:
            last = events[-1][1]
            assert last["details"] is not None, "a stream was cut before its final event"
            assert last["details"]["generated_tokens"] == TOKENS
            assert last["generated_text"] == "".join(e["token"]["text"] for _, e in events)
        # The drain really waited: the streams were still producing after the signal.
        assert max(events[-1][0] for events in results) > signalled + 0.2

        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.seek(0)
        lines = log.read().splitlines()
        log.close()

    records = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    assert any(r.get("request_id") and r.get("logger") == "seq2serve.access" for r in records)
    messages = " ".join(r["message"] for r in records)
    assert "draining" in messages and "engine stopped" in messages


@pytest.mark.parametrize("fault", ["wrong checksum", "missing file", "mismatched graph"])
def test_bad_bundle_is_refused_at_start(tiny_bundle, tmp_path, fault):
    """A bundle with a file that fails its checksum, a missing file, or a graph that breaks
    the contract stops `seq2serve serve` before it listens, with one line naming the file and
    a non-zero exit."""
    bundle, name = bad_bundles(tiny_bundle, tmp_path)[fault]
    with free_socket() as sock:
        port = sock.getsockname()[1]
    out = subprocess.run(
        serve_command(bundle, port),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "SEQ2SERVE_LOG_LEVEL": "WARNING"},
    )
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "cannot serve" in lines[0] and str(bundle / name) in lines[0]
    assert "Traceback" not in out.stderr
