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
import tempfile
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
) -> dict[str, Figures]:
    """``generate`` with the KV cache (transformers' default), greedy, per batch size."""
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
    return rows


def ctranslate2_rows(
    hf_dir: Path,
    tokenizer: Any,
    src: dict[int, list[list[int]]],
    new_tokens: int,
    repeats: int,
    threads: int | None,
    timer: Timer,
    figures: Callable[[float, int, int], Figures],
) -> dict[str, Figures]:
    """CTranslate2's ``Translator`` (fp32, CPU) on the converted model, greedy, per batch size."""
    import ctranslate2

    with tempfile.TemporaryDirectory(prefix="seq2serve-ct2-") as tmp:
        out = Path(tmp) / "model"
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out), force=True)
        translator = ctranslate2.Translator(
            str(out), device="cpu", inter_threads=1, intra_threads=threads or 0
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
    return rows


def peer_rows(
    hf_dir: Path,
    tokenizer: Any,
    src: dict[int, list[list[int]]],
    new_tokens: int,
    repeats: int,
    threads: int | None,
    timer: Timer,
    figures: Callable[[float, int, int], Figures],
    progress: Callable[[str], None],
) -> dict[str, dict[str, Figures]]:
    """The peer engines that are installed, keyed like the bench's decode table."""
    rows: dict[str, dict[str, Figures]] = {}
    try:
        import transformers  # noqa: F401
    except ImportError:
        progress("transformers is not installed: its peer row is skipped")
    else:
        progress(f"decode: transformers generate (cached) from {hf_dir}")
        rows["transformers (cached)"] = transformers_rows(
            hf_dir, src, new_tokens, repeats, timer, figures
        )
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        progress("ctranslate2 is not installed: its peer row is skipped")
    else:
        progress(f"decode: CTranslate2 from {hf_dir}")
        try:
            rows["ctranslate2 fp32"] = ctranslate2_rows(
                hf_dir, tokenizer, src, new_tokens, repeats, threads, timer, figures
            )
        except (ValueError, RuntimeError, OSError) as err:
            # A converter that cannot read this checkpoint ends its row, not the benchmark.
            progress(f"CTranslate2 could not run this model ({err}): its row is skipped")
    return rows
