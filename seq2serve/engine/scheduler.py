"""The scheduler: dynamic batching for encode/classify, continuous batching for generation.

One worker thread owns the model. Each turn it drops cancelled sequences, runs waiting
encode/classify requests as one encoder batch, lets waiting generation requests join the
running batch (one encoder call for all joiners), and runs one decoder step for every live
sequence. Results cross back to the event loop with ``call_soon_threadsafe``, so the loop
never blocks on inference and streams keep flowing.

| limit            | effect                                                              |
|------------------|---------------------------------------------------------------------|
| max_batch_size   | rows in the running generation batch; inputs in one encoder batch   |
| max_wait_ms      | how long an idle engine lets an encode batch wait for company       |
| max_queue        | requests waiting for a slot; one more raises ``QueueFull`` (429)    |

Beam search (K rows of one request, re-ranked every step) runs on its own thread, outside the
continuous batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from seq2serve.config import ModelConfig
from seq2serve.engine import memory
from seq2serve.engine.bundle import pool_thread_ids
from seq2serve.engine.generation import (
    DecodeBatch,
    SamplingParams,
    Sequence,
    TokenEvent,
    beam_search,
    pad_rows,
)
from seq2serve.engine.metrics import EngineMetrics
from seq2serve.engine.runtime import Backend

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests are waiting; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the request queue is full; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is not taking work: not started yet, or draining."""


class RequestFailed(Exception):
    """The engine failed this request (the others in its batch carry on)."""


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256


@dataclass
class EncodeOutput:
    last_hidden_state: list[np.ndarray]  # per input (S_i, C), real tokens only
    pooled: np.ndarray  # (B, C): mean over real tokens
    class_logits: np.ndarray  # (B, num_labels)


class GenerationStream:
    """One generation request as the web layer sees it: an async iterator of token events."""

    def __init__(self, engine: Engine, sequence: Sequence, loop: asyncio.AbstractEventLoop) -> None:
        self.sequence = sequence
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()
        self.arrival = time.monotonic()
        self.last_token_at: float | None = None
        self.cancelled = False

    def push(self, item: TokenEvent | Exception) -> None:
        """Called from the worker thread."""
        self._loop.call_soon_threadsafe(self.put, item)

    def put(self, item: TokenEvent | Exception) -> None:
        """Called on the event loop."""
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        async for events in self.chunks():
            for event in events:
                yield event

    async def chunks(self) -> AsyncIterator[list[TokenEvent]]:
        """The events in arrival order, each time every event already waiting: a consumer
        that fell behind the engine catches up in one write instead of one per token."""
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            events: list[TokenEvent] = []
            for item in items:
                if isinstance(item, Exception):
                    if events:
                        yield events
                    raise item
                events.append(item)
                if item.finish_reason is not None:
                    yield events
                    return
            yield events

    def cancel(self) -> None:
        """Idempotent: the sequence leaves the batch before the next step."""
        if not self.cancelled and self.sequence.finish_reason is None:
            self.cancelled = True
            self._engine._cancel(self)

    async def result(self) -> Sequence:
        async for _ in self:
            pass
        return self.sequence


# Free memory goes back to the system when the engine goes idle (``memory``): a 20-second
# soak of sources from 2 to 512 tokens left 30 % more resident than its warm-up's high-water
# mark without it.
TRIM_EVERY_S = 1.0  # at most this often, when the engine goes idle


# How long the worker waits for the event loop to take a call's tokens (see ``_publish``):
# a loop that is stuck never holds the batch back for longer.
HANDOFF_TIMEOUT_S = 0.003

# How long after a step that ended sequences a join waits for their clients' next requests
# (``Engine._await_returns``): over loopback HTTP they reached the engine 0.25 to 0.75 ms
# after the step's tokens were handed over.
RETURN_GRACE_S = 0.0015

# A turn with no joiners waits for those clients too while the share of ended sequences whose
# clients came back within the grace is at least RETURN_RATE_TO_WAIT (a running average over
# the steps that ended sequences, each step's share weighing RETURN_RATE_WEIGHT), and while
# such waits would cost the running batch at most RETURN_WAIT_SHARE of a step's time: a
# running average over all steps, each weighing RETURN_WAIT_WEIGHT, of the wait each would
# bring (for a step that ended sequences, from its tokens handed over to the last of their
# clients back, or the grace where some did not come back; else none). The wait saves the
# clients back a whole step. Where clients send nothing more when their requests end, or
# where steps are short next to the round trip (a small model, bounded by HTTP), the
# running batch does not wait for them.
RETURN_RATE_TO_WAIT = 0.5
RETURN_RATE_WEIGHT = 0.25
RETURN_WAIT_SHARE = 0.05
RETURN_WAIT_WEIGHT = 0.02


# ``nice=None`` (auto): this nice value when a warm-up token costs at least AUTO_NICE_MIN_S,
# else none (see ``lower_priority``).
AUTO_NICE = 10
AUTO_NICE_MIN_S = 0.001


def lower_priority(threads: Iterable[int], nice: int) -> None:
    """Give these threads (native ids) this nice value (Linux; a no-op at 0 or elsewhere).
    Raising it needs no privilege.

    The compute threads (the engine's and onnxruntime's pool) keep every core busy while a
    batch decodes; the event loop wakes for a few hundred microseconds at a time to read
    requests and write tokens. At equal priority the kernel lets a woken loop wait for a
    running compute thread's time slice, and the wait lands on the time to first token; at
    a lower priority for the compute threads the loop runs at once. Opus-mt-sized int8, 2
    cores, 16 streams arriving one by one over HTTP, five interleaved rounds of 10 s: p95
    time to first token 18.3 -> 11.5 ms at nice 10, tokens/s within the rounds' spread.
    With a model whose step is a tenth of a millisecond the server is bound by its HTTP
    work, which the engine thread shares (and the interpreter lock with it): there nice 10
    cost 8 to 15 % of the tokens/s, hence the automatic choice by the cost of a token. A busy
    process at nice 0 on the same cores would take most of the time from such threads: a
    container (its own cgroup) has none.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
        except OSError as err:  # a thread gone, or a sandbox that forbids it
            log.warning("cannot lower the priority of thread %d: %s", tid, err)


def _deliver(
    deliveries: list[tuple[GenerationStream, TokenEvent | Exception]],
    delivered: threading.Event | None = None,
) -> None:
    for stream, item in deliveries:
        stream.put(item)
    if delivered is not None:
        # Runs after the stream tasks these puts woke (scheduled before it): their tokens
        # are written out by then.
        asyncio.get_running_loop().call_soon(delivered.set)


@dataclass
class _EncodeJob:
    source_ids: list[list[int]]
    future: asyncio.Future[EncodeOutput]
    arrival: float


class Engine:
    """Owns the model and the worker thread; knows nothing of HTTP."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        limits: EngineLimits | None = None,
        metrics: EngineMetrics | None = None,
        nice: int | None = 0,
    ) -> None:
        self.backend = backend
        # Of the compute threads, see ``lower_priority``; None: decided at start.
        self.nice = nice
        self.tokenizer = tokenizer
        self.config: ModelConfig = backend.config
        self.limits = limits or EngineLimits()
        self.metrics = metrics
        self.batch = DecodeBatch(backend, tokenizer)
        self.ready = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[GenerationStream] = deque()
        self._encodes: deque[_EncodeJob] = deque()
        self._cancelled: set[int] = set()
        self._live: dict[int, GenerationStream] = {}
        self._beams = 0
        self._accepting = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._beam_pool = ThreadPoolExecutor(1, thread_name_prefix="seq2serve-beam")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_seconds = 0.01  # running average, for Retry-After
        self.handoff_timeout_s = HANDOFF_TIMEOUT_S
        # Sequences the last step finished whose clients have sent nothing since, and until
        # when a turn waits for them (``_await_returns``).
        self._returning = 0
        self._return_deadline = 0.0
        self.return_grace_s = RETURN_GRACE_S
        # Of the last step that ended sequences: how many it ended, how many new requests came
        # within the grace after it, when its tokens had been handed over (None while they
        # go out) and when the last of its clients was back, after that; the running share
        # of clients that come back, and what waiting for them costs a step on average.
        self._ended = 0
        self._back = 0
        self._handed_over: float | None = None
        self._all_back_after = 0.0
        self.return_rate = 0.0
        self.return_wait = RETURN_GRACE_S

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker and warm the model up; ``ready`` turns True at the end."""
        memory.map_large_blocks()
        self._loop = asyncio.get_running_loop()
        self._running = self._accepting = True
        self._thread = threading.Thread(target=self._run, name="seq2serve-engine", daemon=True)
        self._thread.start()
        ids = self.tokenizer.encode("0").ids[: self.config.max_source_positions]
        await self.encode([ids])
        await self.generate_stream(ids, SamplingParams(max_new_tokens=4)).result()
        if self.nice is None:  # the cost of a token, warm
            tokens = 4
            started = time.perf_counter()
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            await self.generate_stream(ids, params).result()
            per_token = (time.perf_counter() - started) / tokens
            self.nice = AUTO_NICE if per_token >= AUTO_NICE_MIN_S else 0
            log.info("compute threads at nice %d (%.2f ms a token)", self.nice, 1000 * per_token)
        assert self._thread is not None and self._thread.native_id is not None
        lower_priority((self._thread.native_id, *pool_thread_ids()), self.nice)
        self.backend.release_memory()
        memory.release_free_memory()
        with self._lock:  # the warm-up's requests are no clients to wait for
            self._returning = self._ended = self._back = 0
        self.ready = True
        log.info("engine ready")

    async def stop(self) -> None:
        """Stop taking work, let every in-flight request finish, then stop the worker."""
        self.ready = False
        with self._lock:
            self._accepting = False
        while True:
            with self._lock:
                busy = bool(self._pending or self._encodes or self._live or self._beams)
            if not busy:
                break
            await asyncio.sleep(0.01)
        with self._lock:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._beam_pool.shutdown(wait=True)
        log.info("engine stopped")

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._encodes)

    @property
    def active_sequences(self) -> int:
        return len(self._live) + self._beams

    # -- requests --------------------------------------------------------------------------

    def _admit(self) -> None:
        if not self._accepting:
            raise EngineStopped("the engine is not taking requests (starting or draining)")
        if self.queue_depth >= self.limits.max_queue:
            waiting = self.queue_depth / max(self.limits.max_batch_size, 1)
            raise QueueFull(retry_after=max(1.0, round(waiting * self._step_seconds * 64)))

    async def encode(self, source_ids: list[list[int]]) -> EncodeOutput:
        loop = asyncio.get_running_loop()
        job = _EncodeJob(source_ids, loop.create_future(), time.monotonic())
        with self._lock:
            self._admit()
            self._encodes.append(job)
            self._wake.notify()
        self._gauge_queue()
        return await job.future

    def generate_stream(self, source_ids: list[int], params: SamplingParams) -> GenerationStream:
        assert self._loop is not None, "start() the engine first"
        stream = GenerationStream(self, self.batch.new_sequence(source_ids, params), self._loop)
        with self._lock:
            self._admit()
            self._returning = max(0, self._returning - 1)  # a client back (``_await_returns``)
            now = time.monotonic()
            if self._back < self._ended and now <= self._return_deadline:
                self._back += 1
                if self._back == self._ended and self._handed_over is not None:
                    self._all_back_after = now - self._handed_over
            if params.num_beams > 1:
                self._beams += 1
                self._beam_pool.submit(self._run_beam, stream)
            else:
                self._pending.append(stream)
                self._wake.notify()
        self._gauge_queue()
        return stream

    def _cancel(self, stream: GenerationStream) -> None:
        with self._lock:
            if stream in self._pending:
                self._pending.remove(stream)
            else:  # in the batch, or joining it this turn: the worker drops it next turn
                self._cancelled.add(stream.sequence.id)
                self._wake.notify()
        self._gauge_queue()

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        trimmed, worked = time.monotonic(), False
        while True:
            with self._lock:
                while self._running and not self._has_work():
                    due = trimmed + TRIM_EVERY_S - time.monotonic()
                    if worked and due <= 0:
                        break
                    self._wake.wait(due if worked else None)
                idle = not self._has_work()
            if idle and worked and self._running:
                memory.release_free_memory()
                trimmed, worked = time.monotonic(), False
                continue
            worked = True
            with self._lock:
                if not self._running and not self._has_work():
                    return
                cancelled, self._cancelled = self._cancelled, set()
                free = self.limits.max_batch_size - len(self._live.keys() - cancelled)
                self._await_returns(free)
                joiners = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
                encodes = self._take_encodes()
            for seq_id in cancelled:
                self.batch.cancel(seq_id)
                self._live.pop(seq_id, None)
            if encodes:
                self._run_encodes(encodes)
            if joiners:
                self._join(joiners)
            if len(self.batch):
                self._step()
            self._gauge_queue()

    def _await_returns(self, free: int) -> None:
        """Before a join, wait up to ``return_grace_s`` after the last step for the next
        requests of the clients whose sequences that step ended (lock held): anticipatory
        scheduling, as disk schedulers wait for a process's next read. A turn with no
        joiners waits too while most such clients have come back (``return_rate``) and the
        waits for them take a small share of the steps' time (``return_wait``), so the
        returning requests join before the next step instead of after it.

        A client that sends its next request when the last one ends (a script working
        through its inputs, a closed-loop load) reaches the engine a round trip after the
        step, just after the next turn began. When that turn had joiners, the request
        waited for their join and a whole step before its own join: opus-mt-sized int8, 2
        cores, 16 HTTP streams arriving one by one, 66 of 527 requests came 0.25 to 0.75 ms
        after a step and waited 5 to 12 ms more, the tail of the time to first token. Now
        it joins with them, in one encoder call. The wait is only for a turn that joins
        anyway, and only for clients not yet back: each new request counts as one, so a
        lone client's next request waits for nothing. The bench's serving phase, three runs
        alternating with the code without the wait, int8: time to first token p95 14.1 /
        15.2 / 19.8 against 18.8 / 17.9 / 22.0 ms, p99 19.1 / 20.3 / 25.9 against 20.2 /
        25.5 / 36.1, p50 7.8 / 7.8 / 11.8 against 8.9 / 9.1 / 12.0, tokens/s 2,088 / 2,045 /
        1,521 against 1,933 / 2,040 / 1,456 (the third pair on a slower spell of the host).
        fp32: within the host's spread (p95 30.9 / 27.1 / 37.8 against 33.9 / 34.4 / 20.7).

        A turn without joiners had started its step at once, and the clients coming back
        0.25 to 0.75 ms later waited for all of it (and for another join, when a group came
        back one by one). Waiting for them there too, four serving-only runs alternating with
        the code without it, opus-mt-sized model, 2 cores, 16 HTTP streams arriving one by
        one: p95 time to first token 12.3 / 12.0 / 12.1 / 12.2 against 20.9 / 20.5 / 18.2 /
        18.8 ms in fp32 and 9.2 / 7.3 / 5.5 / 9.1 against 9.2 / 11.2 / 10.9 / 8.3 in int8,
        for 1.3 % (fp32) and 2.7 % (int8) of the tokens/s at the median, the time the batch
        waits. ``return_rate`` keeps that cost from traffic whose clients do not come back,
        and ``return_wait`` from a model whose steps are short next to the round trip: on
        the default model, bounded by HTTP, the same wait cost 12 % of the tokens/s on one
        host; with ``return_wait`` it no longer waits there (three alternating runs on
        another: 3,637-3,686 against 3,386-3,434 tokens/s, inter-token p50 3.7-4.0 against
        4.4-4.6 ms, time to first token p95 11.4-12.7 against 9.3-9.7 ms).
        """
        worth_it = (
            self.return_rate >= RETURN_RATE_TO_WAIT
            and self.return_wait <= RETURN_WAIT_SHARE * self._step_seconds
        )
        while (
            self._returning
            and (self._pending or worth_it)
            and len(self._pending) < free
            and self._running
            and (left := self._return_deadline - time.monotonic()) > 0
        ):
            self._wake.wait(left)
        self._returning = 0

    def _has_work(self) -> bool:
        return bool(self._pending or self._encodes or self._cancelled or len(self.batch))

    def _take_encodes(self) -> list[_EncodeJob]:
        """Waiting encode jobs, up to max_batch_size inputs. An idle engine lets the batch wait
        up to max_wait_ms from the oldest job's arrival for more company (lock held)."""
        if not self._encodes:
            return []
        limit = self.limits.max_batch_size
        if not len(self.batch) and not self._pending:
            deadline = self._encodes[0].arrival + self.limits.max_wait_ms / 1000
            while (
                self._running
                and sum(len(j.source_ids) for j in self._encodes) < limit
                and (remaining := deadline - time.monotonic()) > 0
            ):
                self._wake.wait(remaining)
        jobs: list[_EncodeJob] = []
        inputs = 0
        while self._encodes and (not jobs or inputs + len(self._encodes[0].source_ids) <= limit):
            job = self._encodes.popleft()
            jobs.append(job)
            inputs += len(job.source_ids)
        return jobs

    def _run_encodes(self, jobs: list[_EncodeJob]) -> None:
        rows = [ids for job in jobs for ids in job.source_ids]
        try:
            outputs = [
                self._encode_rows(rows[i : i + self.limits.max_batch_size])
                for i in range(0, len(rows), self.limits.max_batch_size)
            ]
        except Exception as err:  # a model failure fails these requests, not the engine
            log.exception("encoder batch failed")
            for job in jobs:
                self._resolve(job.future, RequestFailed(f"encoding failed: {err}"))
            return
        hidden = [h for out in outputs for h in out.last_hidden_state]
        pooled = np.concatenate([o.pooled for o in outputs])
        logits = np.concatenate([o.class_logits for o in outputs])
        start = 0
        for job in jobs:
            n = len(job.source_ids)
            result = EncodeOutput(
                hidden[start : start + n], pooled[start : start + n], logits[start : start + n]
            )
            self._resolve(job.future, result)
            start += n

    def _encode_rows(self, rows: list[list[int]]) -> EncodeOutput:
        ids, mask = pad_rows(rows, self.config.pad_token_id)
        out = self.backend.encode(ids, mask)
        if self.metrics:
            self.metrics.batch_size.labels("encode").observe(len(rows))
        return EncodeOutput(
            [out.last_hidden_state[i, : len(r)] for i, r in enumerate(rows)],
            out.pooled,
            out.class_logits,
        )

    def _resolve(
        self, future: asyncio.Future[EncodeOutput], value: EncodeOutput | Exception
    ) -> None:
        def settle() -> None:
            if future.done():  # the client went away
                return
            if isinstance(value, Exception):
                future.set_exception(value)
            else:
                future.set_result(value)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _join(self, joiners: list[GenerationStream]) -> None:
        """Encode the joiners and give them their first token (a decoder call over the
        joiners alone), so a new request waits for no step of the running batch."""
        for stream in joiners:
            self._live[stream.sequence.id] = stream
        try:
            events = self.batch.add([s.sequence for s in joiners])
        except Exception as err:
            log.exception("encoding new sequences failed")
            for stream in joiners:
                del self._live[stream.sequence.id]
                stream.push(RequestFailed(f"encoding failed: {err}"))
            return
        if self.metrics:
            self.metrics.batch_size.labels("prefill").observe(len(joiners))
        self._publish(events, time.monotonic(), first_tokens=True)

    def _step(self) -> None:
        started = time.monotonic()
        rows = len(self.batch)
        try:
            events = self.batch.step()
        except Exception as err:  # the decoder call itself failed: every row fails
            log.exception("decoder step failed")
            for seq in list(self.batch.rows):
                stream = self._live.pop(seq.id)
                stream.push(RequestFailed(f"generation failed: {err}"))
            self.batch.remove({s.id for s in self.batch.rows})
            return
        now = time.monotonic()
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * (now - started)
        if self.metrics:
            self.metrics.batch_size.labels("generate").observe(rows)
        # Counted before the tokens go out: a client may be back before ``_publish`` returns.
        # (The count is 0 here: each turn's ``_await_returns`` ended with it.)
        finished = sum(e.finish_reason is not None and not e.error for e in events)
        if not finished:
            self.return_wait -= RETURN_WAIT_WEIGHT * self.return_wait
            self._publish(events, now)
            return
        with self._lock:
            wait = 0.0
            if self._ended:  # the last such step's clients are counted: fold them in
                share = self._back / self._ended
                self.return_rate += RETURN_RATE_WEIGHT * (share - self.return_rate)
                wait = self._all_back_after if share == 1 else self.return_grace_s
            self.return_wait += RETURN_WAIT_WEIGHT * (wait - self.return_wait)
            self._returning = self._ended = finished
            self._back = 0
            self._handed_over = None
            self._all_back_after = 0.0
            # While the tokens go out (``_publish`` waits for the loop for at most the
            # hand-off timeout), and then for the grace.
            grace = self.handoff_timeout_s + self.return_grace_s
            self._return_deadline = time.monotonic() + grace
        self._publish(events, now)
        with self._lock:
            self._handed_over = time.monotonic()
            self._return_deadline = self._handed_over + self.return_grace_s

    def _publish(self, events: list[TokenEvent], now: float, first_tokens: bool = False) -> None:
        """Hand a call's token events to their streams: one wake-up of the event loop.
        ``first_tokens``: a prefill's, whose wait for the loop below is always worth it."""
        if self.metrics:
            self.metrics.generated_tokens.inc(len(events))
        deliveries: list[tuple[GenerationStream, TokenEvent | Exception]] = []
        for event in events:
            stream = self._live[event.seq_id]
            if self.metrics:
                if stream.last_token_at is None:
                    self.metrics.time_to_first_token.observe(now - stream.arrival)
                else:
                    self.metrics.inter_token_latency.observe(now - stream.last_token_at)
            stream.last_token_at = now
            deliveries.append((stream, RequestFailed(event.error) if event.error else event))
            if event.finish_reason is not None:
                del self._live[event.seq_id]
        # One wake-up of the event loop per step, not one per sequence.
        assert self._loop is not None
        if len(deliveries) < 2 and not first_tokens:
            self._loop.call_soon_threadsafe(_deliver, deliveries)
            return
        # For several streams, the next call waits until the loop has written these tokens
        # out. The loop shares the cores with onnxruntime's threads: writing during the next
        # step, it takes a core from one of them while the other waits for it at the
        # operator's end, the tokens reach their clients a step late, and new requests wait
        # behind the writes to be read. Opus-mt-sized int8, 2 cores, 16 streams arriving one
        # by one over HTTP, three interleaved rounds: time to first token p50 / p95 15.5 /
        # 25.1 -> 8.4 / 18.3 ms, 1,817 -> 1,908 tokens/s (fp32: 26.5 / 45.0 -> 13.6 / 37.4
        # ms). One stream's tokens are left to go on their own: waiting for the loop to wake
        # cost a lone stream 3 to 8 % of its tokens/s. A first token always waits: it is
        # once per request, and it is the time to first token.
        delivered = threading.Event()
        self._loop.call_soon_threadsafe(_deliver, deliveries, delivered)
        delivered.wait(self.handoff_timeout_s)

    def _run_beam(self, stream: GenerationStream) -> None:
        try:
            seq = stream.sequence
            best = beam_search(self.backend, self.tokenizer, seq.source_ids, seq.params)
            seq.generated, seq.logprobs = best.generated, best.logprobs
            seq.stream, seq.finish_reason = best.stream, best.finish_reason
            # Beam search decides the whole text at the end; it is not streamed token by token.
            for i, (token, logprob) in enumerate(zip(best.generated, best.logprobs, strict=True)):
                last = i == len(best.generated) - 1
                stream.push(
                    TokenEvent(
                        seq.id,
                        token,
                        best.text if last else "",
                        logprob,
                        token in self.batch.special_ids,
                        best.finish_reason if last else None,
                    )
                )
            if not best.generated:
                stream.push(
                    TokenEvent(seq.id, self.config.eos_token_id, "", 0.0, True, best.finish_reason)
                )
        except Exception as err:
            log.exception("beam search failed")
            stream.push(RequestFailed(f"generation failed: {err}"))
        finally:
            with self._lock:
                self._beams -= 1

    def _gauge_queue(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth)
            self.metrics.active_sequences.set(self.active_sequences)
