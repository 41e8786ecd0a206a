"""Reference generation with the KV cache: greedy, sampling and beam search.

This is the PyTorch oracle that the onnxruntime engine is checked against; it favours
clarity over speed. Each step feeds one new token per row; the encoder runs once and
cross-attention keys/values are computed once per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seq2serve.model.cache import KV, KVCache
from seq2serve.model.transformer import Transformer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1.0 = no nucleus cut
    repetition_penalty: float = 1.0  # CTRL-style: > 1 discourages tokens already generated
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are sum(logprob) / length ** length_penalty
    seed: int | None = None


def process_logits(logits: Tensor, history: Tensor, cfg: GenerationConfig) -> Tensor:
    """Repetition penalty, then temperature, top-k and top-p; (B, V) -> (B, V).

    ``history`` (B, N) holds each row's generated ids so far. Cut-off tokens become -inf.
    """
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and history.shape[1]:
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - ordered.softmax(dim=-1)) >= cfg.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


class _Decoding:
    """The state one generation carries between steps: encoder K/V, self-attention cache."""

    def __init__(self, model: Transformer, input_ids: Tensor, attention_mask: Tensor) -> None:
        self.model = model
        hidden = model.encode(input_ids, attention_mask)
        self.cross: list[KV] = model.cross_kv(hidden)
        self.encoder_attention_mask = attention_mask
        b = input_ids.shape[0]
        self.cache = KVCache.empty(model.cfg, b, device=input_ids.device, dtype=hidden.dtype)
        self.decoder_attention_mask = torch.zeros(b, 0, dtype=torch.long, device=input_ids.device)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (B,) and return next-token logits (B, V)."""
        b = tokens.shape[0]
        position = self.cache.length
        self.decoder_attention_mask = torch.cat(
            [self.decoder_attention_mask, self.decoder_attention_mask.new_ones(b, 1)], dim=1
        )
        positions = torch.full((b, 1), position, dtype=torch.long, device=tokens.device)
        logits = self.model.decode(
            tokens[:, None],
            positions,
            self.decoder_attention_mask,
            self.cache,
            self.cross,
            self.encoder_attention_mask,
        )
        return logits[:, -1]

    def select(self, rows: Tensor) -> None:
        self.cache = self.cache.select(rows)
        self.cross = [KV(kv.key[rows], kv.value[rows]) for kv in self.cross]
        self.encoder_attention_mask = self.encoder_attention_mask[rows]
        self.decoder_attention_mask = self.decoder_attention_mask[rows]


@torch.no_grad()
def generate(
    model: Transformer, input_ids: Tensor, attention_mask: Tensor, cfg: GenerationConfig
) -> list[list[int]]:
    """Generated ids per row, ending with EOS when the model produced it."""
    if cfg.num_beams > 1:
        return [
            _beam_search(model, input_ids[i : i + 1], attention_mask[i : i + 1], cfg)
            for i in range(input_ids.shape[0])
        ]
    return _sample(model, input_ids, attention_mask, cfg)


def _sample(
    model: Transformer, input_ids: Tensor, attention_mask: Tensor, cfg: GenerationConfig
) -> list[list[int]]:
    mc = model.cfg
    b = input_ids.shape[0]
    generator = torch.Generator(device=input_ids.device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    state = _Decoding(model, input_ids, attention_mask)
    tokens = torch.full((b,), mc.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    history = torch.zeros(b, 0, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for _ in range(cfg.max_new_tokens):
        logits = process_logits(state.step(tokens), history, cfg)
        if cfg.do_sample:
            tokens = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
        else:
            tokens = logits.argmax(dim=-1)
        tokens = tokens.masked_fill(done, mc.pad_token_id)
        history = torch.cat([history, tokens[:, None]], dim=1)
        done |= tokens == mc.eos_token_id
        if done.all():
            break
    return [_until_eos(row, mc.eos_token_id) for row in history.tolist()]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _beam_search(
    model: Transformer, input_ids: Tensor, attention_mask: Tensor, cfg: GenerationConfig
) -> list[int]:
    """Beam search for one source row: K live beams, finished hypotheses ranked by
    sum(logprob) / length ** length_penalty; stops when no live beam can beat the worst kept
    finished hypothesis."""
    mc, k = model.cfg, cfg.num_beams
    rows = torch.zeros(k, dtype=torch.long, device=input_ids.device)
    state = _Decoding(model, input_ids, attention_mask)
    state.select(rows)  # K copies of the one source row
    beams = [[] for _ in range(k)]  # type: list[list[int]]
    scores = torch.full((k,), float("-inf"), device=input_ids.device)
    scores[0] = 0.0  # identical beams at the start: only the first may expand
    tokens = torch.full((k,), mc.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    finished: list[tuple[float, list[int]]] = []

    def normalized(score: float, length: int) -> float:
        return score / length**cfg.length_penalty

    for step in range(cfg.max_new_tokens):
        history = torch.tensor(beams, dtype=torch.long, device=input_ids.device).view(k, step)
        logprobs = process_logits(state.step(tokens), history, cfg).log_softmax(dim=-1)
        candidates = (scores[:, None] + logprobs).view(-1)  # (K * V)
        top_scores, top_index = candidates.topk(2 * k)
        next_beams, next_scores, next_rows, next_tokens = [], [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist(), strict=True):
            beam, token = divmod(index, logprobs.shape[-1])
            if token == mc.eos_token_id:
                finished.append((normalized(score, step + 1), [*beams[beam], token]))
            else:
                next_beams.append([*beams[beam], token])
                next_scores.append(score)
                next_rows.append(beam)
                next_tokens.append(token)
            if len(next_beams) == k:
                break
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:k]
        if len(finished) == k and normalized(max(next_scores), step + 1) <= finished[-1][0]:
            break
        beams = next_beams
        scores = torch.tensor(next_scores, device=input_ids.device)
        tokens = torch.tensor(next_tokens, dtype=torch.long, device=input_ids.device)
        state.select(torch.tensor(next_rows, device=input_ids.device))
    else:
        finished += [
            (normalized(s, len(b)), b) for s, b in zip(scores.tolist(), beams, strict=True)
        ]
    return max(finished, key=lambda f: f[0])[1]
