"""Shared fixtures: a tiny seeded model, its checkpoint and its exported bundle (built once)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from seq2serve.config import ModelConfig
from seq2serve.data.task import LANGUAGES, build_default_task, language_tags
from seq2serve.data.tokenizer import train_tokenizer
from seq2serve.engine.bundle import Bundle
from seq2serve.engine.generation import DecodeBatch, SamplingParams, Sequence, run_to_completion
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.export.bundle import export_bundle
from seq2serve.export.screen import SCREEN_CANDIDATES
from seq2serve.model.checkpoint import save_weights
from seq2serve.model.transformer import Transformer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "models" / "default"


def largest_int8(graph_file: Path, name: str | None = None) -> int:
    """The largest magnitude among a graph's int8 initializers (or the one called ``name``)."""
    graph = onnx.load(str(graph_file)).graph
    weights = [
        onnx.numpy_helper.to_array(i).astype(np.int32)
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and name in (None, i.name)
    ]
    assert weights, (graph_file, name)
    return max(int(np.abs(w).max()) for w in weights)


def make_checkpoint(out: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight model (non-zero biases, so every parameter matters) with a tokenizer
    trained on the default task's text."""
    task = build_default_task(n_train=1500, n_heldout=50, seed=seed)
    texts = [t for e in task.train for t in (e.source, e.target) if t]
    tok = train_tokenizer(texts, vocab_size=400, extra_special_tokens=language_tags())
    fields = dict(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        max_source_positions=64,
        max_target_positions=64,
        dropout=0.0,
        id2label=dict(enumerate(LANGUAGES)),
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        # Weights big enough that the layers, not the residual copy of the input embedding,
        # decide the output (otherwise a random model repeats its input token), and non-zero
        # biases so every parameter matters.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
            elif p.ndim == 2 and not name.startswith("tokens"):
                p.normal_(std=1.5 / p.shape[1] ** 0.5)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    tok.save(str(out / "tokenizer.json"))
    save_weights(model, out / "model.safetensors")
    return out


def first_step_logits(backend: OnnxBackend, rows: int, seed: int, exact: bool) -> np.ndarray:
    """Logits (rows, V) of a first decoder step over random sources (``exact``: the
    ``exact_logits`` a screened step graph takes)."""
    cfg = backend.config
    rng = np.random.default_rng(seed)
    src = rng.integers(10, cfg.vocab_size, (rows, 9))
    mask = np.ones_like(src)
    cross = backend.encode(src, mask).cross
    empty = [np.zeros((rows, cfg.n_heads, 0, cfg.head_dim), np.float32)] * (
        2 * cfg.n_decoder_layers
    )
    ids = rng.integers(10, cfg.vocab_size, (rows, 1))
    out = backend.decode(
        ids, np.zeros((rows, 1), np.int64), np.ones((rows, 1), np.int64), mask, empty, cross, exact
    )
    return out.logits[:, 0]


def assert_screen_keeps_the_heads_choice(
    screened: OnnxBackend, exact: OnnxBackend, rows: int, screen_error: tuple[float, float]
) -> None:
    """Over six random first steps of ``rows`` rows: the screened graph picks the argmax of
    the head it screens, with that head's logit; its candidates' logits are the head's, and
    the rest are the screen's, off by more than ``screen_error[0]`` (the screen was used)
    and less than ``screen_error[1]``."""
    for seed in range(6):
        fast = first_step_logits(screened, rows, seed, exact=False)
        full = first_step_logits(exact, rows, seed, exact=False)
        picked = fast.argmax(-1)
        assert (picked == full.argmax(-1)).all()
        chosen = np.arange(rows), picked
        np.testing.assert_allclose(fast[chosen], full[chosen], atol=1e-5)
        assert ((np.abs(fast - full) <= 1e-5).sum(-1) >= SCREEN_CANDIDATES).all()
        low, high = screen_error
        assert low < np.abs(fast - full).max() < high


def greedy_generations(bundles: Iterable[Bundle], sources: list[list[int]]) -> list[list[Sequence]]:
    """Each bundle's 24-token greedy generations of ``sources`` in one batch, with EOS
    ignored so that the batch keeps its size."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    runs = []
    for bundle in bundles:
        batch = DecodeBatch(OnnxBackend(bundle), bundle.tokenizer)
        runs.append(run_to_completion(batch, [batch.new_sequence(s, params) for s in sources]))
    return runs


@pytest.fixture(scope="session")
def screen_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint the screens' tests export (tests/test_screen*.py)."""
    return make_checkpoint(tmp_path_factory.mktemp("screen") / "ckpt", seed=3)


@pytest.fixture(scope="session")
def screen_bundles(screen_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(screened, exact): bundles of ``screen_checkpoint`` with fp32 and int8 graphs, the
    first with both LM heads screened (fp32 in int8, int8 in 4 bits), the second with
    neither."""
    out = tmp_path_factory.mktemp("screen")
    export_bundle(screen_checkpoint, out / "screened", quantize="int8", screen=True, verify=True)
    export_bundle(screen_checkpoint, out / "exact", quantize="int8", screen=False)
    return out / "screened", out / "exact"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from seq2serve.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(tiny_checkpoint, out, quantize="int8", verify=True)
    return out


@pytest.fixture(scope="module")
def server(tiny_bundle):
    """A real server on 127.0.0.1 over the tiny bundle, one per test module."""
    from tests.service_helpers import running_server, settings_for

    with running_server(settings_for(tiny_bundle)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c
