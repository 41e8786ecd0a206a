"""The graph rewrites (``seq2serve.export.fuse``) compute what the exported graphs computed:
the graphs with and without each rewrite, on the same inputs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from seq2serve import contract
from seq2serve.engine.bundle import session_options
from seq2serve.export import fuse, graphs
from seq2serve.export.quantize import quantize_int8
from seq2serve.model.checkpoint import load_model


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> tuple[Path, onnx.ModelProto]:
    """The tiny model's decoder.onnx as the exporter writes it, before any rewrite, and the
    directory it was written to (with encoder.onnx, also unrewritten)."""
    model, _ = load_model(tiny_checkpoint)
    out = tmp_path_factory.mktemp("raw")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graphs, "fuse_projections", lambda proto: 0)
        patch.setattr(graphs, "attend_unsplit", lambda proto, n_heads: 0)
        graphs.export_graphs(model, out)
    return out, onnx.load(str(out / contract.DECODER_FILE))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    made = onnx.ModelProto()
    made.CopyFrom(proto)
    return made


def _session(proto: onnx.ModelProto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(
        proto.SerializeToString(), session_options(threads=1), providers=["CPUExecutionProvider"]
    )


def _feeds(session, cfg, rows: int, new: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a decoder or step graph: ``new`` tokens a row after ``past``
    cached ones (a step graph's buffers hold ``past + new`` columns)."""
    rng = np.random.default_rng(seed)
    source = 5
    step = any(i.name == contract.WRITE_INDICES for i in session.get_inputs())
    columns = past + new if step else past
    feeds = {
        "input_ids": rng.integers(4, cfg.vocab_size, (rows, new)),
        "position_ids": np.broadcast_to(np.arange(past, past + new), (rows, new)).copy(),
        "decoder_attention_mask": np.ones((rows, past + new), np.int64),
        "encoder_attention_mask": np.ones((rows, source), np.int64),
    }
    feeds["encoder_attention_mask"][0, 3:] = 0
    if step:
        feeds[contract.WRITE_INDICES] = np.full(rows, past, np.int64)
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            length = columns if ".decoder." in i.name else source
            shape = (rows, cfg.n_heads, length, cfg.head_dim)
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(proto).run(None, feeds)


@pytest.fixture(scope="module")
def cfg(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    return model.cfg


def test_one_matmul_serves_each_self_attentions_query_key_and_value(exported, cfg):
    _, decoder = exported
    fused = _copy(decoder)
    assert fuse.fuse_projections(fused) == cfg.n_decoder_layers
    before = Counter(n.op_type for n in decoder.graph.node)
    after = Counter(n.op_type for n in fused.graph.node)
    assert after["MatMul"] == before["MatMul"] - 2 * cfg.n_decoder_layers
    assert after["Split"] == before["Split"] + cfg.n_decoder_layers
    onnx.checker.check_model(fused, full_check=True)


@pytest.mark.parametrize(("new", "past"), [(4, 0), (1, 3), (2, 5)])
def test_fused_projections_give_the_same_logits_and_cache(exported, cfg, new, past):
    _, decoder = exported
    fused = _copy(decoder)
    fuse.fuse_projections(fused)
    feeds = _feeds(_session(decoder), cfg, rows=3, new=new, past=past)
    for want, got in zip(_run(decoder, feeds), _run(fused, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_fused_projections_quantize_to_the_same_int8_results(exported, cfg, tmp_path):
    """Weights are quantized per output channel: the fused weight's channels are the three
    projections' channels, with their scales, so the int8 graphs agree to the bit."""
    raw, decoder = exported
    fused = _copy(decoder)
    fuse.fuse_projections(fused)
    onnx.save_model(fused, str(tmp_path / "fused.onnx"))
    quantize_int8(raw / contract.DECODER_FILE, tmp_path / "apart.int8.onnx")
    quantize_int8(tmp_path / "fused.onnx", tmp_path / "fused.int8.onnx")
    apart, together = (onnx.load(str(tmp_path / f)) for f in ("apart.int8.onnx", "fused.int8.onnx"))
    feeds = _feeds(_session(apart), cfg, rows=2, new=1, past=4)
    for want, got in zip(_run(apart, feeds), _run(together, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def steps(exported, cfg) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The step graph with its heads split and merged by Transposes, as exported, and by
    reshapes alone."""
    _, decoder = exported
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graphs, "fold_head_transposes", lambda proto, n_heads, head_dim: 0)
        transposed = graphs.step_graph(decoder, cfg)
    return transposed, graphs.step_graph(decoder, cfg)


def _head_swaps(proto: onnx.ModelProto) -> int:
    """Transposes between (B, T, H, D) and (B, H, T, D)."""
    return sum(
        n.op_type == "Transpose" and [list(a.ints) for a in n.attribute] == [fuse.HEAD_SWAP]
        for n in proto.graph.node
    )


def test_the_step_graph_splits_and_merges_heads_without_a_transpose(steps, cfg):
    transposed, folded = steps
    count = _head_swaps(transposed)
    # Per layer: the self-attention's query, key and value and the cross-attention's query
    # split, both attentions' outputs merged.
    assert count == 6 * cfg.n_decoder_layers
    assert _head_swaps(folded) == 0
    assert fuse.fold_head_transposes(_copy(transposed), cfg.n_heads, cfg.head_dim) == count


@pytest.mark.parametrize("rows", [1, 3])
def test_folded_heads_give_the_same_logits_and_cache(steps, cfg, rows):
    transposed, folded = steps
    feeds = _feeds(_session(transposed), cfg, rows=rows, new=1, past=6, seed=rows)
    for want, got in zip(_run(transposed, feeds), _run(folded, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_step_of_two_tokens_a_row_is_refused_not_garbled(steps, cfg):
    """The step graph's contract is one new token a row; its reshapes spell that out."""
    transposed, folded = steps
    feeds = _feeds(_session(transposed), cfg, rows=2, new=2, past=3)
    _run(transposed, feeds)  # the Transposes would have taken it
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.Fail, match="Reshape"):
        _run(folded, feeds)


def test_the_encoder_attends_over_unsplit_heads(exported, cfg):
    raw, _ = exported
    split = onnx.load(str(raw / contract.ENCODER_FILE))
    unsplit = _copy(split)
    assert fuse.attend_unsplit(unsplit, cfg.n_heads) == cfg.n_encoder_layers
    # Each self-attention's query, key, value and output went; the cross-attention keys and
    # values the encoder returns keep their (B, H, S, D) layout.
    assert _head_swaps(split) == 4 * cfg.n_encoder_layers + 2 * cfg.n_decoder_layers
    assert _head_swaps(unsplit) == 2 * cfg.n_decoder_layers
    onnx.checker.check_model(unsplit, full_check=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    for want, got in zip(_run(split, feeds), _run(unsplit, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_the_bundle_carries_the_rewrites(tiny_bundle, cfg, quantized):
    def graph(file: str) -> onnx.ModelProto:
        path = tiny_bundle / contract.onnx_file(file, quantized)
        return onnx.load(str(path), load_external_data=False)

    def splits(file: str) -> int:
        return Counter(n.op_type for n in graph(file).graph.node)["Split"]

    for file in (contract.DECODER_FILE, contract.DECODER_STEP_FILE):
        assert splits(file) == cfg.n_decoder_layers
    assert splits(contract.ENCODER_FILE) == 0
    assert _head_swaps(graph(contract.ENCODER_FILE)) == 2 * cfg.n_decoder_layers
    assert _head_swaps(graph(contract.DECODER_STEP_FILE)) == 0
    assert _head_swaps(graph(contract.DECODER_FILE)) == 6 * cfg.n_decoder_layers
