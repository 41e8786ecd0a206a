"""The subword tokenizer shared by training and serving, stored as a ``tokenizer.json``.

Byte-level BPE, so that any Unicode text (accented Latin, Cyrillic, Japanese, emoji) encodes
without ``<unk>`` and decodes back to exactly the same string. There is no normalizer for the
same reason: the server must return what the model wrote, not a normalized version of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["SPECIAL_TOKENS", "TOKENIZER_FILE", "load_tokenizer", "train_tokenizer"]

# Ids 0..3 in this order: the model and the ONNX export rely on these fixed ids.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, extra_special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    ``extra_special_tokens`` (the ``>>xx<<`` language tags) get the ids after
    ``SPECIAL_TOKENS`` and always encode as one token each, wherever they appear.

    ``encode(text).ids`` ends with ``</s>`` (the Marian-style source layout); pass
    ``add_special_tokens=False`` to leave it out. ``decode(ids, skip_special_tokens=False)``
    inverts ``encode(text, add_special_tokens=False)`` exactly for every string; the default
    ``decode`` drops special tokens, which is what model output wants.
    """
    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    if len(set(specials)) != len(specials):
        raise ValueError(f"duplicate special tokens in {specials}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        # Below this the trainer silently ignores vocab_size; say so instead.
        raise ValueError(
            f"vocab_size={vocab_size} is below the {len(alphabet)} byte symbols "
            f"plus {len(specials)} special tokens"
        )

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # One token per digit: the model then sees every digit of "1234" and need not
            # learn how BPE happened to chunk each number.
            pre_tokenizers.Digits(individual_digits=True),
            # No prefix space: it would add a space the input did not have (not lossless).
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # All 256 byte symbols, not just those seen in training, so that no input is unknown.
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>",
        pair="$A $B </s>",
        special_tokens=[("</s>", eos_id)],
    )
    for expected_id, token in enumerate(specials):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token!r} did not get id {expected_id}")
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved with ``Tokenizer.save``, from the file or from the directory that
    holds ``tokenizer.json`` (a model directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return Tokenizer.from_file(str(path))
