"""The ONNX contract of a model bundle: graph input/output names, element types and axes.

One place, no PyTorch: the exporter writes graphs to it, the verifier and the server check
graphs against it. Names follow Hugging Face Optimum's so outside runtimes feel at home;
unlike Optimum, the encoder also returns the cross-attention keys/values, computed once per
request.

Axis names are symbolic dimensions; an int is a fixed size from the model config.
"""

from __future__ import annotations

from dataclasses import dataclass

from seq2serve.config import ModelConfig

# Bundle files.
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
# Both graphs keep their weights in one shared external-data file, so the token embedding
# (used by the encoder, the decoder and the tied LM head) is stored once.
ONNX_DATA_FILE = "model.onnx.data"
# The decoder for steps over a cache buffer written in place (optional: bundles without it
# decode with decoder.onnx). Its weights are decoder.onnx's, in the same data file.
DECODER_STEP_FILE = "decoder_step.onnx"
INT8_SUFFIX = ".int8"
# Where `seq2serve import-hf` found a model (benchmarks run the original on the same weights).
HF_SOURCE_FILE = "hf_source.json"

# Symbolic axes.
BATCH = "batch_size"
SOURCE = "encoder_sequence_length"
TARGET = "decoder_sequence_length"
PAST = "past_decoder_sequence_length"
TOTAL = "past_decoder_sequence_length + decoder_sequence_length"
CAPACITY = "cache_capacity"
WRITE_INDICES = "write_indices"
EXACT_LOGITS = "exact_logits"

Dim = str | int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" or "float"
    shape: tuple[Dim, ...]


def onnx_data_file(quantized: bool) -> str:
    return f"model{INT8_SUFFIX}.onnx.data" if quantized else ONNX_DATA_FILE


def onnx_file(name: str, quantized: bool) -> str:
    """encoder.onnx -> encoder.int8.onnx for the quantized variant."""
    return name.replace(".onnx", f"{INT8_SUFFIX}.onnx") if quantized else name


def encoder_inputs() -> list[TensorSpec]:
    return [
        TensorSpec("input_ids", "int64", (BATCH, SOURCE)),
        TensorSpec("attention_mask", "int64", (BATCH, SOURCE)),
    ]


def encoder_outputs(cfg: ModelConfig) -> list[TensorSpec]:
    kv = (BATCH, cfg.n_heads, SOURCE, cfg.head_dim)
    out = [
        TensorSpec("last_hidden_state", "float", (BATCH, SOURCE, cfg.d_model)),
        TensorSpec("pooled", "float", (BATCH, cfg.d_model)),
        TensorSpec("class_logits", "float", (BATCH, cfg.num_labels)),
    ]
    for i in range(cfg.n_decoder_layers):
        out.append(TensorSpec(f"present.{i}.encoder.key", "float", kv))
        out.append(TensorSpec(f"present.{i}.encoder.value", "float", kv))
    return out


def decoder_inputs(cfg: ModelConfig) -> list[TensorSpec]:
    cross = (BATCH, cfg.n_heads, SOURCE, cfg.head_dim)
    past = (BATCH, cfg.n_heads, PAST, cfg.head_dim)
    out = [
        TensorSpec("input_ids", "int64", (BATCH, TARGET)),
        TensorSpec("position_ids", "int64", (BATCH, TARGET)),
        TensorSpec("decoder_attention_mask", "int64", (BATCH, TOTAL)),
        TensorSpec("encoder_attention_mask", "int64", (BATCH, SOURCE)),
    ]
    for i in range(cfg.n_decoder_layers):
        out.append(TensorSpec(f"past_key_values.{i}.decoder.key", "float", past))
        out.append(TensorSpec(f"past_key_values.{i}.decoder.value", "float", past))
        out.append(TensorSpec(f"past_key_values.{i}.encoder.key", "float", cross))
        out.append(TensorSpec(f"past_key_values.{i}.encoder.value", "float", cross))
    return out


def decoder_outputs(cfg: ModelConfig) -> list[TensorSpec]:
    present = (BATCH, cfg.n_heads, TOTAL, cfg.head_dim)
    out = [TensorSpec("logits", "float", (BATCH, TARGET, cfg.vocab_size))]
    for i in range(cfg.n_decoder_layers):
        out.append(TensorSpec(f"present.{i}.decoder.key", "float", present))
        out.append(TensorSpec(f"present.{i}.decoder.value", "float", present))
    return out


def decoder_step_inputs(cfg: ModelConfig, screened: bool = False) -> list[TensorSpec]:
    """``decoder.onnx``'s inputs over a cache buffer of any capacity, and where to write.

    One new token per row (``decoder_sequence_length`` 1): its keys/values are written into
    column ``write_indices[b]`` of row b's buffer, and ``decoder_attention_mask`` (1 = a real
    token, the new one included; 0 after it) covers the whole buffer. Bind each
    ``present.*.decoder.*`` output to the same memory as its ``past_key_values`` input and
    the step copies nothing (onnxruntime's TensorScatter, opset 24); unbound, the present is
    the updated copy of the buffer.

    A graph whose LM head is screened (``screened``, see ``seq2serve.export.screen``: an
    fp32 head in int8, an int8 head in 4 bits) also takes ``exact_logits``, a bool scalar:
    false, the logits are exact for the highest-scoring tokens (the argmax among them,
    certified) and the screen's for the rest; true, exact for every token. "Exact" is the
    graph's own precision: an int8 graph's logits are its int8 head's.
    """
    out = []
    for spec in decoder_inputs(cfg):
        if spec.name == "decoder_attention_mask":
            spec = TensorSpec(spec.name, spec.dtype, (BATCH, CAPACITY))
        elif spec.name.endswith((".decoder.key", ".decoder.value")):
            spec = TensorSpec(spec.name, spec.dtype, (BATCH, cfg.n_heads, CAPACITY, cfg.head_dim))
        out.append(spec)
    out.append(TensorSpec(WRITE_INDICES, "int64", (BATCH,)))
    if screened:
        out.append(TensorSpec(EXACT_LOGITS, "bool", ()))
    return out


def decoder_step_outputs(cfg: ModelConfig) -> list[TensorSpec]:
    buffer = (BATCH, cfg.n_heads, CAPACITY, cfg.head_dim)
    return [
        spec if spec.name == "logits" else TensorSpec(spec.name, spec.dtype, buffer)
        for spec in decoder_outputs(cfg)
    ]


def graph_specs(
    cfg: ModelConfig, screened: bool = False
) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    """File name -> (inputs, outputs); ``screened``: the step graph's LM head is screened."""
    return {
        ENCODER_FILE: (encoder_inputs(), encoder_outputs(cfg)),
        DECODER_FILE: (decoder_inputs(cfg), decoder_outputs(cfg)),
        DECODER_STEP_FILE: (decoder_step_inputs(cfg, screened), decoder_step_outputs(cfg)),
    }


def check_io(
    file: str,
    expected: list[TensorSpec],
    actual: list[tuple[str, str, tuple[Dim | None, ...]]],
    kind: str,
) -> list[str]:
    """Compare a graph's inputs or outputs, given as (name, dtype, shape) with symbolic dims
    as strings, against the contract. Returns human-readable problems naming the file.

    Symbolic axes are checked for being dynamic (any name: runtimes rename them), fixed axes
    for their size.
    """
    problems = []
    names = [a[0] for a in actual]
    if names != [e.name for e in expected]:
        missing = [e.name for e in expected if e.name not in names]
        extra = [n for n in names if n not in {e.name for e in expected}]
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing)}")
        if extra:
            detail.append(f"unexpected {', '.join(extra)}")
        if not detail:
            detail.append("in another order")
        return [f"{file}: {kind} differ from the contract: {'; '.join(detail)}"]
    for spec, (name, dtype, shape) in zip(expected, actual, strict=True):
        if dtype != spec.dtype:
            problems.append(
                f"{file}: {kind[:-1]} {name} is {dtype}, the contract says {spec.dtype}"
            )
        if len(shape) != len(spec.shape):
            problems.append(
                f"{file}: {kind[:-1]} {name} has rank {len(shape)}, "
                f"the contract says {len(spec.shape)}"
            )
            continue
        for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(want, int) and got != want:
                problems.append(
                    f"{file}: {kind[:-1]} {name} axis {axis} is {got}, the contract says {want}"
                )
            if isinstance(want, str) and isinstance(got, int):
                problems.append(
                    f"{file}: {kind[:-1]} {name} axis {axis} is fixed at {got}, "
                    f"the contract says it is dynamic ({want})"
                )
    return problems
