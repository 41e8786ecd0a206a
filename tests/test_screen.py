"""The fp32 step graph's screened LM head: int8 screen, exact rescoring, certificate.

Against a bundle of the same checkpoint exported without the screen: greedy tokens
identical, the chosen tokens' logits exact, every logit exact when asked for or when the
certificate fails, sampling and beams reading exact logits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from seq2serve import contract
from seq2serve.engine.bundle import load_bundle, session_options
from seq2serve.engine.generation import (
    DecodeBatch,
    SamplingParams,
    beam_search,
    run_to_completion,
)
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.export import quantize, screen
from seq2serve.export.bundle import export_bundle
from tests.conftest import (
    assert_screen_keeps_the_heads_choice,
    first_step_logits,
    greedy_generations,
    largest_int8,
)


def test_the_screened_graph_keeps_the_contract_and_no_transposed_fp32_head(screen_bundles):
    screened, exact = screen_bundles
    assert load_bundle(screened).screened and not load_bundle(exact).screened
    manifest = json.loads((screened / contract.MANIFEST_FILE).read_text())
    inputs = [i["name"] for i in manifest["io"][contract.DECODER_STEP_FILE]["inputs"]]
    assert inputs[-1] == contract.EXACT_LOGITS
    graph = onnx.load(str(screened / contract.DECODER_STEP_FILE), load_external_data=False).graph
    table = next(n.input[0] for n in graph.node if n.op_type == "Gather")
    # The table is read as stored (lookup, rescoring, exact branch); nothing transposes it.
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] == table]
    weights = {i.name: i for i in graph.initializer}
    assert weights[screen.PREFIX + "weight"].data_type == onnx.TensorProto.INT8
    # within the range no CPU's uint8 x int8 kernel saturates on (the bound assumes exact
    # integer products)
    largest = largest_int8(screened / contract.DECODER_STEP_FILE, screen.PREFIX + "weight")
    assert largest == quantize.SATURATION_FREE_WEIGHT


def test_the_screened_step_graph_loads_without_onnxruntime_warnings(screen_bundles, capfd):
    # The warning a server would print at every start (the Slice elimination rule's, for a
    # Slice whose output a subgraph reads) is written by onnxruntime to the stderr stream.
    screened, _ = screen_bundles
    options = session_options(threads=None)  # the server's: every graph optimization
    options.log_severity_level = 2  # warnings and errors
    capfd.readouterr()
    ort.InferenceSession(
        str(screened / contract.DECODER_STEP_FILE), options, providers=["CPUExecutionProvider"]
    )
    err = capfd.readouterr().err
    assert "[W:onnxruntime" not in err and "[E:onnxruntime" not in err, err


@pytest.mark.parametrize("rows", [1, 5])
def test_the_screen_picks_the_exact_argmax_and_its_exact_logit(screen_bundles, rows):
    screened, exact = (OnnxBackend(load_bundle(b)) for b in screen_bundles)
    # The candidates' logits are exact, the chosen one among them, and the rest come from the
    # int8 screen: close, not equal.
    assert_screen_keeps_the_heads_choice(screened, exact, rows, screen_error=(1e-6, 0.5))


@pytest.mark.parametrize("rows", [1, 4])  # the exact head's two forms: one row, several
def test_exact_logits_asked_for_are_exact(screen_bundles, rows):
    screened, exact = (OnnxBackend(load_bundle(b)) for b in screen_bundles)
    for seed in range(3):
        np.testing.assert_allclose(
            first_step_logits(screened, rows, seed, exact=True),
            first_step_logits(exact, rows, seed, exact=False),
            atol=1e-5,
        )


def test_an_uncertified_step_returns_exact_logits(
    screen_checkpoint, screen_bundles, tmp_path, monkeypatch
):
    """A margin no candidate can clear: the certificate fails on every row and the graph
    computes every logit exactly."""
    monkeypatch.setattr(screen, "ABSOLUTE_MARGIN", 1e6)
    export_bundle(screen_checkpoint, tmp_path / "never", screen=True)
    never = OnnxBackend(load_bundle(tmp_path / "never"))
    exact = OnnxBackend(load_bundle(screen_bundles[1]))
    np.testing.assert_allclose(
        first_step_logits(never, 3, 0, exact=False),
        first_step_logits(exact, 3, 0, exact=False),
        atol=1e-5,
    )


def test_greedy_generation_matches_the_exact_head(screen_bundles):
    screened, exact = (load_bundle(b) for b in screen_bundles)
    manifest = json.loads((screen_bundles[0] / contract.MANIFEST_FILE).read_text())
    assert manifest["parity"]["fp32"]["decoder_step_screened_argmax_mismatches"] == 0
    rng = np.random.default_rng(7)
    sources = [[*rng.integers(10, screened.config.vocab_size, n).tolist(), 2] for n in (5, 9, 14)]
    for fast, full in zip(*greedy_generations((screened, exact), sources), strict=True):
        assert fast.generated == full.generated
        # The normalizer of each log-probability sums the screen's int8 logits: off by
        # about 1e-3 on this tiny model, whose 400 tokens' probabilities are nearly flat.
        np.testing.assert_allclose(fast.logprobs, full.logprobs, atol=5e-3)


class Recording(OnnxBackend):
    """Records each in-place step's ``exact_logits``."""

    def __init__(self, bundle) -> None:
        super().__init__(bundle)
        self.asked: list[bool] = []

    def step_in_place(self, *args, **kwargs):
        self.asked.append(bool(args[5] if len(args) > 5 else kwargs.get("exact_logits")))
        return super().step_in_place(*args, **kwargs)


@pytest.mark.parametrize(
    ("params", "asks"),
    [
        (SamplingParams(max_new_tokens=6), False),
        (SamplingParams(max_new_tokens=6, do_sample=True, seed=1), True),
        (SamplingParams(max_new_tokens=6, repetition_penalty=1.3), True),
    ],
)
def test_choices_that_read_every_logit_ask_for_exact_logits(screen_bundles, params, asks):
    bundle = load_bundle(screen_bundles[0])
    backend = Recording(bundle)
    batch = DecodeBatch(backend, bundle.tokenizer)
    greedy = SamplingParams(max_new_tokens=6)
    seqs = [batch.new_sequence([5, 6, 7, 2], greedy), batch.new_sequence([8, 9, 2], params)]
    run_to_completion(batch, seqs)
    assert backend.asked and set(backend.asked) == {asks}


def test_sampling_and_beams_match_the_exact_head(screen_bundles):
    screened, exact = (load_bundle(b) for b in screen_bundles)
    source = [11, 12, 13, 14, 2]
    sampled = []
    for bundle in (screened, exact):
        batch = DecodeBatch(OnnxBackend(bundle), bundle.tokenizer)
        params = SamplingParams(max_new_tokens=16, do_sample=True, seed=5, ignore_eos=True)
        (seq,) = run_to_completion(batch, [batch.new_sequence(source, params)])
        beams = beam_search(
            OnnxBackend(bundle), bundle.tokenizer, source, SamplingParams(12, num_beams=3)
        )
        sampled.append((seq.generated, beams.generated))
    assert sampled[0] == sampled[1]


def test_a_server_on_the_screened_bundle_streams_the_exact_heads_tokens(screen_bundles):
    """Greedy and seeded sampling requests at once, streamed, through a real server over
    the screened bundle: each stream's tokens are the exact bundle's for the same request
    (greedy through the screen, sampling through exact logits the same batch asked for)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.service_helpers import running_server, settings_for, sse_events

    texts = ["12 34 56", "hello there", "999 1000", "the cat"]
    bodies = [
        {"inputs": t, "parameters": {"max_new_tokens": 16, "details": True, "seed": 3 + i}}
        for i, t in enumerate(texts)
    ]
    for body in bodies[1::2]:
        body["parameters"] |= {"do_sample": True, "temperature": 1.5}

    def run(bundle, streamed: bool) -> list[list[int]]:
        with running_server(settings_for(bundle)) as server, server.client() as client:

            def one(body) -> list[int]:
                if not streamed:
                    r = client.post("/v1/generate", json=body)
                    assert r.status_code == 200, r.text
                    return [t["id"] for t in r.json()["details"]["tokens"]]
                with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    r.read()
                    events = [json.loads(e["data"]) for e in sse_events(r) if "data" in e]
                    return [e["token"]["id"] for e in events]

            with ThreadPoolExecutor(len(bodies)) as pool:
                return list(pool.map(one, bodies))

    screened, exact = screen_bundles
    expected = run(exact, streamed=False)
    assert run(screened, streamed=True) == expected
    assert all(len(ids) == 16 for ids in expected)
