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
from seq2serve.engine import memory
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
        exact_logits: bool = False,
    ) -> DecoderResult:
        """Logits (B, T, V) and the cache with the new tokens' columns. ``exact_logits``
        false lets a step graph with a screened LM head return logits that are exact for
        each row's best tokens only (the greedy token and its logit exact); sampling, beams
        and repetition penalties ask for all of them."""
        ...

    def release_memory(self) -> None:
        """Hand back what loading and warming up brought into memory that serving need not
        keep (the engine calls it once it is warm)."""
        ...


def cache_buffers(past: list[np.ndarray], rows: int, capacity: int) -> list[np.ndarray]:
    """Buffers (rows, H, capacity, D) for ``step_in_place`` with ``past`` (B, H, P, D) copied
    into their leading rows and columns; the rest zero (free slots, columns to come)."""
    buffers = []
    for old in past:
        buffer = memory.zeros((rows, old.shape[1], capacity, old.shape[3]), np.float32)
        buffer[: old.shape[0], :, : old.shape[2]] = old
        buffers.append(buffer)
    return buffers


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
        self._present_names = [
            f"present.{i}.decoder.{kind}" for i in range(n) for kind in ("key", "value")
        ]
        # Steps over cache buffers written in place (``bind_step``, ``step_in_place``): with
        # the bundle's decoder_step graph, which load_bundle opens on the CPU only.
        self.steps_in_place = bundle.step is not None

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
        exact_logits: bool = False,
    ) -> DecoderResult:
        step = self.bundle.step
        if step is not None and input_ids.shape[1] == 1:
            # The step graph over buffers one column wider than the past: the same
            # computation as decoder.onnx's, whose session then never needs opening.
            b, _, p, _ = past[0].shape
            buffers = cache_buffers(past, b, p + 1)
            binding = self.bind_step(
                buffers, cross, encoder_attention_mask, decoder_attention_mask.shape
            )
            logits = binding.run(input_ids, position_ids, decoder_attention_mask, p, exact_logits)
            return DecoderResult(logits, buffers)
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

    def release_memory(self) -> None:
        # The lookup tables: warm-up asked for exact logits, which read all of the table.
        if self.bundle.tables is not None:
            self.bundle.tables.release()

    def bind_step(
        self,
        buffers: list[np.ndarray],
        cross: list[np.ndarray],
        encoder_attention_mask: np.ndarray,
        mask_shape: tuple[int, ...],
    ) -> StepBinding:
        """The step graph bound to a batch's arrays, for ``step_in_place``: ``buffers`` are
        2L cache arrays (B, H, capacity, D), contiguous; ``mask_shape`` is (B, capacity)."""
        step = self.bundle.step
        assert step is not None
        return StepBinding(self, step, buffers, cross, encoder_attention_mask, mask_shape)

    def step_in_place(
        self,
        binding: StepBinding,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        decoder_attention_mask: np.ndarray,
        write_index: int,
        exact_logits: bool = False,
    ) -> np.ndarray:
        """One decode step (one new token per row) that writes the new keys/values into
        column ``write_index`` of the bound buffers and returns the logits (B, 1, V), valid
        until the binding's next run. ``decoder_attention_mask`` (B, capacity) covers the
        whole buffer, 1 at every column that holds one of a row's real tokens, ``write_index``
        (the new token's) included: columns are attended as a set, in any order (each
        token's position is in its own keys and values), so the cache may be a ring.

        The buffers are bound as both the graph's past input and its present output, so the
        cache is neither copied into a wider array nor returned: ``decode`` copies every
        cached column every step (13 % of an opus-mt-sized int8 step at batch 16 and 70
        cached columns). ``exact_logits``: as for ``decode``.
        """
        return binding.run(
            input_ids, position_ids, decoder_attention_mask, write_index, exact_logits
        )


class StepBinding:
    """The step graph's IO binding to a batch's arrays, kept by the batch while they stay
    the same objects (``serves``): a step then only writes its few inputs into the bound
    arrays and runs (no forty binding calls per step). Arrays are bound by address; holding
    them here keeps that memory, and the identities compared, alive."""

    def __init__(
        self,
        backend: OnnxBackend,
        session: ort.InferenceSession,
        buffers: list[np.ndarray],
        cross: list[np.ndarray],
        encoder_attention_mask: np.ndarray,
        mask_shape: tuple[int, ...],
    ) -> None:
        b = mask_shape[0]
        self.buffers, self.cross = buffers, cross
        self.encoder_attention_mask = encoder_attention_mask
        self.input_ids = np.zeros((b, 1), np.int64)
        self.position_ids = np.zeros((b, 1), np.int64)
        self.decoder_attention_mask = np.zeros(mask_shape, np.int64)
        self.write_indices = np.zeros(b, np.int64)
        self.exact_logits = np.zeros((), np.bool_)  # bound when the head is screened
        self.logits = memory.zeros((b, 1, backend.config.vocab_size), np.float32)
        given = [encoder_attention_mask, *cross]
        self._held = [np.ascontiguousarray(encoder_attention_mask, np.int64)]
        self._held += [np.ascontiguousarray(c, np.float32) for c in cross]
        self.reusable = all(h is g for h, g in zip(self._held, given, strict=True))
        self.binding = binding = session.io_binding()

        def bind(name: str, array: np.ndarray, output: bool = False) -> None:
            assert array.flags.c_contiguous
            args = (name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            (binding.bind_output if output else binding.bind_input)(*args)

        bind("input_ids", self.input_ids)
        bind("position_ids", self.position_ids)
        bind("decoder_attention_mask", self.decoder_attention_mask)
        bind(contract.WRITE_INDICES, self.write_indices)
        if backend.bundle.screened:
            bind(contract.EXACT_LOGITS, self.exact_logits)
        bind("encoder_attention_mask", self._held[0])
        for name, array in zip(backend._cross_names, self._held[1:], strict=True):
            bind(name, array)
        for past, present, buffer in zip(
            backend._past_names, backend._present_names, buffers, strict=True
        ):
            assert buffer.dtype == np.float32
            bind(past, buffer)
            bind(present, buffer, output=True)
        bind("logits", self.logits, output=True)
        self.session = session

    def serves(
        self,
        buffers: list[np.ndarray],
        cross: list[np.ndarray],
        encoder_attention_mask: np.ndarray,
        mask_shape: tuple[int, ...],
    ) -> bool:
        """Whether this binding is bound to these very arrays (one that had to copy an
        array at binding would miss the batch's later writes into it, a joiner's slot)."""
        return (
            self.reusable
            and self.buffers is buffers
            and self.cross is cross
            and self.encoder_attention_mask is encoder_attention_mask
            and self.decoder_attention_mask.shape == mask_shape
        )

    def run(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        decoder_attention_mask: np.ndarray,
        write_index: int,
        exact_logits: bool = False,
    ) -> np.ndarray:
        self.input_ids[...] = input_ids
        self.position_ids[...] = position_ids
        self.decoder_attention_mask[...] = decoder_attention_mask
        self.write_indices[...] = write_index
        self.exact_logits[...] = exact_logits
        self.session.run_with_iobinding(self.binding)
        return self.logits


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
            graph, session_options(None, arena=True), providers=["CPUExecutionProvider"]
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
