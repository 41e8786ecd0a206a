"""The HTTP API against a real uvicorn on 127.0.0.1: every route's happy path, and bad input
on every route answered with the right 4xx in the one error shape, never a 5xx."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from seq2serve.engine.bundle import load_bundle
from seq2serve.service.app import create_app
from seq2serve.service.settings import Limits, Settings
from tests.service_helpers import running_server, settings_for

pytestmark = pytest.mark.timeout(120)

LONG_TEXT = " ".join(str(n) for n in range(200))  # far more than the tiny model's 64 tokens


@pytest.fixture(scope="module")
def model_id(client):
    return client.get("/v1/models").json()["data"][0]["id"]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- operations ---------------------------------------------------------------------------


def test_health_ready_info(client, tiny_bundle):
    for path in ("/health", "/v2/health/live"):
        assert client.get(path).json() == {"status": "ok"}
    for path in ("/ready", "/v2/health/ready"):
        r = client.get(path)
        assert r.status_code == 200 and r.json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["model_id"] == tiny_bundle.name
    assert info["runtime"] == "onnx"
    assert info["execution_provider"] == "CPUExecutionProvider"
    assert info["config"]["d_model"] == 32
    assert info["limits"]["max_input_tokens"] == 64  # capped by the model
    assert info["limits"]["max_new_tokens"] == 64
    assert info["version"]


def test_metrics_text(client):
    client.get("/health")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'seq2serve_requests_total{route="/health",status="200"}' in text
    client.get("/openapi.json")
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'seq2serve_requests_total{route="/openapi.json",status="200"}' in text
    assert 'seq2serve_requests_total{route="unmatched",status="404"}' in text
    for name in (
        "seq2serve_request_duration_seconds_bucket",
        "seq2serve_batch_size_bucket",
        "seq2serve_queue_depth",
        "seq2serve_active_sequences",
        "seq2serve_generated_tokens_total",
        "seq2serve_time_to_first_token_seconds_bucket",
        "seq2serve_inter_token_latency_seconds_bucket",
    ):
        assert name in text


def test_request_id_honoured_or_made(client):
    r = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces" * 20})
    assert r.headers["x-request-id"] != "bad id" and len(r.headers["x-request-id"]) == 32
    r = client.post("/v1/generate", json={"inputs": ""})
    assert len(r.headers["x-request-id"]) == 32
    made = {client.get("/health").headers["x-request-id"] for _ in range(50)}
    assert len(made) == 50 and all(len(m) == 32 and int(m, 16) >= 0 for m in made)


def test_openapi_documents_streams_and_errors(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "text/event-stream" in responses["200"]["content"]
        assert "application/json" in responses["200"]["content"]
    for path in ("/v1/generate", "/v1/encode", "/v1/classify", "/v1/completions", "/v1/embeddings"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "401", "413", "422", "429", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
        assert "Retry-After" in responses["429"]["headers"]
    # No API key configured: the document declares no security either.
    assert "securitySchemes" not in spec.get("components", {})
    assert client.get("/docs").status_code == 200


# -- encode / classify --------------------------------------------------------------------


def test_encode_pooling_and_normalize(client, model_id):
    texts = [">>fr<< 2021-03-04", "jeudi 4 mars 2021", "日本語のテキスト"]
    one = client.post("/v1/encode", json={"inputs": texts[0]}).json()
    assert one["model"] == model_id and len(one["embeddings"]) == 1
    assert len(one["embeddings"][0]) == 32
    assert np.isclose(np.linalg.norm(one["embeddings"][0]), 1.0, atol=1e-5)

    body = {"inputs": texts, "normalize": False}
    mean = np.asarray(client.post("/v1/encode", json=body).json()["embeddings"])
    first = np.asarray(
        client.post("/v1/encode", json={**body, "pooling": "first"}).json()["embeddings"]
    )
    r = client.post("/v1/encode", json={**body, "pooling": "none"}).json()
    assert "embeddings" not in r
    states = [np.asarray(h) for h in r["hidden_states"]]
    assert [len(h) for h in states] == [r["usage"]["input_tokens"] and len(h) for h in states]
    for i, h in enumerate(states):
        # Oracles: mean pooling is the mean of the token states; first is the first state.
        np.testing.assert_allclose(mean[i], h.mean(axis=0), atol=1e-4)
        np.testing.assert_allclose(first[i], h[0], atol=1e-5)
    # Batched with others equals alone.
    alone = client.post("/v1/encode", json={"inputs": texts[1], "normalize": False}).json()
    np.testing.assert_allclose(alone["embeddings"][0], mean[1], atol=1e-4)
    assert r["usage"]["input_tokens"] == sum(len(h) for h in states)


def test_encode_truncate(client):
    error = assert_error(client.post("/v1/encode", json={"inputs": LONG_TEXT}), 422, "inputs")
    assert "64" in error["message"] and "max_input_tokens" in error["message"]
    error = assert_error(
        client.post("/v1/encode", json={"inputs": ["ok", LONG_TEXT]}), 422, "inputs.1"
    )
    r = client.post("/v1/encode", json={"inputs": [LONG_TEXT], "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == 64


def test_classify(client, tiny_bundle):
    labels = set(load_bundle(tiny_bundle).config.labels)
    r = client.post("/v1/classify", json={"inputs": ["jeudi 4 mars 2021", "1234"]}).json()
    assert len(r["results"]) == 2
    for result in r["results"]:
        assert {x["label"] for x in result} == labels
        scores = [x["score"] for x in result]
        assert scores == sorted(scores, reverse=True)
        assert np.isclose(sum(scores), 1.0)
    top = client.post("/v1/classify", json={"inputs": "1234", "top_k": 2}).json()
    assert len(top["results"][0]) == 2
    assert top["results"][0] == r["results"][1][:2]
    assert r["usage"]["input_tokens"] > 0


# -- generate -----------------------------------------------------------------------------


def test_generate_details(client):
    body = {"inputs": ">>de<< 1234", "parameters": {"max_new_tokens": 12, "details": True}}
    r = client.post("/v1/generate", json=body).json()
    details = r["details"]
    assert "".join(t["text"] for t in details["tokens"]) == r["generated_text"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 12
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["input_length"] > 0 and details["seed"] is None
    plain = client.post("/v1/generate", json={**body, "parameters": {"max_new_tokens": 12}})
    assert plain.json() == {"generated_text": r["generated_text"]}


def test_tiny_temperatures_are_greedy(client):
    """Dividing logits by a denormal temperature overflows to NaN; below 1e-5 is greedy."""
    greedy = client.post(G, json={"inputs": "77", "parameters": {"max_new_tokens": 8}}).json()
    for params in ({"do_sample": True, "temperature": 5e-324}, {"temperature": 1e-6}):
        body = {"inputs": "77", "parameters": {"max_new_tokens": 8, **params}}
        assert client.post(G, json=body).json() == greedy
    model = client.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "77", "max_tokens": 8, "temperature": 5e-324}
    r = client.post(CMP, json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy["generated_text"]


def test_generate_sampling_and_beams(client):
    params = {"max_new_tokens": 10, "do_sample": True, "seed": 7, "temperature": 0.9}
    params |= {"top_k": 50, "top_p": 0.95, "repetition_penalty": 1.2, "details": True}
    a = client.post("/v1/generate", json={"inputs": "1999", "parameters": params}).json()
    b = client.post("/v1/generate", json={"inputs": "1999", "parameters": params}).json()
    assert a == b and a["details"]["seed"] == 7
    r = client.post(
        "/v1/generate", json={"inputs": "1999", "parameters": {"num_beams": 3, "max_new_tokens": 8}}
    )
    assert r.status_code == 200 and isinstance(r.json()["generated_text"], str)


def test_tgi_aliases(client):
    body = {"inputs": ">>ru<< 5", "parameters": {"max_new_tokens": 6}}
    expected = client.post("/v1/generate", json=body).json()["generated_text"]
    assert client.post("/generate", json=body).json()["generated_text"] == expected
    # InferenceClient posts to the base URL, without a Content-Type header.
    r = client.post("/", content=json.dumps(body).encode(), headers={"content-type": ""})
    assert r.json()["generated_text"] == expected
    r = client.post("/generate_stream", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    last = json.loads(r.text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["generated_text"] == expected


# -- OpenAI-compatible --------------------------------------------------------------------


def test_models(client, model_id, tiny_bundle):
    assert model_id == tiny_bundle.name
    card = client.get(f"/v1/models/{model_id}").json()
    assert card["object"] == "model" and card["id"] == model_id
    assert_error(client.get("/v1/models/nope"), 404)
    # An unknown model is a 404, as OpenAI answers it.
    for path, body in ((CMP, {"prompt": "a"}), (EMB, {"input": "a"})):
        error = assert_error(client.post(path, json={**body, "model": "other"}), 404, "model")
        assert error["code"] == "model_not_found" and model_id in error["message"]


def test_completions_match_generate(client, model_id):
    prompts = [">>fr<< 2021-03-04", ">>ja<< 77"]
    expected = [
        client.post("/v1/generate", json={"inputs": p, "parameters": {"max_new_tokens": 9}}).json()
        for p in prompts
    ]
    body = {"model": model_id, "prompt": prompts, "max_tokens": 9, "temperature": 0}
    r = client.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["model"] == model_id
    assert [c["text"] for c in r["choices"]] == [e["generated_text"] for e in expected]
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in r["choices"])
    usage = r["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_embeddings_float_and_base64(client, model_id):
    texts = ["un", "deux trois"]
    encoded = client.post("/v1/encode", json={"inputs": texts}).json()["embeddings"]
    floats = client.post("/v1/embeddings", json={"model": model_id, "input": texts}).json()
    assert [d["index"] for d in floats["data"]] == [0, 1]
    np.testing.assert_allclose([d["embedding"] for d in floats["data"]], encoded, atol=1e-6)
    b64 = client.post(
        "/v1/embeddings", json={"model": model_id, "input": texts, "encoding_format": "base64"}
    ).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]]
    np.testing.assert_allclose(decoded, encoded, atol=1e-6)
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0


# -- bad input ----------------------------------------------------------------------------

G = "/v1/generate"
E = "/v1/encode"
C = "/v1/classify"
CMP = "/v1/completions"
EMB = "/v1/embeddings"
MODEL = "__model__"  # replaced with the served id

BAD = [
    (G, {}, "inputs"),
    (G, {"inputs": ""}, "inputs"),
    (G, {"inputs": 5}, "inputs"),
    (G, {"inputs": ["a"]}, "inputs"),
    (G, {"inputs": LONG_TEXT}, "inputs"),
    (G, {"inputs": "a", "stream": "yes"}, "stream"),
    (G, {"inputs": "a", "stream": 1}, "stream"),
    (G, {"inputs": "a", "foo": 1}, "foo"),
    (G, {"inputs": "a", "parameters": {"best_of": 2}}, "parameters.best_of"),
    (G, {"inputs": "a", "parameters": []}, "parameters"),
    (G, {"inputs": "a", "parameters": {"max_new_tokens": True}}, "parameters.max_new_tokens"),
    (G, {"inputs": "a", "parameters": {"max_new_tokens": 1.5}}, "parameters.max_new_tokens"),
    (G, {"inputs": "a", "parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens"),
    (G, {"inputs": "a", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    (G, {"inputs": "a", "parameters": {"max_new_tokens": 65}}, "parameters.max_new_tokens"),
    (G, {"inputs": "a", "parameters": {"do_sample": 1}}, "parameters.do_sample"),
    (
        G,
        {"inputs": "a", "parameters": {"do_sample": True, "temperature": 0}},
        "parameters.temperature",
    ),
    (G, {"inputs": "a", "parameters": {"temperature": -1}}, "parameters.temperature"),
    (G, {"inputs": "a", "parameters": {"temperature": True}}, "parameters.temperature"),
    (G, {"inputs": "a", "parameters": {"top_p": 0}}, "parameters.top_p"),
    (G, {"inputs": "a", "parameters": {"top_p": 1.01}}, "parameters.top_p"),
    (G, {"inputs": "a", "parameters": {"top_k": -1}}, "parameters.top_k"),
    (G, {"inputs": "a", "parameters": {"repetition_penalty": 0}}, "parameters.repetition_penalty"),
    (
        G,
        {"inputs": "a", "parameters": {"repetition_penalty": 1e-9}},
        "parameters.repetition_penalty",
    ),
    (G, {"inputs": "a", "parameters": {"num_beams": 2}, "stream": True}, "parameters.num_beams"),
    (G, {"inputs": "a", "parameters": {"num_beams": 2, "do_sample": True}}, "parameters.num_beams"),
    (G, {"inputs": "a", "parameters": {"num_beams": 99}}, "parameters.num_beams"),
    (
        G,
        {"inputs": "a", "parameters": {"num_beams": 2, "length_penalty": 1e308}},
        "parameters.length_penalty",
    ),
    (G, {"inputs": "a", "parameters": {"seed": -1}}, "parameters.seed"),
    (G, {"inputs": "a", "parameters": {"seed": 2**64}}, "parameters.seed"),
    (G, {"inputs": "a", "parameters": {"stop": "x"}}, "parameters.stop"),
    (G, {"inputs": "a", "parameters": {"stop": [""]}}, "parameters.stop.0"),
    (G, {"inputs": "a", "parameters": {"stop": ["x" * 257]}}, "parameters.stop.0"),
    (G, {"inputs": "a", "parameters": {"stop": ["x"] * 17}}, "parameters.stop"),
    (G, {"inputs": "a", "parameters": {"stop": [5]}}, "parameters.stop.0"),
    (G, {"inputs": "a", "parameters": {"details": "true"}}, "parameters.details"),
    (E, {"inputs": []}, "inputs"),
    (E, {"inputs": [""]}, "inputs.0"),
    (E, {"inputs": ""}, "inputs"),
    (E, {"inputs": ["a"] * 65}, "inputs"),
    (E, {"inputs": [1, 2]}, "inputs.0"),
    (E, {"inputs": "a", "pooling": "max"}, "pooling"),
    (E, {"inputs": "a", "normalize": "true"}, "normalize"),
    (E, {"inputs": "a", "truncate": 1}, "truncate"),
    (E, {"inputs": "a", "extra": None}, "extra"),
    (C, {"inputs": "a", "top_k": 0}, "top_k"),
    (C, {"inputs": "a", "top_k": True}, "top_k"),
    (C, {"inputs": LONG_TEXT}, "inputs"),
    (C, {"inputs": None}, "inputs"),
    (CMP, {"model": MODEL}, "prompt"),
    (CMP, {"model": MODEL, "prompt": []}, "prompt"),
    (CMP, {"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
    (CMP, {"model": MODEL, "prompt": "a", "max_tokens": 1000}, "max_tokens"),
    (CMP, {"model": MODEL, "prompt": "a", "temperature": 2.5}, "temperature"),
    (CMP, {"model": MODEL, "prompt": "a", "top_p": 0}, "top_p"),
    (CMP, {"model": MODEL, "prompt": "a", "n": 2}, "n"),
    (CMP, {"model": MODEL, "prompt": ["a", "b"], "stream": True}, "prompt"),
    (CMP, {"model": MODEL, "prompt": "a", "stop": ["x"] * 17}, "stop"),
    (CMP, {"model": MODEL, "prompt": "a", "logit_bias": {}}, "logit_bias"),
    (EMB, {"model": MODEL, "input": []}, "input"),
    (EMB, {"model": MODEL, "input": 5}, "input"),
    (EMB, {"model": MODEL, "input": LONG_TEXT}, "input"),
    (EMB, {"model": MODEL, "input": "a", "encoding_format": "binary"}, "encoding_format"),
    (EMB, {"input": "a"}, "model"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), BAD, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD)]
)
def test_bad_field_is_422(client, model_id, path, body, param):
    if body.get("model") == MODEL:
        body = {**body, "model": model_id}
    error = assert_error(client.post(path, json=body), 422, param)
    assert error["type"] == "invalid_request_error"
    if param in ("parameters.max_new_tokens", "max_tokens") and "limit" in error["message"]:
        assert "64" in error["message"]


@pytest.mark.parametrize("path", [G, E, C, CMP, EMB])
@pytest.mark.parametrize(
    "raw",
    [
        b'{"inputs": ',
        b"not json",
        b'{"inputs": "\xff\xfe"}',
        b"\xff\xfe\x00\x01",
        b'{"a":1}}',
        '{"inputs": "a"}'.encode("utf-16"),
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["truncated", "not-json", "bad-utf8-in-string", "bad-utf8", "trailing", "utf16", "deep"],
)
def test_malformed_body_is_400(client, path, raw):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_non_object_bodies_are_422(client):
    for raw in (b"[1, 2]", b'"text"', b"null", b"3"):
        r = client.post(G, content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text
        assert_error(r, r.status_code)
    assert_error(client.post(G, content=b"", headers={"content-type": "application/json"}), 422)


def test_lone_surrogate_is_422(client):
    raw = b'{"inputs": "\\ud800 abc"}'
    for path in (G, E):
        assert_error(
            client.post(path, content=raw, headers={"content-type": "application/json"}),
            422,
            "inputs",
        )
    raw = b'{"inputs": "abc", "parameters": {"stop": ["\\udfff"]}}'
    assert_error(
        client.post(G, content=raw, headers={"content-type": "application/json"}),
        422,
        "parameters.stop.0",
    )


def test_oversize_body_is_413(client):
    big = {"inputs": "a" * (1 << 20)}
    error = assert_error(client.post(E, json=big), 413)
    assert str(1 << 20) in error["message"]

    def chunks():
        # No Content-Length: the limit must be enforced by counting what arrives.
        yield b'{"inputs": "'
        for _ in range(40):
            yield b"a" * 32768
        yield b'"}'

    error = assert_error(
        client.post(E, content=chunks(), headers={"content-type": "application/json"}), 413
    )
    assert error["code"] == "body_too_large"


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/v1/generate"), 405)
    assert_error(client.delete("/health"), 405)


def test_no_server_error_after_abuse(server):
    counts = server.metrics()
    errors = [
        k
        for k, v in counts.items()
        if k.startswith("seq2serve_requests_total") and "status=5" in k and v
    ]
    assert not errors, errors


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/encode", {"inputs": "1234"}),
        ("/v1/classify", {"inputs": "1234"}),
        ("/v1/generate", {"inputs": "1234"}),
        ("/v1/generate", {"inputs": "1234", "stream": True}),
        ("/generate_stream", {"inputs": "1234"}),
        ("/v1/completions", {"prompt": "1234"}),
        ("/v1/embeddings", {"input": "1234"}),
    ],
)
def test_model_routes_answer_503_until_the_model_is_warm(tiny_bundle, path, body):
    # Without the lifespan the model is never loaded: every route that runs it refuses.
    client = TestClient(create_app(settings_for(tiny_bundle)))
    error = assert_error(client.post(path, json=body), 503)
    assert error["code"] == "not_ready"
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQ2SERVE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("SEQ2SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("SEQ2SERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("SEQ2SERVE_API_KEY", "")
    monkeypatch.setenv("SEQ2SERVE_RUNTIME", "onnx")
    s = Settings()
    assert s.model_dir == tmp_path and s.max_batch_size == 8
    assert s.log_level == "DEBUG" and s.api_key is None  # an empty key means no auth
    monkeypatch.setenv("SEQ2SERVE_API_KEY", "sekrit-1")
    assert Settings().api_key.get_secret_value() == "sekrit-1"
    assert "sekrit" not in repr(Settings())
    for name, value in (("MAX_QUEUE", "0"), ("RUNTIME", "tensorflow"), ("DEVICE", "tpu")):
        monkeypatch.setenv(f"SEQ2SERVE_{name}", value)
        with pytest.raises(ValueError):
            Settings()
        monkeypatch.delenv(f"SEQ2SERVE_{name}")
    assert Settings.model_fields["model_dir"].default.parts[-2:] == ("models", "default")


def test_limits_are_capped_by_the_model(tiny_bundle):
    config = load_bundle(tiny_bundle).config  # 64 source and 64 target positions
    limits = Limits.resolve(Settings(max_input_tokens=1000, max_new_tokens=1000), config)
    assert (limits.max_input_tokens, limits.max_new_tokens) == (64, 64)
    limits = Limits.resolve(Settings(max_input_tokens=10, max_new_tokens=20), config)
    assert (limits.max_input_tokens, limits.max_new_tokens) == (10, 20)
    assert limits.default_new_tokens == 20


# -- auth ---------------------------------------------------------------------------------


def test_api_key(tiny_bundle):
    with running_server(settings_for(tiny_bundle, api_key="s3cret")) as srv, srv.client() as c:
        body = {"inputs": "1234", "parameters": {"max_new_tokens": 3}}
        for path, payload in ((G, body), (E, {"inputs": "a"}), ("/generate", body), ("/", body)):
            assert_error(c.post(path, json=payload), 401)
            assert_error(c.post(path, json=payload, headers={"Authorization": "Bearer nope"}), 401)
            assert_error(c.post(path, json=payload, headers={"Authorization": "s3cret"}), 401)
            ok = c.post(path, json=payload, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200, ok.text
        assert_error(c.get("/v1/models"), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/health", "/ready", "/metrics", "/v2/health/ready", "/openapi.json"):
            assert c.get(path).status_code == 200
        spec = c.get("/openapi.json").json()
        assert "HTTPBearer" in spec["components"]["securitySchemes"]


# -- runtimes -----------------------------------------------------------------------------


def test_torch_runtime_agrees_with_onnx(client, tiny_bundle):
    """runtime=torch serves the same bundle through PyTorch (imported only then)."""
    with (
        running_server(settings_for(tiny_bundle, runtime="torch")) as srv,
        srv.client() as torch_client,
    ):
        info = torch_client.get("/info").json()
        assert info["runtime"] == "torch" and info["execution_provider"] == "torch:cpu"
        for source in (">>de<< 1234", ">>ja<< 77", "jeudi 4 mars 2021"):
            body = {"inputs": source, "parameters": {"max_new_tokens": 16}}
            ours = torch_client.post(G, json=body).json()
            assert ours == client.post(G, json=body).json()
        assert torch_client.post(E, json={"inputs": "abc"}).status_code == 200


def test_quantized_bundle_serves(tiny_bundle):
    with running_server(settings_for(tiny_bundle, quantized=True)) as srv, srv.client() as c:
        assert c.get("/info").json()["quantized"] is True
        body = {"inputs": ">>de<< 1234", "parameters": {"max_new_tokens": 8}}
        assert c.post(G, json=body).status_code == 200


# -- torch-free serving -------------------------------------------------------------------


def test_serving_onnx_never_imports_torch(tiny_bundle):
    script = textwrap.dedent(
        f"""
        import sys
        from fastapi.testclient import TestClient
        import seq2serve.service.app
        import seq2serve.service.server
        from seq2serve.service.settings import Settings
        app = seq2serve.service.app.create_app(Settings(model_dir={str(tiny_bundle)!r}))
        with TestClient(app) as client:
            assert client.get("/ready").status_code == 200
            body = {{"inputs": "12", "parameters": {{"max_new_tokens": 3}}}}
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
        banned = ("torch.", "seq2serve.model")
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(banned))
        assert not loaded, loaded
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
