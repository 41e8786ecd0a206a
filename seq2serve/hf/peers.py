"""Peer rows for ``seq2serve bench``: Hugging Face ``transformers`` and CTranslate2 decoding the
same weights (the Hugging Face directory a bundle was imported from).

Measured like the engine rows: greedy decoding of ``new_tokens`` tokens from the same random
``source_tokens``-token sources, encoder included, median over repeats after a warm-up, with
EOS suppressed (``min_new_tokens`` / ``min_decoding_length`` = the length) so every engine does
the same work. Each peer is skipped, with a note, when its package is not installed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Figures = dict[str, float]
Timer = Callable[[Callable[[], None], int], float]


def find_hf_source(bundle: Path, explicit: Path | None) -> Path | None:
    """``--hf-model`` if given, else the ``hf_source`` that ``import-hf`` recorded."""
    if explicit is not None:
        return explicit
    from seq2serve.hf.convert import SOURCE_FILE

    record = bundle / SOURCE_FILE
    if record.exists():
        source = Path(json.loads(record.read_text())["hf_source"])
        return source if source.is_dir() else None
    return None


def transformers_rows(
    hf_dir: Path,
    src: dict[int, list[list[int]]],
    new_tokens: int,
    repeats: int,
    timer: Timer,
    figures: Callable[[float, int, int], Figures],
    memory: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """``generate`` with the KV cache (transformers' default), greedy, per batch size; then
    ``memory()`` while the model is loaded."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir)).eval()
    rows = {}
    for b, sources in src.items():
        ids = torch.tensor(sources)

        @torch.inference_mode()
        def once(ids: torch.Tensor = ids) -> None:
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                use_cache=True,
                forced_bos_token_id=None,
                forced_eos_token_id=None,
                bad_words_ids=None,
            )

        rows[str(b)] = figures(timer(once, repeats), b, new_tokens)
    return {"rows": rows, **memory()}


def convert_ctranslate2(hf_dir: Path, out: Path, quantization: str | None) -> Path:
    """CTranslate2's converter on the Hugging Face model; ``quantization`` "int8" stores int8
    weights (as ``ct2-transformers-converter --quantization int8`` does)."""
    import ctranslate2

    from seq2serve.hf.tokenizer import without_sacremoses_advice

    converter = ctranslate2.converters.TransformersConverter(str(hf_dir))
    with without_sacremoses_advice():  # the converter loads transformers' MarianTokenizer
        converter.convert(str(out), quantization=quantization, force=True)
    return out


def ctranslate2_rows(
    ct2_dir: Path,
    tokenizer: Any,
    src: dict[int, list[list[int]]],
    new_tokens: int,
    repeats: int,
    threads: int | None,
    timer: Timer,
    figures: Callable[[float, int, int], Figures],
    memory: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """CTranslate2's ``Translator`` (CPU) on a converted model, greedy, per batch size; then
    ``memory()`` while the model is loaded."""
    import ctranslate2

    translator = ctranslate2.Translator(
        str(ct2_dir), device="cpu", inter_threads=1, intra_threads=threads or 0
    )
    rows = {}
    for b, sources in src.items():
        # CTranslate2 takes token strings; the ids come from the same vocabulary.
        tokens = [[tokenizer.id_to_token(i) for i in row] for row in sources]

        def once(tokens: list[list[str]] = tokens) -> None:
            translator.translate_batch(
                tokens,
                beam_size=1,
                max_decoding_length=new_tokens,
                min_decoding_length=new_tokens,
                max_batch_size=len(tokens),
            )

        rows[str(b)] = figures(timer(once, repeats), b, new_tokens)
    return {"rows": rows, **memory()}
