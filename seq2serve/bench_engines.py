"""One engine's decode figures, measured in a process of its own.

``seq2serve bench`` runs ``python -m seq2serve.bench_engines ENGINE ...`` once per engine, so
that each row's resident memory is that engine's alone and no engine's thread pool (PyTorch
keeps one spinning) competes with the next. The child prints one JSON object: figures per
batch size, and the process's resident memory after decoding (``rss_mb``) and at its peak.

Every engine does the same work: greedy decoding of ``new_tokens`` tokens from the same
random ``source_tokens``-token sources, encoder included, EOS ignored, median over repeats
after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = (
    "onnx fp32",
    "onnx int8",
    "torch cached",
    "torch uncached",
    "transformers (cached)",
    "ctranslate2 fp32",
    "ctranslate2 int8",
)

Figures = dict[str, float]
Decode = Callable[[list[list[int]]], None]


def sources(vocab_size: int, n: int, length: int, eos: int, seed: int = 0) -> list[list[int]]:
    """Random ids of ordinary tokens (ids below 4 and added tags are special), EOS-terminated."""
    rng = np.random.default_rng(seed)
    low = min(64, vocab_size // 2)
    return [[*rng.integers(low, vocab_size, length - 1).tolist(), eos] for _ in range(n)]


def median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialization are not decode speed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def figures(seconds: float, batch_size: int, new_tokens: int) -> Figures:
    return {
        "ms_per_step": round(1000 * seconds / new_tokens, 3),
        "tokens_per_s": round(batch_size * new_tokens / seconds, 1),
    }


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """A process's ``/proc/PID/status`` fields (``VmRSS``, ``VmHWM``, ``Threads``, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def status_mb(fields: dict[str, str], key: str) -> float:
    """A ``kB`` field of ``proc_status`` in MB."""
    return int(fields[key].split()[0]) / 1024


def memory() -> dict[str, float]:
    """This process's resident memory now and at its peak, MB (from /proc). Called by each
    engine's runner after decoding, while its model is still loaded."""
    try:
        fields = proc_status()
    except OSError:
        return {}
    return {"rss_mb": status_mb(fields, "VmRSS"), "peak_rss_mb": status_mb(fields, "VmHWM")}


def _engine_decode(backend: Any, tokenizer: Any, args: argparse.Namespace) -> Decode:
    """Greedy decoding of a batch of sources by the serving engine over ``backend``."""
    from seq2serve.engine.generation import DecodeBatch, SamplingParams, run_to_completion

    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

    def decode(src: list[list[int]]) -> None:
        batch = DecodeBatch(backend, tokenizer)
        run_to_completion(batch, [batch.new_sequence(s, params) for s in src])

    return decode


def _rows(decode: Decode, cfg: Any, repeats: int, args: argparse.Namespace) -> dict[str, Any]:
    """``decode``'s figures per batch size, then the process's memory."""
    rows = {}
    for b in args.batch_sizes:
        src = sources(cfg.vocab_size, b, args.source_tokens, cfg.eos_token_id)
        rows[str(b)] = figures(median_time(partial(decode, src), repeats), b, args.new_tokens)
    return {"rows": rows, **memory()}


def _onnx(model: Path, quantized: bool, args: argparse.Namespace) -> dict[str, Any]:
    from seq2serve.engine.bundle import load_bundle
    from seq2serve.engine.runtime import OnnxBackend

    bundle = load_bundle(model, quantized=quantized, device=args.device, threads=args.threads)
    decode = _engine_decode(OnnxBackend(bundle), bundle.tokenizer, args)
    return _rows(decode, bundle.config, args.repeats, args)


def _torch(model: Path, cached: bool, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from seq2serve.model.backend import TorchBackend
    from seq2serve.model.cache import KVCache
    from seq2serve.model.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    net, tokenizer = load_model(model)
    backend = TorchBackend(net, args.device)  # moves the model to the device
    mc, device = net.cfg, backend.device

    @torch.inference_mode()
    def recomputing(src: list[list[int]]) -> None:
        # Greedy decoding that recomputes the whole decoder prefix every step.
        ids = torch.tensor(src, device=device)
        mask = torch.ones_like(ids)
        b = len(src)
        cross = net.cross_kv(net.encode(ids, mask))
        tokens = torch.full((b, 1), mc.decoder_start_token_id, device=device)
        for _ in range(args.new_tokens):
            t = tokens.shape[1]
            logits = net.decode(
                tokens,
                torch.arange(t, device=device).expand(b, t),
                torch.ones(b, t, dtype=torch.long, device=device),
                KVCache.empty(mc, b, device=device),
                cross,
                mask,
            )
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        tokens.cpu()  # waits for the device's queue: the timing covers the work

    if cached:
        return _rows(_engine_decode(backend, tokenizer, args), mc, args.repeats, args)
    return _rows(recomputing, mc, max(1, args.repeats // 2), args)


def _peer(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from seq2serve import contract
    from seq2serve.config import ModelConfig
    from seq2serve.hf import peers

    cfg = ModelConfig.load(args.model / contract.CONFIG_FILE)
    src = {
        b: sources(cfg.vocab_size, b, args.source_tokens, cfg.eos_token_id)
        for b in args.batch_sizes
    }
    if engine == "transformers (cached)":
        return peers.transformers_rows(
            args.hf_model, src, args.new_tokens, args.repeats, median_time, figures, memory
        )
    tokenizer = Tokenizer.from_file(str(args.model / contract.TOKENIZER_FILE))
    # The parent converted the model (conversion loads it in PyTorch: not this row's memory).
    return peers.ctranslate2_rows(
        args.ct2_model,
        tokenizer,
        src,
        args.new_tokens,
        args.repeats,
        args.threads,
        median_time,
        figures,
        memory,
    )


def measure(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    if engine.startswith("onnx"):
        return _onnx(args.model, engine.endswith("int8"), args)
    if engine.startswith("torch"):
        return _torch(args.model, engine == "torch cached", args)
    return _peer(engine, args)


def command(engine: str, model: Path, **options: Any) -> list[str]:
    """The child command for one engine's row."""
    cmd = [sys.executable, "-m", "seq2serve.bench_engines", engine, "--model", str(model)]
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return cmd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--hf-model", type=Path, help="Hugging Face directory (transformers)")
    parser.add_argument("--ct2-model", type=Path, help="converted CTranslate2 directory")
    parser.add_argument(
        "--batch-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 8)
    )
    parser.add_argument("--source-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.engine, args)), flush=True)


if __name__ == "__main__":
    main()
