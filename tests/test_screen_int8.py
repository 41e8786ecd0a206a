"""The int8 step graph's LM head screened in 4 bits: screen, bound, int8 rescoring,
certificate, and the switch to the int8 head above ``INT4_SCREEN_MAX_ROWS`` rows (asked for
at export: ``screen=True``).

Against an int8 bundle of the same checkpoint exported without the screen: greedy tokens
identical, the candidates' logits the int8 head's, and every logit the int8 head's when the
batch is larger, when exact logits are asked for or when the certificate fails. The bound
itself is checked on a head alone, over hidden states of many scales and outliers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from seq2serve import contract
from seq2serve.engine.bundle import load_bundle, session_options
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.export import screen
from seq2serve.export.bundle import export_bundle
from seq2serve.export.quantize import EMBED_INT8, EMBED_SCALE, SATURATION_FREE_WEIGHT
from tests.conftest import (
    assert_screen_keeps_the_heads_choice,
    first_step_logits,
    greedy_generations,
)


def _backends(bundles) -> tuple[OnnxBackend, OnnxBackend]:
    screened, exact = (OnnxBackend(load_bundle(b, quantized=True)) for b in bundles)
    return screened, exact


def test_int4_blocks_are_what_the_kernel_multiplies_by():
    rng = np.random.default_rng(0)
    vocab, channels, block = 50, 64, 32
    rows = rng.standard_normal((vocab, channels)) * rng.uniform(0.01, 2, (vocab, 1))
    rows[3] = 0  # an all-zero row: scale 0, codes at the zero point
    packed, scale, values = screen.int4_blocks(rows, block)
    assert packed.shape == (vocab, channels // block, block // 2) and packed.dtype == np.uint8
    # within half a step of each block's grid
    step = np.repeat(scale.reshape(vocab, -1), block, axis=1)
    assert (np.abs(values - rows) <= step / 2 + 1e-12).all()
    node = helper.make_node(
        "MatMulNBits",
        ["h", "B", "scales"],
        ["y"],
        domain="com.microsoft",
        K=channels,
        N=vocab,
        bits=4,
        block_size=block,
        accuracy_level=0,  # fp32 activations: only the weights' 4 bits in the product
    )
    graph = helper.make_graph(
        [node],
        "int4",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, (None, channels))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scale, "scales")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = _session(model)
    h = rng.standard_normal((4, channels)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"h": h})[0], h @ values.T, rtol=1e-5, atol=1e-5)


def _head_alone(vocab: int, channels: int, seed: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """A graph with the int8 bundle's head and nothing else: hidden (B, 1, C) -> logits,
    ``DynamicQuantizeLinear`` + ``MatMulInteger`` over ``Transpose`` of the int8 table, its
    per-token scales and a bias; and the table's values (V, C)."""
    rng = np.random.default_rng(seed)
    w = SATURATION_FREE_WEIGHT
    codes = rng.integers(-w, w + 1, (vocab, channels)).astype(np.int8)
    codes[rng.integers(0, vocab, vocab // 10), rng.integers(0, channels, vocab // 10)] = w
    scale = rng.uniform(0.0005, 0.004, vocab).astype(np.float32)
    bias = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", [EMBED_INT8], ["head_w"], perm=[1, 0]),
        helper.make_node("DynamicQuantizeLinear", ["hidden"], ["hq", "hs", "hz"]),
        helper.make_node("MatMulInteger", ["hq", "head_w", "hz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["hs", EMBED_SCALE], ["scales"]),
        helper.make_node("Mul", ["accf", "scales"], ["matmul"]),
        helper.make_node("Add", ["matmul", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ("B", 1, channels))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ("B", 1, vocab))],
        [
            numpy_helper.from_array(codes, EMBED_INT8),
            numpy_helper.from_array(scale, EMBED_SCALE),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    return model, codes.astype(np.float64) * scale[:, None]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(
        model.SerializeToString(), session_options(threads=1), providers=["CPUExecutionProvider"]
    )


def _hidden_states(rng: np.random.Generator, rows: int, channels: int) -> np.ndarray:
    """Hidden states of many scales, some with a few large outliers (the per-tensor and
    per-block activation grids are then coarse), some with a constant offset."""
    h = rng.standard_normal((rows, 1, channels)) * rng.choice([0.01, 1.0, 30.0])
    if rng.random() < 0.5:
        h[:, 0, rng.integers(0, channels, 3)] *= 40
    if rng.random() < 0.3:
        h += rng.normal() * 5
    return h.astype(np.float32)


def test_the_bound_holds_for_every_token():
    """|screened logit - int8 head's logit| <= eps for every token of every row, with the
    kernel's own activation rounding, across hidden states the bound is loosest on."""
    vocab, channels = 3000, 128
    model, _ = _head_alone(vocab, channels, seed=1)
    head = _session(model)
    screened = onnx.ModelProto()
    screened.CopyFrom(model)
    screen.screen_int8_head(screened, candidates=8)
    for name in ("A", "eps"):
        screened.graph.output.append(
            helper.make_tensor_value_info(screen.PREFIX + name, TensorProto.FLOAT, None)
        )
    probe = _session(screened)
    rng = np.random.default_rng(2)
    slack = []
    for _ in range(60):
        rows = int(rng.integers(1, screen.INT4_SCREEN_MAX_ROWS + 1))
        h = _hidden_states(rng, rows, channels)
        want = head.run(None, {"hidden": h})[0]
        _, screened_logits, eps = probe.run(
            None, {"hidden": h, contract.EXACT_LOGITS: np.array(False)}
        )
        error = np.abs(screened_logits - want).max(axis=-1, keepdims=True)
        assert (error <= eps).all(), (error, eps)
        slack.append(float((error / eps).max()))
    # the bound is worst-case, not vacuous: some rows come within a fifth of it
    assert max(slack) > 0.05


def test_a_certified_row_returns_the_int8_heads_argmax_and_its_logit():
    """Rows with a clear winner: the screen certifies most and returns the int8 head's
    token and logit; a row it does not certify gets every logit from the int8 head."""
    vocab, channels = 3000, 128
    model, values = _head_alone(vocab, channels, seed=4)
    head = _session(model)
    screen.screen_int8_head(model)
    screened = _session(model)
    rng = np.random.default_rng(5)
    certified = 0
    for _ in range(20):
        h = (rng.standard_normal((1, 1, channels)) * 3).astype(np.float32)
        h[0, 0, :16] += 40 * np.sign(values[rng.integers(vocab), :16])
        want = head.run(None, {"hidden": h})[0]
        got = screened.run(None, {"hidden": h, contract.EXACT_LOGITS: np.array(False)})[0]
        if np.array_equal(got, want):
            continue  # not certified: the int8 head's logits
        certified += 1
        best = int(want.argmax())
        assert int(got.argmax()) == best
        np.testing.assert_allclose(got[0, 0, best], want[0, 0, best], rtol=1e-6, atol=1e-5)
    assert certified >= 15


def test_the_screened_int8_graph_keeps_the_contract_and_one_int8_head(screen_bundles):
    screened, exact = screen_bundles
    assert load_bundle(screened, quantized=True).screened
    assert not load_bundle(exact, quantized=True).screened
    step = contract.onnx_file(contract.DECODER_STEP_FILE, True)
    graph = onnx.load(str(screened / step), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 1 and "If" not in ops
    # the int8 head reads the tied table in the main graph, where its weight is packed once
    head = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] == EMBED_INT8]
    assert len(head) == 1
    weights = {i.name: i for i in graph.initializer}
    assert weights[screen.PREFIX + "weight"].data_type == TensorProto.UINT8


def test_the_screened_int8_step_graph_loads_without_onnxruntime_warnings(screen_bundles, capfd):
    screened, _ = screen_bundles
    options = session_options(threads=None)
    options.log_severity_level = 2  # warnings and errors
    capfd.readouterr()
    ort.InferenceSession(
        str(screened / contract.onnx_file(contract.DECODER_STEP_FILE, True)),
        options,
        providers=["CPUExecutionProvider"],
    )
    err = capfd.readouterr().err
    assert "[W:onnxruntime" not in err and "[E:onnxruntime" not in err, err


@pytest.mark.parametrize("rows", range(1, screen.INT4_SCREEN_MAX_ROWS + 1))
def test_the_screen_picks_the_int8_heads_argmax_and_logit(screen_bundles, rows):
    screened, exact = _backends(screen_bundles)
    # the logits outside the candidates are the 4-bit screen's
    assert_screen_keeps_the_heads_choice(screened, exact, rows, screen_error=(1e-4, 2.0))


@pytest.mark.parametrize("rows", [screen.INT4_SCREEN_MAX_ROWS + 1, 5])
def test_a_larger_batch_runs_the_int8_head(screen_bundles, rows):
    screened, exact = _backends(screen_bundles)
    for seed in range(2):
        np.testing.assert_array_equal(
            first_step_logits(screened, rows, seed, exact=False),
            first_step_logits(exact, rows, seed, exact=False),
        )


@pytest.mark.parametrize("rows", [1, 2])
def test_exact_logits_asked_for_are_the_int8_heads(screen_bundles, rows):
    screened, exact = _backends(screen_bundles)
    np.testing.assert_array_equal(
        first_step_logits(screened, rows, 0, exact=True),
        first_step_logits(exact, rows, 0, exact=False),
    )


def test_an_uncertified_step_returns_the_int8_heads_logits(
    screen_checkpoint, screen_bundles, tmp_path
):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(screen, "ABSOLUTE_MARGIN", 1e6)
        export_bundle(screen_checkpoint, tmp_path / "never", quantize="int8", screen=True)
    never = OnnxBackend(load_bundle(tmp_path / "never", quantized=True))
    _, exact = _backends(screen_bundles)
    np.testing.assert_array_equal(
        first_step_logits(never, 1, 0, exact=False), first_step_logits(exact, 1, 0, exact=False)
    )


@pytest.mark.parametrize("count", [1, 2, 3])
def test_greedy_generation_matches_the_int8_head(screen_bundles, count):
    """One sequence (screened), two and three (the int8 head) in one batch, with EOS
    ignored so the batch keeps its size."""
    rng = np.random.default_rng(11)
    screened, exact = (load_bundle(b, quantized=True) for b in screen_bundles)
    vocab = screened.config.vocab_size
    sources = [[*rng.integers(10, vocab, n).tolist(), 2] for n in (6, 11, 8)][:count]
    for fast, full in zip(*greedy_generations((screened, exact), sources), strict=True):
        assert fast.generated == full.generated
        # a screened step's log-probabilities take their normalizer over the 4-bit logits
        np.testing.assert_allclose(fast.logprobs, full.logprobs, atol=2e-2)


def test_only_an_export_that_asks_for_it_screens_the_int8_head(screen_checkpoint, tmp_path):
    """``screen=None`` (``--screen-head auto``) screens the fp32 head when it is large
    enough, here always, and leaves the int8 head as it is."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(screen, "SCREEN_MIN_BYTES", 0)
        export_bundle(screen_checkpoint, tmp_path / "auto", quantize="int8")
    assert load_bundle(tmp_path / "auto").screened
    assert not load_bundle(tmp_path / "auto", quantized=True).screened
