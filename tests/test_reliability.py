"""Reliability: the short form of ``python -m seq2serve.reliability`` (load, soak, cancellation,
overload, bad bundles, SIGTERM drain, hostile input, API keys) against real server processes,
plus what needs the inside of a server: an exception in the engine for one request fails that
request alone, the key comparison is constant-time, nothing on the serving path unpickles, and
``pip-audit`` finds no known vulnerability in the runtime dependencies."""

from __future__ import annotations

import hmac
import threading
import time
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from seq2serve import reliability
from seq2serve.engine.generation import DecodeBatch, Sequence, TokenEvent
from seq2serve.service import deps
from tests.conftest import DEFAULT_BUNDLE
from tests.service_helpers import running_server, settings_for, slow_engine

pytestmark = pytest.mark.timeout(240)


@pytest.mark.slow
def test_short_form_passes():
    """Every check of the short form meets its bar (the report is in the failure message)."""
    report = reliability.run(reliability.short_config(DEFAULT_BUNDLE))
    assert not report.failed, report.table()


# -- a fault inside the engine -------------------------------------------------------------

POISON = ">>de<< 1234"  # the request whose sequence the injected fault breaks
OTHERS = [">>fr<< 2021-03-04", ">>ja<< 77", ">>ru<< 1999-12-31"]


def _generate(client: httpx.Client, text: str, stream: bool) -> dict[str, Any]:
    """One request: for a stream, its event kinds, its concatenated text and its last payload."""
    body = {"inputs": text, "parameters": {"max_new_tokens": 12}, "stream": stream}
    if not stream:
        r = client.post("/v1/generate", json=body)
        return {"status": r.status_code, "json": r.json()}
    with connect_sse(client, "POST", "/v1/generate", json=body) as source:
        events = list(source.iter_sse())
        status = source.response.status_code
    data = [e.json() for e in events]
    return {
        "status": status,
        "kinds": [e.event for e in events],
        "text": "".join(d["token"]["text"] for d in data if "token" in d),
        "last": data[-1],
    }


def test_an_engine_fault_fails_one_request_alone(tiny_bundle, monkeypatch):
    """A bug that raises inside the engine for one sequence ends that request with a clean
    error (``event: error`` once streaming, a JSON 500 otherwise) while its batch-mates,
    in the same decoder steps, finish with the text they get alone."""
    settings = settings_for(tiny_bundle, max_batch_size=8)
    registry = CollectorRegistry()
    # 20 ms a step: the four requests, sent together, share their decoder steps.
    engine = slow_engine(tiny_bundle, settings, delay_s=0.02, registry=registry)
    poison_ids = engine.tokenizer.encode(POISON).ids
    advance = DecodeBatch._advance
    batch_rows: list[int] = []

    def faulty(self: DecodeBatch, seq: Sequence, token: int, logprob: float) -> TokenEvent:
        if seq.source_ids == poison_ids and len(seq.generated) == 3:
            batch_rows.append(len(self.rows))
            raise RuntimeError("injected fault")
        return advance(self, seq, token, logprob)

    with running_server(settings, engine=engine, registry=registry) as srv, srv.client() as c:
        alone = {t: _generate(c, t, stream=False)["json"]["generated_text"] for t in OTHERS}
        monkeypatch.setattr(DecodeBatch, "_advance", faulty)
        results: dict[str, dict[str, Any]] = {}

        def run(text: str) -> None:
            with srv.client() as own:
                results[text] = _generate(own, text, stream=True)

        threads = [threading.Thread(target=run, args=(t,)) for t in [*OTHERS, POISON]]
        # The others first, and in the batch before the poisoned request comes: on a slow
        # host, requests sent together could reach the engine more than two steps apart.
        for t in threads[:-1]:
            t.start()
        deadline = time.monotonic() + 30
        while engine.active_sequences < len(OTHERS) and time.monotonic() < deadline:
            time.sleep(0.002)
        threads[-1].start()
        for t in threads:
            t.join(60)
        bad = results[POISON]
        assert bad["status"] == 200 and bad["kinds"] == ["message"] * 3 + ["error"]
        assert set(bad["last"]["error"]) == {"message", "type", "param", "code"}
        assert "injected fault" in bad["last"]["error"]["message"]
        assert max(batch_rows) > 1, "the faulty request did not share its batch"
        for text in OTHERS:
            assert results[text]["kinds"][-1] == "message"
            assert results[text]["text"] == alone[text] == results[text]["last"]["generated_text"]

        failed = _generate(c, POISON, stream=False)
        assert failed["status"] == 500
        assert failed["json"]["error"]["code"] == "engine_error"
        assert _generate(c, OTHERS[0], stream=False)["json"]["generated_text"] == alone[OTHERS[0]]
        assert srv.metrics()["seq2serve_active_sequences{}"] == 0


@pytest.mark.slow
def test_a_slow_reader_is_judged_after_its_generation_ends(tiny_bundle):
    """The slow-reader check of the hostile part counts slots and requests held only once
    the reader's generation should be over, however long it takes on the host: here its
    steps take 45 ms, so its 64 tokens take longer than the two seconds the check once
    assumed. Its slot stays active while it generates and is released after, while the
    reader has read a few bytes."""
    settings = settings_for(tiny_bundle, max_batch_size=8)
    registry = CollectorRegistry()
    engine = slow_engine(tiny_bundle, settings, delay_s=0.045, registry=registry)
    with running_server(settings, engine=engine, registry=registry) as srv, srv.client() as c:
        prompt = reliability.Prompt(OTHERS[0], 4)
        alone = reliability.alone_results(srv.base_url, [prompt])
        max_new = c.get("/info").json()["limits"]["max_new_tokens"]
        slow = reliability._slow_client(srv.base_url, 1.0, max_new, alone, [prompt])
    assert slow["generation_alone_s"] > 2.5
    assert slow["server_closed_after_s"] is None and slow["bytes_read"] < 100
    assert slow["others_ok"] == slow["others"] > 0
    assert slow["active_sequences_while_stalled"][:2] == [1, 1]  # generating meanwhile
    slots, requests, judged = reliability.held_after_generation(slow)
    assert judged >= 2 and slots == [] and requests == []


# -- security ------------------------------------------------------------------------------


def test_api_key_is_compared_in_constant_time(tiny_bundle, monkeypatch):
    """Every key check goes through ``hmac.compare_digest``; every /v1 route refuses a
    missing or wrong key."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    settings = settings_for(tiny_bundle, api_key="s3cret")
    with running_server(settings) as srv, srv.client() as c:
        paths = [
            (method.upper(), path)
            for path, ops in c.get("/openapi.json").json()["paths"].items()
            if path.startswith("/v1")
            for method in ops
        ]
        assert len(paths) >= 6
        for method, path in paths:
            for headers in ({}, {"Authorization": "Bearer s3creT"}):
                r = c.request(method, path, json={"inputs": "1"}, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert (b"s3creT", b"s3cret") in calls and (b"s3cret", b"s3cret") in calls
    assert reliability.key_comparison_is_constant_time()


def test_weights_never_unpickle():
    """Nothing on the serving path can unpickle; weights come from safetensors and ONNX."""
    assert reliability.unsafe_loading() == []
    assert all(reliability.weight_loaders().values()), reliability.weight_loaders()
    # The scan itself finds what it looks for.
    for line in ("torch.load(path)", "import pickle", "np.load(f, allow_pickle=True)"):
        assert reliability.UNSAFE_LOADING.search(line), line


@pytest.mark.slow
def test_pip_audit_finds_no_known_vulnerability():
    audit = reliability.pip_audit(timeout_s=120)
    if "vulnerabilities" not in audit:
        pytest.skip(str(audit["skipped"]))
    if not audit["audited"]:
        pytest.skip(f"pip-audit could audit none of the {len(audit['skipped'])} pinned versions")
    assert audit["dependencies"] >= len(reliability.runtime_requirements())
    assert audit["vulnerabilities"] == [], audit["vulnerabilities"]


def _sentencepiece_like() -> Tokenizer:
    """A tokenizer like opus-mt's where it matters here: every text starts with a word-start
    piece of its own, and digits merge into pieces of several digits."""
    from tokenizers import decoders, models, pre_tokenizers, processors

    pieces = ["</s>", "<unk>", "▁", *"0123456789", "12", "34", "345", "a", "x", "."]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab, [("1", "2"), ("3", "4"), ("34", "5")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 0)]
    )
    return tok


def test_filler_texts_have_every_length_a_tokenizer_can_give():
    """The suite's inputs of a given length in ids, from the default model's tokenizer and
    from one whose digits merge and whose texts all begin with a piece of their own."""
    default = Tokenizer.from_file(str(DEFAULT_BUNDLE / "tokenizer.json"))
    merging = _sentencepiece_like()
    assert len(merging.encode("0123456789").ids) < 11  # digits alone would not do
    for tok, shortest in ((default, 2), (merging, 3)):
        texts = reliability.texts_by_length(tok, 300)
        assert sorted(texts) == list(range(shortest, 301))
        for n, text in texts.items():
            assert len(tok.encode(text).ids) == n
    with pytest.raises(ValueError, match="exactly 2 ids"):
        reliability.text_of_tokens(merging, 2)
