"""Streaming text output: incremental detokenization and stop strings with hold-back.

The serving engine sends text to clients over Server-Sent Events as tokens are generated, so
two things must happen per token without re-decoding the whole sequence:

* turning token ids into text (``IncrementalDetokenizer``), where one character may span
  several tokens (byte-level BPE splits "é", "日" or an emoji into byte tokens);
* cutting the text at stop strings (``StopMatcher``) without ever sending a client the
  beginning of a stop string that the next token completes.

``TextStream`` chains the two for one generated sequence; the engine uses that.

Why not ``tokenizers.decoders.DecodeStream``
--------------------------------------------
``DecodeStream`` (tokenizers >= 0.21) implements the same prefix-offset idea in Rust, and for
byte-level BPE and Metaspace tokenizers its pieces are right while a sequence is running. It
was measured against the invariant this module guarantees::

    "".join(pieces) + flush() == tokenizer.decode(ids, skip_special_tokens=True)

and fails it, for reasons that cannot be patched from outside:

* it has no flush: bytes of a character that is still incomplete when generation ends
  (``max_new_tokens`` reached, or EOS right after a partial character) are silently dropped,
  where ``decode`` yields U+FFFD. On random byte-level id sequences about half of them lost
  such a tail. Its buffered ids are not exposed, so a flush cannot be added on top without
  shadowing its whole state, which is the algorithm itself;
* it raises ``Exception("Invalid prefix encountered ...")`` mid-stream when a decoder is not
  prefix-stable (``ByteFallback`` turns an invalid run of byte tokens into one U+FFFD per
  byte, rewriting text it already produced); an exception would kill the client's stream;
* it holds back for as long as the text ends with U+FFFD, so a model emitting a long run of
  invalid bytes makes it re-decode an ever-growing window.

So the prefix-offset algorithm is implemented here (``IncrementalDetokenizer``), with a flush,
a bounded window and no failure mode beyond what ``Tokenizer.decode`` itself raises. The cost
per token is one ``decode`` of a window of about two text chunks, plus one more when text is
emitted: O(1) amortized, independent of the sequence length.

Stop-string semantics
---------------------
For a complete text ``t`` and stop strings ``S``, the output is ``t[:c]`` where ``c`` is the
smallest START index of any occurrence of any ``s`` in ``S`` in ``t`` (``len(t)`` when none
occurs). Earliest start, not earliest end: with stops ``"bc"`` and ``"abcd"``, the text
``"abcd"`` yields ``""``, not ``"a"``, so the output never depends on how the text was chunked
into pushes. The price is that a completed stop can stay undecided while a longer stop that
started earlier is still possible; ``StopMatcher`` then holds the text back and reports the
stop once it is decided (at the latest when the stream ends).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

__all__ = [
    "IncrementalDetokenizer",
    "StopMatcher",
    "TextStream",
    "special_token_ids",
]

_REPLACEMENT = "\ufffd"

# Pending ids after which a text ending in U+FFFD is treated as final except for its last
# character. An incomplete UTF-8 character has at most 3 bytes, so a live partial character
# never needs more than 3 pending tokens (4 with the token that carried its lead byte after
# complete text); 8 leaves room and still bounds the window during runs of invalid bytes.
_MAX_HELD_IDS = 8


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special added tokens.

    Exposed so the engine can compute it once per tokenizer and pass it to every
    ``IncrementalDetokenizer`` instead of listing added tokens once per request.
    """
    return frozenset(i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)


class IncrementalDetokenizer:
    """Turn one generated sequence of token ids into text, piece by piece.

    The window ``_ids`` holds a context chunk (ids whose text was already emitted, kept so the
    decoder sees the same neighbourhood it sees in a full decode; Metaspace drops the leading
    space of the first token only) followed by pending ids. Each push decodes the window and
    emits the text beyond the ``_emitted`` characters already sent, unless that text ends in
    U+FFFD, which usually means a character whose remaining bytes are still to come.

    Guarantee: ``"".join(push(i) for i in ids) + flush() ==
    tokenizer.decode(ids, skip_special_tokens=...)`` for every id sequence, for decoders
    whose output for a sequence extends the output for its prefix except at a trailing U+FFFD
    (ByteLevel and Metaspace, both covered by the tests). ``ByteFallback`` breaks that premise for
    runs of byte tokens that are not valid UTF-8 as a whole; there the output stays close to
    ``decode`` and never raises, but cannot equal it in every case since ``decode`` rewrites
    text that was already streamed.
    """

    __slots__ = (
        "_emitted",
        "_ids",
        "_read",
        "_skip_ids",
        "_skip_special_tokens",
        "_tokenizer",
        "_vocab_size",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        special_ids: Iterable[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Ids that decode to nothing are dropped up front: kept in the window, a long run of
        # them (padding, or a model looping on EOS-like ids) would grow it without bound.
        if not skip_special_tokens:
            self._skip_ids: frozenset[int] = frozenset()
        elif special_ids is None:
            self._skip_ids = special_token_ids(tokenizer)
        else:
            self._skip_ids = frozenset(special_ids)
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._ids: list[int] = []
        # Window index where the pending ids start; ids before it are the context chunk.
        self._read = 0
        # Characters of ``decode(self._ids)`` already emitted.
        self._emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (``""`` if none yet)."""
        if token_id in self._skip_ids or not 0 <= token_id < self._vocab_size:
            # Skipped specials and ids without a token add nothing to decode()'s output.
            return ""
        ids = self._ids
        ids.append(token_id)
        text = self._decode(ids)
        if len(text) <= self._emitted:
            # No new characters (e.g. Metaspace's lone first "▁"). Not sliding here keeps at
            # least one text-producing id in the context chunk.
            return ""
        if not text.endswith(_REPLACEMENT):
            piece = text[self._emitted :]
            # Slide: the chunk just emitted becomes the context for the next one.
            del ids[: self._read]
            self._read = len(ids)
            self._emitted = len(self._decode(ids))
            return piece
        if len(ids) - self._read <= _MAX_HELD_IDS:
            return ""
        return self._release_held(text)

    def _release_held(self, text: str) -> str:
        """Emit all but the last character of text that has ended in U+FFFD for too long.

        With lossy UTF-8 decoding, appended bytes can only change the trailing U+FFFD of an
        incomplete character; everything before it is final. Then the window is cut at the
        newest id when that is a clean split, so a run of invalid bytes cannot grow it.
        """
        ids = self._ids
        final = len(text) - 1
        piece = text[self._emitted : final] if final > self._emitted else ""
        self._emitted = max(self._emitted, final)
        split = len(ids) - 1
        head = self._decode(ids[:split])
        # The concatenation test accepts a split only where decoding restarts cleanly: a split
        # inside a character (or an invalid sequence) decodes each side to extra U+FFFD, and a
        # position-dependent decoder (Metaspace) changes the first token's text. The length
        # test is implied by it and only spares the second decode.
        if len(head) <= self._emitted and head + self._decode(ids[split:]) == text:
            del ids[:split]
            self._read = 0
            self._emitted -= len(head)
        return piece

    def flush(self) -> str:
        """Return the text still held back; call once when the sequence ends.

        A trailing incomplete character comes out as U+FFFD, exactly as ``decode`` renders it.
        The detokenizer is reset afterwards.
        """
        text = self._decode(self._ids)
        piece = text[self._emitted :]
        self._ids = []
        self._read = 0
        self._emitted = 0
        return piece


class _StopAutomaton:
    """Aho-Corasick automaton over the stop strings.

    Its state after each character is the longest suffix of the text that is a prefix of some
    stop, which is exactly the text that must be held back, and the longest stop ending there
    gives the earliest-starting match. Per character the cost is O(1) amortized whatever the
    number of stops, where checking every stop (or every suffix up to the longest stop) would
    multiply the per-character cost by 10,000 for large stop lists.
    """

    __slots__ = ("depth", "fail", "goto", "match")

    def __init__(self, stops: Iterable[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth: list[int] = [0]
        # Length of the longest stop that is a suffix of the node's string, 0 if none.
        self.match: list[int] = [0]
        for stop in stops:
            node = 0
            for ch in stop:
                nxt = self.goto[node].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[node][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.match.append(0)
                node = nxt
            self.match[node] = len(stop)
        self.fail: list[int] = [0] * len(self.goto)
        # Breadth-first, so a node's failure target (shallower) is complete before the node.
        queue: deque[int] = deque(self.goto[0].values())
        while queue:
            node = queue.popleft()
            for ch, child in self.goto[node].items():
                queue.append(child)
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f].get(ch, 0)
                if not self.match[child]:
                    self.match[child] = self.match[self.fail[child]]


class StopMatcher:
    """Cut streamed text at the first stop string, holding back text that may start one.

    ``push`` returns the text that is safe to send now and whether generation should stop.
    Held-back text is the longest suffix that is a prefix of some stop (plus, while a match is
    undecided, everything from that match's start), so at most ``max(len(s))`` characters are
    ever delayed. See the module docstring for the earliest-start semantics.
    """

    __slots__ = ("_automaton", "_held", "_held_start", "_match_start", "_pos", "_state", "_stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            # A bare string is a sequence of its characters; that is never what is meant.
            raise TypeError("stops must be a sequence of strings, not a string")
        unique = list(dict.fromkeys(stops))
        if any(not s for s in unique):
            raise ValueError("stop strings must be non-empty")
        self._automaton = _StopAutomaton(unique) if unique else None
        self._state = 0
        self._pos = 0  # characters consumed so far
        self._held = ""  # undecided text, starting at absolute index _held_start
        self._held_start = 0
        self._match_start: int | None = None  # earliest start of a completed stop
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been decided (by ``push`` or by ``flush``)."""
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Consume ``text``; return (text safe to emit now, whether a stop string matched)."""
        if self._stopped:
            return "", True
        automaton = self._automaton
        if automaton is None:
            return text, False
        buf = self._held + text
        base = self._held_start
        goto, fail, depth, match = automaton.goto, automaton.fail, automaton.depth, automaton.match
        state = self._state
        pos = self._pos
        match_start = self._match_start
        for ch in text:
            # Locals and no method call: this loop is the per-character hot path.
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            pos += 1
            m = match[state]
            if m and (match_start is None or pos - m < match_start):
                match_start = pos - m
            # Decided once no still-possible stop starts before the completed one.
            if match_start is not None and pos - depth[state] >= match_start:
                self._stopped = True
                self._held = ""
                return buf[: match_start - base], True
        self._state = state
        self._pos = pos
        self._match_start = match_start
        # Undecided matches start at or after the longest live candidate, so this is the cut.
        keep_from = pos - depth[state]
        self._held = buf[keep_from - base :]
        self._held_start = keep_from
        return buf[: keep_from - base], False

    def flush(self) -> str:
        """Return held-back text at the end of the stream.

        No more text can complete a longer stop now, so a completed but undecided match is
        final: the text before it is returned and ``stopped`` becomes true.
        """
        if self._stopped:
            return ""
        held, held_start = self._held, self._held_start
        self._held = ""
        self._held_start = self._pos
        self._state = 0
        if self._match_start is not None:
            self._stopped = True
            return held[: self._match_start - held_start]
        return held


class TextStream:
    """Token ids in, client-ready text out, for one generated sequence.

    Combines ``IncrementalDetokenizer`` and ``StopMatcher``; once a stop string is decided the
    stream is finished and further tokens are ignored, which tells the engine to stop
    generating this sequence.
    """

    __slots__ = ("_detok", "_finished", "_matcher", "_pieces")

    def __init__(
        self,
        tokenizer: Tokenizer,
        stops: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
        special_ids: Iterable[int] | None = None,
    ) -> None:
        self._detok = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=skip_special_tokens, special_ids=special_ids
        )
        self._matcher = StopMatcher(stops)
        self._pieces: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            # Joined lazily and cached so repeated reads stay linear overall.
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def stopped(self) -> bool:
        """Whether generation ended on a stop string."""
        return self._matcher.stopped

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated id; return (text to send now, whether a stop string matched)."""
        if self._finished:
            return "", self._matcher.stopped
        out, stopped = self._matcher.push(self._detok.push(token_id))
        if out:
            self._pieces.append(out)
        if stopped:
            self._finished = True
        return out, stopped

    def finish(self) -> str:
        """Return the remaining text when generation ends (EOS, length limit or stop)."""
        if self._finished:
            return ""
        self._finished = True
        out, stopped = self._matcher.push(self._detok.flush())
        if not stopped:
            out += self._matcher.flush()
        if out:
            self._pieces.append(out)
        return out
