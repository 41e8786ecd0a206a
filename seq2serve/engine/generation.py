"""Generation over a batch whose rows are at different steps: what continuous batching drives.

A ``DecodeBatch`` holds one row (a slot) per sequence. ``add`` encodes new sequences (once:
their cross-attention keys/values are kept for every later step) and places them in free
slots, or appends slots, whose cached positions so far are masked holes; ``step`` runs one
decoder call for every slot and picks each live row's next token. Rows never influence each
other: masks hide other rows' padding and holes, so a greedy sequence gets the same tokens
whatever shares its batch.

A finished or cancelled sequence frees its slot without moving anything: removing a row
copies every cache array (as does appending one), a cost the whole batch would pay each time
a request comes or goes. The next joiner writes its cross keys/values into the free slot; a
slot left free for ``REUSE_STEPS`` steps is compacted away.

Arrays kept across steps (shapes as in the model: B slots, H heads, S source, C cache
columns, D head):

| array          | shape        | changes                                              |
|----------------|--------------|------------------------------------------------------|
| ``cross[j]``   | (B, H, S, D) | when slots are filled, appended or compacted         |
| ``enc_mask``   | (B, S)       | likewise                                             |
| ``past[j]``    | (B, H, C, D) | every step writes column ``next_column``             |
| ``dec_mask``   | (B, C)       | every step; 0 marks a hole (joined late, or free)    |

A row's cached tokens are the columns its mask marks, oldest first from ``next_column``
round (``row_cache``). Attention weighs them as a set (each token's position is in its own
keys and values), so where a column sits changes nothing.

With a bundle's ``decoder_step.onnx`` (on the CPU) the cache is a ring: a step writes its
column in place, into the column after the last one written, wrapping round to column 0
(the oldest), which no live row still uses once C is wider than the oldest row. The
buffers are copied (oldest column first, at the width the live rows use, with room for
``BUFFER_HEADROOM`` more steps) only when rows are appended or compacted, when the oldest
live row would be overwritten (the ring grows), or when it is more than twice as wide as the
rows need (it shrinks): under steady traffic, never. Without the step graph each step's
decoder call returns a new, one column wider copy of the cache (``next_column`` is then C),
and leading columns no row uses any more are cut once they are a quarter of the width.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from seq2serve.config import ModelConfig
from seq2serve.engine import memory
from seq2serve.engine.runtime import (
    Backend,
    OnnxBackend,
    StepBinding,
    log_softmax_rows,
)
from seq2serve.engine.text import TextStream, special_token_ids

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"
FINISH_ERROR = "error"  # this sequence failed; the others in its batch carry on


# Sampling below this temperature is greedy decoding: dividing logits by a smaller number
# overflows float32 and the probabilities become NaN (vLLM draws the same line).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # CTRL-style, over the tokens generated so far
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    # Keep going past EOS until max_new_tokens: fixed-length work for benchmarks.
    ignore_eos: bool = False

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random: do_sample at a temperature that can be used."""
        return self.do_sample and self.temperature >= GREEDY_BELOW_TEMPERATURE

    @property
    def exact_logits(self) -> bool:
        """Whether choosing a token reads every logit, not only the best ones (a screened LM
        head returns exact logits for a row's best tokens: enough for greedy decoding)."""
        return self.sampling or self.repetition_penalty != 1.0 or self.num_beams > 1


@dataclass
class TokenEvent:
    """One generated token of one sequence, with the text it decided."""

    seq_id: int
    token_id: int
    text: str  # new text this token decided (may be "": a partial character, or held back)
    logprob: float  # log-probability of the token under the model
    special: bool
    finish_reason: str | None = None  # set on a sequence's last event
    error: str | None = None  # set when this sequence failed (finish_reason "error")


# Unseeded sampling draws from children of one seed sequence, drawn from the OS once per
# process: ``default_rng(None)`` reads the OS's entropy for every request, a call that
# releases the GIL, and under load the event loop that made the request then waited for
# the engine thread to hand the GIL back (5 % of the loop's samples, default model).
_ENTROPY = np.random.SeedSequence()


@dataclass
class Sequence:
    """One request's generation state."""

    source_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    special_ids: frozenset[int]
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.stream = TextStream(self.tokenizer, self.params.stop, special_ids=self.special_ids)
        self.seed = self.params.seed
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        """The sampler's generator, made on first use (greedy requests never need one):
        from the request's seed, else from the process's own entropy (``_ENTROPY``)."""
        if self._rng is None:
            seed = self.seed if self.seed is not None else _ENTROPY.spawn(1)[0]
            self._rng = np.random.default_rng(seed)
        return self._rng

    @property
    def text(self) -> str:
        return self.stream.text


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted: np.ndarray = logits - logits.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def process_logits(logits: np.ndarray, generated: list[int], p: SamplingParams) -> np.ndarray:
    """One row's logits (V,) after repetition penalty, temperature, top-k and top-p.

    The same order and semantics as the PyTorch reference (``seq2serve.model.generate``).
    """
    logits = logits.astype(np.float32, copy=True)
    if p.repetition_penalty != 1.0 and generated:
        seen = np.unique(np.asarray(generated))
        values = logits[seen].astype(np.float64)
        # Extreme penalties must not overflow into inf (then NaN probabilities): clip.
        with np.errstate(over="ignore"):
            penalized = np.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        limit = float(np.finfo(np.float32).max) / 4
        logits[seen] = np.clip(penalized, -limit, limit)
    if not p.sampling:
        return logits
    logits /= p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = np.partition(logits, -p.top_k)[-p.top_k]
        logits[logits < kth] = -np.inf
    if p.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = np.exp(log_softmax(logits[order]))
        before = np.cumsum(probs) - probs
        drop = before >= p.top_p
        drop[0] = False
        logits[order[drop]] = -np.inf
    return logits


def choose(logits: np.ndarray, seq: Sequence) -> int:
    p = seq.params
    processed = process_logits(logits, seq.generated, p)
    if not p.sampling:
        return int(processed.argmax())
    probs = np.exp(log_softmax(processed).astype(np.float64))
    return int(seq.rng.choice(probs.shape[-1], p=probs / probs.sum()))


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into (ids, attention_mask), both int64 (B, longest)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _pad_to(array: np.ndarray, axis: int, length: int) -> np.ndarray:
    missing = length - array.shape[axis]
    if missing <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, missing)
    return np.pad(array, widths)


def remade(arrays: list[np.ndarray], make: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """``[make(a) for a in arrays]``, taking each array out of ``arrays`` as its replacement
    is made (``arrays`` ends empty: its owner hands it over).

    Each old array is then freed as soon as its replacement exists, where nothing else holds
    it, so a batch that replaces its 2L cache or cross-attention arrays holds one array more
    than they take, not all of them twice (the ring of 16 opus-mt-sized rows is 26 MB). A
    list comprehension held both: 16 staggered int8 streams in-process peaked at 260 MB
    resident (numpy's arrays at 61-62 MB), against 240-242 MB (42 MB) this way."""
    out = []
    arrays.reverse()
    while arrays:
        out.append(make(arrays.pop()))
    return out


# A free slot waits this many steps for a joiner before the batch is compacted.
REUSE_STEPS = 4
# Columns a cache buffer holds beyond the next step's when it is made: a step over the buffer
# reads all of them, written or not (doubling the width cost more than the copies it saved:
# 6.1 against 5.9 ms for a concatenating step, int8 opus-mt-sized, batch 16, 70 columns).
# When the ring grows, it doubles (so that its copies cost O(1) a step, amortized), up to
# the widest the live rows can get (their max_new_tokens: 16 64-token requests that start
# together were copied 3 times, to 76 columns, when it grew by half; now twice, to 65), and
# by this many columns at least.
BUFFER_HEADROOM = 16


class DecodeBatch:
    """The running batch of continuous batching (see the module docstring)."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer) -> None:
        self.backend = backend
        self.config: ModelConfig = backend.config
        self.tokenizer = tokenizer
        self.special_ids = special_token_ids(tokenizer)
        self.log_softmax = log_softmax_rows()
        self.slots: list[Sequence | None] = []  # None: a free slot
        self._free_since: dict[int, int] = {}  # free slot -> step it was freed at
        self._columns_freed = False  # a row left since the last look for unused columns
        self._steps = 0
        n, h, d = self.config.n_decoder_layers, self.config.n_heads, self.config.head_dim
        self.cross = [np.zeros((0, h, 0, d), np.float32) for _ in range(2 * n)]
        self.enc_mask = np.zeros((0, 0), np.int64)
        self.past = [np.zeros((0, h, 0, d), np.float32) for _ in range(2 * n)]
        self.dec_mask = np.zeros((0, 0), np.int64)
        self.next_column = 0  # the column the next step writes; C: it appends one
        # With a backend that steps in place (``OnnxBackend.step_in_place``), ``past`` is a
        # ring of buffers that each step writes its column into through ``_binding``.
        self._in_place: OnnxBackend | None = (
            backend if isinstance(backend, OnnxBackend) and backend.steps_in_place else None
        )
        self._binding: StepBinding | None = None

    @property
    def rows(self) -> list[Sequence]:
        """The live sequences, in slot order."""
        return [s for s in self.slots if s is not None]

    def __len__(self) -> int:
        return len(self.slots) - len(self._free_since)

    def new_sequence(self, source_ids: list[int], params: SamplingParams) -> Sequence:
        return Sequence(source_ids, params, self.tokenizer, self.special_ids)

    def row_cache(self, slot: int) -> list[np.ndarray]:
        """The cached keys/values of the row in ``slot``, per array (H, its tokens, D), oldest
        first."""
        c = self.dec_mask.shape[1]
        order = (self.next_column + np.arange(c)) % max(c, 1)
        columns = order[self.dec_mask[slot, order] == 1]
        return [a[slot][:, columns] for a in self.past]

    def _remade(
        self, arrays: list[np.ndarray], make: Callable[[np.ndarray], np.ndarray]
    ) -> list[np.ndarray]:
        """``remade`` for the batch's own cache or cross-attention arrays. The step binding
        points into the old ones: it goes first."""
        self._binding = None
        return remade(arrays, make)

    # -- membership ------------------------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Encode ``seqs`` in one encoder call, give each its first token and place them in
        the batch (see ``prefill``). Returns the first tokens' events."""
        if not seqs:
            return []
        ids, mask = pad_rows([s.source_ids for s in seqs], self.config.pad_token_id)
        encoded = self.backend.encode(ids, mask)
        return self.prefill(seqs, encoded.cross, mask)

    def prefill(
        self, seqs: list[Sequence], cross: list[np.ndarray], enc_mask: np.ndarray
    ) -> list[TokenEvent]:
        """The first token of each joiner, from a decoder call over the joiners alone, then
        the joiners join with that token's cache column.

        A joiner's first token then costs its encoder call and one step of a batch of
        joiners, not a step of the whole running batch (TGI splits prefill from decode for
        the same reason: time to first token)."""
        cfg = self.config
        n = len(seqs)
        empty = np.zeros((n, cfg.n_heads, 0, cfg.head_dim), np.float32)
        out = self.backend.decode(
            np.full((n, 1), cfg.decoder_start_token_id, np.int64),
            np.zeros((n, 1), np.int64),
            np.ones((n, 1), np.int64),
            enc_mask,
            [empty] * (2 * cfg.n_decoder_layers),
            cross,
            exact_logits=any(s.params.exact_logits for s in seqs),
        )
        events = self._choose_next(seqs, out.logits[:, -1], list(range(len(seqs))))
        keep = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        first = out.present
        if len(keep) < n:  # some finished at their first token: the others' rows only
            index = np.asarray(keep, np.int64)
            seqs, enc_mask = [seqs[i] for i in keep], enc_mask[index]
            cross, first = [c[index] for c in cross], [p[index] for p in first]
        if keep:  # when every joiner goes on, their arrays as they are, not copies
            self.add_encoded(seqs, cross, enc_mask, first=first)
        return events

    def add_encoded(
        self,
        seqs: list[Sequence],
        cross: list[np.ndarray],
        enc_mask: np.ndarray,
        first: list[np.ndarray] | None = None,
    ) -> None:
        """Place rows whose encoder output is already computed (cross K/V per layer): into
        free slots first, then appended. They hold no cached token so far, except, with
        ``first`` (per layer (N, H, 1, D): the cache of a first token), in the column the
        last step wrote. ``cross`` and ``enc_mask`` are handed over: an empty batch keeps
        them as its own arrays, and later joiners are written into them."""
        if first is not None and self.dec_mask.shape[1] == 0:  # room for the first column
            self.past = self._remade(self.past, lambda a: _pad_to(a, 2, 1))
            self.dec_mask = _pad_to(self.dec_mask, 1, 1)
            self.next_column = 1
        # An empty batch takes the joiners' source arrays as they are: a burst that starts
        # together copies none of its cross-attention keys/values (12.6 MB for 16 opus-mt-
        # sized rows of 32 tokens, every page of it a fault of a new mapping).
        adopted = not self.slots
        if adopted:
            self.cross, self.enc_mask = list(cross), enc_mask
        elif enc_mask.shape[1] > self.enc_mask.shape[1]:  # a longer source: widen every slot
            s = enc_mask.shape[1]
            self.cross = self._remade(self.cross, lambda a: _pad_to(a, 2, s))
            self.enc_mask = _pad_to(self.enc_mask, 1, s)
        self._append_free_slots(len(seqs) - len(self._free_since), source=not adopted)
        last = (self.next_column - 1) % max(self.dec_mask.shape[1], 1)
        for k, slot in enumerate(sorted(self._free_since)[: len(seqs)]):
            if not adopted:
                for old, new in zip(self.cross, cross, strict=True):
                    old[slot] = 0.0
                    old[slot, :, : new.shape[2]] = new[k]
                self.enc_mask[slot] = 0
                self.enc_mask[slot, : enc_mask.shape[1]] = enc_mask[k]
            self.dec_mask[slot] = 0
            if first is not None:
                for old, new in zip(self.past, first, strict=True):
                    old[slot, :, last] = new[k, :, 0]
                self.dec_mask[slot, last] = 1
            self.slots[slot] = seqs[k]
            del self._free_since[slot]

    def _append_free_slots(self, n: int, source: bool = True) -> None:
        """Grow every array by ``n`` free slots: one allocation each, not a pad and a
        concatenate per joiner (``source`` false: the cross-attention arrays and the source
        mask already have their rows)."""
        if n <= 0:
            return
        b = len(self.slots)

        def grown(old: np.ndarray) -> np.ndarray:
            out = np.zeros((b + n, *old.shape[1:]), old.dtype)
            out[:b] = old
            return out

        if source:
            self.cross = self._remade(self.cross, grown)
            self.enc_mask = grown(self.enc_mask)
        if self._in_place is not None:  # straight into a ring with room to grow
            self._rebuffer(slice(None), b, b + n)
        else:
            self.past, self.dec_mask = self._remade(self.past, grown), grown(self.dec_mask)
        self.slots.extend([None] * n)
        self._free_since.update(dict.fromkeys(range(b, b + n), self._steps))

    def remove(self, seq_ids: set[int]) -> None:
        """Free the slots of these sequences (finished or cancelled); nothing is copied."""
        for i, seq in enumerate(self.slots):
            if seq is not None and seq.id in seq_ids:
                self.slots[i] = None
                self.dec_mask[i] = 0  # a free slot holds no cache column in use
                self._free_since[i] = self._steps
                self._columns_freed = True

    def compact(self) -> None:
        """Drop the free slots, and the source and cache columns no remaining row needs."""
        keep = [i for i, s in enumerate(self.slots) if s is not None]
        self._free_since.clear()
        if len(keep) == len(self.slots):
            return
        index = np.asarray(keep, dtype=np.int64)
        if not keep:  # an idle batch holds no cache, nor a binding to one
            # New empty arrays, not empty views: a view keeps its whole buffer alive.
            self.past = [np.zeros((0, a.shape[1], 0, a.shape[3]), a.dtype) for a in self.past]
            self.dec_mask = np.zeros((0, 0), np.int64)
            self.next_column, self._binding = 0, None
        elif self._in_place is not None:
            self._rebuffer(index, len(keep), len(keep))
        else:
            self.past = self._remade(self.past, lambda a: a[index])
            self.dec_mask = self.dec_mask[index]
            self._trim(0)
        self.slots = [self.slots[i] for i in keep]
        # The kept rows and the source columns they use, in one copy each (new arrays:
        # indexing by an index array never returns a view).
        s = int(self.enc_mask[index].sum(axis=1).max()) if keep else 0
        self.cross = self._remade(self.cross, lambda a: a[index, :, :s])
        self.enc_mask = self.enc_mask[index, :s]

    @staticmethod
    def _room(used: int) -> int:
        """The width a ring is made at for rows using ``used`` columns: theirs, the next
        step's and ``BUFFER_HEADROOM`` more."""
        return used + 1 + BUFFER_HEADROOM

    def _used_columns(self) -> int:
        """How many of the last columns written the live rows use (the oldest row's)."""
        live = [i for i, s in enumerate(self.slots) if s is not None]
        return int(self.dec_mask[live].sum(axis=1).max()) if live else 0

    def _rebuffer(
        self, rows: slice | np.ndarray, kept: int, total: int, grow: bool = False
    ) -> None:
        """New ring buffers of ``total`` slots, the first ``kept`` from ``rows`` of the old,
        with the columns the live rows use copied in oldest first and room for
        ``BUFFER_HEADROOM`` more steps (``grow``: twice as wide as now), and no wider than
        the live rows can get."""
        c = self.dec_mask.shape[1]
        used = self._used_columns()
        capacity = max(self._room(used), 2 * c if grow else 0)
        if self.rows:
            # A row holds at most max_new_tokens columns: the start token and every
            # generated token but the last.
            widest = max(s.params.max_new_tokens for s in self.rows)
            capacity = max(used + 1, min(capacity, widest + 1))
        # The used columns, oldest first: one slice, or two where they wrap round.
        first = self.next_column - used
        spans = [(first % c, c), (0, self.next_column)] if first < 0 else [(first, first + used)]

        def oldest_first(old: np.ndarray, new: np.ndarray) -> np.ndarray:
            """``new`` with the used columns (axis 2) of ``old``'s ``rows`` copied in."""
            at = 0
            for lo, hi in spans:
                new[:kept, :, at : at + hi - lo] = old[rows, :, lo:hi]
                at += hi - lo
            return new

        h, d = self.config.n_heads, self.config.head_dim
        self.past = self._remade(
            self.past,
            lambda old: oldest_first(old, memory.zeros((total, h, capacity, d), np.float32)),
        )
        mask = np.zeros((total, capacity), np.int64)
        oldest_first(self.dec_mask[:, None], mask[:, None])  # (B, 1, C) views of the masks
        self.dec_mask, self.next_column = mask, used

    def _trim(self, at_least: int) -> None:
        """Cut leading cache columns no slot uses, when there are more than ``at_least``
        (a cache that each step widens by one: the ring reuses its columns instead)."""
        used = np.flatnonzero(self.dec_mask.any(axis=0))
        first = int(used[0]) if used.size else self.dec_mask.shape[1]
        if first and first > at_least:
            self.past = self._remade(self.past, lambda a: np.ascontiguousarray(a[:, :, first:]))
            self.dec_mask = np.ascontiguousarray(self.dec_mask[:, first:])
            self.next_column = self.dec_mask.shape[1]

    def _tidy(self) -> None:
        """Before a step: compact when a slot has waited too long for a joiner (or every
        slot is free); once a row has left, cut the cache's unused columns when they are
        worth a copy."""
        stale = any(self._steps - t >= REUSE_STEPS for t in self._free_since.values())
        if self._free_since and (stale or len(self) == 0):
            self.compact()
        elif self._columns_freed:
            # Only a row leaving frees columns: the mask is scanned for them then, not every
            # step (a scan that also waits for the GIL the event loop holds).
            if self._in_place is None:
                self._trim(self.dec_mask.shape[1] // 4)
            elif 2 * self._room(self._used_columns()) <= self.dec_mask.shape[1]:
                b = len(self.slots)
                self._rebuffer(slice(None), b, b)  # the ring shrinks
        self._columns_freed = False

    # -- one step --------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One decoder call for every slot; returns one event per live row. Finished rows
        free their slots."""
        self._tidy()
        if not len(self):
            return []
        cfg = self.config
        b = len(self.slots)
        last = [
            (s.generated[-1] if s.generated else cfg.decoder_start_token_id)
            if s is not None
            else cfg.pad_token_id
            for s in self.slots
        ]
        input_ids = np.asarray(last, np.int64)[:, None]
        positions = [len(s.generated) if s is not None else 0 for s in self.slots]
        position_ids = np.asarray(positions, np.int64)[:, None]
        live = [i for i, s in enumerate(self.slots) if s is not None]
        exact = any(s.params.exact_logits for s in self.slots if s is not None)
        if self._in_place is not None:
            logits = self._step_in_ring(input_ids, position_ids, live, exact)
        else:
            dec_mask = np.concatenate([self.dec_mask, np.ones((b, 1), np.int64)], axis=1)
            out = self.backend.decode(
                input_ids, position_ids, dec_mask, self.enc_mask, self.past, self.cross, exact
            )
            self.past, self.dec_mask = out.present, dec_mask
            self.next_column = dec_mask.shape[1]
            logits = out.logits[:, -1]  # (B, V)
        self._steps += 1
        rows = self.rows
        events = self._choose_next(rows, logits, live)
        self.remove({s.id for s in rows if s.finish_reason is not None})
        if not len(self):  # an idle batch holds no cache
            self.compact()
        return events

    def _step_in_ring(
        self, input_ids: np.ndarray, position_ids: np.ndarray, live: list[int], exact: bool
    ) -> np.ndarray:
        """``step``'s decoder call over the ring: the new column is written in place (see
        ``OnnxBackend.step_in_place``), over the oldest. Returns the logits (B, V)."""
        backend = self._in_place
        assert backend is not None
        column = self.next_column
        if column == self.dec_mask.shape[1] or self.dec_mask[live, column].any():
            b = len(self.slots)  # the oldest live row still uses that column: grow
            self._rebuffer(slice(None), b, b, grow=True)
            column = self.next_column
        self.dec_mask[:, column] = 1  # free slots too: a row with nothing to attend to is NaN
        arrays = (self.past, self.cross, self.enc_mask, self.dec_mask.shape)
        if self._binding is None or not self._binding.serves(*arrays):
            self._binding = backend.bind_step(*arrays)
        logits: np.ndarray = backend.step_in_place(
            self._binding, input_ids, position_ids, self.dec_mask, column, exact
        )
        self.next_column = (column + 1) % self.dec_mask.shape[1]
        return logits[:, -1]

    def _choose_next(
        self, seqs: list[Sequence], logits: np.ndarray, rows: list[int]
    ) -> list[TokenEvent]:
        """Each sequence's next token from its row of ``logits`` (B, V), and its event.
        ``rows``: the row of each sequence.

        A step's free slots keep their rows in ``logits``, and their logits are taken
        through the log-softmax and argmax with the others: picking the live rows out first
        copied (B - 1, V) floats into a new mapping each step (``memory.map_large_blocks``),
        and a batch-16 step with one free slot took 7.7 ms against 6.0 ms with none
        (opus-mt-sized int8). A free slot's row may be NaN; rows are independent."""
        logprobs = self.log_softmax(logits)  # (B, V)
        greedy = np.argmax(logits, axis=-1)
        events = []
        for seq, r in zip(seqs, rows, strict=True):
            p = seq.params
            plain = not p.sampling and p.repetition_penalty == 1.0
            try:
                token = int(greedy[r]) if plain else choose(logits[r], seq)
                events.append(self._advance(seq, token, float(logprobs[r, token])))
            except Exception as err:  # one sequence's failure must not end its batch-mates'
                seq.finish_reason = FINISH_ERROR
                events.append(TokenEvent(seq.id, -1, "", 0.0, False, FINISH_ERROR, error=str(err)))
        return events

    def _advance(self, seq: Sequence, token: int, logprob: float) -> TokenEvent:
        cfg = self.config
        seq.generated.append(token)
        seq.logprobs.append(logprob)
        text, stopped = seq.stream.push(token)
        if stopped:
            seq.finish_reason = FINISH_STOP
        elif token == cfg.eos_token_id and not seq.params.ignore_eos:
            seq.finish_reason = FINISH_EOS
        elif (
            len(seq.generated) >= seq.params.max_new_tokens
            or len(seq.generated) >= cfg.max_target_positions
        ):
            seq.finish_reason = FINISH_LENGTH
        if seq.finish_reason is not None and not stopped:
            text += seq.stream.finish()
        return TokenEvent(
            seq.id, token, text, logprob, token in self.special_ids, seq.finish_reason
        )

    def cancel(self, seq_id: int) -> bool:
        """Free a sequence's slot before the next step (a client went away)."""
        if any(s.id == seq_id for s in self.rows):
            self.remove({seq_id})
            return True
        return False


def run_to_completion(batch: DecodeBatch, seqs: list[Sequence]) -> list[Sequence]:
    """Add ``seqs`` and step until all are finished (offline generation, tests, benchmarks)."""
    batch.add(seqs)
    while batch.rows:
        batch.step()
    return seqs


def beam_search(
    backend: Backend, tokenizer: Tokenizer, source_ids: list[int], params: SamplingParams
) -> Sequence:
    """Beam search for one source: K rows of its own batch, ranked by
    sum(logprob) / length ** length_penalty, stopping when no live beam can beat the worst of
    the K kept finished hypotheses. Returns a finished ``Sequence`` holding the best."""
    cfg = backend.config
    k = params.num_beams
    template = Sequence(source_ids, params, tokenizer, special_token_ids(tokenizer))
    ids = np.asarray([source_ids], np.int64)
    encoded = backend.encode(ids, np.ones_like(ids))
    # K rows of their own, reordered every step (so the cache is a copy each step, not a
    # ring): the source's cross K/V and mask repeated, and an empty cache.
    cross = [np.repeat(c, k, axis=0) for c in encoded.cross]
    enc_mask = np.ones((k, len(source_ids)), np.int64)
    past = [
        np.zeros((k, cfg.n_heads, 0, cfg.head_dim), np.float32)
        for _ in range(2 * cfg.n_decoder_layers)
    ]
    scores = np.full(k, -np.inf)
    scores[0] = 0.0
    finished: list[tuple[float, list[int], list[float]]] = []
    histories: list[list[int]] = [[] for _ in range(k)]
    token_logprobs: list[list[float]] = [[] for _ in range(k)]

    def normalized(score: float, length: int) -> float:
        return float(score / float(length) ** params.length_penalty)

    limit = min(params.max_new_tokens, cfg.max_target_positions)
    for step in range(limit):
        b = len(histories)
        last = [h[-1] if h else cfg.decoder_start_token_id for h in histories]
        dec_mask = np.ones((b, step + 1), np.int64)
        out = backend.decode(
            np.asarray(last, np.int64)[:, None],
            np.full((b, 1), step, np.int64),
            dec_mask,
            enc_mask,
            past,
            cross,
            exact_logits=True,
        )
        logprobs = np.stack(
            [log_softmax(process_logits(out.logits[i, -1], histories[i], params)) for i in range(b)]
        )
        candidates = (scores[:, None] + logprobs).reshape(-1)
        top = np.argsort(-candidates, kind="stable")[: 2 * k]
        next_hist, next_scores, next_lps, rows = [], [], [], []
        for index in top:
            beam, token = divmod(int(index), logprobs.shape[-1])
            score = float(candidates[index])
            lps = [*token_logprobs[beam], float(logprobs[beam, token])]
            if token == cfg.eos_token_id:
                finished.append((normalized(score, step + 1), [*histories[beam], token], lps))
            else:
                next_hist.append([*histories[beam], token])
                next_scores.append(score)
                next_lps.append(lps)
                rows.append(beam)
            if len(next_hist) == k:
                break
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:k]
        if len(finished) == k and normalized(max(next_scores), step + 1) <= finished[-1][0]:
            break
        index = np.asarray(rows, np.int64)
        past = [a[index] for a in out.present]
        cross = [a[index] for a in cross]
        enc_mask = enc_mask[index]
        histories, scores, token_logprobs = next_hist, np.asarray(next_scores), next_lps
    else:
        finished += [
            (normalized(s, len(h)), h, lp)
            for s, h, lp in zip(scores.tolist(), histories, token_logprobs, strict=True)
        ]
    _, best, best_logprobs = max(finished, key=lambda f: f[0]) if finished else (0.0, [], [])
    for token, logprob in zip(best, best_logprobs, strict=True):
        template.generated.append(token)
        template.logprobs.append(logprob)
        _, stopped = template.stream.push(token)
        if stopped:
            template.finish_reason = FINISH_STOP
            break
    if template.finish_reason is None:
        template.stream.finish()
        last_token = template.generated[-1] if template.generated else None
        template.finish_reason = FINISH_EOS if last_token == cfg.eos_token_id else FINISH_LENGTH
    return template
