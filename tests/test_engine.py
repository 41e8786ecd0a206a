"""The onnxruntime engine: generation equal to the PyTorch reference, rows at different steps
equal to alone, cancellation, sampling, beam search and stop strings."""

from __future__ import annotations

import json
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2serve import contract
from seq2serve.engine import generation
from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import (
    BUFFER_HEADROOM,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    REUSE_STEPS,
    DecodeBatch,
    SamplingParams,
    Sequence,
    beam_search,
    log_softmax,
    pad_rows,
    remade,
    run_to_completion,
)
from seq2serve.engine.runtime import OnnxBackend, log_softmax_rows
from seq2serve.export.graphs import log_softmax_model
from seq2serve.model.checkpoint import load_model
from seq2serve.model.generate import GenerationConfig, generate

SOURCES = [">>fr<< 2021-03-04", ">>de<< 1234", ">>ja<< 77", ">>ru<< 1999-12-31", ">>en<< 5"]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return OnnxBackend(bundle), bundle.tokenizer


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return load_model(tiny_bundle)


def source_ids(tok, text: str) -> list[int]:
    return tok.encode(text).ids


def alone(engine, text: str, params: SamplingParams) -> list[int]:
    backend, tok = engine
    batch = DecodeBatch(backend, tok)
    (seq,) = run_to_completion(batch, [batch.new_sequence(source_ids(tok, text), params)])
    return seq.generated


def test_greedy_equals_the_pytorch_reference(engine, reference):
    backend, tok = engine
    model, _ = reference
    params = SamplingParams(max_new_tokens=20)
    batch = DecodeBatch(backend, tok)
    seqs = run_to_completion(
        batch, [batch.new_sequence(source_ids(tok, s), params) for s in SOURCES]
    )
    for text, seq in zip(SOURCES, seqs, strict=True):
        ids = torch.tensor([source_ids(tok, text)])
        (expected,) = generate(
            model, ids, torch.ones_like(ids), GenerationConfig(max_new_tokens=20)
        )
        assert seq.generated == expected, text
        assert seq.finish_reason in (FINISH_EOS, FINISH_LENGTH)
        assert seq.text == tok.decode(seq.generated, skip_special_tokens=True)


def test_rows_joining_at_different_steps_equal_alone(engine):
    """Continuous batching: each sequence joins the running batch at a different step and
    leaves when done; every one gets exactly the tokens it gets alone."""
    backend, tok = engine
    params = SamplingParams(max_new_tokens=16)
    expected = {s: alone(engine, s, params) for s in SOURCES}
    batch = DecodeBatch(backend, tok)
    pending = list(SOURCES)
    seqs, step, sizes = {}, 0, []
    while pending or len(batch):
        if pending and step % 3 == 0:
            text = pending.pop(0)
            seqs[text] = batch.new_sequence(source_ids(tok, text), params)
            batch.add([seqs[text]])
        sizes.append(len(batch))
        batch.step()
        step += 1
    assert max(sizes) > 1, "the sequences never shared a batch"
    for text, seq in seqs.items():
        assert seq.generated == expected[text], text
    # Leading holes are trimmed as rows leave: nothing is left behind.
    assert batch.dec_mask.shape == (0, 0) or batch.dec_mask.shape[0] == 0


def test_freed_slots_are_reused_in_place_and_rows_stay_equal_to_alone(engine):
    """A finished row frees its slot; the next joiner (shorter or longer source) is written
    into it without growing the batch, and every sequence still gets its tokens alone."""
    backend, tok = engine
    texts = [*SOURCES, ">>fr<< 1999-12-31 2024-07-01 1234567", ">>en<< 3"]
    lengths = [3, 9, 5, 12, 4, 7, 6]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    expected = [alone(engine, t, p) for t, p in zip(texts, params, strict=True)]
    batch = DecodeBatch(backend, tok)
    seqs = [batch.new_sequence(source_ids(tok, t), p) for t, p in zip(texts, params, strict=True)]
    batch.add(seqs[:3])
    waiting = seqs[3:]
    widths = []
    while len(batch) or waiting:
        freed = len(batch.slots) - len(batch)
        if waiting and freed:
            batch.add([waiting.pop(0)])
            assert len(batch.slots) == 3, "a joiner took a new slot while one was free"
        widths.append(batch.enc_mask.shape[1])
        batch.step()
    for seq, want in zip(seqs, expected, strict=True):
        assert seq.generated == want
    assert max(widths) > min(widths), "no joiner had a longer source than the batch"
    assert batch.slots == [] and batch.dec_mask.shape[0] == 0  # idle: nothing kept


def test_a_batch_that_starts_empty_takes_the_encoders_arrays_and_later_joiners_are_copied(
    engine,
):
    """Rows that start an empty batch bring their cross-attention keys/values as the encoder
    made them (no copy); a later joiner is copied into the batch's arrays, and every row
    still gets its tokens alone."""
    backend, tok = engine
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    batch = DecodeBatch(backend, tok)
    first = [batch.new_sequence(source_ids(tok, t), params) for t in SOURCES[:2]]
    ids, mask = pad_rows([s.source_ids for s in first], backend.config.pad_token_id)
    encoded = backend.encode(ids, mask)
    batch.prefill(first, encoded.cross, mask)
    assert all(held is made for held, made in zip(batch.cross, encoded.cross, strict=True))
    batch.step()
    later = batch.new_sequence(source_ids(tok, SOURCES[3]), params)  # a longer source
    batch.add([later])
    assert all(held is not made for held, made in zip(batch.cross, encoded.cross, strict=True))
    while len(batch):
        batch.step()
    for seq, text in zip([*first, later], [*SOURCES[:2], SOURCES[3]], strict=True):
        assert seq.generated == alone(engine, text, params), text


def test_a_slot_left_free_is_compacted_away(engine):
    backend, tok = engine
    batch = DecodeBatch(backend, tok)
    short = batch.new_sequence(
        source_ids(tok, SOURCES[0]), SamplingParams(max_new_tokens=2, ignore_eos=True)
    )
    long = batch.new_sequence(
        source_ids(tok, SOURCES[1]), SamplingParams(max_new_tokens=20, ignore_eos=True)
    )
    batch.add([short, long])
    batch.step()
    assert len(batch) == 1 and len(batch.slots) == 2  # freed, kept for a joiner
    for _ in range(REUSE_STEPS + 1):
        batch.step()
    assert batch.slots == [long] and batch.past[0].shape[0] == 1
    # Holes the finished row left behind are cut too: the long row's columns and the room
    # for the steps to come remain.
    assert batch.dec_mask.sum() == len(long.generated)
    assert batch.dec_mask.shape[1] <= len(long.generated) + 1 + BUFFER_HEADROOM


def test_cancel_frees_the_row_and_spares_the_others(engine):
    backend, tok = engine
    params = SamplingParams(max_new_tokens=16)
    expected = alone(engine, SOURCES[0], params)
    batch = DecodeBatch(backend, tok)
    keep = batch.new_sequence(source_ids(tok, SOURCES[0]), params)
    drop = batch.new_sequence(source_ids(tok, SOURCES[1]), params)
    batch.add([drop, keep])
    batch.step()
    assert batch.cancel(drop.id)
    assert not batch.cancel(drop.id)
    assert [s.id for s in batch.rows] == [keep.id]
    while len(batch):
        batch.step()
    assert keep.generated == expected


def test_rows_behind_a_freed_slot_keep_their_tokens_logprobs_and_samples(engine):
    """A step reads each live row's logits at its own slot, with a free slot ahead of it:
    greedy tokens and their log-probabilities, and a seeded sample, equal alone."""
    backend, tok = engine
    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=10, do_sample=True, seed=7, ignore_eos=True)
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    cases = [(SOURCES[1], short), (SOURCES[0], greedy), (SOURCES[2], sampled)]

    def run(rows: list[tuple[str, SamplingParams]]) -> list[Sequence]:
        batch = DecodeBatch(backend, tok)
        return run_to_completion(
            batch, [batch.new_sequence(source_ids(tok, t), p) for t, p in rows]
        )

    together = run(cases)
    # Slot 0 is free from step 3 until the batch compacts it, REUSE_STEPS steps later.
    assert len(together[0].generated) == 2 and REUSE_STEPS < 8
    for seq, case in zip(together[1:], cases[1:], strict=True):
        (want,) = run([case])
        assert seq.generated == want.generated
        np.testing.assert_allclose(seq.logprobs, want.logprobs, atol=1e-5)


def test_sampling_is_seeded(engine):
    params = SamplingParams(
        max_new_tokens=12, do_sample=True, temperature=8.0, top_k=50, top_p=0.99, seed=3
    )
    a, b = alone(engine, SOURCES[1], params), alone(engine, SOURCES[1], params)
    assert a == b
    others = [
        alone(engine, SOURCES[1], SamplingParams(**{**params.__dict__, "seed": s}))
        for s in range(6)
    ]
    assert any(o != a for o in others)


def test_top_k_of_one_is_greedy(engine):
    greedy = alone(engine, SOURCES[3], SamplingParams(max_new_tokens=12))
    sampled = alone(
        engine, SOURCES[3], SamplingParams(max_new_tokens=12, do_sample=True, top_k=1, seed=9)
    )
    assert sampled == greedy


def test_beam_search_equals_the_pytorch_reference(engine, reference):
    backend, tok = engine
    model, _ = reference
    for text in SOURCES[:3]:
        ids = source_ids(tok, text)
        got = beam_search(backend, tok, ids, SamplingParams(max_new_tokens=12, num_beams=3))
        t = torch.tensor([ids])
        (expected,) = generate(
            model, t, torch.ones_like(t), GenerationConfig(max_new_tokens=12, num_beams=3)
        )
        assert got.generated == expected
        one = beam_search(backend, tok, ids, SamplingParams(max_new_tokens=12, num_beams=1))
        assert one.generated == alone(engine, text, SamplingParams(max_new_tokens=12))


def test_stop_string_cuts_the_text(engine):
    backend, tok = engine
    # The random model's output for some sources is all special tokens; take one with text.
    outputs = {s: tok.decode(alone(engine, s, SamplingParams(max_new_tokens=20))) for s in SOURCES}
    source, full = max(outputs.items(), key=lambda item: len(item[1]))
    assert len(full) >= 4
    stop = full[2:4]
    batch = DecodeBatch(backend, tok)
    seq = batch.new_sequence(
        source_ids(tok, source), SamplingParams(max_new_tokens=20, stop=(stop,))
    )
    pieces = [e.text for e in batch.add([seq])]  # the first token comes with joining
    while len(batch):
        pieces += [e.text for e in batch.step()]
    assert seq.finish_reason == FINISH_STOP
    assert "".join(pieces) == seq.text == full[: full.index(stop)]


def test_streamed_pieces_equal_the_final_text(engine):
    backend, tok = engine
    batch = DecodeBatch(backend, tok)
    seqs = [
        batch.new_sequence(source_ids(tok, s), SamplingParams(max_new_tokens=24)) for s in SOURCES
    ]
    pieces: dict[int, list[str]] = {s.id: [] for s in seqs}
    finished = {}
    events = batch.add(seqs)  # the first tokens come with joining
    while events:
        for event in events:
            pieces[event.seq_id].append(event.text)
            assert np.isfinite(event.logprob) and event.logprob <= 0
            if event.finish_reason:
                finished[event.seq_id] = event.finish_reason
        events = batch.step()
    for s in seqs:
        assert "".join(pieces[s.id]) == s.text == tok.decode(s.generated, skip_special_tokens=True)
        assert finished[s.id] == s.finish_reason


def test_int8_graphs_generate(tiny_bundle):
    bundle = load_bundle(tiny_bundle, quantized=True)
    batch = DecodeBatch(OnnxBackend(bundle), bundle.tokenizer)
    (seq,) = run_to_completion(
        batch,
        [
            batch.new_sequence(
                bundle.tokenizer.encode(SOURCES[0]).ids, SamplingParams(max_new_tokens=8)
            )
        ],
    )
    assert 0 < len(seq.generated) <= 8


def test_tiny_temperature_samples_greedily(engine):
    greedy = alone(engine, SOURCES[1], SamplingParams(max_new_tokens=12))
    tiny = SamplingParams(max_new_tokens=12, do_sample=True, temperature=5e-324, seed=1)
    assert not tiny.sampling
    assert alone(engine, SOURCES[1], tiny) == greedy


def test_the_shipped_log_softmax_graph_is_the_one_the_exporter_builds():
    from importlib import resources

    shipped = resources.files("seq2serve.engine").joinpath("log_softmax.onnx").read_bytes()
    assert shipped == log_softmax_model().SerializeToString(), (
        "seq2serve/engine/log_softmax.onnx is stale: rewrite it from "
        "seq2serve.export.graphs.log_softmax_model()"
    )


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_onnxruntime_log_softmax_equals_numpys(rows):
    rng = np.random.default_rng(rows)
    logits = (rng.standard_normal((rows, 5003)) * rng.uniform(0.1, 40, (rows, 1))).astype(
        np.float32
    )
    logits[0, :7] = 80.0  # ties at the top, far above the rest
    got = log_softmax_rows()(logits)
    assert got.shape == logits.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, log_softmax(logits.astype(np.float64)), rtol=1e-5, atol=1e-4)
    assert got.max() <= 1e-6


# -- steps over cache buffers written in place ---------------------------------------------


def _without_step_graph(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` as exported before decoder_step.onnx existed."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / contract.MANIFEST_FILE).read_text())
    for quantized in (False, True):
        name = contract.onnx_file(contract.DECODER_STEP_FILE, quantized)
        (out / name).unlink()
        del manifest["files"][name]
    (out / contract.MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def copying_engine(tiny_bundle, tmp_path_factory):
    bundle = load_bundle(_without_step_graph(tiny_bundle, tmp_path_factory.mktemp("old") / "b"))
    backend = OnnxBackend(bundle)
    assert bundle.step is None and not backend.steps_in_place
    return backend, bundle.tokenizer


TEXTS = [*SOURCES, ">>fr<< 1999-12-31 2024-07-01 1234567", ">>en<< 3", ">>de<< 42"]

# A request of a schedule: (text, max_new_tokens, step it arrives at, step it is cancelled at
# or None).
REQUEST = st.tuples(
    st.integers(0, len(TEXTS) - 1),
    st.integers(1, 24),
    st.integers(0, 30),
    st.one_of(st.none(), st.integers(0, 40)),
)


def _run_schedule(
    engine,
    schedule: list[tuple[int, int, int, int | None]],
    ignore_eos: bool = False,
    watch: Callable[[DecodeBatch, np.ndarray], None] | None = None,
) -> tuple[list, DecodeBatch]:
    """Requests joining, leaving and cancelled at the schedule's steps, until every one has
    finished or been cancelled; ``watch(batch, given)`` after each step, ``given`` being the
    first cache array the step was handed. Returns the sequences and the batch."""
    backend, tok = engine
    batch = DecodeBatch(backend, tok)
    seqs = [
        batch.new_sequence(
            source_ids(tok, TEXTS[t]), SamplingParams(max_new_tokens=n, ignore_eos=ignore_eos)
        )
        for t, n, _, _ in schedule
    ]
    step, pending = 0, list(range(len(schedule)))
    while pending or len(batch):
        joining = [i for i in pending if schedule[i][2] <= step]
        if joining:
            batch.add([seqs[i] for i in joining])
            pending = [i for i in pending if i not in joining]
        for i, (_, _, _, cancel_at) in enumerate(schedule):
            if cancel_at == step and seqs[i].finish_reason is None:
                batch.cancel(seqs[i].id)
        given = batch.past[0]
        batch.step()
        if watch is not None:
            watch(batch, given)
        step += 1
        assert step < 200
    return seqs, batch


def _traffic(
    engine,
) -> tuple[list, list[dict[int, list[np.ndarray]]], set[int], int, DecodeBatch]:
    """Sequences joining every other step (one with a longer source), finishing at different
    lengths: slots freed and reused, a slot compacted away, the cache's columns reused or
    cut. Returns the sequences, each step's cache of every live row (``row_cache``, by
    sequence id), the ids of the buffers the steps wrote, how many steps wrapped round to
    column 0 of the buffers they were given, and the batch."""
    lengths = [5, 14, 3, 9, 4, 11, 2, 6]
    caches: list[dict[int, list[np.ndarray]]] = []
    buffers: set[int] = set()
    wraps = 0

    def watch(batch: DecodeBatch, given: np.ndarray) -> None:
        nonlocal wraps
        caches.append(
            {s.id: batch.row_cache(i) for i, s in enumerate(batch.slots) if s is not None}
        )
        wraps += given.size > 0 and batch.past[0] is given and batch.next_column == 1
        buffers.update(id(b) for b in batch.past)

    schedule = [(i, n, 2 * i, None) for i, n in enumerate(lengths)]
    seqs, batch = _run_schedule(engine, schedule, ignore_eos=True, watch=watch)
    return seqs, caches, buffers, wraps, batch


def test_steps_in_place_equal_steps_over_copied_caches(engine, copying_engine):
    backend, _ = engine
    assert backend.steps_in_place
    seqs, caches, buffers, wraps, batch = _traffic(engine)
    seqs_c, caches_c, _, _, _ = _traffic(copying_engine)
    for seq, other in zip(seqs, seqs_c, strict=True):
        assert seq.generated == other.generated
        np.testing.assert_allclose(seq.logprobs, other.logprobs, atol=1e-5)
    assert len(caches) == len(caches_c)
    ids = {s.id: o.id for s, o in zip(seqs, seqs_c, strict=True)}
    for step, (rows, rows_c) in enumerate(zip(caches, caches_c, strict=True)):
        assert {ids[i] for i in rows} == set(rows_c), f"step {step}"
        for seq_id, cache in rows.items():
            for x, y in zip(cache, rows_c[ids[seq_id]], strict=True):
                assert x.shape == y.shape, f"step {step}"
                np.testing.assert_allclose(x, y, atol=1e-5, err_msg=f"step {step}")
    # The steps wrote into buffers they kept, round the ring: new ones only when rows were
    # appended or compacted or the ring grew or shrank, not one per step.
    assert wraps > 0
    assert len(buffers) <= len(caches) // 2 * len(batch.past), (len(buffers), len(caches))
    # Idle: neither the batch nor its binding to the step graph holds a buffer (an empty
    # view of one would keep it alive).
    assert batch._binding is None
    assert all(a.size == 0 and a.base is None for a in [*batch.past, batch.dec_mask])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(REQUEST, min_size=1, max_size=8))
def test_any_schedule_gives_the_ring_the_copied_caches_tokens(engine, copying_engine, schedule):
    """Whatever joins, finishes and is cancelled when, steps over the ring (wrapping,
    growing, shrinking, compacted) give each request the tokens and log-probabilities that
    steps over caches copied every step give it."""
    ring, _ = _run_schedule(engine, schedule)
    copied, _ = _run_schedule(copying_engine, schedule)
    for a, b in zip(ring, copied, strict=True):
        assert a.generated == b.generated
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_unseeded_samples_differ_and_greedy_rows_make_no_generator(engine):
    backend, tok = engine
    batch = DecodeBatch(backend, tok)
    ids = source_ids(tok, SOURCES[0])
    sampled = SamplingParams(max_new_tokens=16, ignore_eos=True, do_sample=True, temperature=2.0)
    seqs = [batch.new_sequence(ids, sampled) for _ in range(2)]
    greedy = batch.new_sequence(ids, SamplingParams(max_new_tokens=16, ignore_eos=True))
    run_to_completion(batch, [*seqs, greedy])
    # Each unseeded request has a stream of its own (16 draws over a flat distribution).
    assert seqs[0].generated != seqs[1].generated
    assert greedy._rng is None


def test_the_ring_doubles_up_to_the_widest_row_and_no_further(engine):
    backend, tok = engine
    batch = DecodeBatch(backend, tok)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    seqs = [batch.new_sequence(source_ids(tok, s), params) for s in SOURCES[:3]]
    batch.add(seqs)
    widths = []
    while len(batch):
        widths.append(batch.dec_mask.shape[1])
        batch.step()
    assert all(len(s.generated) == 40 for s in seqs)
    first = 1 + BUFFER_HEADROOM
    assert sorted(set(widths)) == [first, 2 * first, 40 + 1]


def test_generation_runs_on_the_step_graph_alone(tiny_bundle):
    """With decoder_step.onnx, first tokens, steps and beam search never open decoder.onnx
    (a second session would hold a second packed copy of the decoder's weights); a call of
    several new tokens a row opens it, and agrees."""
    bundle = load_bundle(tiny_bundle)
    backend = OnnxBackend(bundle)
    batch = DecodeBatch(backend, bundle.tokenizer)
    params = SamplingParams(max_new_tokens=8)
    run_to_completion(
        batch, [batch.new_sequence(source_ids(bundle.tokenizer, s), params) for s in SOURCES]
    )
    ids = source_ids(bundle.tokenizer, SOURCES[0])
    beam_search(backend, bundle.tokenizer, ids, SamplingParams(max_new_tokens=6, num_beams=3))
    assert bundle.open_decoder.cache_info().currsize == 0  # type: ignore[attr-defined]

    cfg = bundle.config
    src = np.asarray([ids])
    cross = backend.encode(src, np.ones_like(src)).cross
    empty = [np.zeros((1, cfg.n_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.n_decoder_layers)
    tokens = np.asarray([[cfg.decoder_start_token_id, 40, 41]])
    positions = np.arange(3)[None]
    both = backend.decode(
        tokens, positions, np.ones((1, 3), np.int64), np.ones_like(src), empty, cross
    )
    assert bundle.open_decoder.cache_info().currsize == 1  # type: ignore[attr-defined]
    past = empty
    for i in range(3):  # the same tokens one at a time, through the step graph
        one = backend.decode(
            tokens[:, i : i + 1],
            positions[:, i : i + 1],
            np.ones((1, i + 1), np.int64),
            np.ones_like(src),
            past,
            cross,
        )
        np.testing.assert_allclose(one.logits[:, 0], both.logits[:, i], atol=1e-5)
        past = one.present
    for a, b in zip(past, both.present, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_remaking_the_batch_arrays_frees_each_old_one_as_its_replacement_is_made(
    engine, monkeypatch
):
    """When rows join with no free slot, the ring grows, or free slots are compacted away,
    the batch's cache and cross-attention arrays are replaced one by one, each old array
    gone by the time the next replacement is made: no call holds the old arrays and their
    replacements all at once (for 16 opus-mt-sized rows, 26 MB more for the ring)."""
    backend, tok = engine
    alive: list[list[int]] = []  # per remake: the old arrays alive as each new one is made

    def watched(arrays: list[np.ndarray], make: Callable[[np.ndarray], np.ndarray]):
        refs = [weakref.ref(a) for a in arrays]
        counts: list[int] = []
        alive.append(counts)

        def made(a: np.ndarray) -> np.ndarray:
            counts.append(sum(r() is not None for r in refs))
            return make(a)

        return remade(arrays, made)

    monkeypatch.setattr(generation, "remade", watched)
    batch = DecodeBatch(backend, tok)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    batch.add([batch.new_sequence(source_ids(tok, s), params) for s in SOURCES[:3]])
    for step in range(40):
        if step in (5, 20):  # joiners with no free slot: every array gets rows more
            late = SamplingParams(max_new_tokens=6, ignore_eos=True)
            batch.add([batch.new_sequence(source_ids(tok, s), late) for s in SOURCES[3:]])
        batch.step()
    # Two joins appended rows (cache and cross arrays each), the ring grew, and the slots
    # the joiners left were compacted away.
    assert len(alive) >= 8, alive
    n = 2 * backend.config.n_decoder_layers
    assert [c for c in alive if c != list(range(n, 0, -1))] == []
