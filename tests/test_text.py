"""Tests for streaming text output: incremental detokenization, stop strings, TextStream.

The tokenizers are trained here with ``tokenizers`` on a tiny multilingual corpus so that,
with a vocabulary of about 300, byte-level BPE really splits accented letters, Cyrillic,
Japanese and emoji across tokens; a test asserts this so the streaming checks cannot pass
vacuously on a tokenizer that never splits a character.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from seq2serve.engine.text import (
    IncrementalDetokenizer,
    StopMatcher,
    TextStream,
    special_token_ids,
)

CORPUS = [
    "Le café est très bon, à côté de l'église où Zoë a mangé une crème brûlée.",
    "Déjà vu: l'été à Noël, garçon français, œuvre naïve.",
    "Die Straße ist groß und der Fluß fließt schön; Grüße aus München!",
    "Привет, как дела? Москва — столица России. Съешь же ещё этих мягких булок.",
    "日本語のテキストです。東京は日本の首都です。こんにちは世界！",
    "Emoji: 😀 🎉 👍🏽 🚀 ❤️ 👨‍👩‍👧 🇫🇷 and text 🙂.",
    "The quick brown fox jumps over the lazy dog. Hello world!",
]
SPECIALS = ["<pad>", "<s>", "</s>"]
REPLACEMENT = "\ufffd"

# Characters the random texts are drawn from: everything in the corpus plus a few the
# tokenizers never saw (unknown to the Unigram model, rare bytes for byte-level BPE).
CHARS = sorted(set("".join(CORPUS)) | set("ÆØÅ€ñ漢字🤖🏳️‍🌈\t\n  "))

CI = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bytelevel() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """SentencePiece-like: Unigram with Metaspace, which drops the first token's "▁"."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=[*SPECIALS, "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    tok: Tokenizer = request.getfixturevalue(request.param)
    return tok


def stream_decode(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


def assert_streams_like_decode(tok: Tokenizer, ids: list[int]) -> list[str]:
    pieces, tail = stream_decode(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True)
    return pieces


# --- IncrementalDetokenizer -------------------------------------------------------------


def test_bytelevel_splits_characters_across_tokens(bytelevel: Tokenizer) -> None:
    text = "crème brûlée, Straße, 日本, 😀"
    ids = bytelevel.encode(text).ids
    assert bytelevel.decode(ids) == text
    partial = [i for i in ids if REPLACEMENT in bytelevel.decode([i])]
    assert partial, "the tokenizer never splits a character; the streaming tests are vacuous"
    pieces = assert_streams_like_decode(bytelevel, ids)
    # Tokens holding only part of a character produce no text, and no piece ever shows a
    # replacement character for text that is valid once complete.
    assert "" in pieces
    assert all(REPLACEMENT not in p for p in pieces)


@pytest.mark.parametrize("text", ["é", "ß", "日本", "😀", "👨‍👩‍👧", "a😀b", "Привет"])
def test_multibyte_character_emitted_whole(bytelevel: Tokenizer, text: str) -> None:
    ids = bytelevel.encode(text).ids
    pieces = assert_streams_like_decode(bytelevel, ids)
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)


def test_flush_renders_incomplete_tail_as_decode_does(bytelevel: Tokenizer) -> None:
    ids = bytelevel.encode("ok 😀").ids
    cut = ids[:-1]  # generation stopped in the middle of the emoji's bytes
    assert bytelevel.decode(cut).endswith(REPLACEMENT)
    pieces, tail = stream_decode(bytelevel, cut)
    assert REPLACEMENT not in "".join(pieces)
    assert "".join(pieces) + tail == bytelevel.decode(cut)


def test_flush_resets(bytelevel: Tokenizer) -> None:
    detok = IncrementalDetokenizer(bytelevel)
    for i in bytelevel.encode("Grüße ").ids:
        detok.push(i)
    detok.flush()
    ids = bytelevel.encode("日本").ids
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "日本"


def test_metaspace_leading_space_handling(metaspace: Tokenizer) -> None:
    text = "Le café est  très bon"
    ids = metaspace.encode(text).ids
    pieces = assert_streams_like_decode(metaspace, ids)
    # The first word has no leading space, later words keep theirs.
    assert not "".join(pieces).startswith(" ")
    assert " café" in "".join(pieces)


def token_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    assert i is not None
    return i


def test_special_tokens_skipped(tokenizer: Tokenizer) -> None:
    s, eos = token_id(tokenizer, "<s>"), token_id(tokenizer, "</s>")
    ids = [s, *tokenizer.encode("Grüße, Zoë").ids, eos, eos]
    pieces = assert_streams_like_decode(tokenizer, ids)
    assert "<s>" not in "".join(pieces)
    assert special_token_ids(tokenizer) >= {s, eos}


def test_special_tokens_kept_when_asked(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("café").ids, token_id(tokenizer, "</s>")]
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=False)


def byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One id per UTF-8 byte of ``text``: the worst split a byte-level model can produce."""
    # GPT-2's byte-to-character table, which the ByteLevel pre-tokenizer uses.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(sorted(set(range(256)) - set(table)))})
    ids = [tok.token_to_id(table[b]) for b in text.encode()]
    assert None not in ids
    return [i for i in ids if i is not None]


def test_byte_token_ids_decode(bytelevel: Tokenizer) -> None:
    assert bytelevel.decode(byte_token_ids(bytelevel, "é日😀")) == "é日😀"


def test_long_invalid_byte_run_keeps_flowing(bytelevel: Tokenizer) -> None:
    """A model stuck on invalid bytes must not make the detokenizer hold text forever."""
    invalid = byte_token_ids(bytelevel, "é")[1:]  # a lone continuation byte
    assert bytelevel.decode(invalid) == REPLACEMENT
    ids = invalid * 50 + bytelevel.encode("fin é").ids
    detok = IncrementalDetokenizer(bytelevel)
    early = "".join(detok.push(i) for i in ids[:50])
    assert len(early) >= 40
    rest = "".join(detok.push(i) for i in ids[50:]) + detok.flush()
    assert early + rest == bytelevel.decode(ids)


@pytest.mark.parametrize("run", range(25))
def test_character_split_after_long_invalid_run(bytelevel: Tokenizer, run: int) -> None:
    """Text released early during an invalid run must not include a live partial character.

    Every run length is tried because where the run's forced releases fall relative to the
    split character depends on it.
    """
    invalid = byte_token_ids(bytelevel, "é")[1:]
    # Merged tokens too: one may end one character and start the next (bytes "a5 e6" of 日本).
    merged = bytelevel.encode("日本語").ids
    assert any(REPLACEMENT in bytelevel.decode([i]) for i in merged)
    ids = invalid * run + byte_token_ids(bytelevel, "😀é") + invalid * run + merged
    ids += invalid * 12 + byte_token_ids(bytelevel, "日本") + bytelevel.encode(" ok").ids
    pieces = assert_streams_like_decode(bytelevel, ids)
    assert "😀é" in "".join(pieces)
    assert "日本語" in "".join(pieces)
    assert "日本 ok" in "".join(pieces)


def test_byte_fallback_does_not_raise() -> None:
    """ByteFallback rewrites invalid byte runs; streaming stays close and never raises."""
    vocab = {"<0x41>": 0, "<0xFF>": 1, "a": 2, "<0xE6>": 3, "<0x97>": 4, "<0xA5>": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # Valid runs are exact: 日 arrives whole.
    assert "".join(stream_decode(tok, [2, 3, 4, 5])[0]) == "a日"
    pieces, tail = stream_decode(tok, [0, 1, 2])
    assert "".join(pieces) + tail  # no exception, some text


@CI
@given(data=st.data())
def test_random_text_streams_like_decode(tokenizer: Tokenizer, data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=st.sampled_from(CHARS), max_size=80))
    assert_streams_like_decode(tokenizer, tokenizer.encode(text).ids)


@CI
@given(data=st.data())
def test_random_ids_stream_like_decode(tokenizer: Tokenizer, data: st.DataObject) -> None:
    size = tokenizer.get_vocab_size()
    specials = sorted(special_token_ids(tokenizer))
    # Out-of-vocab ids too: models often have more logits than the tokenizer has tokens.
    any_id = st.integers(min_value=0, max_value=size + 3)
    ids = data.draw(st.lists(st.one_of(any_id, st.sampled_from(specials)), max_size=60))
    assert_streams_like_decode(tokenizer, ids)


@CI
@given(data=st.data())
def test_random_byte_runs_stream_like_decode(bytelevel: Tokenizer, data: st.DataObject) -> None:
    """Long runs of raw byte tokens: partial characters, invalid bytes, forced releases."""
    invalid = byte_token_ids(bytelevel, "é")[1:] + byte_token_ids(bytelevel, "日")[:1]
    whole_char = st.sampled_from(CHARS).map(lambda c: byte_token_ids(bytelevel, c))
    part_char = whole_char.flatmap(lambda b: st.integers(1, len(b)).map(lambda k: b[:k]))
    single = st.one_of(st.sampled_from(invalid), st.integers(0, bytelevel.get_vocab_size() - 1))
    run = st.lists(st.sampled_from(invalid), min_size=1, max_size=24)
    chunks = data.draw(
        st.lists(st.one_of(whole_char, part_char, run, single.map(lambda i: [i])), max_size=40)
    )
    assert_streams_like_decode(bytelevel, [i for chunk in chunks for i in chunk])


# --- StopMatcher ------------------------------------------------------------------------


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut at the earliest start of any occurrence of any stop."""
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(starts)], True) if starts else (text, False)


def run_matcher(stops: list[str], chunks: list[str]) -> tuple[str, bool, StopMatcher]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    stopped = False
    for chunk in chunks:
        piece, stopped = matcher.push(chunk)
        out.append(piece)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), matcher.stopped, matcher


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=100), max_size=12),
)
def test_stop_matcher_matches_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    out, stopped, _ = run_matcher(stops, split_at(text, cuts))
    assert (out, stopped) == reference_cut(text, stops)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab", max_size=30),
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=100), max_size=10),
)
def test_stop_matcher_holds_back_only_possible_stop_starts(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    """After every push the emitted text is as long as it can be without risking a stop."""
    matcher = StopMatcher(stops)
    seen = ""
    emitted = ""
    for chunk in split_at(text, cuts):
        piece, stopped = matcher.push(chunk)
        seen += chunk
        emitted += piece
        if stopped:
            assert (emitted, True) == reference_cut(seen, stops)
            return
        # Everything is safe except a suffix that may still grow into a stop, and the text
        # from a completed stop that a longer, earlier-starting one may still override.
        live = max(
            (k for k in range(1, len(seen) + 1) if any(s.startswith(seen[-k:]) for s in stops)),
            default=0,
        )
        safe = len(seen) - live
        cut, found = reference_cut(seen, stops)
        if found:
            safe = min(safe, len(cut))
        assert emitted == seen[:safe]


def test_stop_straddles_pushes() -> None:
    m = StopMatcher(["</answer>"])
    assert m.push("the result<") == ("the result", False)
    assert m.push("/ans") == ("", False)
    assert m.push("wer> and more") == ("", True)
    assert m.push("ignored") == ("", True)
    assert m.stopped


def test_false_start_is_released() -> None:
    m = StopMatcher(["</answer>"])
    assert m.push("a </ans") == ("a ", False)
    assert m.push("x") == ("</ansx", False)
    assert m.flush() == ""


def test_stop_inside_one_push() -> None:
    assert StopMatcher(["STOP"]).push("hello STOP world STOP") == ("hello ", True)


def test_stop_at_very_start() -> None:
    assert StopMatcher(["Q:"]).push("Q: next") == ("", True)
    m = StopMatcher(["Q:"])
    assert m.push("Q") == ("", False)
    assert m.push(":") == ("", True)


@pytest.mark.parametrize(
    ("stops", "chunks", "expected"),
    [
        (["ab", "abc"], ["x", "a", "b", "c"], "x"),
        (["abc", "ab"], ["xab"], "x"),
        (["aab", "ab"], ["a", "a", "b"], ""),
        (["aab", "ab"], ["xa", "ab"], "x"),
        (["aab"], ["aaab"], "a"),
        # "bc" completes first but "abcd" starts earlier: earliest start wins.
        (["bc", "abcd"], ["ab", "c", "d"], ""),
        (["bc", "abcd"], ["ab", "c", "e"], "a"),
    ],
)
def test_overlapping_stops(stops: list[str], chunks: list[str], expected: str) -> None:
    out, stopped, _ = run_matcher(stops, chunks)
    assert (out, stopped) == (expected, True)


def test_undecided_stop_is_decided_by_flush() -> None:
    m = StopMatcher(["bc", "abcd"])
    assert m.push("xabc") == ("x", False)
    assert not m.stopped
    assert m.flush() == "a"
    assert m.stopped


def test_flush_returns_held_text_without_stop() -> None:
    m = StopMatcher(["<end>"])
    assert m.push("tail <en") == ("tail ", False)
    assert m.flush() == "<en"
    assert not m.stopped


def test_no_stops_passes_through() -> None:
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)
    assert m.flush() == ""


@pytest.mark.parametrize("stops", [[""], ["ok", ""]])
def test_empty_stop_rejected(stops: list[str]) -> None:
    with pytest.raises(ValueError):
        StopMatcher(stops)


def test_bare_string_rejected() -> None:
    with pytest.raises(TypeError):
        StopMatcher("stop")


def test_many_stops_on_long_text() -> None:
    """10,000 stops sharing prefixes with a long text, pushed in token-sized chunks."""
    rng = random.Random(1234)
    letters = "abcdefgh"
    stops = sorted({"".join(rng.choices(letters, k=rng.randint(6, 14))) for _ in range(10_000)})
    stops += ["a" * k + "z" for k in range(1, 200)]  # deep chain of shared prefixes
    assert len(stops) >= 10_000
    text = "".join(rng.choices(letters, k=60_000)) + "a" * 500 + stops[0] + "tail"
    chunks: list[str] = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        chunks.append(text[i : i + n])
        i += n
    out, stopped, _ = run_matcher(stops, chunks)
    assert (out, stopped) == reference_cut(text, stops)


# --- TextStream -------------------------------------------------------------------------


def run_stream(tok: Tokenizer, ids: list[int], stops: list[str]) -> tuple[str, bool, TextStream]:
    stream = TextStream(tok, stops)
    out: list[str] = []
    stopped = False
    for i in ids:
        piece, stopped = stream.push(i)
        out.append(piece)
        if stopped:
            break
    out.append(stream.finish())
    assert stream.text == "".join(out)
    return "".join(out), stream.stopped, stream


def test_text_stream_cuts_at_stop(bytelevel: Tokenizer) -> None:
    ids = bytelevel.encode("Grüße aus München! 日本 😀 Ende").ids
    out, stopped, stream = run_stream(bytelevel, ids, ["日本", "xyz"])
    assert (out, stopped) == ("Grüße aus München! ", True)
    assert stream.push(ids[0]) == ("", True)
    assert stream.finish() == ""


def test_text_stream_without_stop(metaspace: Tokenizer) -> None:
    ids = metaspace.encode("Le café est très bon").ids
    out, stopped, _ = run_stream(metaspace, ids, ["<end>"])
    assert (out, stopped) == (metaspace.decode(ids), False)


def test_text_stream_stop_inside_multibyte_run(bytelevel: Tokenizer) -> None:
    """A stop made of a split emoji matches only once its last byte arrives."""
    ids = bytelevel.encode("ok 🎉 done").ids
    out, stopped, _ = run_stream(bytelevel, ids, ["🎉"])
    assert (out, stopped) == ("ok ", True)


@CI
@given(data=st.data())
def test_text_stream_matches_decode_then_cut(tokenizer: Tokenizer, data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=st.sampled_from(CHARS), max_size=60))
    ids = tokenizer.encode(text).ids
    if data.draw(st.booleans()):
        # Truncate anywhere, as a length limit would, possibly inside a character.
        ids = ids[: data.draw(st.integers(0, len(ids)))]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    # Stops taken from the decoded text so they really occur, plus random ones.
    from_text = st.integers(0, max(len(full) - 1, 0)).flatmap(
        lambda a: st.integers(a + 1, a + 4).map(lambda b: full[a:b])
    )
    stops = data.draw(
        st.lists(
            st.one_of(from_text, st.text(st.sampled_from(CHARS), max_size=3)).filter(bool),
            max_size=3,
        )
    )
    out, stopped, _ = run_stream(tokenizer, ids, stops)
    assert (out, stopped) == reference_cut(full, stops)
