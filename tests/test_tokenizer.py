"""The byte-level BPE tokenizer: lossless on any text, fixed special ids, single-token tags."""

from __future__ import annotations

import random
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from seq2serve.data.task import (
    LANGUAGES,
    build_default_task,
    language_tags,
    verbalize_date,
    verbalize_number,
)
from seq2serve.data.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    load_tokenizer,
    train_tokenizer,
)

# Every code point except lone surrogates, which a Python str can hold but UTF-8 cannot encode.
_ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    task = build_default_task(n_train=5_000, n_heldout=100, seed=0)
    texts = [text for ex in task.train for text in (ex.source, ex.target) if text]
    return train_tokenizer(texts, vocab_size=1000, extra_special_tokens=language_tags())


def _generated_strings() -> list[str]:
    """Sources and phrases from every language, including ones the tokenizer was not
    trained on (other seed, the whole range)."""
    rng = random.Random(1)
    out = []
    for lang in LANGUAGES:
        for _ in range(25):
            number = rng.randrange(10_000)
            day = date(1900, 1, 1) + timedelta(days=rng.randrange(73_000))
            out += [
                f">>{lang}<< {number}",
                verbalize_number(number, lang),
                f">>{lang}<< {day.isoformat()}",
                verbalize_date(day, lang),
            ]
    return out


def _round_trip(tokenizer: Tokenizer, text: str) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_special_token_ids(tokenizer: Tokenizer) -> None:
    for expected_id, token in enumerate([*SPECIAL_TOKENS, *language_tags()]):
        assert tokenizer.token_to_id(token) == expected_id
    assert tokenizer.get_vocab_size() == 1000


def test_tags_are_single_tokens(tokenizer: Tokenizer) -> None:
    for tag in language_tags():
        assert tokenizer.encode(tag, add_special_tokens=False).tokens == [tag]
        encoding = tokenizer.encode(f"{tag} 2021-03-04", add_special_tokens=False)
        assert encoding.tokens[0] == tag


def test_digits_are_one_token_each(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode("1234", add_special_tokens=False).tokens
    assert tokens == ["1", "2", "3", "4"]


def test_eos_appended(tokenizer: Tokenizer) -> None:
    eos = SPECIAL_TOKENS.index("</s>")
    with_eos = tokenizer.encode(">>de<< 1234").ids
    without = tokenizer.encode(">>de<< 1234", add_special_tokens=False).ids
    assert with_eos == [*without, eos]
    assert eos not in without


def test_lossless_on_task_strings(tokenizer: Tokenizer) -> None:
    strings = _generated_strings()
    assert len(strings) >= 700
    unk = tokenizer.token_to_id("<unk>")
    for text in strings:
        assert _round_trip(tokenizer, text) == text
        assert unk not in tokenizer.encode(text).ids
        if not text.startswith(">>"):
            # Phrases hold no special token, so the default decode (which drops specials)
            # returns them unchanged too, even after the appended </s>.
            assert tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "  leading and trailing  ",
        "a\tb\t\tc",
        "line\nbreaks\r\n\u2028",
        "x\x00y",
        "🙂👍🏽 héllo",
        "٣３ full-width and Arabic-Indic digits",
        "<pad></s> literal specials >>en<<",
        "\ufeffBOM",
    ],
)
def test_lossless_edge_cases(tokenizer: Tokenizer, text: str) -> None:
    assert _round_trip(tokenizer, text) == text


@settings(max_examples=200, deadline=None)
@given(text=_ANY_TEXT)
def test_lossless_on_any_text(tokenizer: Tokenizer, text: str) -> None:
    assert _round_trip(tokenizer, text) == text


@settings(max_examples=50, deadline=None)
@given(tag=st.sampled_from(language_tags()), text=_ANY_TEXT)
def test_tag_then_any_text(tokenizer: Tokenizer, tag: str, text: str) -> None:
    source = f"{tag} {text}"
    encoding = tokenizer.encode(source)
    assert encoding.tokens[0] == tag
    assert encoding.ids[-1] == SPECIAL_TOKENS.index("</s>")
    assert _round_trip(tokenizer, source) == source


def test_save_load_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / TOKENIZER_FILE
    tokenizer.save(str(path))
    for loaded in (load_tokenizer(path), load_tokenizer(str(path)), load_tokenizer(tmp_path)):
        assert loaded.get_vocab() == tokenizer.get_vocab()
        for text in [*_generated_strings()[:50], "🙂 x\ty "]:
            assert loaded.encode(text).ids == tokenizer.encode(text).ids
            assert _round_trip(loaded, text) == text
        assert loaded.encode("4 mars 2021").ids[-1] == SPECIAL_TOKENS.index("</s>")


def test_training_is_deterministic() -> None:
    texts = [verbalize_number(n, lang) for n in range(0, 10_000, 37) for lang in LANGUAGES]
    a = train_tokenizer(texts, vocab_size=400, extra_special_tokens=language_tags())
    b = train_tokenizer(texts, vocab_size=400, extra_special_tokens=language_tags())
    assert a.to_str() == b.to_str()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="duplicate"):
        train_tokenizer(["abc"], extra_special_tokens=["<pad>"])
