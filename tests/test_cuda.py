"""The GPU paths: PyTorch on CUDA (``--runtime torch --device cuda``) and onnxruntime's CUDA
execution provider, held to the CPU's contract.

Each test is skipped where its device is missing (CI has no GPU); on a GPU machine
``pytest tests/test_cuda.py`` runs them. The engine and server tests are the CPU suite's own,
collected here again over a CUDA backend.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import DecodeBatch, SamplingParams, run_to_completion
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.model.backend import TorchBackend
from seq2serve.model.cache import KVCache
from tests.test_engine import (  # noqa: F401  (collected again with this module's fixtures)
    SOURCES,
    source_ids,
    test_cancel_frees_the_row_and_spares_the_others,
    test_freed_slots_are_reused_in_place_and_rows_stay_equal_to_alone,
    test_greedy_equals_the_pytorch_reference,
    test_rows_joining_at_different_steps_equal_alone,
    test_sampling_is_seeded,
    test_streamed_pieces_equal_the_final_text,
)
from tests.test_model import CONFIGS, build, decode_stepwise, full_decoder_logits, random_ids
from tests.test_service_stream import (  # noqa: F401
    test_32_concurrent_streams_equal_alone,
    test_streamed_equals_non_streamed_greedy,
)

CUDA = torch.cuda.is_available()
ORT_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """fp32 graphs only: int8 is a CPU format (the engine warns when it is asked for under
    CUDA), and its export needs nothing from a GPU machine."""
    from seq2serve.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle-fp32") / "tiny"
    export_bundle(tiny_checkpoint, out, verify=True)
    return out


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    backend = TorchBackend.from_bundle(tiny_bundle, "cuda")
    assert next(backend.model.parameters()).is_cuda
    return backend, load_bundle(tiny_bundle).tokenizer


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    from seq2serve.model.checkpoint import load_model

    return load_model(tiny_bundle)  # on the CPU: the GPU is held to the CPU's tokens


@pytest.fixture(scope="module")
def server(tiny_bundle):
    from tests.service_helpers import running_server, settings_for

    with running_server(settings_for(tiny_bundle, runtime="torch", device="cuda")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        info = c.get("/info").json()
        assert "cuda" in str(info), info
        yield c


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prefill", [1, 4])
def test_cached_decoding_on_cuda_equals_full_recomputation_and_the_cpu(name, prefill):
    cpu = build(CONFIGS[name])
    gpu = build(CONFIGS[name]).cuda()
    src = random_ids(3, 8)
    src_mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5, [1] * 6 + [0] * 2])
    tgt = random_ids(3, 10, 3)
    with torch.no_grad():
        expected = full_decoder_logits(cpu, src, src_mask, tgt)
        full = full_decoder_logits(gpu, src.cuda(), src_mask.cuda(), tgt.cuda())
        cached = decode_stepwise(gpu, src.cuda(), src_mask.cuda(), tgt.cuda(), prefill)
    assert cached.is_cuda
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.cpu(), expected, atol=1e-4, rtol=0)


def test_empty_cache_lives_on_the_device():
    model = build(CONFIGS["pre-norm sinusoidal"]).cuda()
    cache = KVCache.empty(model.cfg, 2, device="cuda")
    assert all(t.is_cuda for kv in cache.layers for t in (kv.key, kv.value))


@pytest.mark.skipif(not ORT_CUDA, reason="onnxruntime has no CUDAExecutionProvider")
def test_onnxruntime_cuda_provider_equals_the_cpu(tiny_bundle):
    cpu = load_bundle(tiny_bundle)
    gpu = load_bundle(tiny_bundle, device="cuda")
    assert gpu.encoder.get_providers()[0] == "CUDAExecutionProvider"
    params = SamplingParams(max_new_tokens=16)
    generated = []
    for bundle in (cpu, gpu):
        batch = DecodeBatch(OnnxBackend(bundle), bundle.tokenizer)
        seqs = run_to_completion(
            batch, [batch.new_sequence(source_ids(bundle.tokenizer, s), params) for s in SOURCES]
        )
        generated.append([s.generated for s in seqs])
    assert generated[1] == generated[0]
    ids = np.asarray([source_ids(cpu.tokenizer, SOURCES[0])])
    a = OnnxBackend(cpu).encode(ids, np.ones_like(ids))
    b = OnnxBackend(gpu).encode(ids, np.ones_like(ids))
    np.testing.assert_allclose(b.last_hidden_state, a.last_hidden_state, atol=1e-4)
