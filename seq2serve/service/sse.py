"""Server-Sent Events: wire format and a response that streams, keeps idle connections alive
and cancels the work behind it as soon as the client goes away.

Why not Starlette's ``StreamingResponse``: under ASGI 2.4 it notices a disconnect only when a
write fails, and then leaves the body generator suspended (closed later by the garbage
collector). A sequence whose client left would keep its batch slot until its next token and
possibly beyond. Here a task waits for ``http.disconnect`` and the stream's ``on_close`` runs
the moment it arrives, so the engine drops the sequence at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from seq2serve.service.errors import ApiError

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def data_event(payload: Any) -> bytes:
    # json.dumps escapes CR and LF inside strings, so one payload is always one data line.
    return json_event(json.dumps(payload, ensure_ascii=False))


def json_event(encoded: str) -> bytes:
    """The event of one ``data:`` line holding ``encoded``: JSON text, on one line."""
    return b"data: " + encoded.encode("utf-8") + b"\n\n"


def error_event(error: ApiError) -> bytes:
    body = json.dumps(error.body(), ensure_ascii=False).encode("utf-8")
    return b"event: error\ndata: " + body + b"\n\n"


class EventStreamResponse(Response):
    """Streams ``events`` (already SSE-encoded chunks) as ``text/event-stream``.

    A ``: keep-alive`` comment goes out whenever no event came for ``keepalive_s``. When the
    client disconnects, or the stream ends in any other way, ``on_close`` is called (once):
    it cancels the engine's sequence, which is idempotent and harmless after a normal end.
    """

    media_type = MEDIA_TYPE

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        *,
        keepalive_s: float,
        on_close: Callable[[], None],
    ) -> None:
        # Not Response.__init__: it would declare a Content-Length for the empty body.
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        self.events = events
        self.keepalive_s = keepalive_s
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Three tasks for the whole stream, none per event: one sends the events, one sends
        # a keep-alive when the stream has been idle, one waits for the client to leave.
        loop = asyncio.get_running_loop()
        last_write = loop.time()

        async def write(chunk: bytes) -> None:
            nonlocal last_write
            last_write = loop.time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async def pump() -> None:
            try:
                async for chunk in self.events:
                    await write(chunk)
            except OSError:
                raise
            except Exception:
                # The event source is meant to turn its own failures into error events;
                # this is the last line, so the client still gets a well-formed ending.
                log.exception("event stream failed")
                await write(
                    error_event(ApiError(500, "internal server error", code="internal_error"))
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def keepalive() -> None:
            while True:
                idle = loop.time() - last_write
                if idle >= self.keepalive_s:
                    await write(KEEPALIVE)
                    idle = 0.0
                await asyncio.sleep(self.keepalive_s - idle)

        tasks: list[asyncio.Task[None]] = []
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            tasks = [
                asyncio.create_task(pump()),
                asyncio.create_task(_wait_for_disconnect(receive)),
                asyncio.create_task(keepalive()),
            ]
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
            if tasks[0].done() and not tasks[0].cancelled():
                tasks[0].result()  # an OSError: the server could not write
        except OSError:
            # The server could not write: the client is gone (uvicorn's ClientDisconnected).
            return
        finally:
            self.on_close()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self.events.aclose()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
