"""The generated default task and the user data file reader."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import pytest

from seq2serve.data.files import DataError, Example, load_examples
from seq2serve.data.task import (
    LANGUAGES,
    TaskData,
    build_default_task,
    is_heldout,
    item_key,
    language_tags,
    verbalize_date,
    verbalize_number,
)

_SOURCE = re.compile(r">>([a-z]{2})<< (\d{1,4}|\d{4}-\d{2}-\d{2})")


@pytest.fixture(scope="module")
def task() -> TaskData:
    return build_default_task(n_train=20_000, n_heldout=2_000, seed=0)


def _seq2seq(examples: list[Example]) -> list[Example]:
    return [ex for ex in examples if ex.target is not None]


def _classification(examples: list[Example]) -> list[Example]:
    return [ex for ex in examples if ex.label is not None]


def _source_lang(ex: Example) -> str:
    match = _SOURCE.fullmatch(ex.source)
    assert match, ex.source
    return match.group(1)


def _source_value(ex: Example) -> str:
    match = _SOURCE.fullmatch(ex.source)
    assert match, ex.source
    return match.group(2)


def _verbalize(value: str, lang: str) -> str:
    if "-" in value:
        return verbalize_date(date.fromisoformat(value), lang)
    return verbalize_number(int(value), lang)


# --- the default task ------------------------------------------------------------------------


def test_spec_examples() -> None:
    assert verbalize_number(1234, "de") == "eintausendzweihundertvierunddreißig"
    assert verbalize_date(date(2021, 3, 4), "fr") == "4 mars 2021"
    assert verbalize_date(date(2021, 3, 4), "en") == "March 4, 2021"  # no weekday


def test_labels_and_tags(task: TaskData) -> None:
    assert task.labels == LANGUAGES
    assert language_tags() == [f">>{lang}<<" for lang in task.labels]
    assert {"ru", "ja"} <= set(task.labels)


def test_examples_are_well_formed(task: TaskData) -> None:
    for ex in task.train + task.heldout:
        # Exactly one of target and label: seq2seq or classification.
        assert (ex.target is None) != (ex.label is None), ex
        if ex.target is not None:
            match = _SOURCE.fullmatch(ex.source)
            assert match, ex.source
            lang, value = match.groups()
            assert lang in task.labels
            assert ex.target == _verbalize(value, lang)
        else:
            assert ex.label in task.labels
            assert ex.source.strip()


def test_dates_with_weekdays_are_classification_phrases(task: TaskData) -> None:
    phrases = {ex.source: ex.label for ex in _classification(task.train)}
    weekdays = {"jeudi": "fr", "Donnerstag": "de", "четверг": "ru", "Thursday": "en"}
    for word, lang in weekdays.items():
        hits = [p for p in phrases if p.startswith(word)]
        assert hits and all(phrases[p] == lang for p in hits), word


def test_mix_is_balanced(task: TaskData) -> None:
    seq2seq = _seq2seq(task.train)
    assert len(seq2seq) == 20_000
    kinds = Counter("date" if "-" in _source_value(ex) else "num" for ex in seq2seq)
    assert kinds == {"num": 10_000, "date": 10_000}
    n_classification = len(_classification(task.train))
    # One classification example per phrase, two per date (with and without the weekday);
    # only the ambiguous phrases (a few percent) lack theirs.
    assert 0.9 * 1.5 * len(seq2seq) < n_classification < 1.5 * len(seq2seq)
    langs = Counter(_source_lang(ex) for ex in seq2seq)
    assert set(langs) == set(LANGUAGES)
    assert min(langs.values()) > 0.8 * len(seq2seq) / len(LANGUAGES)
    # Shuffled: both kinds of example early in the list, not one block after the other.
    head = task.train[:200]
    assert _seq2seq(head) and _classification(head)


def test_short_numbers_are_not_drowned_out(task: TaskData) -> None:
    numbers = [int(v) for ex in _seq2seq(task.train) if "-" not in (v := _source_value(ex))]
    digits = Counter(len(str(n)) for n in numbers)
    for count in range(1, 5):
        assert abs(digits[count] / len(numbers) - 0.25) < 0.03, digits


def test_non_latin_scripts_present(task: TaskData) -> None:
    def scripts(text: str) -> set[str]:
        return {unicodedata.name(c).split()[0] for c in text if c.isalpha()}

    targets = {ex.target for ex in _seq2seq(task.train)}
    all_scripts = set().union(*(scripts(t) for t in targets if t))
    assert {"LATIN", "CYRILLIC", "CJK"} <= all_scripts
    classification_labels = {ex.label for ex in _classification(task.train)}
    assert {"ru", "ja"} <= classification_labels


def test_heldout_never_in_train(task: TaskData) -> None:
    train_values = {_source_value(ex) for ex in _seq2seq(task.train)}
    heldout_values = {_source_value(ex) for ex in _seq2seq(task.heldout)}
    assert heldout_values
    assert not train_values & heldout_values
    assert all(is_heldout(item_key(v)) for v in heldout_values)
    assert not any(is_heldout(item_key(v)) for v in train_values)

    train_phrases = {ex.source for ex in _classification(task.train)}
    train_targets = {ex.target for ex in _seq2seq(task.train)}
    heldout_phrases = {ex.source for ex in _classification(task.heldout)}
    assert heldout_phrases
    assert not heldout_phrases & train_phrases
    assert not heldout_phrases & train_targets


def test_heldout_shape(task: TaskData) -> None:
    seq2seq = _seq2seq(task.heldout)
    assert len(seq2seq) == 2_000
    assert len({ex.source for ex in seq2seq}) == 2_000  # distinct (item, language) pairs
    langs = {_source_lang(ex) for ex in seq2seq}
    assert langs == set(LANGUAGES)
    assert {ex.label for ex in _classification(task.heldout)} == set(LANGUAGES)
    kinds = Counter("date" if "-" in _source_value(ex) else "num" for ex in seq2seq)
    assert kinds == {"num": 1_000, "date": 1_000}


def test_split_is_about_two_percent() -> None:
    numbers = sum(is_heldout(f"num:{n}") for n in range(10_000))
    assert 150 < numbers < 250
    start = date(1900, 1, 1).toordinal()
    days = [date.fromordinal(o) for o in range(start, start + 20_000)]
    held_days = sum(is_heldout(f"date:{d.isoformat()}") for d in days)
    assert 0.015 < held_days / len(days) < 0.025


def test_deterministic_under_seed() -> None:
    a = build_default_task(n_train=2_000, n_heldout=200, seed=7)
    b = build_default_task(n_train=2_000, n_heldout=200, seed=7)
    c = build_default_task(n_train=2_000, n_heldout=200, seed=8)
    assert a == b
    assert a.train != c.train
    assert a.heldout != c.heldout


def test_heldout_does_not_depend_on_n_train() -> None:
    small = build_default_task(n_train=100, n_heldout=200, seed=3)
    large = build_default_task(n_train=3_000, n_heldout=200, seed=3)
    assert small.heldout == large.heldout


def test_no_ambiguous_classification_phrase(task: TaskData) -> None:
    labels_of: dict[str, set[str]] = defaultdict(set)
    for ex in _classification(task.train + task.heldout):
        assert ex.label is not None
        labels_of[ex.source].add(ex.label)
    assert all(len(labels) == 1 for labels in labels_of.values())

    # Every seq2seq target that another language verbalizes identically is left out of
    # the classification examples; the known collisions do occur among the targets.
    ambiguous: set[str] = set()
    for ex in _seq2seq(task.train + task.heldout):
        value = _source_value(ex)
        phrases = [_verbalize(value, lang) for lang in LANGUAGES]
        if ex.target is not None and phrases.count(ex.target) > 1:
            ambiguous.add(ex.target)
    assert {"uno", "zero"} <= ambiguous  # es/it and en/it
    assert any("novembre" in phrase for phrase in ambiguous)  # every November date, fr/it
    assert not ambiguous & set(labels_of)


def test_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError):
        build_default_task(n_train=-1)
    with pytest.raises(ValueError, match="held-out pairs"):
        build_default_task(n_train=0, n_heldout=1_000_000)


# --- user data files -------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def test_load_tsv(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "data.tsv",
        "source\ttarget\tlabel\r\n"
        "hello\tbonjour\r\n"
        "  spaced  \tkept as is\tgreeting\n"
        "привет\tこんにちは\u2028ok\n",  # U+2028 inside a field is not a line break
    )
    assert load_examples(path, labels=["greeting"]) == [
        Example("hello", "bonjour", None),
        Example("  spaced  ", "kept as is", "greeting"),
        Example("привет", "こんにちは\u2028ok", None),
    ]


def test_load_tsv_without_header_or_final_newline(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.tsv", "\ufeffa\tb\nc\td")
    assert load_examples(str(path)) == [Example("a", "b", None), Example("c", "d", None)]


def test_load_jsonl(tmp_path: Path) -> None:
    rows = [
        {"source": "1234", "target": "mille deux cent trente-quatre"},
        {"source": "x\ty", "target": "z", "label": "fr"},
    ]
    path = _write(tmp_path, "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert load_examples(path, labels=("fr", "de")) == [
        Example("1234", "mille deux cent trente-quatre", None),
        Example("x\ty", "z", "fr"),
    ]


_GOOD_TSV = b"a\tb\n"
_GOOD_JSONL = b'{"source": "a", "target": "b"}\n'


@pytest.mark.parametrize(
    ("name", "content", "line", "message"),
    [
        ("data.tsv", _GOOD_TSV * 6 + b"only a source\n", 7, "missing target column"),
        ("data.tsv", _GOOD_TSV + b"a\tb\tc\td\n", 2, "4 columns"),
        ("data.tsv", _GOOD_TSV + b"\n" + _GOOD_TSV, 2, "empty line"),
        ("data.tsv", _GOOD_TSV + b"  \t \n", 2, "empty line"),
        ("data.tsv", _GOOD_TSV * 2 + b"caf\xe9\tb\n", 3, "invalid UTF-8"),
        ("data.tsv", _GOOD_TSV + b"\tb\n", 2, "empty source"),
        ("data.tsv", _GOOD_TSV + b"a\t\n", 2, "empty target"),
        ("data.tsv", _GOOD_TSV + b"a\tb\t\n", 2, "empty label"),
        ("data.tsv", b"a\tb\txx\n", 1, "unknown label 'xx' (known: en, fr)"),
        ("data.jsonl", _GOOD_JSONL + b'{"source": "a"}\n', 2, "missing target"),
        ("data.jsonl", _GOOD_JSONL + b'{"target": "a"}\n', 2, "missing source"),
        ("data.jsonl", _GOOD_JSONL + b'{"source": "a", "label": "en"}\n', 2, "missing target"),
        ("data.jsonl", _GOOD_JSONL + b'{"source": "a", "target": 3}\n', 2, "target must be"),
        ("data.jsonl", _GOOD_JSONL + b'{"source": null, "target": "b"}\n', 2, "got null"),
        ("data.jsonl", b'{"source": "a", "target": "b", "label": 1}\n', 1, "label must be"),
        ("data.jsonl", b'{"source": "a", "target": "b", "extra": "c"}\n', 1, "unknown key"),
        ("data.jsonl", _GOOD_JSONL + b'{"source": "a", "target": \n', 2, "invalid JSON"),
        ("data.jsonl", _GOOD_JSONL + b'["a", "b"]\n', 2, "expected a JSON object"),
        ("data.jsonl", _GOOD_JSONL * 3 + b"\n", 4, "empty line"),
        ("data.jsonl", b'{"source": "\xff", "target": "b"}\n', 1, "invalid UTF-8"),
        ("data.jsonl", b'{"source": " ", "target": "b"}\n', 1, "empty source"),
        ("data.jsonl", b'{"source": "a", "target": "b", "label": "xx"}\n', 1, "unknown label"),
    ],
)
def test_load_errors_name_file_and_line(
    tmp_path: Path, name: str, content: bytes, line: int, message: str
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_examples(path, labels=["en", "fr"])
    text = str(info.value)
    assert text.startswith(f"{path}:{line}: "), text
    assert message in text
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("data.tsv", b"", "file is empty"),
        ("data.jsonl", b"", "file is empty"),
        ("data.tsv", b"source\ttarget\n", "no examples"),
        ("data.csv", b"a,b\n", "unsupported file type"),
    ],
)
def test_load_whole_file_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as info:
        load_examples(path)
    assert str(info.value).startswith(f"{path}: ")


def test_example_needs_target_or_label() -> None:
    with pytest.raises(ValueError):
        Example("a", None, None)
