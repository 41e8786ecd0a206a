"""``seq2serve train``: train the encoder-decoder (and its classification head) from scratch.

Without data it trains the built-in default task; with ``--data`` a user's TSV/JSONL. A run is
seeded and reproducible, checkpoints atomically as safetensors (never pickle), and resumes
from the last checkpoint in ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from seq2serve.atomic import atomic_directory
from seq2serve.config import ModelConfig
from seq2serve.data.files import HELDOUT_FILE, Example, load_examples, write_heldout
from seq2serve.data.task import build_default_task, language_tags
from seq2serve.data.tokenizer import train_tokenizer
from seq2serve.model.checkpoint import load_model, save_weights
from seq2serve.model.generate import GenerationConfig, generate
from seq2serve.model.transformer import Transformer

log = logging.getLogger(__name__)


MAX_POSITIONS = 512


@dataclass(frozen=True)
class Preset:
    d_model: int
    n_heads: int
    d_ff: int
    n_encoder_layers: int
    n_decoder_layers: int
    vocab_size: int
    steps: int
    batch_size: int  # seq2seq rows per step (as many classification rows ride along)
    lr: float
    warmup: int
    eval_every: int
    n_train: int  # examples generated for the default task


PRESETS = {
    # The shipped default model: small enough that the bundle (weights, fp32 and int8 graphs)
    # stays under 25 MB, big enough to clear the task bars in under 15 minutes on 2 cores.
    "default": Preset(192, 4, 768, 2, 2, 1000, 2000, 128, 2e-3, 200, 400, 200_000),
    # For tests and smoke runs: trains in seconds.
    "tiny": Preset(32, 2, 64, 1, 1, 300, 60, 32, 3e-3, 10, 30, 4_000),
}


@dataclass(frozen=True)
class Dataset:
    train_pairs: list[Example]  # seq2seq rows
    train_labelled: list[Example]  # classification rows
    heldout_pairs: list[Example]
    heldout_labelled: list[Example]
    labels: tuple[str, ...]
    special_tokens: tuple[str, ...]


def _split(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    pairs = [e for e in examples if e.target is not None]
    labelled = [e for e in examples if e.label is not None]
    return pairs, labelled


def _heldout(example: Example) -> bool:
    """A stable ~2% of a user's rows, chosen by the source text (not by Python's hash seed)."""
    return hashlib.sha1(example.source.encode()).digest()[0] < 6


def load_dataset(data: Path | None, preset: Preset, seed: int) -> Dataset:
    if data is None:
        task = build_default_task(n_train=preset.n_train, seed=seed)
        train, heldout = task.train, task.heldout
        labels, special = task.labels, tuple(language_tags())
    else:
        rows = load_examples(data)
        train = [e for e in rows if not _heldout(e)]
        heldout = [e for e in rows if _heldout(e)]
        if not heldout:  # tiny files: keep at least one row aside for evaluation
            heldout, train = train[-1:], train[:-1] or train
        # A user row carries source, target and an optional label of its source.
        labelled = [Example(e.source, None, e.label) for e in rows if e.label is not None]
        labels = tuple(sorted({e.label for e in labelled if e.label is not None}))
        train = [Example(e.source, e.target, None) for e in train] + [
            e for e in labelled if not _heldout(e)
        ]
        heldout = [Example(e.source, e.target, None) for e in heldout] + [
            e for e in labelled if _heldout(e)
        ]
        special = ()
    train_pairs, train_labelled = _split(train)
    heldout_pairs, heldout_labelled = _split(heldout)
    return Dataset(train_pairs, train_labelled, heldout_pairs, heldout_labelled, labels, special)


# ----------------------------------------------------------------------------------------
# Batches


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


class Encoded:
    """Token ids of a dataset, computed once (tokenizing per step would dominate)."""

    def __init__(self, ds: Dataset, tok: Tokenizer, cfg: ModelConfig) -> None:
        limit_s, limit_t = cfg.max_source_positions, cfg.max_target_positions - 1
        self.pair_src = [
            e.ids[:limit_s] for e in tok.encode_batch([p.source for p in ds.train_pairs])
        ]
        self.pair_tgt = [
            e.ids[:limit_t]
            for e in tok.encode_batch(
                [p.target or "" for p in ds.train_pairs], add_special_tokens=False
            )
        ]
        self.cls_src = [
            e.ids[:limit_s] for e in tok.encode_batch([e.source for e in ds.train_labelled])
        ]
        index = {label: i for i, label in enumerate(ds.labels)}
        self.cls_label = [index[e.label] for e in ds.train_labelled if e.label is not None]


def seq2seq_batch(enc: Encoded, rows: list[int], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    src, src_mask = _pad([enc.pair_src[i] for i in rows], cfg.pad_token_id)
    dec_in, dec_mask = _pad(
        [[cfg.decoder_start_token_id, *enc.pair_tgt[i]] for i in rows], cfg.pad_token_id
    )
    labels, label_mask = _pad(
        [[*enc.pair_tgt[i], cfg.eos_token_id] for i in rows], cfg.pad_token_id
    )
    labels = labels.masked_fill(label_mask == 0, -100)
    return {
        "input_ids": src,
        "attention_mask": src_mask,
        "decoder_input_ids": dec_in,
        "decoder_attention_mask": dec_mask,
        "labels": labels,
    }


# ----------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: Transformer,
    tok: Tokenizer,
    pairs: Sequence[Example],
    labelled: Sequence[Example],
    batch_size: int = 256,
) -> dict[str, float]:
    """Held-out exact match of greedy generation, and classification accuracy."""
    model.eval()
    cfg = model.cfg
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        src, mask = _pad(
            [
                e.ids[: cfg.max_source_positions]
                for e in tok.encode_batch([p.source for p in chunk])
            ],
            cfg.pad_token_id,
        )
        longest = max(len(tok.encode(p.target or "", add_special_tokens=False).ids) for p in chunk)
        out = generate(model, src, mask, GenerationConfig(max_new_tokens=longest + 8))
        texts = tok.decode_batch(out, skip_special_tokens=True)
        correct += sum(t == p.target for t, p in zip(texts, chunk, strict=True))
    right = 0
    index = {label: i for i, label in enumerate(cfg.labels)}
    for start in range(0, len(labelled), batch_size):
        chunk = labelled[start : start + batch_size]
        src, mask = _pad(
            [
                e.ids[: cfg.max_source_positions]
                for e in tok.encode_batch([c.source for c in chunk])
            ],
            cfg.pad_token_id,
        )
        pred = model.classify(model.encode(src, mask), mask).argmax(-1).tolist()
        right += sum(p == index[c.label] for p, c in zip(pred, chunk, strict=True) if c.label)
    model.train()
    return {
        "exact_match": correct / max(len(pairs), 1),
        "accuracy": right / len(labelled) if labelled else float("nan"),
        "heldout_pairs": float(len(pairs)),
        "heldout_labelled": float(len(labelled)),
    }


# ----------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    out: Path,
    model: Transformer,
    tok: Tokenizer,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, object],
    metrics: dict[str, float] | None = None,
    heldout: Sequence[Example] = (),
) -> None:
    """Write the checkpoint to a temporary sibling, then swap it in: never half-written."""
    with atomic_directory(out) as tmp:
        model.cfg.save(tmp / "config.json")
        tok.save(str(tmp / "tokenizer.json"))
        save_weights(model, tmp / "model.safetensors")
        if optimizer is not None:
            save_file(_optimizer_tensors(model, optimizer), str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if heldout:
            # Export evaluates the ONNX graphs (fp32 and int8) on the same held-out rows.
            write_heldout(tmp / HELDOUT_FILE, heldout)


def _optimizer_tensors(
    model: Transformer, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{names[id(p)]}::{key}"] = torch.as_tensor(value).contiguous()
    return tensors


def _load_optimizer(model: Transformer, optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, slot = key.split("::")
        optimizer.state[params[name]][slot] = value


# ----------------------------------------------------------------------------------------
# The loop


def train(
    out: Path,
    data: Path | None = None,
    steps: int | None = None,
    preset_name: str = "default",
    seed: int = 0,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, float]:
    """Train, evaluate on the held-out split, and write the checkpoint to ``out``.

    ``stop_after`` ends this process's share of the run after that step, as an interruption
    would (the checkpoint is written there); calling ``train`` again resumes it.
    """
    preset = PRESETS[preset_name]
    if steps is not None:
        preset = replace(preset, steps=steps)
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    started = time.monotonic()
    ds = load_dataset(data, preset, seed)
    resume = (out / "trainer_state.json").exists()
    if resume:
        model, tok = load_model(out)
        cfg = model.cfg
        state = json.loads((out / "trainer_state.json").read_text())
        if state.get("seed") != seed or state.get("preset") != asdict(preset):
            raise ValueError(f"{out}: the checkpoint there was trained with other settings")
    else:
        texts = [e.source for e in ds.train_pairs] + [e.target or "" for e in ds.train_pairs]
        texts += [e.source for e in ds.train_labelled]
        tok = train_tokenizer(
            texts, vocab_size=preset.vocab_size, extra_special_tokens=ds.special_tokens
        )
        cfg = ModelConfig(
            vocab_size=tok.get_vocab_size(),
            d_model=preset.d_model,
            n_heads=preset.n_heads,
            d_ff=preset.d_ff,
            n_encoder_layers=preset.n_encoder_layers,
            n_decoder_layers=preset.n_decoder_layers,
            # Sinusoidal positions cost no weights: cover long inputs and outputs (the server
            # still enforces its own limits) and long-generation benchmarks.
            max_source_positions=MAX_POSITIONS,
            max_target_positions=MAX_POSITIONS,
            pad_token_id=tok.token_to_id("<pad>"),
            bos_token_id=tok.token_to_id("<s>"),
            eos_token_id=tok.token_to_id("</s>"),
            decoder_start_token_id=tok.token_to_id("<s>"),
            id2label=dict(enumerate(ds.labels)),
        )
        torch.manual_seed(seed)
        model = Transformer(cfg)
        state = {"step": 0, "seed": seed, "preset": asdict(preset), "history": []}

    enc = Encoded(ds, tok, cfg)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=preset.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    if resume and (out / "optimizer.safetensors").exists():
        _load_optimizer(model, optimizer, out / "optimizer.safetensors")

    def lr_at(step: int) -> float:
        if step < preset.warmup:
            return preset.lr * (step + 1) / preset.warmup
        progress_ = (step - preset.warmup) / max(preset.steps - preset.warmup, 1)
        return preset.lr * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    eval_pairs = ds.heldout_pairs[:300]
    eval_labelled = ds.heldout_labelled[:300]
    model.train()
    start_step = int(state["step"])  # type: ignore[call-overload]
    bar = tqdm(
        range(start_step, preset.steps),
        initial=start_step,
        total=preset.steps,
        desc="train",
        disable=not progress,
        unit="step",
    )
    for step in bar:
        # Every step draws from its own seeded generator: a resumed run sees the same batches.
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        torch.manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(len(enc.pair_src), (preset.batch_size,), generator=g).tolist()
        batch = seq2seq_batch(enc, rows, cfg)
        out_ = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["decoder_input_ids"],
            batch["decoder_attention_mask"],
        )
        loss = F.cross_entropy(
            out_.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
        )
        lm_loss = loss.item()
        cls_loss = 0.0
        if enc.cls_src and model.classifier is not None:
            crow = torch.randint(len(enc.cls_src), (preset.batch_size // 2,), generator=g).tolist()
            src, mask = _pad([enc.cls_src[i] for i in crow], cfg.pad_token_id)
            logits = model.classify(model.encode(src, mask), mask)
            c_loss = F.cross_entropy(logits, torch.tensor([enc.cls_label[i] for i in crow]))
            cls_loss = c_loss.item()
            loss = loss + c_loss
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(lm=f"{lm_loss:.3f}", cls=f"{cls_loss:.3f}", refresh=False)
        done = step + 1
        if done % preset.eval_every == 0 or done == preset.steps:
            metrics = evaluate(model, tok, eval_pairs, eval_labelled)
            state["step"] = done
            state["history"].append(  # type: ignore[union-attr]
                {"step": done, "lm_loss": lm_loss, "cls_loss": cls_loss, **metrics}
            )
            bar.write(
                f"step {done}: loss {lm_loss:.4f}/{cls_loss:.4f} "
                f"exact match {metrics['exact_match']:.3f} accuracy {metrics['accuracy']:.3f} "
                f"(on {len(eval_pairs)}/{len(eval_labelled)} held-out)"
            )
            save_checkpoint(out, model, tok, optimizer, state)
        if stop_after is not None and done >= stop_after and done < preset.steps:
            save_checkpoint(out, model, tok, optimizer, {**state, "step": done})
            bar.close()
            return {}
    bar.close()

    final = evaluate(model, tok, ds.heldout_pairs, ds.heldout_labelled)
    final["train_seconds"] = round(time.monotonic() - started, 1)
    state["step"] = preset.steps
    state["metrics"] = final
    heldout = [*ds.heldout_pairs, *ds.heldout_labelled]
    save_checkpoint(out, model.eval(), tok, optimizer, state, metrics=final, heldout=heldout)
    return final
