"""The benchmark's reference workload: an opus-mt-en-de-sized MarianMT with random weights.

    python -m seq2serve.hf.reference --out DIR

writes ``DIR/hf`` (a Hugging Face directory: config, safetensors weights, source/target
SentencePiece models and vocab.json, shaped like Helsinki-NLP/opus-mt-en-de: d_model 512,
6+6 layers, 8 heads, FFN 2048, a 58,101-entry vocabulary, swish, scaled embeddings, tied
weights), then imports it (``seq2serve import-hf``) to ``DIR/ckpt`` and exports it with int8
graphs to ``DIR/bundle``, whose ``hf_source.json`` points the benchmark's transformers and
CTranslate2 rows at ``DIR/hf``. Nothing is downloaded: the SentencePiece models are trained
on the default task's phrases, the vocabulary is padded to opus-mt's size, and the weights
are drawn from a fixed seed, so every run builds the same model.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any

VOCAB_SIZE = 58101  # opus-mt-en-de's
SEED = 0

log = logging.getLogger("seq2serve.hf.reference")  # the same name when run with -m


def _phrases(n: int, seed: int) -> list[str]:
    from seq2serve.data.task import build_default_task

    task = build_default_task(n_train=n, n_heldout=0, seed=seed)
    text = [e.source for e in task.train] + [e.target for e in task.train if e.target]
    random.Random(seed).shuffle(text)
    return text[:n]


def shared_pieces(models: list[Path], first: list[str]) -> list[str]:
    """A Marian-style shared vocabulary: ``first``, then every piece of the SentencePiece
    ``models`` in order, each once (their control and unknown pieces left out)."""
    import sentencepiece as spm

    pieces = list(first)
    for model in models:
        sp = spm.SentencePieceProcessor(model_file=str(model))
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if not (sp.is_control(i) or sp.is_unknown(i)) and piece not in pieces:
                pieces.append(piece)
    return pieces


def build_hf(
    out: Path, d_model: int = 512, layers: int = 6, heads: int = 8, ffn: int = 2048
) -> Path:
    """The Hugging Face directory of the reference model (smaller dimensions for tests)."""
    import sentencepiece as spm
    import torch
    import transformers

    work = out / "spm"
    work.mkdir(parents=True, exist_ok=True)
    for name, seed in (("source", 1), ("target", 2)):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_phrases(4000, seed)),
            model_prefix=str(work / name),
            vocab_size=400,
            model_type="unigram",
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    pieces = shared_pieces([work / "source.model", work / "target.model"], ["</s>", "<unk>"])
    # Filler pieces bring the vocabulary (and the embedding, the LM head) to opus-mt's size.
    pieces += [f"\u2581w{i}" for i in range(VOCAB_SIZE - 1 - len(pieces))]
    hf = out / "hf"
    cfg = marian_config(work, hf, pieces, d_model, layers, heads, ffn, max_positions=512)
    torch.manual_seed(SEED)
    transformers.MarianMTModel(cfg).eval().save_pretrained(str(hf))
    return hf


def marian_config(
    work: Path,
    hf: Path,
    pieces: list[str],
    d_model: int,
    layers: int,
    heads: int,
    ffn: int,
    max_positions: int,
) -> Any:
    """Write a Marian-style ``vocab.json`` (``pieces``, then ``<pad>`` last, as in opus-mt)
    beside the SentencePiece models ``work/source.model`` and ``work/target.model``, save
    their ``MarianTokenizer`` to ``hf``, and return the config of an opus-mt-style MarianMT
    over them (swish, scaled embeddings, EOS 0, decoding starts at pad) that generates plain
    greedy, nothing forced, as seq2serve's engine decodes."""
    import transformers

    from seq2serve.hf.tokenizer import without_sacremoses_advice

    vocab = {p: i for i, p in enumerate([*pieces, "<pad>"])}
    (work / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    with without_sacremoses_advice():
        transformers.MarianTokenizer(
            str(work / "source.model"), str(work / "target.model"), str(work / "vocab.json")
        ).save_pretrained(str(hf))
    pad = vocab["<pad>"]
    return transformers.MarianConfig(
        vocab_size=len(vocab),
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=max_positions,
        activation_function="swish",
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        bad_words_ids=None,
        num_beams=1,
    )


def build(out: Path, **dims: int) -> Path:
    """HF directory, checkpoint and bundle under ``out``; returns the bundle."""
    from seq2serve.export.bundle import export_bundle
    from seq2serve.hf.convert import import_hf

    hf = build_hf(out, **dims)
    log.info("importing %s", hf)
    import_hf(hf, out / "ckpt")
    log.info("exporting the bundle with int8 graphs")
    export_bundle(out / "ckpt", out / "bundle", quantize="int8", verify=True)
    return out / "bundle"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to build into")
    args = parser.parse_args(argv)
    from seq2serve.cli import console_logging

    console_logging()  # as the console script logs (onnxscript's INFO: 100 lines an export)
    print(build(args.out))


if __name__ == "__main__":
    main()
