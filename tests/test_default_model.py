"""The shipped default bundle: its task bars, measured here through the served graphs, and
onnxruntime's greedy tokens equal to the PyTorch reference on the held-out set."""

from __future__ import annotations

import pytest
import torch

from seq2serve.data.task import build_default_task
from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import DecodeBatch, SamplingParams, run_to_completion
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.evaluate import evaluate_bundle
from seq2serve.model.checkpoint import load_model
from seq2serve.model.generate import GenerationConfig, generate
from tests.conftest import DEFAULT_BUNDLE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heldout():
    # Regenerated from the task's code (same seed as `seq2serve train`), not read from a file.
    return build_default_task(n_train=2_000, seed=0).heldout


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_bundle_meets_the_task_bars(heldout, quantized):
    figures = evaluate_bundle(DEFAULT_BUNDLE, heldout, quantized=quantized)
    assert figures["heldout_pairs"] >= 1000 and figures["heldout_labelled"] >= 1000
    assert figures["exact_match"] >= 0.97, figures
    assert figures["accuracy"] >= 0.98, figures


def test_onnx_greedy_equals_pytorch_on_the_heldout_set(heldout):
    bundle = load_bundle(DEFAULT_BUNDLE)
    backend, tok = OnnxBackend(bundle), bundle.tokenizer
    model, _ = load_model(DEFAULT_BUNDLE)
    pairs = [e for e in heldout if e.target is not None]
    mismatches = []
    for start in range(0, len(pairs), 250):
        chunk = pairs[start : start + 250]
        ids = [tok.encode(e.source).ids for e in chunk]
        batch = DecodeBatch(backend, tok)
        seqs = run_to_completion(
            batch, [batch.new_sequence(i, SamplingParams(max_new_tokens=48)) for i in ids]
        )
        width = max(len(i) for i in ids)
        src = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros_like(src)
        for r, i in enumerate(ids):
            src[r, : len(i)], mask[r, : len(i)] = torch.tensor(i), 1
        reference = generate(model, src, mask, GenerationConfig(max_new_tokens=48))
        mismatches += [
            e.source for e, s, r in zip(chunk, seqs, reference, strict=True) if s.generated != r
        ]
    assert not mismatches, mismatches[:10]


def test_the_examples_of_the_spec():
    bundle = load_bundle(DEFAULT_BUNDLE)
    backend, tok = OnnxBackend(bundle), bundle.tokenizer
    batch = DecodeBatch(backend, tok)
    seqs = [
        batch.new_sequence(tok.encode(s).ids, SamplingParams())
        for s in (">>de<< 1234", ">>fr<< 2021-03-04")
    ]
    run_to_completion(batch, seqs)
    assert [s.text for s in seqs] == ["eintausendzweihundertvierunddreißig", "4 mars 2021"]
    ids = tok.encode("4 mars 2021").ids
    import numpy as np

    logits = backend.encode(np.array([ids]), np.ones((1, len(ids)), np.int64)).class_logits
    assert bundle.config.labels[int(logits.argmax())] == "fr"
