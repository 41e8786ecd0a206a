"""The scheduler: continuous batching equal to alone, cancellation, queue bound, drain, faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import DecodeBatch, SamplingParams, run_to_completion
from seq2serve.engine.metrics import EngineMetrics
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.engine.scheduler import (
    RETURN_RATE_TO_WAIT,
    Engine,
    EngineLimits,
    EngineStopped,
    QueueFull,
    RequestFailed,
)

TEXTS = [
    ">>fr<< 2021-03-04",
    ">>de<< 1234",
    ">>ja<< 77",
    ">>ru<< 1999-12-31",
    ">>en<< 5",
    ">>it<< 42",
]


@pytest.fixture(scope="module")
def parts(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return OnnxBackend(bundle), bundle.tokenizer


def run(coro_fn, parts, limits=None):
    """Run ``coro_fn(engine, registry)`` against a started engine, then stop it."""
    backend, tok = parts

    async def main():
        registry = CollectorRegistry()
        engine = Engine(backend, tok, limits or EngineLimits(), EngineMetrics(registry))
        await engine.start()
        try:
            return await asyncio.wait_for(coro_fn(engine, registry), timeout=60)
        finally:
            await engine.stop()

    return asyncio.run(main())


def alone(parts, text, params):
    backend, tok = parts
    batch = DecodeBatch(backend, tok)
    (seq,) = run_to_completion(batch, [batch.new_sequence(tok.encode(text).ids, params)])
    return seq.generated


def histogram_max_bucket(registry, name, kind):
    """The largest batch size observed (upper bound of the highest non-empty bucket)."""
    counts = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == f"{name}_bucket" and sample.labels.get("kind") == kind:
                counts[float(sample.labels["le"])] = sample.value
    previous, biggest = 0.0, 0.0
    for le in sorted(counts):
        if counts[le] > previous:
            biggest = le
        previous = counts[le]
    return biggest


def test_concurrent_streams_equal_alone_and_share_batches(parts):
    _, tok = parts
    requests = [(TEXTS[i % len(TEXTS)], 4 + 3 * i) for i in range(12)]
    expected = [alone(parts, t, SamplingParams(max_new_tokens=n)) for t, n in requests]

    async def body(engine, registry):
        async def one(text, n, delay):
            await asyncio.sleep(delay)  # arrive at different steps
            stream = engine.generate_stream(tok.encode(text).ids, SamplingParams(max_new_tokens=n))
            pieces = [e.text async for e in stream]
            return stream.sequence, "".join(pieces)

        results = await asyncio.gather(*(one(t, n, 0.003 * i) for i, (t, n) in enumerate(requests)))
        return results, histogram_max_bucket(registry, "seq2serve_batch_size", "generate")

    results, biggest = run(body, parts)
    for (seq, streamed), want in zip(results, expected, strict=True):
        assert seq.generated == want
        assert streamed == seq.text
    assert biggest > 1, "the requests never shared a decoder step"


def test_concurrent_encodes_are_batched_and_equal_alone(parts):
    _, tok = parts
    ids = [tok.encode(t).ids for t in TEXTS]

    async def body(engine, registry):
        singles = [await engine.encode([i]) for i in ids]
        together = await asyncio.gather(*(engine.encode([i]) for i in ids))
        return singles, together, histogram_max_bucket(registry, "seq2serve_batch_size", "encode")

    singles, together, biggest = run(body, parts, EngineLimits(max_wait_ms=50))
    for a, b in zip(singles, together, strict=True):
        np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-5)
        np.testing.assert_allclose(a.class_logits, b.class_logits, atol=1e-5)
        assert a.last_hidden_state[0].shape == b.last_hidden_state[0].shape
    assert biggest > 1


def test_cancel_frees_the_slot_within_a_step(parts):
    _, tok = parts

    async def body(engine, registry):
        keep = engine.generate_stream(tok.encode(TEXTS[0]).ids, SamplingParams(max_new_tokens=30))
        drop = engine.generate_stream(tok.encode(TEXTS[1]).ids, SamplingParams(max_new_tokens=60))
        got = 0
        async for _ in drop:
            got += 1
            if got == 3:
                break
        drop.cancel()
        for _ in range(100):
            if engine.active_sequences <= 1:
                break
            await asyncio.sleep(0.01)
        active_after_cancel = engine.active_sequences
        seq = await keep.result()
        return active_after_cancel, seq.generated, len(drop.sequence.generated)

    active, kept, dropped_len = run(body, parts)
    assert active <= 1
    assert kept == alone(parts, TEXTS[0], SamplingParams(max_new_tokens=30))
    assert dropped_len < 60


def test_queue_bound_raises_queue_full(parts):
    _, tok = parts

    async def body(engine, registry):
        ids = tok.encode(TEXTS[0]).ids
        first = engine.generate_stream(ids, SamplingParams(max_new_tokens=40))
        # Its first token: it holds the only slot. (A fixed sleep raced the tiny model, which
        # can finish 40 tokens in under 50 ms.)
        events = aiter(first)
        await anext(events)
        second = engine.generate_stream(ids, SamplingParams(max_new_tokens=4))  # waits
        with pytest.raises(QueueFull) as info:
            engine.generate_stream(ids, SamplingParams(max_new_tokens=4))
        assert info.value.retry_after >= 1
        async for _ in events:
            pass
        await second.result()
        return True

    assert run(body, parts, EngineLimits(max_batch_size=1, max_queue=1))


def test_stop_drains_in_flight_then_refuses(parts):
    backend, tok = parts

    async def main():
        engine = Engine(backend, tok)
        await engine.start()
        streams = [
            engine.generate_stream(tok.encode(t).ids, SamplingParams(max_new_tokens=20))
            for t in TEXTS
        ]
        stopping = asyncio.create_task(engine.stop())
        await asyncio.sleep(0)
        assert not engine.ready
        with pytest.raises(EngineStopped):
            engine.generate_stream(tok.encode(TEXTS[0]).ids, SamplingParams())
        results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 30)
        await asyncio.wait_for(stopping, 30)
        return results

    for seq in asyncio.run(main()):
        assert seq.finish_reason in ("eos_token", "length")


def test_a_failing_request_fails_alone(parts, monkeypatch):
    _, tok = parts
    expected = alone(parts, TEXTS[0], SamplingParams(max_new_tokens=12))

    async def body(engine, registry):
        good = engine.generate_stream(tok.encode(TEXTS[0]).ids, SamplingParams(max_new_tokens=12))
        bad = engine.generate_stream(tok.encode(TEXTS[1]).ids, SamplingParams(max_new_tokens=12))

        class Exploding:  # a fault inside the engine, for this request only
            text = ""

            def push(self, token_id):
                raise RuntimeError("injected fault")

        bad.sequence.stream = Exploding()
        with pytest.raises(RequestFailed, match="injected fault"):
            await bad.result()
        return (await good.result()).generated

    assert run(body, parts) == expected


def test_beam_search_requests_run_beside_the_batch(parts):
    _, tok = parts

    async def body(engine, registry):
        beam = engine.generate_stream(
            tok.encode(TEXTS[2]).ids, SamplingParams(max_new_tokens=10, num_beams=3)
        )
        greedy = engine.generate_stream(tok.encode(TEXTS[2]).ids, SamplingParams(max_new_tokens=10))
        events = [e async for e in beam]
        return beam.sequence, events, await greedy.result()

    seq, events, greedy = run(body, parts)
    assert [e.token_id for e in events] == seq.generated
    assert "".join(e.text for e in events) == seq.text
    assert all(np.isfinite(e.logprob) for e in events)
    assert greedy.generated == alone(parts, TEXTS[2], SamplingParams(max_new_tokens=10))


def test_a_call_for_several_streams_reaches_them_before_the_next_call(parts):
    """The worker hands a call's tokens to the event loop and waits until the streams have
    them before its next call: even a loop slower than the steps gets every token a step
    apart. (Without the wait, the slow loop falls behind and reads several tokens after
    the same step.)"""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)

    async def go(engine, _):
        engine.handoff_timeout_s = 5.0  # the wait, not its bound, is under test
        streams = [engine.generate_stream(parts[1].encode(t).ids, params) for t in TEXTS[:3]]

        async def consume(stream):
            seen = []
            async for _ in stream:
                seen.append(engine.batch._steps)
                time.sleep(0.005)  # a busy event loop: slower than a step of the tiny model
            return seen

        return await asyncio.gather(*(consume(s) for s in streams))

    for seen in run(go, parts):
        assert len(seen) == 10
        assert len(set(seen)) >= 9, seen  # a joiner's first token may share a step number


def test_a_first_token_reaches_its_stream_before_the_next_call(parts):
    """A prefill's first token is handed over as a step's tokens are: with the event loop
    busy when the token is ready, the worker waits for the loop instead of decoding on."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)

    async def go(engine, _):
        engine.handoff_timeout_s = 5.0  # the wait, not its bound, is under test
        before = engine.batch._steps
        stream = engine.generate_stream(parts[1].encode(TEXTS[0]).ids, params)
        time.sleep(0.2)  # the loop is busy while the worker encodes and decodes
        async for _ in stream:
            return engine.batch._steps - before

    assert run(go, parts) == 0


def expect_clients_back(engine, n):
    """Leave the engine as a step that ended ``n`` sequences leaves it: a join waits up to
    ``return_grace_s`` for their clients' next requests."""
    with engine._lock:
        engine._returning = n
        engine._return_deadline = time.monotonic() + engine.return_grace_s


def test_a_join_waits_for_the_clients_whose_sequences_the_last_step_ended(parts):
    """A step ended two sequences; one client is back at once, the other 50 ms later. With
    a grace far longer than that, the first request's join waits for the second, and both
    join in one prefill. (Without the wait, the first joins alone, a turn ahead.)"""
    params = SamplingParams(max_new_tokens=3)
    ids = [parts[1].encode(t).ids for t in TEXTS[:2]]

    async def go(engine, _):
        engine.return_grace_s = 5.0  # the wait, not its bound, is under test
        joins = []
        add = engine.batch.add

        def recording_add(seqs):
            joins.append(sorted(s.id for s in seqs))
            return add(seqs)

        engine.batch.add = recording_add
        expect_clients_back(engine, 2)
        first = engine.generate_stream(ids[0], params)
        await asyncio.sleep(0.05)
        second = engine.generate_stream(ids[1], params)
        done = [await first.result(), await second.result()]
        return joins, done

    joins, done = run(go, parts)
    assert joins == [sorted(s.id for s in done)]
    for seq, text in zip(done, TEXTS, strict=False):
        assert seq.generated == alone(parts, text, params)


@pytest.mark.parametrize(
    ("return_rate", "return_wait", "waits"),
    [(1.0, 0.0, True), (0.0, 0.0, False), (1.0, 1.0, False)],
)
def test_a_turn_without_joiners_waits_for_clients_that_come_back(
    parts, return_rate, return_wait, waits
):
    """A step ended a sequence while another runs on, and no request waits. Where clients
    have been coming back (``return_rate``), all soon next to a step (``return_wait``), the
    next turn waits for the client before stepping, and its request joins the running
    sequence before that step; where they have not, or took longer than a step, the
    running sequence steps on."""
    ids = [parts[1].encode(t).ids for t in TEXTS[:2]]
    params = SamplingParams(max_new_tokens=3)
    running = SamplingParams(max_new_tokens=60, ignore_eos=True)

    async def go(engine, _):
        engine.return_grace_s = 5.0  # the wait, not its bound, is under test
        other = engine.generate_stream(ids[1], running)
        async for _ in other:  # in the batch
            break
        engine.return_rate, engine.return_wait = return_rate, return_wait
        expect_clients_back(engine, 1)
        before = engine.batch._steps
        await asyncio.sleep(0.2)
        during = engine.batch._steps - before
        back = await engine.generate_stream(ids[0], params).result()
        return during, back, await other.result()

    during, back, other = run(go, parts)
    if waits:
        assert during <= 1  # at most the step under way when the step ended the sequence
    else:
        assert during >= 5
    assert back.generated == alone(parts, TEXTS[0], params)
    assert other.generated == alone(parts, TEXTS[1], running)


def test_the_return_rate_and_wait_follow_the_clients(parts):
    """Each step that ends sequences adds the share of their clients back within the grace
    to the running rate, and the time from its tokens handed over to the last of them back
    to the running wait a step (which every step without such clients lowers): clients that
    send their next request as the last one ends raise the rate past the bar for waiting
    and lower the wait; clients back 100 ms later keep the rate and raise the wait; a long
    request's steps, which end nothing, lower the wait; clients back later than the grace
    lower the rate."""
    params = SamplingParams(max_new_tokens=3)
    ids = parts[1].encode(TEXTS[0]).ids

    async def go(engine, _):
        engine.return_grace_s = 5.0
        rates, waits = [], []
        for pause in [0.0] * 6 + [0.1] * 4:  # back at once, then 100 ms later
            await asyncio.sleep(pause)
            await engine.generate_stream(ids, params).result()
            rates.append(engine.return_rate)
            waits.append(engine.return_wait)
        engine.return_grace_s = 0.001
        long = SamplingParams(max_new_tokens=41, ignore_eos=True)
        await engine.generate_stream(ids, long).result()  # back at once, then 40 steps
        waits.append(engine.return_wait)
        for _ in range(6):  # back later than the grace
            await asyncio.sleep(0.05)
            await engine.generate_stream(ids, params).result()
            rates.append(engine.return_rate)
        return rates, waits

    rates, waits = run(go, parts)
    assert rates[0] == 0.0  # no step had ended a sequence before the first request
    assert all(a <= b for a, b in itertools.pairwise(rates[:10]))
    assert rates[5] >= RETURN_RATE_TO_WAIT
    assert waits[5] < waits[0]  # each wait for them would have been about 0
    assert waits[9] > 3 * waits[5]  # each 100 ms, every other step
    assert waits[10] < 0.6 * waits[9]  # 0.98 ** 40 = 0.45 of it, and about 0 once
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] < RETURN_RATE_TO_WAIT


def test_a_beam_search_request_counts_as_a_client_back(parts):
    """Beam search runs beside the batch, but its request is still one of the clients a
    join may wait for: with two expected and a beam request back, the next greedy request
    is the second, and its join waits for no one (a grace of 5 s would show)."""
    ids = [parts[1].encode(t).ids for t in TEXTS[:2]]

    async def go(engine, _):
        engine.return_grace_s = 5.0
        expect_clients_back(engine, 2)
        beams = engine.generate_stream(ids[0], SamplingParams(max_new_tokens=3, num_beams=2))
        started = time.monotonic()
        async for _ in engine.generate_stream(ids[1], SamplingParams(max_new_tokens=3)):
            first_token_s = time.monotonic() - started
            break
        await beams.result()
        return first_token_s

    assert run(go, parts) < 2.5


def test_a_client_back_after_its_own_sequence_ended_waits_for_nothing(parts):
    """The step that ends a sequence expects its client back; the client's next request is
    that return, so its join waits for no one else (a grace of 5 s would show)."""
    params = SamplingParams(max_new_tokens=3)
    ids = parts[1].encode(TEXTS[0]).ids

    async def go(engine, _):
        engine.return_grace_s = 5.0
        await engine.generate_stream(ids, params).result()
        with engine._lock:
            expected = engine._returning
        started = time.monotonic()
        async for _ in engine.generate_stream(ids, params):
            return expected, time.monotonic() - started

    expected, first_token_s = run(go, parts)
    assert expected == 1
    assert first_token_s < 2.5


def test_a_client_back_while_its_last_token_is_handed_over_waits_for_nothing(parts):
    """A step for two streams hands its tokens over and waits for the event loop; a client
    whose sequence that step ended sends its next request right then. It is counted back,
    so its join waits for no one (a grace of 5 s would show)."""
    params = SamplingParams(max_new_tokens=3)
    ids = [parts[1].encode(t).ids for t in TEXTS[:2]]

    async def go(engine, _):
        engine.return_grace_s = engine.handoff_timeout_s = 5.0
        other = engine.generate_stream(ids[1], SamplingParams(max_new_tokens=40, ignore_eos=True))
        async for _ in other:  # in the batch: the steps below are for two streams
            break
        await engine.generate_stream(ids[0], params).result()
        started = time.monotonic()
        async for _ in engine.generate_stream(ids[0], params):
            first_token_s = time.monotonic() - started
            break
        await other.result()
        return first_token_s

    assert run(go, parts) < 2.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest.mark.parametrize(
    ("nice", "auto_min_s", "expected"),
    [
        (7, None, 7),  # as asked
        (None, 10.0, 0),  # auto, for a model whose tokens cost less than the bar
        (None, 0.0, 10),  # auto, for a model whose tokens cost at least the bar
    ],
)
def test_the_compute_threads_run_at_the_engine_nice_value(tiny_bundle, nice, auto_min_s, expected):
    """The engine thread and onnxruntime's pool workers get the engine's nice value; the
    event loop's thread keeps its own. In a fresh process: the pool is process-wide."""
    script = f"""
import asyncio, json, os, threading
from pathlib import Path
from seq2serve.engine import scheduler
from seq2serve.engine.bundle import load_bundle, pool_thread_ids
from seq2serve.engine.runtime import OnnxBackend

if {auto_min_s!r} is not None:
    scheduler.AUTO_NICE_MIN_S = {auto_min_s!r}
bundle = load_bundle(Path({str(tiny_bundle)!r}), threads=2)
engine = scheduler.Engine(OnnxBackend(bundle), bundle.tokenizer, nice={nice!r})

def nice(tid):
    return os.getpriority(os.PRIO_PROCESS, tid)

async def main():
    await engine.start()
    threads = [threading.get_native_id(), engine._thread.native_id, *pool_thread_ids()]
    print(json.dumps([engine.nice, *(nice(t) for t in threads)]))
    await engine.stop()

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    chosen, loop, engine, *pool = json.loads(done.stdout.strip().splitlines()[-1])
    assert chosen == expected
    assert loop == base
    assert engine == max(expected, base)
    assert pool and all(n == max(expected, base) for n in pool)  # 2 threads: one pool worker
