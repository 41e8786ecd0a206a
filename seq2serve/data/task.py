"""The built-in default task: verbalize numbers and dates in seven languages, and identify the
language of a verbalized phrase.

The data is generated, not downloaded: the words come from real linguistic data shipped in
packages (``num2words`` for numbers, Babel's CLDR tables for dates), so a model can be trained
and served end to end with no data set on disk, while the outputs are still natural language
in several scripts (Latin with accents, Cyrillic, Japanese).

Seq2seq sources carry a Marian-style target-language tag: ``">>de<< 1234"`` becomes
``"eintausendzweihundertvierunddreißig"`` and ``">>fr<< 2021-03-04"`` becomes
``"4 mars 2021"``. Classification examples map such a phrase back to its language code.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from datetime import date

from babel import Locale
from babel.dates import format_date
from num2words import num2words

from seq2serve.data.files import Example

__all__ = [
    "LANGUAGES",
    "TaskData",
    "build_default_task",
    "is_heldout",
    "item_key",
    "language_tags",
    "verbalize_date",
    "verbalize_number",
]

LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "it", "ru", "ja")

# Held-out share, in items per 10,000: about 2 %.
_HELDOUT_PER_10K = 200
_MAX_DIGITS = 4  # numbers 0..9999
_FIRST_DATE = date(1900, 1, 1)
_LAST_DATE = date(2099, 12, 31)

# An item is the language-independent thing being verbalized: ("num", 1234) or
# ("date", ordinal). The held-out split is decided per item, so an item held out in one
# language is held out in all of them and no translation of it leaks into training.
_Item = tuple[str, int]


@dataclass(frozen=True)
class TaskData:
    """The generated task.

    ``train`` and ``heldout`` mix seq2seq examples (``target`` set) and classification
    examples (``label`` set); ``labels`` are the classification labels, the language codes.
    """

    train: list[Example]
    heldout: list[Example]
    labels: tuple[str, ...]


def language_tags() -> list[str]:
    """The source-side language tags, ``[">>en<<", ...]``, in ``LANGUAGES`` order.

    The tokenizer must keep each tag as a single token, so callers pass these as extra special
    tokens when training it.
    """
    return [f">>{lang}<<" for lang in LANGUAGES]


def verbalize_number(value: int, lang: str) -> str:
    """A number in words: ``verbalize_number(1234, "de")`` is
    ``"eintausendzweihundertvierunddreißig"``."""
    words: str = num2words(value, lang=lang)  # num2words is untyped
    return words


def verbalize_date(day: date, lang: str) -> str:
    """A date in words, CLDR's "long" format: ``verbalize_date(date(2021, 3, 4), "fr")`` is
    ``"4 mars 2021"``. "long" has no weekday: the weekday is calendar arithmetic, not
    verbalization."""
    return format_date(day, "long", locale=_locale(lang))


def date_with_weekday(day: date, lang: str) -> str:
    """CLDR's "full" format, with the weekday: ``"jeudi 4 mars 2021"``. Used for language
    identification only (people write dates this way); not a generation target."""
    return format_date(day, "full", locale=_locale(lang))


@functools.cache
def _locale(lang: str) -> Locale:
    # Parsing the locale once saves about a third of each format_date call.
    return Locale.parse(lang)


def item_key(source_value: str) -> str:
    """The held-out key of the value after the tag in a source: ``"1234"`` gives
    ``"num:1234"``, ``"2021-03-04"`` gives ``"date:2021-03-04"``."""
    return f"date:{source_value}" if "-" in source_value else f"num:{source_value}"


def is_heldout(key: str) -> bool:
    """Whether the item with this key (see ``item_key``) belongs to the held-out split.

    A SHA-1 of the key rather than ``hash()``, so that the split is the same in every process
    whatever ``PYTHONHASHSEED`` is, and the same for every seed of ``build_default_task``.
    """
    digest = hashlib.sha1(key.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < _HELDOUT_PER_10K


def build_default_task(n_train: int = 200_000, n_heldout: int = 2_000, seed: int = 0) -> TaskData:
    """Generate the default task, reproducibly for a given ``seed``.

    ``n_train`` seq2seq examples are drawn (half numbers, half dates, the language uniform),
    and each one also yields a classification example of its target phrase unless that phrase
    is ambiguous, so ``train`` holds a little under ``2 * n_train`` examples, shuffled.
    ``heldout`` is built the same way from ``n_heldout`` distinct (item, language) pairs drawn
    only from held-out items; training sampling never produces a held-out item.

    Numbers are drawn by first picking a digit count uniformly from 1 to 4, then a number with
    that many digits: numbers below 100 are 1 % of the range but carry most irregular words
    ("onze", "quinze", "одиннадцать"), and this gives them half of the number draws.
    """
    if n_train < 0 or n_heldout < 0:
        raise ValueError("n_train and n_heldout must not be negative")
    split = _split()
    verbalizer = _Verbalizer()
    n_langs = len(LANGUAGES)

    # Two independent streams, so the held-out set does not change with n_train.
    # String seeds are hashed with SHA-512 by random.seed, independently of PYTHONHASHSEED.
    train_rng = random.Random(f"{seed}:train")
    heldout_rng = random.Random(f"{seed}:heldout")

    train: list[Example] = []
    n_numbers = n_train // 2
    for i in range(n_train):
        item: _Item
        if i < n_numbers:
            digits = train_rng.randint(1, _MAX_DIGITS)
            item = ("num", train_rng.choice(split.train_numbers[digits - 1]))
        else:
            item = ("date", train_rng.choice(split.train_dates))
        train.extend(verbalizer.examples(item, train_rng.randrange(n_langs)))
    train_rng.shuffle(train)

    pairs = _heldout_pairs(split, n_heldout, heldout_rng)
    heldout = [ex for item, lang in pairs for ex in verbalizer.examples(item, lang)]
    heldout_rng.shuffle(heldout)
    return TaskData(train=train, heldout=heldout, labels=LANGUAGES)


def _heldout_pairs(split: _Split, n: int, rng: random.Random) -> list[tuple[_Item, int]]:
    """Draw ``n`` distinct (item, language index) pairs from the held-out items.

    Distinct, unlike training sampling: repeats in an evaluation set only re-weight it. Numbers
    are taken round-robin over digit counts so short numbers are represented while they last.
    """
    n_langs = len(LANGUAGES)
    groups = [
        [(("num", v), li) for v in values for li in range(n_langs)]
        for values in split.heldout_numbers
    ]
    for group in groups:
        rng.shuffle(group)
    n_number_pairs = min(n // 2, sum(len(g) for g in groups))
    pairs: list[tuple[_Item, int]] = []
    while len(pairs) < n_number_pairs:
        for group in groups:
            if group and len(pairs) < n_number_pairs:
                pairs.append(group.pop())

    n_date_pairs = n - n_number_pairs
    date_pool = len(split.heldout_dates) * n_langs
    if n_date_pairs > date_pool:
        raise ValueError(f"n_heldout={n} exceeds the {n_number_pairs + date_pool} held-out pairs")
    for index in rng.sample(range(date_pool), n_date_pairs):
        date_index, lang = divmod(index, n_langs)
        pairs.append((("date", split.heldout_dates[date_index]), lang))
    return pairs


@dataclass(frozen=True)
class _Split:
    """Item values on each side of the split; numbers grouped by digit count (index 0: 1 digit)."""

    train_numbers: tuple[tuple[int, ...], ...]
    heldout_numbers: tuple[tuple[int, ...], ...]
    train_dates: tuple[int, ...]  # date ordinals
    heldout_dates: tuple[int, ...]


@functools.cache
def _split() -> _Split:
    """Partition every item once per process (about 83k hashes, a few tens of milliseconds)."""
    train_numbers: list[tuple[int, ...]] = []
    heldout_numbers: list[tuple[int, ...]] = []
    for digits in range(1, _MAX_DIGITS + 1):
        low = 0 if digits == 1 else 10 ** (digits - 1)
        values = range(low, 10**digits)
        held = tuple(v for v in values if is_heldout(f"num:{v}"))
        held_set = set(held)
        heldout_numbers.append(held)
        train_numbers.append(tuple(v for v in values if v not in held_set))
    train_dates: list[int] = []
    heldout_dates: list[int] = []
    for ordinal in range(_FIRST_DATE.toordinal(), _LAST_DATE.toordinal() + 1):
        key = f"date:{date.fromordinal(ordinal).isoformat()}"
        (heldout_dates if is_heldout(key) else train_dates).append(ordinal)
    return _Split(
        train_numbers=tuple(train_numbers),
        heldout_numbers=tuple(heldout_numbers),
        train_dates=tuple(train_dates),
        heldout_dates=tuple(heldout_dates),
    )


class _Verbalizer:
    """Verbalizes an item in every language at once, memoized per item.

    All languages together because the ambiguity check needs them anyway: a phrase is
    ambiguous when the same item verbalizes identically in another language ("six" in en and
    fr, "uno" in es and it, and every November date in fr and it: "4 novembre 2021"). Checking
    every item of the pinned packages found no phrase shared by two *different* items, so the
    per-item check finds every collision. The cache lives as long as one build: it makes 200k
    draws cost a few seconds, and is dropped afterwards rather than held by the process.
    """

    def __init__(self) -> None:
        self._cache: dict[_Item, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}

    def _verbalize(self, item: _Item) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """The item as written in a source, its phrase in each language, and (dates only)
        its phrase with the weekday in each language."""
        cached = self._cache.get(item)
        if cached is None:
            kind, value = item
            if kind == "num":
                text = str(value)
                phrases = tuple(verbalize_number(value, lang) for lang in LANGUAGES)
                with_weekday: tuple[str, ...] = ()
            else:
                day = date.fromordinal(value)
                text = day.isoformat()
                phrases = tuple(verbalize_date(day, lang) for lang in LANGUAGES)
                with_weekday = tuple(date_with_weekday(day, lang) for lang in LANGUAGES)
            cached = self._cache[item] = (text, phrases, with_weekday)
        return cached

    def examples(self, item: _Item, lang_index: int) -> list[Example]:
        """The seq2seq example for the item in one language, plus its classification examples
        (the phrase, and for dates the phrase with its weekday) when they identify the
        language unambiguously."""
        text, phrases, with_weekday = self._verbalize(item)
        lang, phrase = LANGUAGES[lang_index], phrases[lang_index]
        out = [Example(source=f">>{lang}<< {text}", target=phrase, label=None)]
        if phrases.count(phrase) == 1:
            out.append(Example(source=phrase, target=None, label=lang))
        if with_weekday and with_weekday.count(with_weekday[lang_index]) == 1:
            out.append(Example(source=with_weekday[lang_index], target=None, label=lang))
        return out
