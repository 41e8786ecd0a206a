"""Task figures of a bundle as served: greedy exact match and classification accuracy,
computed through the onnxruntime engine (the graphs users get, fp32 or int8)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from seq2serve.data.files import Example
from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import DecodeBatch, SamplingParams, pad_rows, run_to_completion
from seq2serve.engine.runtime import OnnxBackend


def evaluate_bundle(
    path: Path, examples: Sequence[Example], quantized: bool = False, batch_size: int = 64
) -> dict[str, float]:
    bundle = load_bundle(path, quantized=quantized)
    backend, tok, cfg = OnnxBackend(bundle), bundle.tokenizer, bundle.config
    pairs = [e for e in examples if e.target is not None]
    labelled = [e for e in examples if e.label is not None]
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = DecodeBatch(backend, tok)
        seqs = [
            batch.new_sequence(
                tok.encode(e.source).ids[: cfg.max_source_positions],
                SamplingParams(max_new_tokens=64),
            )
            for e in chunk
        ]
        run_to_completion(batch, seqs)
        correct += sum(s.text == e.target for s, e in zip(seqs, chunk, strict=True))
    right = 0
    index = {label: i for i, label in enumerate(cfg.labels)}
    for start in range(0, len(labelled), batch_size):
        chunk = labelled[start : start + batch_size]
        rows = [tok.encode(e.source).ids[: cfg.max_source_positions] for e in chunk]
        ids, mask = pad_rows(rows, cfg.pad_token_id)
        pred = backend.encode(ids, mask).class_logits.argmax(-1)
        right += sum(
            int(p) == index.get(e.label or "", -1) for p, e in zip(pred, chunk, strict=True)
        )
    return {
        "exact_match": correct / len(pairs) if pairs else float("nan"),
        "accuracy": right / len(labelled) if labelled else float("nan"),
        "heldout_pairs": len(pairs),
        "heldout_labelled": len(labelled),
    }
