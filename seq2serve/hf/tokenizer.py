"""Hugging Face tokenizers -> one ``tokenizer.json`` that encodes exactly as ``transformers`` does.

BART ships a byte-level BPE that the ``tokenizers`` library already runs (``tokenizer.json``, or
``vocab.json`` + ``merges.txt`` that ``transformers`` turns into one): it is taken as it is,
post-processor (``<s> ... </s>``) included.

Marian is the awkward one. ``MarianTokenizer`` segments the input with the *source*
SentencePiece model (``source.spm``), then looks each piece's text up in ``vocab.json``: the
ids are not SentencePiece's ids, and a piece missing from ``vocab.json`` becomes ``<unk>``.
Decoding maps ids back to pieces through the same ``vocab.json`` (shared by source and target
when ``separate_vocabs`` is false, the only case seq2serve's one token embedding can serve),
so the *target* SentencePiece model adds nothing to decoding beyond joining pieces and turning
``▁`` back into spaces, which is what the ``tokenizers`` decoder below does.

So the design is a ``Unigram`` model whose vocabulary is ``vocab.json`` in id order, scored
so that its Viterbi search picks exactly the segmentation of ``source.spm``:

* a piece of ``source.spm`` keeps its SentencePiece score;
* a one-character piece that only the target side has (``ß`` in an en-de vocabulary) scores
  below every source piece: it is chosen only where ``source.spm`` has no piece at all for the
  character, which is where SentencePiece emits the character as an unknown piece and
  ``MarianTokenizer`` then finds it in ``vocab.json`` under that same text;
* every other entry (longer target-only pieces, special tokens, language codes) scores so low
  that no segmentation through it can win: SentencePiece never produces it from text;
* the special tokens and the ``>>xx<<`` language codes are added tokens, matched before
  segmentation, and the post-processor appends ``</s>`` as ``MarianTokenizer`` does.

Where this differs from ``MarianTokenizer`` (both are rare in text and documented here so
nobody has to rediscover them): a run of two or more adjacent characters unknown to
``source.spm`` is one unknown piece for SentencePiece (looked up whole, usually ``<unk>``),
while here each such character that the shared vocabulary knows keeps its own id; and a
``>>xx<<`` language code is recognised anywhere in the text, where ``MarianTokenizer`` only
strips one at the very start (the only place Marian models are trained to see one).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors
from tokenizers.models import Unigram

log = logging.getLogger(__name__)

# Unigram scores of vocabulary entries that SentencePiece itself would not produce from text
# (see the module docstring). Below every real log-probability, far enough apart that no sum
# of one-character fallbacks along a line of text reaches the unreachable score.
FALLBACK_BELOW_SOURCE = 100.0
UNREACHABLE_SCORE = -1.0e9

# SentencePiece piece types (sentencepiece_model.proto): only NORMAL pieces are segmentation
# candidates; UNKNOWN, CONTROL, UNUSED and BYTE pieces are never matched against text.
SPM_NORMAL, SPM_USER_DEFINED, SPM_BYTE = 1, 4, 6
SPM_UNIGRAM = 1


@contextmanager
def without_sacremoses_advice() -> Iterator[None]:
    """``MarianTokenizer`` warns "Recommended: pip install sacremoses." when it cannot build
    Moses' punctuation normalizer. Only its ``normalize`` helper uses that normalizer; its
    tokenization never does, so the conversion matches it either way, and the advice, printed
    by every import, would only send users after a package that changes nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        yield


class TokenizerImportError(ValueError):
    """A Hugging Face tokenizer that cannot be converted exactly; the message names why."""


def load_hf_tokenizer(hf_dir: Path) -> Any:
    """The ``transformers`` tokenizer of ``hf_dir`` (the reference the conversion must match)."""
    from transformers import AutoTokenizer

    try:
        with without_sacremoses_advice():
            return AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError, TypeError) as err:
        raise TokenizerImportError(f"{hf_dir}: cannot load its tokenizer ({err})") from err


def bart_tokenizer(hf_tokenizer: Any) -> Tokenizer:
    """BART's byte-level BPE, as the ``tokenizers`` object ``transformers`` itself runs."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TokenizerImportError(
            f"{type(hf_tokenizer).__name__} is not backed by the tokenizers library; "
            "BART import needs tokenizer.json or vocab.json + merges.txt (byte-level BPE)"
        )
    # A copy: the caller saves it, and the reference tokenizer must stay as it was.
    return Tokenizer.from_str(backend.to_str())


def _spm_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def marian_tokenizer(hf_tokenizer: Any, vocab_size: int) -> Tokenizer:
    """``MarianTokenizer`` (source.spm + vocab.json) as one ``tokenizers`` Unigram model."""
    from transformers.convert_slow_tokenizer import SpmConverter

    if getattr(hf_tokenizer, "separate_vocabs", False):
        raise TokenizerImportError(
            "separate_vocabs=True (target_vocab.json): source and target ids differ, and "
            "seq2serve's model has one shared token embedding and one tokenizer"
        )
    source_spm, target_spm = (Path(p) for p in hf_tokenizer.spm_files)
    source = _spm_proto(source_spm)
    target = _spm_proto(target_spm)
    spec = source.trainer_spec
    if spec.model_type != SPM_UNIGRAM:
        raise TokenizerImportError(
            f"{source_spm.name}: trainer_spec.model_type {spec.model_type} is not unigram"
        )
    if any(p.type == SPM_USER_DEFINED for p in source.pieces):
        raise TokenizerImportError(f"{source_spm.name}: user_defined_symbols are not supported")
    if target.denormalizer_spec.precompiled_charsmap:
        raise TokenizerImportError(
            f"{target_spm.name}: a denormalizer_spec (decode-time rewriting) is not supported"
        )

    vocab: dict[str, int] = dict(hf_tokenizer.encoder)
    if len(set(vocab.values())) != len(vocab) or max(vocab.values()) >= vocab_size:
        raise TokenizerImportError(
            f"vocab.json: ids must be distinct and below the model's vocab_size {vocab_size}"
        )
    normal = {p.piece: p.score for p in source.pieces if p.type == SPM_NORMAL}
    missing = sorted(set(normal) - set(vocab))
    if missing:
        raise TokenizerImportError(
            f"vocab.json lacks {len(missing)} piece(s) of {source_spm.name} "
            f"(e.g. {missing[:5]}): MarianTokenizer maps them to <unk> after segmenting, "
            "which a tokenizers model cannot express"
        )
    special = [str(t) for t in hf_tokenizer.all_special_tokens]
    codes = [t for t in vocab if t.startswith(">>") and t.endswith("<<")]
    fallback = min(normal.values()) - FALLBACK_BELOW_SOURCE
    by_id = {i: t for t, i in vocab.items()}
    pieces: list[tuple[str, float]] = []
    for i in range(max(vocab.values()) + 1):
        # Ids no token uses (gaps) get a name that no text produces.
        token = by_id.get(i, f"<seq2serve-unused-{i}>")
        if token in normal:
            score = normal[token]
        elif len(token) == 1 and token not in special:
            score = fallback
        else:
            score = UNREACHABLE_SCORE
        pieces.append((token, score))

    # Normalizer (the spm's charsmap, whitespace rules), Metaspace pre-tokenizer and decoder
    # exactly as transformers derives them from a SentencePiece proto; legacy=True prefixes
    # every chunk between added tokens with "▁", as MarianTokenizer's per-chunk spm.encode does.
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(source, pieces, legacy=True)
    if tokenizer is None:
        raise TokenizerImportError(f"{source_spm.name}: transformers cannot convert it")
    unk = str(hf_tokenizer.unk_token)
    tokenizer.model = Unigram(pieces, unk_id=vocab[unk], byte_fallback=spec.byte_fallback)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if codes:
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in codes])
    eos = str(hf_tokenizer.eos_token)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 $B:1 {eos}:1", special_tokens=[(eos, vocab[eos])]
    )
    return tokenizer


def convert_tokenizer(hf_dir: Path, model_type: str, vocab_size: int) -> tuple[Tokenizer, Any]:
    """(seq2serve tokenizer, the transformers tokenizer it was converted from)."""
    hf_tokenizer = load_hf_tokenizer(hf_dir)
    if model_type == "marian":
        tokenizer = marian_tokenizer(hf_tokenizer, vocab_size)
    else:
        tokenizer = bart_tokenizer(hf_tokenizer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise TokenizerImportError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"vocab_size {vocab_size}"
        )
    return tokenizer, hf_tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    # Pretty-printed like transformers' own tokenizer.json files; ensure_ascii off keeps the
    # pieces readable.
    path.write_text(json.dumps(json.loads(tokenizer.to_str()), ensure_ascii=False, indent=2))
