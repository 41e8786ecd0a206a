"""Streaming over Server-Sent Events against a real uvicorn: streamed == non-streamed,
multi-byte text intact, stop strings, keep-alive comments, continuous batching under 32
concurrent streams, cancellation on disconnect, overload (429) and mid-stream errors."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import TokenEvent
from seq2serve.engine.metrics import EngineMetrics
from seq2serve.engine.runtime import DecoderResult, OnnxBackend
from seq2serve.engine.scheduler import Engine, EngineLimits
from seq2serve.service import sse
from seq2serve.service.routes.generate import token_event, token_json
from tests.service_helpers import running_server, settings_for, slow_engine

pytestmark = pytest.mark.timeout(120)

SOURCES = [
    ">>fr<< 2021-03-04",
    ">>de<< 1234",
    ">>ja<< 77",
    ">>ru<< 1999-12-31",
    ">>en<< 5",
    "jeudi 4 mars 2021",
    "eintausendzweihundertvierunddreißig",
    "семьдесят семь",
]


def stream(client: httpx.Client, body: dict[str, Any]) -> list[Any]:
    with connect_sse(client, "POST", "/v1/generate", json={**body, "stream": True}) as source:
        response = source.response
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        return list(source.iter_sse())


def check_stream(events: list[Any]) -> tuple[str, dict[str, Any]]:
    """The TGI stream invariants; returns (concatenated token texts, final event)."""
    assert events and all(e.event == "message" for e in events), [e.event for e in events]
    data = [e.json() for e in events]
    assert [d["index"] for d in data] == list(range(1, len(data) + 1))
    for d in data[:-1]:
        assert d["generated_text"] is None and d["details"] is None
        assert set(d["token"]) == {"id", "text", "logprob", "special"}
    last = data[-1]
    text = "".join(d["token"]["text"] for d in data)
    assert last["generated_text"] == text
    assert last["details"]["generated_tokens"] == len(data)
    assert last["details"]["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert last["details"]["input_length"] > 0
    return text, last


def generate(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_streamed_equals_non_streamed_greedy(client):
    for source in SOURCES:
        body = {"inputs": source, "parameters": {"max_new_tokens": 40, "details": True}}
        whole = generate(client, body)
        text, last = check_stream(stream(client, body))
        assert text == whole["generated_text"]
        assert last["details"]["finish_reason"] == whole["details"]["finish_reason"]
        assert last["token"]["id"] == whole["details"]["tokens"][-1]["id"]


def test_multibyte_text_intact(client, tiny_bundle):
    """Sampling at a high temperature makes the random model emit byte-level pieces of
    multi-byte characters; the streamed pieces must still join into exactly the text
    decode() gives for the same ids."""
    tokenizer = load_bundle(tiny_bundle).tokenizer
    non_ascii = 0
    for seed in range(12):
        params = {"max_new_tokens": 48, "do_sample": True, "temperature": 2.0, "seed": seed}
        body = {"inputs": SOURCES[seed % len(SOURCES)], "parameters": {**params, "details": True}}
        whole = generate(client, body)
        events = stream(client, body)
        text, _ = check_stream(events)
        assert text == whole["generated_text"]
        ids = [e.json()["token"]["id"] for e in events]
        assert ids == [t["id"] for t in whole["details"]["tokens"]]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        non_ascii += sum(1 for ch in text if ord(ch) > 127 and ch != "\ufffd")
    assert non_ascii > 0, "no multi-byte character was generated; the test proves nothing"


def test_stop_strings_cut_exactly(client):
    checked = 0
    for seed in range(10):
        params = {"max_new_tokens": 48, "do_sample": True, "temperature": 1.5, "seed": seed}
        full = generate(client, {"inputs": ">>de<< 1234", "parameters": params})["generated_text"]
        if len(full) < 6:
            continue
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        expected = full[: full.find(stop)]
        body = {"inputs": ">>de<< 1234", "parameters": {**params, "stop": [stop], "details": True}}
        whole = generate(client, body)
        assert whole["generated_text"] == expected
        assert whole["details"]["finish_reason"] == "stop_sequence"
        text, last = check_stream(stream(client, body))
        assert text == expected
        assert last["details"]["finish_reason"] == "stop_sequence"
        checked += 1
    assert checked >= 3


def test_openai_stream_matches(client):
    model = client.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": SOURCES[3], "max_tokens": 30, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    with connect_sse(
        client,
        "POST",
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as source:
        events = list(source.iter_sse())
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_32_concurrent_streams_equal_alone(server, client):
    bodies = [
        {"inputs": SOURCES[i % len(SOURCES)] + f" {i}", "parameters": {"max_new_tokens": 8 + i}}
        for i in range(32)
    ]
    alone = [generate(client, b)["generated_text"] for b in bodies]
    before = server.metrics()

    async def one(c: httpx.AsyncClient, body: dict[str, Any]) -> str:
        async with aconnect_sse(c, "POST", "/v1/generate", json={**body, "stream": True}) as src:
            events = [e.json() async for e in src.aiter_sse()]
        assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]
        return str(events[-1]["generated_text"])

    async def all_at_once() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, b) for b in bodies)), 60)

    together = asyncio.run(all_at_once())
    assert together == alone
    after = server.metrics()
    key = "seq2serve_batch_size_bucket{kind=generate,le=1.0}"
    count = "seq2serve_batch_size_count{kind=generate}"
    singles = after[key] - before.get(key, 0)
    steps = after[count] - before.get(count, 0)
    assert steps > singles, "no decoder step ran more than one sequence"


# -- a slow model: streams long enough to leave, to queue behind, to keep alive -------------


@pytest.fixture(scope="module")
def slow(tiny_bundle):
    settings = settings_for(
        tiny_bundle, max_batch_size=1, max_queue=1, keepalive_s=0.02, max_wait_ms=0
    )
    registry = CollectorRegistry()
    engine = slow_engine(tiny_bundle, settings, delay_s=0.05, registry=registry)
    with running_server(settings, engine=engine, registry=registry) as srv:
        yield srv


def gauge(server: Any, name: str) -> float:
    return server.metrics()[name + "{}"]


def wait_for(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_keepalive_comment_when_idle(slow):
    body = {"inputs": "12", "parameters": {"max_new_tokens": 3}, "stream": True}
    with slow.client() as c, c.stream("POST", "/v1/generate", json=body) as r:
        raw = b"".join(r.iter_raw()).decode()
    assert ": keep-alive\n\n" in raw
    data = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: ")]
    assert data[-1]["generated_text"] == "".join(d["token"]["text"] for d in data)


def test_disconnect_cancels_the_sequence(slow):
    assert wait_for(lambda: gauge(slow, "seq2serve_active_sequences") == 0, 5)
    before = gauge(slow, "seq2serve_active_sequences")
    body = {"inputs": "1234", "parameters": {"max_new_tokens": 64}, "stream": True}
    with slow.client() as c:
        with connect_sse(c, "POST", "/v1/generate", json=body) as source:
            events = source.iter_sse()
            next(events)
            next(events)
            assert gauge(slow, "seq2serve_active_sequences") == before + 1
        # The response is closed here, with about 60 tokens still to go (3 s).
        left = time.monotonic()
        assert wait_for(lambda: gauge(slow, "seq2serve_active_sequences") == before, 1.0)
        assert time.monotonic() - left < 1.0
        tokens = slow.metrics()["seq2serve_generated_tokens_total{}"]
        time.sleep(0.3)
        assert slow.metrics()["seq2serve_generated_tokens_total{}"] == tokens


def test_disconnect_cancels_a_non_streamed_request(slow):
    assert wait_for(lambda: gauge(slow, "seq2serve_active_sequences") == 0, 5)
    body = {"inputs": "1234", "parameters": {"max_new_tokens": 64}}
    with slow.client(timeout=0.4) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/generate", json=body)
    assert wait_for(lambda: gauge(slow, "seq2serve_active_sequences") == 0, 1.0)


def test_queue_full_is_429_before_the_stream_opens(slow):
    assert wait_for(lambda: gauge(slow, "seq2serve_active_sequences") == 0, 5)
    body = {"inputs": "1234", "parameters": {"max_new_tokens": 64}, "stream": True}
    with (
        slow.client() as a,
        slow.client() as b,
        slow.client() as c,
        connect_sse(a, "POST", "/v1/generate", json=body) as first,
    ):
        # Keep the iterator: a discarded one closes the response (and the stream).
        first_events = first.iter_sse()
        next(first_events)  # in the batch (its only slot)
        with b.stream("POST", "/v1/generate", json=body) as second:
            assert second.status_code == 200  # waiting in the queue (its only place)
            assert wait_for(lambda: gauge(slow, "seq2serve_queue_depth") == 1, 2)
            for request in (body, {**body, "stream": False}):
                r = c.post("/v1/generate", json=request)
                assert r.status_code == 429, r.text
                assert r.headers["content-type"].startswith("application/json")
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
            r = c.post("/v1/encode", json={"inputs": "a"})
            assert r.status_code == 429
    assert wait_for(lambda: gauge(slow, "seq2serve_active_sequences") == 0, 2)
    assert wait_for(lambda: gauge(slow, "seq2serve_queue_depth") == 0, 2)


# -- a model that fails mid-stream --------------------------------------------------------


class FailingBackend(OnnxBackend):
    """Raises from the decoder once ``fail_after`` more calls have run (None: never)."""

    fail_after: int | None = None

    def _count(self) -> None:
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise RuntimeError("simulated device failure")
            self.fail_after -= 1

    def decode(self, *args: Any, **kwargs: Any) -> DecoderResult:
        self._count()
        return super().decode(*args, **kwargs)

    def step_in_place(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return super().step_in_place(*args, **kwargs)


def test_error_after_the_stream_opened(tiny_bundle):
    settings = settings_for(tiny_bundle)
    registry = CollectorRegistry()
    bundle = load_bundle(tiny_bundle, threads=1)
    backend = FailingBackend(bundle)
    engine = Engine(backend, bundle.tokenizer, EngineLimits(), EngineMetrics(registry))
    with running_server(settings, engine=engine, registry=registry) as srv, srv.client() as c:
        backend.fail_after = 3
        body = {"inputs": "1234", "parameters": {"max_new_tokens": 20}, "stream": True}
        with connect_sse(c, "POST", "/v1/generate", json=body) as source:
            assert source.response.status_code == 200
            events = list(source.iter_sse())
        assert [e.event for e in events] == ["message"] * 3 + ["error"]
        error = events[-1].json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "simulated device failure" in error["message"]

        backend.fail_after = 0
        r = c.post("/v1/generate", json={**body, "stream": False})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        backend.fail_after = None
        assert c.post("/v1/generate", json={**body, "stream": False}).status_code == 200

        async def broken(source_ids: Any) -> Any:
            raise ValueError("a bug, not the client's fault")

        engine.encode = broken  # an unexpected exception below a route
        r = c.post("/v1/encode", json={"inputs": "a"})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["error"] == {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(1, 10**9),
    token_id=st.integers(-1, 2**31),
    text=st.text(),
    logprob=st.floats(),  # NaN and infinities included: they go out as null
    special=st.booleans(),
)
def test_a_token_event_is_written_as_the_general_encoder_writes_it(
    index, token_id, text, logprob, special
):
    """Token events are formatted directly (one per token per stream): byte for byte the
    event ``sse.data_event`` makes of the same fields, escapes and non-ASCII included."""
    event = TokenEvent(0, token_id, text, logprob, special)
    payload = {"index": index, "token": token_json(event), "generated_text": None, "details": None}
    assert token_event(index, event) == sse.data_event(payload)
