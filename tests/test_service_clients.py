"""Real clients, unmodified, against a real uvicorn on 127.0.0.1: the official ``openai``
client, ``huggingface_hub.InferenceClient``, schemathesis fuzzing the OpenAPI document, and
``promtool`` checking the metrics text."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seq2serve.reliability import schemathesis_command
from tests.service_helpers import running_server, settings_for

pytestmark = pytest.mark.timeout(180)

PROMPT = ">>ru<< 1999-12-31"


@pytest.fixture(scope="module")
def expected(server):
    """Greedy text for PROMPT at 12 tokens, from the plain HTTP route."""
    with server.client() as c:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True}}
        return c.post("/v1/generate", json=body).json()


@pytest.fixture(scope="module")
def model_id(server):
    with server.client() as c:
        return c.get("/v1/models").json()["data"][0]["id"]


def test_openai_client(server, expected, model_id):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=30
    )
    assert [m.id for m in client.models.list()] == [model_id]

    completion = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=12, temperature=0
    )
    assert completion.choices[0].text == expected["generated_text"]
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    stream = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["generated_text"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    texts = ["jeudi 4 mars 2021", "семьдесят семь"]
    with server.client() as c:
        reference = c.post("/v1/encode", json={"inputs": texts}).json()["embeddings"]
    default = client.embeddings.create(model=model_id, input=texts)  # asks for base64
    floats = client.embeddings.create(model=model_id, input=texts, encoding_format="float")
    for response in (default, floats):
        got = [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
        np.testing.assert_allclose(got, reference, atol=1e-6)

    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10_000)
    assert "max_tokens" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)


def test_huggingface_inference_client(server, expected):
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(server.base_url, timeout=30)
    text = expected["generated_text"]

    assert client.text_generation(PROMPT, max_new_tokens=12) == text
    pieces = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert "".join(pieces) == text

    events = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True))
    assert [e.token.id for e in events] == [t["id"] for t in expected["details"]["tokens"]]
    last = events[-1]
    assert last.generated_text == text
    assert last.details is not None
    assert last.details.finish_reason == expected["details"]["finish_reason"]
    assert last.details.generated_tokens == expected["details"]["generated_tokens"]

    output = client.text_generation(PROMPT, max_new_tokens=12, details=True)
    assert output.generated_text == text
    assert output.details.generated_tokens == len(output.details.tokens)


def _schemathesis() -> str:
    pytest.importorskip("schemathesis")
    exe = Path(sys.executable).parent / "schemathesis"
    if not exe.exists():
        pytest.skip("the schemathesis command is not installed next to this Python")
    return str(exe)


def test_schemathesis_finds_nothing(server, tmp_path):
    """Fuzz every operation from the OpenAPI document: no 5xx, every status, header, content
    type and body (SSE events included) as documented, schema-invalid input refused.

    ``positive_data_acceptance`` is left out: a schema-valid text can still hold more tokens
    than the model takes (a 422 that JSON Schema cannot express: it counts characters, not
    tokens), and sampling with temperature 0 is a 422 that depends on another field.
    """
    command = schemathesis_command(
        _schemathesis(), server.base_url, 25, 1, "--output-sanitize", "false"
    )
    out = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout


def test_schemathesis_with_api_key(tiny_bundle, tmp_path):
    """With a key configured, the document declares bearer auth and the fuzzer also checks
    that requests without it are refused (``ignored_auth``)."""
    settings = settings_for(tiny_bundle, api_key="k3y")
    with running_server(settings) as srv:
        command = schemathesis_command(
            _schemathesis(), srv.base_url, 8, 2, "--header", "Authorization: Bearer k3y"
        )
        out = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_promtool_accepts_metrics(server, model_id):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    with server.client() as c:
        # Traffic first, so every series family has samples.
        c.post("/v1/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
        c.post("/v1/encode", json={"inputs": "a"})
        c.post("/v1/encode", json={"inputs": ""})
        text = c.get("/metrics").text
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "seq2serve_time_to_first_token_seconds_count" in text
