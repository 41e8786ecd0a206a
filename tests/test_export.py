"""The exported bundle: graphs on the contract, parity with PyTorch, masks, sharing, refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from seq2serve import contract
from seq2serve.engine.bundle import BundleError, SharedTables, load_bundle
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.export import quantize
from seq2serve.export.bundle import sha256_file
from seq2serve.export.verify import verify_parity
from seq2serve.model.checkpoint import load_model
from tests.conftest import largest_int8


def _io(values) -> list[tuple[str, str, tuple]]:
    kinds = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float"}
    return [
        (
            v.name,
            kinds.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
            tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim),
        )
        for v in values
    ]


@pytest.mark.parametrize("quantized", [False, True])
def test_graphs_match_the_contract_names_and_axes(tiny_bundle, quantized):
    model, _ = load_model(tiny_bundle)
    for file, (inputs, outputs) in contract.graph_specs(model.cfg).items():
        name = contract.onnx_file(file, quantized)
        graph = onnx.load(str(tiny_bundle / name), load_external_data=False).graph
        for kind, specs, values in (
            ("inputs", inputs, graph.input),
            ("outputs", outputs, graph.output),
        ):
            actual = _io(values)
            assert contract.check_io(name, specs, actual, kind) == []
            # Symbolic axes carry exactly the contract's names (documented for outside runtimes).
            for spec, (_, _, shape) in zip(specs, actual, strict=True):
                assert shape == spec.shape, (spec.name, shape)


def test_parity_with_pytorch(tiny_bundle):
    manifest = json.loads((tiny_bundle / contract.MANIFEST_FILE).read_text())
    assert manifest["parity"]["fp32"]["max"] <= 1e-4
    model, _ = load_model(tiny_bundle)
    for seed in (1, 2):  # fresh random inputs, not only the ones the exporter checked
        figures = verify_parity(model, tiny_bundle, seed=seed)
        for name, value in figures.items():
            assert value <= 1e-4, (name, value)
        assert {
            "decoder_prefill_logits",
            "decoder_step_logits",
            "decoder_step_in_place_logits",
            "decoder_ragged_logits",
        } <= set(figures)


def _decoder_logits(backend, src, tgt):
    cfg = backend.config
    enc = backend.encode(src, np.ones_like(src))
    b, t = tgt.shape
    empty = [np.zeros((b, cfg.n_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.n_decoder_layers)
    out = backend.decode(
        tgt,
        np.arange(t)[None].repeat(b, 0),
        np.ones((b, t), np.int64),
        np.ones_like(src),
        empty,
        enc.cross,
    )
    return out.logits


@pytest.mark.parametrize("k", [0, 2, 5])
def test_masks_hold_in_the_exported_graphs(tiny_bundle, k):
    backend = OnnxBackend(load_bundle(tiny_bundle))
    rng = np.random.default_rng(k)
    src = rng.integers(10, 300, (2, 6)).astype(np.int64)
    tgt = rng.integers(10, 300, (2, 7)).astype(np.int64)
    changed = tgt.copy()
    changed[:, k] = (tgt[:, k] + 7) % 300 + 10
    a, b = _decoder_logits(backend, src, tgt), _decoder_logits(backend, src, changed)
    assert np.array_equal(a[:, :k], b[:, :k]), "an earlier decoder position saw a later token"
    assert not np.allclose(a[:, k:], b[:, k:])
    # Encoder: the first position sees the last token (no triangle).
    src2 = src.copy()
    src2[:, -1] = (src[:, -1] + 3) % 300 + 10
    e1 = backend.encode(src, np.ones_like(src)).last_hidden_state
    e2 = backend.encode(src2, np.ones_like(src2)).last_hidden_state
    assert not np.allclose(e1[:, 0], e2[:, 0])
    # Padding: extra masked tokens leave the real positions' outputs unchanged.
    padded = np.concatenate([src, rng.integers(10, 300, (2, 4))], axis=1)
    mask = np.concatenate([np.ones_like(src), np.zeros((2, 4), np.int64)], axis=1)
    np.testing.assert_allclose(backend.encode(padded, mask).last_hidden_state[:, :6], e1, atol=1e-5)


def _external_places(path: Path) -> set[tuple[str, int, int]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    places = set()
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            places.add((info["location"], int(info["offset"]), int(info["length"])))
    return places


def test_no_weight_is_stored_twice(tiny_bundle):
    """Sum the bytes of every initializer the graphs reference, once per stored place, and
    compare with the model's parameters: the shared token embedding is stored once."""
    model, _ = load_model(tiny_bundle)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())  # tied embedding counted once
    stored: set[tuple[str, int]] = set()
    stored_bytes = inline_bytes = 0
    for file in (contract.ENCODER_FILE, contract.DECODER_FILE):
        graph = onnx.load(str(tiny_bundle / file), load_external_data=False).graph
        for init in graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                place = (info["location"], int(info["offset"]))
                if place not in stored:
                    stored.add(place)
                    stored_bytes += int(info["length"])
            else:
                inline_bytes += len(init.raw_data)
    # The step graph reads the decoder's weights where the decoder reads them.
    for quantized in (False, True):
        decoder = _external_places(
            tiny_bundle / contract.onnx_file(contract.DECODER_FILE, quantized)
        )
        step = _external_places(
            tiny_bundle / contract.onnx_file(contract.DECODER_STEP_FILE, quantized)
        )
        assert step and step <= decoder
    assert stored_bytes + inline_bytes <= param_bytes * 1.05 + 64 * 1024, (
        stored_bytes,
        inline_bytes,
        param_bytes,
    )
    embedding = model.tokens.weight.numel() * 4
    assert (tiny_bundle / contract.ONNX_DATA_FILE).stat().st_size < param_bytes + embedding


@pytest.mark.parametrize("quantized", [False, True])
def test_lookup_tables_are_mapped_once_and_read_by_every_session(
    tiny_bundle, quantized, monkeypatch
):
    """The manifest's lookup tables are the bytes the graphs gather from; every session reads
    the one copy the engine maps: swap that copy for zeros and the encoder's output moves."""
    manifest = json.loads((tiny_bundle / contract.MANIFEST_FILE).read_text())
    entries = manifest["lookup_tables"]["int8" if quantized else "fp32"]
    data = (tiny_bundle / contract.onnx_data_file(quantized)).read_bytes()
    encoder = onnx.load(str(tiny_bundle / contract.onnx_file(contract.ENCODER_FILE, quantized)))
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in encoder.graph.initializer}
    table = max(entries, key=lambda e: e["length"])  # the embedding
    assert len(table["shape"]) == 2
    for entry in entries:
        raw = data[entry["offset"] : entry["offset"] + entry["length"]]
        array = np.frombuffer(raw, entry["dtype"]).reshape(entry["shape"])
        for name in entry["names"]:
            if name in stored:
                np.testing.assert_array_equal(array, stored[name])
    bundle = load_bundle(tiny_bundle, quantized=quantized)
    assert bundle.tables is not None and set(table["names"]) <= set(bundle.tables.values)

    ids = np.array([[5, 6, 7, 8, 2]])
    mask = np.ones_like(ids)
    before = OnnxBackend(bundle).encode(ids, mask).last_hidden_state
    zeros = onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros(table["shape"], table["dtype"]))

    def add_zeros(self, options):
        for name, value in self.values.items():
            options.add_initializer(name, zeros if name in table["names"] else value)

    monkeypatch.setattr(SharedTables, "add_to", add_zeros)
    after = OnnxBackend(load_bundle(tiny_bundle, quantized=quantized)).encode(ids, mask)
    assert not np.allclose(before, after.last_hidden_state)


@pytest.mark.parametrize("quantized", [False, True])
def test_cpu_sessions_keep_each_residual_add_and_its_layer_norm_apart(
    tiny_bundle, quantized, tmp_path, monkeypatch
):
    """onnxruntime's full optimization would fuse the encoder's residual Adds and
    LayerNormalizations into SkipLayerNormalization, whose CPU kernel is the slower one
    (``bundle.CPU_DISABLED_OPTIMIZERS``): the served encoder runs the two nodes, and the same
    load without the exclusion shows the fusion it prevents."""
    from seq2serve.engine import bundle as bundle_module

    made = bundle_module.session_options

    def encoder_ops(name: str) -> Counter[str]:
        saved = tmp_path / name
        saved.mkdir()

        def saving(threads, arena=False):
            options = made(threads, arena)
            options.optimized_model_filepath = str(saved / f"{len(list(saved.iterdir()))}.onnx")
            return options

        monkeypatch.setattr(bundle_module, "session_options", saving)
        load_bundle(tiny_bundle, quantized=quantized)
        encoder = onnx.load(str(saved / "0.onnx"), load_external_data=False)
        return Counter(node.op_type for node in encoder.graph.node)

    layers = json.loads((tiny_bundle / contract.CONFIG_FILE).read_text())["n_encoder_layers"]
    served = encoder_ops("served")
    assert served["SkipLayerNormalization"] == 0
    assert served["LayerNormalization"] >= 2 * layers
    monkeypatch.setattr(bundle_module, "CPU_DISABLED_OPTIMIZERS", ())
    assert encoder_ops("fused")["SkipLayerNormalization"] >= 1


def test_a_lookup_table_outside_the_data_file_is_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / contract.MANIFEST_FILE).read_text())
    manifest["lookup_tables"]["fp32"][0]["offset"] = 1 << 40
    (bundle / contract.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model\.onnx\.data: lookup table .* does not fit"):
        load_bundle(bundle)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _rehash(bundle: Path, name: str) -> None:
    manifest = json.loads((bundle / contract.MANIFEST_FILE).read_text())
    manifest["files"][name]["sha256"] = sha256_file(bundle / name)
    (bundle / contract.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_corrupted_bundle_is_refused_naming_the_file(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    data = bundle / contract.ONNX_DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"model\.onnx\.data: sha256 does not match"):
        load_bundle(bundle)


def test_incomplete_bundle_is_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / contract.DECODER_FILE).unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx: missing"):
        load_bundle(bundle)
    (bundle / contract.MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(bundle)


def test_graph_that_breaks_the_contract_is_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    # A decoder graph swapped for the encoder graph: checksums made to match, I/O do not.
    shutil.copy(bundle / contract.ENCODER_FILE, bundle / contract.DECODER_FILE)
    _rehash(bundle, contract.DECODER_FILE)
    with pytest.raises(BundleError, match=r"decoder\.onnx: inputs differ from the contract"):
        load_bundle(bundle)


def test_invalid_config_is_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    cfg = json.loads((bundle / contract.CONFIG_FILE).read_text())
    cfg["n_heads"] = 5
    (bundle / contract.CONFIG_FILE).write_text(json.dumps(cfg))
    _rehash(bundle, contract.CONFIG_FILE)
    with pytest.raises(BundleError, match=r"config\.json: .*divisible"):
        load_bundle(bundle)


def test_cuda_request_without_cuda_falls_back_to_cpu(tiny_bundle, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    bundle = load_bundle(tiny_bundle, device="cuda")
    assert bundle.provider == "CPUExecutionProvider"
    assert "falling back to CPU" in caplog.text


def test_export_is_reproducible_and_atomic(tiny_checkpoint, tmp_path):
    from seq2serve.export.bundle import export_bundle

    out = tmp_path / "b"
    export_bundle(tiny_checkpoint, out)
    first = json.loads((out / contract.MANIFEST_FILE).read_text())["files"]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        export_bundle(broken, out)
    # The failed export left the earlier bundle whole.
    assert json.loads((out / contract.MANIFEST_FILE).read_text())["files"] == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert torch.__version__  # the exporter's own version is recorded
    assert "exporter" in json.loads((out / contract.MANIFEST_FILE).read_text())


def test_the_export_command_prints_its_progress_and_no_library_advice(tiny_checkpoint, tmp_path):
    # In a process of its own: the exporter's registry speaks once a process, at its first
    # export, which an earlier test in this one may have made.
    out = tmp_path / "b"
    command = [sys.executable, "-m", "seq2serve.cli", "export", str(tiny_checkpoint)]
    command += ["--out", str(out), "--quantize", "int8", "--screen-head", "on"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "quantizing to int8" in lines and any("screening" in line for line in lines)
    assert not [line for line in lines if "torchvision" in line or "pre-processing" in line]
    assert (out / contract.onnx_file(contract.DECODER_STEP_FILE, True)).is_file()


def test_int8_bundle_quantizes_the_tied_head_and_stores_the_table_once(tiny_bundle):
    """The LM head (MatMul over the transposed embedding) is int8 like every other MatMul, the
    embedding lookup reads the head's int8 rows, and no fp32 copy of the table is left."""
    model, _ = load_model(tiny_bundle)
    table = tuple(model.tokens.weight.shape)  # (V, C)
    for file in (contract.ENCODER_FILE, contract.DECODER_FILE):
        graph = onnx.load(
            str(tiny_bundle / contract.onnx_file(file, True)), load_external_data=False
        ).graph
        shapes = {i.name: (tuple(i.dims), i.data_type) for i in graph.initializer}
        assert (table, onnx.TensorProto.FLOAT) not in shapes.values(), file
        assert (table[::-1], onnx.TensorProto.FLOAT) not in shapes.values(), file
        assert shapes[quantize.EMBED_INT8] == (table, onnx.TensorProto.INT8), file
        # No MatMul left in fp32 with a stored weight.
        for node in graph.node:
            if node.op_type == "MatMul":
                assert node.input[1] not in shapes, (file, node.name)
    decoder = onnx.load(
        str(tiny_bundle / contract.onnx_file(contract.DECODER_FILE, True)),
        load_external_data=False,
    ).graph
    heads = [
        n for n in decoder.node if n.op_type == "Transpose" and n.input[0] == quantize.EMBED_INT8
    ]
    assert len(heads) == 1 and any(heads[0].output[0] in n.input for n in decoder.node)
    params = sum(p.numel() for p in model.parameters())  # int8: about a byte each
    size = (tiny_bundle / contract.onnx_data_file(True)).stat().st_size
    assert size < params * 1.25 + 64 * 1024, (size, params)


def test_int8_weights_stay_where_no_cpu_saturates(tiny_bundle):
    """Without VNNI, onnxruntime's uint8 x int8 kernel adds pairs of products in 16 bits and
    clips them: weights within +-64 keep every pair (2 x 255 x 64) exact on every CPU."""
    for f in (contract.ENCODER_FILE, contract.DECODER_FILE, contract.DECODER_STEP_FILE):
        largest = largest_int8(tiny_bundle / contract.onnx_file(f, True))
        assert largest <= quantize.SATURATION_FREE_WEIGHT, (f, largest)


def test_int8_logits_follow_fp32(tiny_bundle):
    """int8 logits track fp32's (the task-level agreement is measured on the trained default
    model, whose int8 bars are in its manifest and in test_default_model)."""
    fp32 = OnnxBackend(load_bundle(tiny_bundle))
    int8 = OnnxBackend(load_bundle(tiny_bundle, quantized=True))
    cfg = fp32.config
    rng = np.random.default_rng(0)
    src = rng.integers(10, cfg.vocab_size, (4, 9))
    mask = np.ones_like(src)
    ids = rng.integers(10, cfg.vocab_size, (4, 6))
    logits = []
    for backend in (fp32, int8):
        cross = backend.encode(src, mask).cross
        past = [np.zeros((4, cfg.n_heads, 0, cfg.head_dim), np.float32)] * (
            2 * cfg.n_decoder_layers
        )
        out = backend.decode(
            ids, np.broadcast_to(np.arange(6), (4, 6)).copy(), np.ones_like(ids), mask, past, cross
        )
        logits.append(out.logits)
    correlation = np.corrcoef(logits[0].ravel(), logits[1].ravel())[0, 1]
    assert correlation > 0.99, correlation
    # Every int8 choice is among fp32's best few (a random model has near-ties).
    top = np.argsort(-logits[0], axis=-1)[..., :5]
    assert (top == logits[1].argmax(-1)[..., None]).any(-1).all()
