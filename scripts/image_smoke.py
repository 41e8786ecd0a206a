"""HTTP checks against a running seq2serve container (used by image-test.sh and the
kube-play test). Standard library only, so it runs with any python3, outside the venv too.

    python3 image_smoke.py --url http://127.0.0.1:PORT
    python3 image_smoke.py --url http://127.0.0.1:PORT --drain ENGINE CONTAINER

Without --drain: /health and /ready answer 200 (waiting for /ready, bounded); one streamed
generation (SSE `data:` events, the last one carrying `generated_text`, which equals the
concatenated token texts); encode; classify.
With --drain: opens many long streams, sends SIGTERM to the container while they run, and
checks that /ready and new work answer 503 during the drain, that every stream ends with its
final event, and that the container exits with code 0.
Every wait is bounded; all traffic goes to the given URL (127.0.0.1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0
# Long streams for the drain: sampling at a high temperature almost never picks EOS, so each
# stream runs to max_new_tokens, and enough of them share the batch that the drain lasts
# seconds. Fewer than the default batch size (32), so that all of them run at once.
DRAIN_STREAMS = 24
DRAIN_BODY = {
    "inputs": ">>fr<< 2021-03-04",
    "parameters": {"max_new_tokens": 256, "do_sample": True, "temperature": 20.0},
    "stream": True,
}


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Client:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = self.connection()
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return resp.status, raw.decode(errors="replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        start = time.monotonic()
        last = "no answer"
        while time.monotonic() - start < timeout_s:
            try:
                status, _ = self.request("GET", "/ready")
                if status == 200:
                    return time.monotonic() - start
                last = f"HTTP {status}"
            except OSError as err:
                last = repr(err)
            time.sleep(0.25)
        raise CheckFailed(f"/ready not 200 within {timeout_s:.0f} s (last: {last})")


@dataclass
class Stream:
    """One SSE generation, read line by line."""

    client: Client
    body: dict[str, Any]
    status: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    first_event: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        conn = self.client.connection()
        try:
            conn.request(
                "POST",
                "/v1/generate",
                body=json.dumps(self.body).encode(),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            resp = conn.getresponse()
            self.status = resp.status
            if resp.status != 200:
                self.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
                return
            event_type = "message"
            while True:
                line = resp.readline()
                if not line:
                    break
                text = line.decode().rstrip("\r\n")
                if text.startswith("event:"):
                    event_type = text[6:].strip()
                elif text.startswith("data:"):
                    payload = json.loads(text[5:].strip())
                    if event_type == "error":
                        self.error = f"error event: {payload}"
                    self.events.append(payload)
                    self.first_event.set()
                elif not text:
                    event_type = "message"
        except (OSError, ValueError) as err:
            self.error = repr(err)
        finally:
            conn.close()
            self.first_event.set()
            self.done.set()

    def start(self) -> Stream:
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def verify_complete(self) -> str:
        check(self.error is None, f"stream failed: {self.error}")
        check(bool(self.events), "stream sent no data events")
        final = self.events[-1]
        text = final.get("generated_text")
        check(isinstance(text, str), f"last event has no generated_text: {final}")
        check(
            all(e.get("generated_text") is None for e in self.events[:-1]),
            "generated_text before the last event",
        )
        tokens = "".join(e["token"]["text"] for e in self.events)
        check(tokens == text, f"token texts {tokens!r} != generated_text {text!r}")
        return str(text)


def basic(client: Client) -> None:
    took = client.wait_ready()
    print(f"ready after {took:.1f} s")
    status, body = client.request("GET", "/health")
    check(status == 200, f"/health: HTTP {status} {body}")

    stream = Stream(
        client,
        {
            "inputs": ">>fr<< 2021-03-04",
            "parameters": {"max_new_tokens": 32},
            "stream": True,
        },
    ).start()
    check(stream.done.wait(REQUEST_TIMEOUT_S), "generation did not finish in time")
    text = stream.verify_complete()
    reason = stream.events[-1]["details"]["finish_reason"]
    print(f"generate (stream): {len(stream.events)} events, {text!r}, finish_reason={reason}")

    status, body = client.request("POST", "/v1/encode", {"inputs": ["jeudi 4 mars 2021"]})
    check(status == 200, f"/v1/encode: HTTP {status} {body}")
    dims = len(body["embeddings"][0])
    check(len(body["embeddings"]) == 1 and dims > 0, f"/v1/encode: {body}")
    print(f"encode: 1 embedding of {dims} floats")

    status, body = client.request("POST", "/v1/classify", {"inputs": ["jeudi 4 mars 2021"]})
    check(status == 200, f"/v1/classify: HTTP {status} {body}")
    top = body["results"][0][0]
    print(f"classify: top label {top['label']} ({top['score']:.3f})")


def container_state(engine: str, container: str) -> str:
    out = subprocess.run(
        [engine, "inspect", "--format", "{{.State.Status}}", container],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout.strip()


def wait_exit_code(engine: str, container: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if container_state(engine, container) in ("exited", "stopped"):
            out = subprocess.run(
                [engine, "inspect", "--format", "{{.State.ExitCode}}", container],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            return int(out.stdout.strip())
        time.sleep(0.2)
    raise CheckFailed(f"container {container} still running {timeout_s:.0f} s after SIGTERM")


def drain(client: Client, engine: str, container: str) -> None:
    streams = [
        Stream(client, {**DRAIN_BODY, "parameters": {**DRAIN_BODY["parameters"], "seed": i}})
        for i in range(DRAIN_STREAMS)
    ]
    for s in streams:
        s.start()
    for s in streams:
        check(s.first_event.wait(REQUEST_TIMEOUT_S), "a drain stream never started")
        check(s.error is None, f"a drain stream failed before SIGTERM: {s.error}")
    running = sum(not s.done.is_set() for s in streams)
    check(running > 0, "every stream finished before SIGTERM could be sent")
    signalled = time.monotonic()
    subprocess.run(
        [engine, "kill", "--signal", "TERM", container],
        check=True,
        timeout=30,
        stdout=subprocess.DEVNULL,
    )
    print(f"SIGTERM sent with {running}/{len(streams)} streams in flight")

    # While the streams run, the server still answers, with 503 for readiness and new work.
    status, _ = client.request("GET", "/ready")
    ready_status = status
    status, body = client.request("POST", "/v1/classify", {"inputs": ["x"]})
    work_status = status
    still_running = sum(not s.done.is_set() for s in streams)
    check(still_running > 0, "the streams ended before the drain could be observed")
    check(ready_status == 503, f"/ready during the drain: HTTP {ready_status}, expected 503")
    check(work_status == 503, f"new work during the drain: HTTP {work_status} {body}")
    print(f"during the drain: /ready {ready_status}, new request {work_status}")

    for s in streams:
        check(s.done.wait(REQUEST_TIMEOUT_S), "a stream did not end within the drain")
    tokens = 0
    for s in streams:
        s.verify_complete()
        tokens += len(s.events)
    code = wait_exit_code(engine, container, REQUEST_TIMEOUT_S)
    took = time.monotonic() - signalled
    print(
        f"drain: all {len(streams)} streams ended with their final event ({tokens} events); "
        f"container exited with code {code} {took:.1f} s after SIGTERM"
    )
    check(code == 0, f"exit code {code} after SIGTERM, expected 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:18000")
    parser.add_argument(
        "--drain",
        nargs=2,
        metavar=("ENGINE", "CONTAINER"),
        help="check the SIGTERM drain of this container (podman or docker) instead",
    )
    args = parser.parse_args(argv)
    client = Client(args.url)
    try:
        if args.drain:
            client.wait_ready()
            drain(client, *args.drain)
        else:
            basic(client)
    except (CheckFailed, OSError, KeyError, IndexError, TypeError) as err:
        print(f"FAILED: {err!r}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
