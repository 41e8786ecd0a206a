"""The request middleware (pure ASGI, so streaming and disconnects pass through untouched).

Per HTTP request it: picks the request id (a sane ``X-Request-ID`` is honoured, else one is
made) and echoes it; bounds the body at ``max_body_bytes`` (from Content-Length, and by
counting what arrives, for chunked bodies); counts the request in the in-flight total that
the SIGTERM drain waits on; records the request in the HTTP metrics and the access log.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seq2serve.service.errors import ApiError
from seq2serve.service.logs import request_id_var

access_log = logging.getLogger("seq2serve.access")

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "seq2serve_requests",
            "HTTP requests by route template and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "seq2serve_request_duration_seconds",
            "HTTP request duration, to the last byte of the response (streams included).",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "seq2serve_requests_in_flight", "HTTP requests being served.", registry=registry
        )


@dataclass
class Traffic:
    """What the drain needs to know: how many requests are still being served."""

    in_flight: int = 0
    draining: bool = False


def request_id_from(scope: Scope) -> str:
    name: bytes
    value: bytes
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            try:
                candidate = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if _SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return new_id()


def new_id() -> str:
    """A new random 128-bit id, as 32 hex digits. From the process's Mersenne Twister (seeded
    from the OS), not ``uuid4``: that reads the OS's entropy, a call that releases the GIL,
    and under load the event loop then waits for the engine thread to hand it back (4 % of
    the loop's samples, default model, 16 streams). Unique, not secret."""
    return f"{random.getrandbits(128):032x}"


def _content_length(scope: Scope) -> int | None:
    name: bytes
    value: bytes
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _BodyTooLarge(Exception):
    def __init__(self, announced: int | None) -> None:
        super().__init__()
        self.announced = announced  # the Content-Length, when there was one


class _NotUtf8(Exception):
    def __init__(self, err: UnicodeDecodeError) -> None:
        super().__init__(f"body is not valid UTF-8 (byte {err.start}); JSON must be UTF-8")


def _is_json(scope: Scope) -> bool:
    """Whether the body is read as JSON: JSON content types, or none at all (TGI's client
    sends none)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media = bytes(value).split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: HttpMetrics,
        traffic: Traffic,
        max_body_bytes: int,
        plain_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.traffic = traffic
        self.max_body_bytes = max_body_bytes
        # Routes that do not record themselves in the scope (FastAPI's /openapi.json and
        # /docs); any other path that matched no route is "unmatched", so that a scan of
        # random URLs cannot create one series per path.
        self.plain_paths = plain_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        token = request_id_var.set(request_id)
        header = (b"x-request-id", request_id.encode("ascii"))
        status = 500  # if the app raises before answering, the outer handler sends a 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        self.traffic.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            try:
                replay = await self._read_body(scope, receive)
            except _BodyTooLarge as refused:
                await self._discard_body(receive, refused.announced)
                error = ApiError(
                    413,
                    f"body larger than the limit of {self.max_body_bytes} bytes "
                    "(SEQ2SERVE_MAX_BODY_BYTES)",
                    code="body_too_large",
                    headers={"connection": "close"},
                )
                await error.response()(scope, receive, send_with_id)
                return
            except _NotUtf8 as bad:
                # json.loads would guess UTF-16 or UTF-32 from the first bytes; RFC 8259 says
                # JSON between systems is UTF-8, and anything else is a malformed body.
                error = ApiError(400, str(bad), code="invalid_utf8")
                await error.response()(scope, receive, send_with_id)
                return
            await self.app(scope, replay, send_with_id)
        finally:
            self.traffic.in_flight -= 1
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = self._route_label(scope)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.duration.labels(route=route).observe(elapsed)
            access_log.info(
                "%s %s %d",
                scope.get("method"),
                scope.get("path"),
                status,
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )
            request_id_var.reset(token)

    def _route_label(self, scope: Scope) -> str:
        template = getattr(scope.get("route"), "path", None)
        if isinstance(template, str):
            return template
        path = scope.get("path", "")
        return path if path in self.plain_paths else "unmatched"

    async def _discard_body(self, receive: Receive, announced: int | None) -> None:
        """Read and drop the rest of a refused body, up to a bound, before answering.

        Closing a connection whose body is still arriving makes the kernel reset it, and a
        client still sending never reads the 413; read on a while so that it does. Beyond
        the bound (a body many times the limit) the client gets the reset.
        """
        budget = max(8 * self.max_body_bytes, 8 << 20)
        if announced is not None and announced > budget:
            return
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body (bounded) before the app runs; return a receive that replays
        it and then passes on what the server sends (the disconnect a stream waits for)."""
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            raise _BodyTooLarge(length)
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # a disconnect before the body was complete
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge(length)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(scope):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _NotUtf8(err) from err
        buffered: Message = first or {
            "type": "http.request",
            "body": body,
            "more_body": False,
        }
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return buffered
            return await receive()

        return replay
