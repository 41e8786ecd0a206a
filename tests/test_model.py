"""The model's contract: masks as properties, cache == recomputation, padding invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2serve.config import ConfigError, ModelConfig
from seq2serve.model.cache import KVCache
from seq2serve.model.generate import GenerationConfig, generate
from seq2serve.model.transformer import Transformer, causal_mask, padding_mask

VOCAB = 40


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        max_source_positions=32,
        max_target_positions=32,
        dropout=0.0,
        id2label={0: "a", 1: "b", 2: "c"},
    )
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    # Random, non-zero biases so tests exercise every parameter (init sets them to zero).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


CONFIGS = {
    "pre-norm sinusoidal": tiny_config(),
    "post-norm learned (BART-like)": tiny_config(
        norm_first=False,
        positions="learned",
        position_offset=2,
        scale_embedding=False,
        embedding_norm=True,
        activation="gelu",
    ),
    "post-norm sinusoidal (Marian-like)": tiny_config(
        norm_first=False, activation="silu", final_logits_bias=True, decoder_start_token_id=0
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def model(request) -> Transformer:
    return build(CONFIGS[request.param])


def random_ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (b, t), generator=g)


def full_decoder_logits(model, src, src_mask, tgt, tgt_mask=None):
    tgt_mask = torch.ones_like(tgt) if tgt_mask is None else tgt_mask
    return model(src, src_mask, tgt, tgt_mask).logits


# --- masks ------------------------------------------------------------------------------


def test_mask_shapes_and_convention():
    m = padding_mask(torch.tensor([[1, 1, 0]]))
    assert m.shape == (1, 1, 1, 3) and m.dtype == torch.bool
    assert m[0, 0, 0].tolist() == [True, True, False]
    c = causal_mask(torch.ones(1, 4, dtype=torch.long), 4)[0, 0]
    assert torch.equal(c, torch.ones(4, 4, dtype=torch.bool).tril())
    # With 2 cached positions and 2 new ones, the new tokens see the whole past.
    c = causal_mask(torch.tensor([[0, 1, 1, 1]]), 2)[0, 0]
    assert c.tolist() == [[False, True, True, False], [False, True, True, True]]


@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.integers(0, 1), min_size=1, max_size=12), data=st.data())
def test_causal_mask_is_real_keys_up_to_the_query_and_never_an_empty_row(bits, data):
    new = data.draw(st.integers(1, len(bits)))
    mask = torch.tensor([bits])
    c = causal_mask(mask, new)[0, 0]
    past = len(bits) - new
    for j in range(new):
        want = [bool(bits[k]) and k <= past + j for k in range(len(bits))]
        # A query with no real key up to its place sees every key (softmax stays finite).
        assert c[j].tolist() == (want if any(want) else [True] * len(bits))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(0, 7), new_token=st.integers(4, VOCAB - 1), seed=st.integers(0, 10_000))
def test_decoder_position_sees_only_the_past(model, k, new_token, seed):
    src = random_ids(2, 6, seed)
    src_mask = torch.ones_like(src)
    tgt = random_ids(2, 8, seed + 1)
    changed = tgt.clone()
    changed[:, k] = new_token if new_token != tgt[0, k] else (new_token % (VOCAB - 4)) + 4
    with torch.no_grad():
        before = full_decoder_logits(model, src, src_mask, tgt)
        after = full_decoder_logits(model, src, src_mask, changed)
    assert torch.equal(before[:, :k], after[:, :k]), "an earlier position saw a later token"
    assert not torch.allclose(before[0, k:], after[0, k:]), "the changed token had no effect"
    for later in range(k, 8):
        assert not torch.equal(before[0, later], after[0, later])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_encoder_sees_left_and_right(model, seed):
    src = random_ids(1, 7, seed)
    changed = src.clone()
    changed[0, -1] = 4 if src[0, -1] != 4 else 5
    mask = torch.ones_like(src)
    with torch.no_grad():
        a, b = model.encode(src, mask), model.encode(changed, mask)
    assert not torch.allclose(a[0, 0], b[0, 0]), "position 0 did not see the last token"


def test_padding_leaves_real_positions_unchanged(model):
    src = random_ids(1, 5)
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    tgt = random_ids(1, 4, 1)
    padded_tgt = torch.cat([tgt, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model.encode(src, torch.ones_like(src))
        with_pad = model.encode(padded, mask)
        torch.testing.assert_close(with_pad[:, :5], alone, atol=1e-5, rtol=0)
        ref = full_decoder_logits(model, src, torch.ones_like(src), tgt)
        got = full_decoder_logits(
            model, padded, mask, padded_tgt, torch.tensor([[1, 1, 1, 1, 0, 0]])
        )
    torch.testing.assert_close(got[:, :4], ref, atol=1e-5, rtol=0)


def test_fast_and_reference_attention_agree(model):
    src = random_ids(3, 9)
    src_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    tgt = random_ids(3, 6, 2)
    tgt_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6])
    with torch.no_grad():
        fast = model(src, src_mask, tgt, tgt_mask)
        model.use_reference_attention()
        try:
            ref = model(src, src_mask, tgt, tgt_mask)
        finally:
            model.use_reference_attention(False)
    torch.testing.assert_close(fast.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.class_logits, ref.class_logits, atol=1e-5, rtol=0)


# --- the cache --------------------------------------------------------------------------


def decode_stepwise(model, src, src_mask, tgt, prefill: int = 1):
    """Logits for tgt fed through the cache: a prefill of ``prefill`` tokens, then 1 a step."""
    b, t = tgt.shape
    hidden = model.encode(src, src_mask)
    cross = model.cross_kv(hidden)
    cache = KVCache.empty(model.cfg, b, device=tgt.device)
    out, start = [], 0
    for stop in [prefill, *range(prefill + 1, t + 1)]:
        positions = torch.arange(start, stop, device=tgt.device).expand(b, -1)
        logits = model.decode(
            tgt[:, start:stop],
            positions,
            torch.ones(b, stop, dtype=torch.long, device=tgt.device),
            cache,
            cross,
            src_mask,
        )
        out.append(logits)
        start = stop
    assert cache.length == t
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("prefill", [1, 4])
def test_cached_decoding_equals_full_recomputation(model, prefill):
    src = random_ids(3, 8)
    src_mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5, [1] * 6 + [0] * 2])
    tgt = random_ids(3, 10, 3)
    with torch.no_grad():
        full = full_decoder_logits(model, src, src_mask, tgt)
        cached = decode_stepwise(model, src, src_mask, tgt, prefill)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_rows_with_different_numbers_of_real_tokens(model):
    """A row that joined two steps later carries two masked holes in its cache; its logits
    equal those it gets alone, and the other row is unaffected."""
    src = random_ids(2, 6)
    src_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    tgt = random_ids(2, 6, 4)
    with torch.no_grad():
        alone = [
            full_decoder_logits(model, src[i : i + 1], src_mask[i : i + 1], tgt[i : i + 1])
            for i in range(2)
        ]
        hidden = model.encode(src, src_mask)
        cross = model.cross_kv(hidden)
        cache = KVCache.empty(model.cfg, 2)
        mask_cols, logits_b = [], []
        for step in range(6):
            # Row 1 joins at step 2: its first two cache slots are holes (mask 0).
            row1_pos = max(step - 2, 0)
            mask_cols.append(torch.tensor([1, int(step >= 2)]))
            ids = torch.stack([tgt[0, step], tgt[1, row1_pos]])[:, None]
            positions = torch.tensor([[step], [row1_pos]])
            logits = model.decode(ids, positions, torch.stack(mask_cols, 1), cache, cross, src_mask)
            torch.testing.assert_close(logits[0], alone[0][0, step : step + 1], atol=1e-5, rtol=0)
            if step >= 2:
                logits_b.append(logits[1])
    torch.testing.assert_close(torch.cat(logits_b), alone[1][0, :4], atol=1e-5, rtol=0)


# --- heads and generation ---------------------------------------------------------------


def test_classification_ignores_padding(model):
    src = random_ids(1, 5)
    padded = torch.cat([src, random_ids(1, 4, 9)], dim=1)  # junk tokens behind the mask
    mask = torch.tensor([[1] * 5 + [0] * 4])
    with torch.no_grad():
        a = model.classify(model.encode(src, torch.ones_like(src)), torch.ones_like(src))
        b = model.classify(model.encode(padded, mask), mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert a.shape == (1, 3)


def greedy_by_recomputation(model, src, src_mask, n):
    tgt = torch.full((1, 1), model.cfg.decoder_start_token_id)
    for _ in range(n):
        nxt = full_decoder_logits(model, src, src_mask, tgt)[:, -1].argmax(-1, keepdim=True)
        tgt = torch.cat([tgt, nxt], dim=1)
        if nxt.item() == model.cfg.eos_token_id:
            break
    return tgt[0, 1:].tolist()


def test_greedy_generation_equals_recomputation_and_beam_of_one(model):
    src = random_ids(2, 7)
    src_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    cfg = GenerationConfig(max_new_tokens=12)
    got = generate(model, src, src_mask, cfg)
    for i in range(2):
        n = int(src_mask[i].sum())
        with torch.no_grad():
            assert got[i] == greedy_by_recomputation(
                model, src[i : i + 1, :n], src_mask[i : i + 1, :n], 12
            )
    beam1 = generate(model, src, src_mask, GenerationConfig(max_new_tokens=12, num_beams=1))
    assert beam1 == got
    beams = generate(model, src, src_mask, GenerationConfig(max_new_tokens=12, num_beams=3))
    assert [len(b) for b in beams] and all(0 < len(b) <= 12 for b in beams)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(model):
    src = random_ids(1, 6, 5)
    mask = torch.ones_like(src)

    def logprob(ids):
        tgt = torch.tensor([[model.cfg.decoder_start_token_id, *ids[:-1]]])
        with torch.no_grad():
            lp = full_decoder_logits(model, src, mask, tgt).log_softmax(-1)
        return lp[0, torch.arange(len(ids)), torch.tensor(ids)].sum().item()

    cfg = GenerationConfig(max_new_tokens=6, length_penalty=0.0)
    greedy = generate(model, src, mask, cfg)[0]
    beam = generate(
        model, src, mask, GenerationConfig(max_new_tokens=6, num_beams=4, length_penalty=0.0)
    )[0]
    if len(beam) == len(greedy):
        assert logprob(beam) >= logprob(greedy) - 1e-5


def test_sampling_is_deterministic_under_a_seed(model):
    src = random_ids(2, 5)
    mask = torch.ones_like(src)
    cfg = GenerationConfig(
        max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, seed=7
    )
    a, b = generate(model, src, mask, cfg), generate(model, src, mask, cfg)
    assert a == b
    others = [
        generate(model, src, mask, GenerationConfig(**{**cfg.__dict__, "seed": s}))
        for s in range(5)
    ]
    assert any(o != a for o in others), "the seed had no effect"


def test_repetition_penalty_discourages_repeats(model):
    src = random_ids(1, 5)
    mask = torch.ones_like(src)
    plain = generate(model, src, mask, GenerationConfig(max_new_tokens=16))[0]
    penalized = generate(
        model, src, mask, GenerationConfig(max_new_tokens=16, repetition_penalty=100.0)
    )[0]
    body = [t for t in penalized if t != model.cfg.eos_token_id]
    assert len(set(body)) == len(body), "a heavily penalized token came back"
    if len(set(plain)) < len(plain):
        assert plain != penalized


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="divisible"):
        tiny_config(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="activation"):
        tiny_config(activation="tanh")
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"vocab_size": 10, "colour": "blue"})
    cfg = tiny_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
