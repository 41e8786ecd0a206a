"""Handing work to the engine: its exceptions become HTTP answers, and a client that goes
away cancels what it asked for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator

from starlette.requests import Request

from seq2serve.engine.generation import SamplingParams, TokenEvent
from seq2serve.engine.scheduler import (
    Engine,
    EngineStopped,
    GenerationStream,
    QueueFull,
    RequestFailed,
)
from seq2serve.service.errors import ApiError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Map the engine's refusals and failures to error answers."""
    try:
        yield
    except QueueFull as err:
        seconds = max(1, math.ceil(err.retry_after))
        raise ApiError(
            429,
            f"overloaded: the request queue is full; retry after {seconds} s",
            code="queue_full",
            headers={"Retry-After": str(seconds)},
        ) from err
    except EngineStopped as err:
        raise ApiError(503, f"not taking requests: {err}", code="draining") from err
    except RequestFailed as err:
        log.error("request failed in the engine: %s", err)
        raise ApiError(
            500, f"the model failed on this request: {err}", code="engine_error"
        ) from err


def open_stream(engine: Engine, source_ids: list[int], params: SamplingParams) -> GenerationStream:
    """Start a generation; refusals (429, 503) happen here, before any response starts."""
    with engine_errors():
        return engine.generate_stream(source_ids, params)


async def collect(stream: GenerationStream, request: Request) -> list[TokenEvent]:
    """Every event of a non-streamed generation. If the client disconnects first, the
    sequence is cancelled at once rather than generated to the end for nobody."""

    async def consume() -> list[TokenEvent]:
        return [event async for event in stream]

    work = asyncio.create_task(consume())
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            raise ApiError(499, "client closed the request", code="client_closed")
        with engine_errors():
            return work.result()
    finally:
        stream.cancel()
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
