"""``seq2serve export``: a checkpoint -> a model bundle (SPEC section 4).

Steps: export both graphs, optionally quantize them (onnxruntime's dynamic int8), move every
weight into one shared external-data file per precision with each tensor stored once (the
embedding is used by the encoder, the decoder and the tied LM head, and the exporter folds a
transposed copy for the latter), verify parity against PyTorch, and write a manifest with
sha256 of every file. The bundle is written to a temporary sibling and swapped in whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import seq2serve
from seq2serve import contract
from seq2serve.atomic import atomic_directory
from seq2serve.data.files import HELDOUT_FILE, read_heldout
from seq2serve.engine.bundle import sha256_file
from seq2serve.export.graphs import OPSET, export_graphs, step_graph
from seq2serve.export.quantize import quantize_int8, tie_int8_embedding
from seq2serve.export.screen import (
    int8_screen_fits,
    is_screened,
    screen_head,
    screen_int8_head,
    wants_screen,
)
from seq2serve.model.checkpoint import load_model

log = logging.getLogger(__name__)

# Initializers smaller than this stay inside the graph file (scalars, shapes).
INLINE_BYTES = 1024
ALIGN = 64


def _key(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    data = np.ascontiguousarray(array)
    return (data.dtype.str, data.shape, hashlib.sha256(data.tobytes()).hexdigest())


def share_weights(graphs: dict[str, onnx.ModelProto], data_file: Path) -> dict[str, int]:
    """Move the graphs' initializers into ``data_file``, each distinct tensor stored once.

    An initializer that is the transpose of a tensor already stored becomes a Transpose node
    over it (onnxruntime folds it back at load time). Returns byte counts for the manifest.
    """
    stored: dict[tuple[str, tuple[int, ...], str], tuple[int, int]] = {}
    referenced = 0
    with data_file.open("wb") as f:

        def place(array: np.ndarray) -> tuple[int, int]:
            nonlocal referenced
            key = _key(array)
            referenced += array.nbytes
            if key not in stored:
                pad = -f.tell() % ALIGN
                f.write(b"\0" * pad)
                stored[key] = (f.tell(), array.nbytes)
                f.write(np.ascontiguousarray(array).tobytes())
            return stored[key]

        def externalize(init: TensorProto, offset: int, length: int) -> None:
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (
                ("location", data_file.name),
                ("offset", str(offset)),
                ("length", str(length)),
            ):
                init.external_data.add(key=k, value=v)

        for graph in graphs.values():
            # Each initializer, in order: already stored -> point at it; its transpose already
            # stored -> a Transpose node over a stored tensor; else store it. A Transpose's
            # input is always a stored initializer, never another Transpose's output, so a
            # tensor and its transpose in one graph cannot feed each other.
            kept: list[TensorProto] = []
            transposes: list[onnx.NodeProto] = []
            here: dict[tuple[str, tuple[int, ...], str], str] = {}  # stored key -> name here
            for init in graph.graph.initializer:
                array = numpy_helper.to_array(init)
                if array.nbytes < INLINE_BYTES:
                    kept.append(init)
                    continue
                key = _key(array)
                source_key = _key(array.T) if array.ndim == 2 else None
                if key not in stored and source_key in stored:
                    source = here.get(source_key)
                    if source is None:  # stored by an earlier graph, not present here
                        source = f"{init.name}.transposed_source"
                        extra = numpy_helper.from_array(np.ascontiguousarray(array.T), source)
                        externalize(extra, *place(np.ascontiguousarray(array.T)))
                        kept.append(extra)
                        here[source_key] = source
                    transposes.append(
                        helper.make_node("Transpose", [source], [init.name], perm=[1, 0])
                    )
                    continue
                externalize(init, *place(array))
                here.setdefault(key, init.name)
                kept.append(init)
            del graph.graph.initializer[:]
            graph.graph.initializer.extend(kept)
            nodes = [*transposes, *graph.graph.node]
            del graph.graph.node[:]
            graph.graph.node.extend(nodes)
        stored_bytes = sum(length for _, length in stored.values())
    return {"stored_bytes": stored_bytes, "referenced_bytes": referenced}


def lookup_tables(graphs: dict[str, onnx.ModelProto]) -> list[dict[str, Any]]:
    """The stored tensors the graphs gather rows from (the embedding tables), each once:
    where it is in the data file, its dtype, shape and its names in the graphs. The engine
    maps each once and hands it to every session (``engine.bundle.SharedTables``)."""
    tables: dict[tuple[int, int], dict[str, Any]] = {}
    for graph in graphs.values():
        gathered = {n.input[0] for n in graph.graph.node if n.op_type == "Gather"}
        for init in graph.graph.initializer:
            if init.name not in gathered or init.data_location != TensorProto.EXTERNAL:
                continue
            where = {e.key: e.value for e in init.external_data}
            key = (int(where["offset"]), int(where["length"]))
            entry = tables.setdefault(
                key,
                {
                    "offset": key[0],
                    "length": key[1],
                    "dtype": helper.tensor_dtype_to_np_dtype(init.data_type).name,
                    "shape": list(init.dims),
                    "names": [],
                },
            )
            if init.name not in entry["names"]:
                entry["names"].append(init.name)
    return [tables[k] for k in sorted(tables)]


def _io_table(cfg: Any, screened: bool) -> dict[str, Any]:
    """The fp32 graphs' inputs and outputs (the int8 step graph has no ``exact_logits``)."""
    table = {}
    for file, (inputs, outputs) in contract.graph_specs(cfg, screened).items():
        table[file] = {
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in inputs],
            "outputs": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in outputs
            ],
        }
    return table


def export_bundle(
    ckpt: Path,
    out: Path,
    quantize: str | None = None,
    verify: bool = False,
    screen: bool | None = None,
) -> dict[str, Any]:
    """Write the bundle for checkpoint ``ckpt`` to ``out``; returns the manifest.

    ``screen``: whether the step graphs' LM heads are screened and rescored exactly
    (``seq2serve.export.screen``): True, both (fp32 in int8, int8 in 4 bits at batch 1);
    None, the fp32 head when it is large enough to pay; False, neither."""
    ckpt, out = Path(ckpt), Path(out)
    model, _ = load_model(ckpt)
    cfg = model.cfg
    with atomic_directory(out) as tmp:
        for name in (contract.CONFIG_FILE, contract.TOKENIZER_FILE, contract.WEIGHTS_FILE):
            shutil.copy2(ckpt / name, tmp / name)
        if (
            ckpt / contract.HF_SOURCE_FILE
        ).exists():  # where `import-hf` found the model (bench peers)
            shutil.copy2(ckpt / contract.HF_SOURCE_FILE, tmp / contract.HF_SOURCE_FILE)
        raw = tmp / "raw"
        raw.mkdir()
        log.info("exporting encoder and decoder graphs (opset %d)", OPSET)
        export_graphs(model, raw)
        variants = {
            False: {
                f: onnx.load(str(raw / f)) for f in (contract.ENCODER_FILE, contract.DECODER_FILE)
            }
        }
        if quantize == "int8":
            log.info("quantizing to int8")
            for f in (contract.ENCODER_FILE, contract.DECODER_FILE):
                quantize_int8(raw / f, raw / contract.onnx_file(f, True))
            variants[True] = {
                f: onnx.load(str(raw / contract.onnx_file(f, True)))
                for f in (contract.ENCODER_FILE, contract.DECODER_FILE)
            }
            tie_int8_embedding(variants[True], contract.DECODER_FILE)
        elif quantize is not None:
            raise ValueError(f"--quantize must be int8, got {quantize!r}")
        screen_fp32 = wants_screen(cfg.vocab_size, cfg.d_model) if screen is None else screen
        for quantized, graphs in variants.items():
            step = step_graph(graphs[contract.DECODER_FILE], cfg)
            if not quantized:
                if screen_fp32:
                    log.info("screening the fp32 step graph's LM head in int8")
                    screen_head(step)
            elif screen and int8_screen_fits(cfg.d_model):
                log.info("screening the int8 step graph's LM head in 4 bits")
                screen_int8_head(step)
            elif screen:
                log.warning(
                    "d_model %d: no 4-bit block length divides it; the int8 head is not screened",
                    cfg.d_model,
                )
            graphs[contract.DECODER_STEP_FILE] = step
        sizes, tables = {}, {}
        for quantized, graphs in variants.items():
            data_file = tmp / contract.onnx_data_file(quantized)
            sizes["int8" if quantized else "fp32"] = share_weights(graphs, data_file)
            tables["int8" if quantized else "fp32"] = lookup_tables(graphs)
            for f, proto in graphs.items():
                onnx.save_model(proto, str(tmp / contract.onnx_file(f, quantized)))
        shutil.rmtree(raw)

        manifest: dict[str, Any] = {
            "format": "seq2serve-bundle/1",
            "seq2serve_version": seq2serve.__version__,
            "exporter": f"torch.onnx (dynamo) {torch.__version__}, onnx {onnx.__version__}",
            "opset": OPSET,
            "io": _io_table(cfg, is_screened(variants[False][contract.DECODER_STEP_FILE])),
            "weights": sizes,
            "lookup_tables": tables,
        }
        metrics_file = ckpt / "metrics.json"
        if metrics_file.exists():
            manifest["training_metrics"] = json.loads(metrics_file.read_text())

        def write_manifest() -> None:
            manifest["files"] = {
                p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir())
                if p.is_file() and p.name != contract.MANIFEST_FILE
            }
            (tmp / contract.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

        write_manifest()
        if verify:
            from seq2serve.export.verify import verify_parity

            log.info("verifying parity against PyTorch")
            manifest["parity"] = {"fp32": verify_parity(model, tmp, quantized=False)}
            if quantize == "int8":
                manifest["parity"]["int8"] = verify_parity(model, tmp, quantized=True)
            write_manifest()
        heldout_file = ckpt / HELDOUT_FILE
        if heldout_file.exists():
            from seq2serve.evaluate import evaluate_bundle

            heldout = read_heldout(heldout_file)
            manifest["task_metrics"] = {}
            for quantized in variants:
                name = "int8" if quantized else "fp32"
                log.info("evaluating the %s graphs on %d held-out rows", name, len(heldout))
                manifest["task_metrics"][name] = evaluate_bundle(tmp, heldout, quantized=quantized)
            write_manifest()
    return manifest
