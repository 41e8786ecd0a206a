"""Parity of a bundle's graphs against the PyTorch model, as figures for the manifest.

Random inputs with padding; every figure is a max absolute difference:
encoder outputs and cross K/V, decoder logits for a prefill, for step-by-step decoding with
past (and with ``decoder_step.onnx`` over cache buffers written in place; with a screened LM
head, also the greedy tokens it picks and their logits), and for a batch whose rows hold
different numbers of real tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.runtime import OnnxBackend, cache_buffers
from seq2serve.model.cache import KV, KVCache
from seq2serve.model.transformer import Transformer


def _max_diff(a: np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a - b).max()) if a.size else 0.0


@torch.no_grad()
def verify_parity(
    model: Transformer, bundle_dir, quantized: bool = False, seed: int = 0
) -> dict[str, float]:
    cfg = model.cfg
    backend = OnnxBackend(load_bundle(bundle_dir, quantized=quantized))
    g = torch.Generator().manual_seed(seed)
    b, s, t = 3, min(11, cfg.max_source_positions), min(7, cfg.max_target_positions)
    src = torch.randint(4, cfg.vocab_size, (b, s), generator=g)
    src_mask = torch.ones(b, s, dtype=torch.long)
    src_mask[1, 6:] = 0
    src_mask[2, 3:] = 0
    src = src.masked_fill(src_mask == 0, cfg.pad_token_id)
    tgt = torch.randint(4, cfg.vocab_size, (b, t), generator=g)
    real = src_mask.bool()[:, :, None].numpy()  # compare real source positions only

    figures: dict[str, float] = {}
    hidden = model.encode(src, src_mask)
    enc = backend.encode(src.numpy(), src_mask.numpy())
    figures["encoder_last_hidden_state"] = _max_diff(
        enc.last_hidden_state * real, hidden * torch.from_numpy(real)
    )
    figures["encoder_pooled"] = _max_diff(enc.pooled, model.pool(hidden, src_mask))
    if model.classifier is not None:
        figures["encoder_class_logits"] = _max_diff(
            enc.class_logits, model.classify(hidden, src_mask)
        )
    cross = model.cross_kv(hidden)
    torch_cross = [x for kv in cross for x in (kv.key, kv.value)]
    figures["encoder_cross_kv"] = max(
        _max_diff(a * real[:, None, :, :], r * torch.from_numpy(real[:, None, :, :]))
        for a, r in zip(enc.cross, torch_cross, strict=True)
    )

    # Prefill: all t tokens at once from an empty past.
    empty = [np.zeros((b, cfg.n_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.n_decoder_layers)
    positions = torch.arange(t).expand(b, t)
    dec_mask = torch.ones(b, t, dtype=torch.long)
    reference = model.decode(tgt, positions, dec_mask, KVCache.empty(cfg, b), cross, src_mask)
    out = backend.decode(
        tgt.numpy(), positions.numpy(), dec_mask.numpy(), src_mask.numpy(), empty, enc.cross
    )
    figures["decoder_prefill_logits"] = _max_diff(out.logits, reference)

    # Step by step with past: the first 3 tokens as a prefill, then one at a time.
    past, worst = empty, 0.0
    for start, stop in [(0, 3), *((i, i + 1) for i in range(3, t))]:
        out = backend.decode(
            tgt[:, start:stop].numpy(),
            positions[:, start:stop].numpy(),
            dec_mask[:, :stop].numpy(),
            src_mask.numpy(),
            past,
            enc.cross,
            exact_logits=True,
        )
        past = out.present
        worst = max(worst, _max_diff(out.logits, reference[:, start:stop]))
    figures["decoder_step_logits"] = worst

    # decoder_step.onnx: the same steps over buffers with room to spare, written in place.
    if backend.bundle.step is not None:
        first = backend.decode(
            tgt[:, :3].numpy(),
            positions[:, :3].numpy(),
            dec_mask[:, :3].numpy(),
            src_mask.numpy(),
            empty,
            enc.cross,
        )
        capacity = t + 4
        buffers = cache_buffers(first.present, b, capacity)
        worst, best_logit, mismatches = 0.0, 0.0, 0
        # The fp32 screen's picks against PyTorch's. The int8 screen's are its int8 head's
        # (tests/test_screen_int8.py), which rounds differently from PyTorch in any case,
        # and it runs at one row, fewer than these.
        check_screen = backend.bundle.screened and not quantized
        binding = backend.bind_step(buffers, enc.cross, src_mask.numpy(), (b, capacity))
        for i in range(3, t):
            mask = np.zeros((b, capacity), np.int64)
            mask[:, : i + 1] = 1
            args = (binding, tgt[:, i : i + 1].numpy(), positions[:, i : i + 1].numpy(), mask, i)
            want = reference[:, i].numpy()  # (B, V)
            if check_screen:
                # The screened head (exact_logits false): the same greedy token and its logit.
                screened = backend.step_in_place(*args)[:, 0]
                picked = screened.argmax(axis=-1)
                mismatches += int((picked != want.argmax(axis=-1)).sum())
                rows = np.arange(b)
                best_logit = max(best_logit, _max_diff(screened[rows, picked], want[rows, picked]))
            logits = backend.step_in_place(*args, exact_logits=True)  # rewrites the same column
            worst = max(worst, _max_diff(logits[:, 0], want))
        figures["decoder_step_in_place_logits"] = worst
        if check_screen:
            figures["decoder_step_screened_argmax_mismatches"] = mismatches
            figures["decoder_step_screened_best_logit"] = best_logit

    # Ragged rows: row 1 joined 2 steps late (two masked holes), row 2 is right-padded.
    ragged_mask = dec_mask.clone()
    ragged_mask[1, :2] = 0
    ragged_mask[2, 5:] = 0
    ragged_pos = positions.clone()
    ragged_pos[1] = (torch.arange(t) - 2).clamp(min=0)
    ref_rows = []
    for i in range(b):
        keep = ragged_mask[i].bool()
        ids, pos = tgt[i : i + 1, keep], ragged_pos[i : i + 1, keep]
        ones = torch.ones_like(ids)
        alone_cross = [KV(kv.key[i : i + 1], kv.value[i : i + 1]) for kv in cross]
        ref_rows.append(
            (
                keep,
                model.decode(
                    ids, pos, ones, KVCache.empty(cfg, 1), alone_cross, src_mask[i : i + 1]
                ),
            )
        )
    out = backend.decode(
        tgt.numpy(), ragged_pos.numpy(), ragged_mask.numpy(), src_mask.numpy(), empty, enc.cross
    )
    figures["decoder_ragged_logits"] = max(
        _max_diff(out.logits[i, keep.numpy()], ref[0]) for i, (keep, ref) in enumerate(ref_rows)
    )
    figures["max"] = max(figures.values())
    return {k: float(f"{v:.3g}") for k, v in figures.items()}
