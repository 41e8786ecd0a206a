"""The model as the engine sees it: numpy in, numpy out, one call per graph.

``Backend`` is what the scheduler drives; ``OnnxBackend`` runs a bundle's graphs with
onnxruntime, and ``LogSoftmax`` turns a step's logits into log-probabilities. Names come
from ``seq2serve.contract``; nothing here imports PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Protocol

import numpy as np
import onnxruntime as ort

from seq2serve import contract
from seq2serve.config import ModelConfig
from seq2serve.engine.bundle import Bundle, session_options


@dataclass
class EncoderResult:
    last_hidden_state: np.ndarray  # (B, S, C)
    pooled: np.ndarray  # (B, C)
    class_logits: np.ndarray  # (B, num_labels)
    cross: list[np.ndarray]  # 2L arrays (B, H, S, D): layer i's key at 2i, value at 2i + 1


@dataclass
class DecoderResult:
    logits: np.ndarray  # (B, T, V)
    present: list[np.ndarray]  # 2L arrays (B, H, P + T, D): layer i's key at 2i, value at 2i + 1


class Backend(Protocol):
    config: ModelConfig

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderResult: ...

    def decode(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        decoder_attention_mask: np.ndarray,
        encoder_attention_mask: np.ndarray,
        past: list[np.ndarray],
        cross: list[np.ndarray],
    ) -> DecoderResult: ...


class OnnxBackend:
    """onnxruntime sessions of one bundle (CPU or CUDA execution provider)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.config = bundle.config
        n = self.config.n_decoder_layers
        self._encoder_outputs = [s.name for s in contract.encoder_outputs(self.config)]
        self._decoder_outputs = [s.name for s in contract.decoder_outputs(self.config)]
        self._past_names = [
            f"past_key_values.{i}.decoder.{kind}" for i in range(n) for kind in ("key", "value")
        ]
        self._cross_names = [
            f"past_key_values.{i}.encoder.{kind}" for i in range(n) for kind in ("key", "value")
        ]

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderResult:
        out = self.bundle.encoder.run(
            self._encoder_outputs,
            {
                "input_ids": input_ids.astype(np.int64),
                "attention_mask": attention_mask.astype(np.int64),
            },
        )
        return EncoderResult(out[0], out[1], out[2], list(out[3:]))

    def decode(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        decoder_attention_mask: np.ndarray,
        encoder_attention_mask: np.ndarray,
        past: list[np.ndarray],
        cross: list[np.ndarray],
    ) -> DecoderResult:
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "encoder_attention_mask": encoder_attention_mask,
        }
        feeds.update(zip(self._past_names, past, strict=True))
        feeds.update(zip(self._cross_names, cross, strict=True))
        out = self.bundle.decoder.run(self._decoder_outputs, feeds)
        return DecoderResult(out[0], list(out[1:]))


class LogSoftmax:
    """log_softmax over the last axis of (B, V) float32 logits, run by onnxruntime.

    Every step reports each chosen token's log-probability, so every row needs its
    normalizer. numpy's max, subtract, exp and sum over (16, 58101) logits took a tenth of an
    opus-mt-sized int8 batch-16 step; onnxruntime's kernel (vectorized, rows in parallel on
    the shared thread pool) takes a fifth of that time: the step went from 5.9 to 5.2 ms.
    The graph, ``log_softmax.onnx``, is one LogSoftmax node
    (``seq2serve.export.graphs.log_softmax_model``).
    """

    def __init__(self) -> None:
        graph = resources.files("seq2serve.engine").joinpath("log_softmax.onnx").read_bytes()
        self._session = ort.InferenceSession(
            graph, session_options(None), providers=["CPUExecutionProvider"]
        )

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._session.run(
            None, {"logits": np.ascontiguousarray(logits, dtype=np.float32)}
        )[0]
        return out


@cache
def log_softmax_rows() -> LogSoftmax:
    """The process's one ``LogSoftmax`` (made on first use)."""
    return LogSoftmax()
