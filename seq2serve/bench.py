"""``seq2serve bench``: decode speed per engine, per-step cost growth, and a server load run.

Everything is measured in one run so that ratios are meaningful on a shared machine where
absolute numbers drift. Timings are medians over repeats, after a warm-up.

Parts:
- decode: greedy generation of ``--new-tokens`` tokens (EOS ignored, so every engine does the
  same work) from ``--source-tokens``-token sources, encoder included, at each batch size, for
  onnx fp32, onnx int8, torch with the KV cache, and torch recomputing the whole prefix;
- step cost: the cost of decoder step 16 against step 256 for one sequence (the cache keeps
  a step's cost flat; recomputation would grow it linearly);
- server: N concurrent streaming clients over loopback for a bounded time, with continuous
  batching and with batch size 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import DecodeBatch, SamplingParams, run_to_completion
from seq2serve.engine.runtime import Backend, OnnxBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    model: Path
    batch_sizes: tuple[int, ...] = (1, 8)
    source_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 5
    threads: int | None = None
    long_steps: int = 256
    server_clients: int = 16
    server_seconds: float = 15.0
    server: bool = True
    uncached: bool = True
    # Hugging Face directory for the transformers / CTranslate2 peer rows (default: the
    # hf_source that `seq2serve import-hf` recorded beside the model, if any).
    hf_model: Path | None = None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    return info


def sources(vocab_size: int, n: int, length: int, eos: int, seed: int = 0) -> list[list[int]]:
    """Random ids of ordinary tokens (ids below 4 and added tags are special), EOS-terminated."""
    rng = np.random.default_rng(seed)
    low = min(64, vocab_size // 2)
    return [[*rng.integers(low, vocab_size, length - 1).tolist(), eos] for _ in range(n)]


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialization are not decode speed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_engine(
    backend: Backend, tokenizer: Any, cfg: BenchConfig, batch_size: int
) -> dict[str, float]:
    src = sources(
        backend.config.vocab_size, batch_size, cfg.source_tokens, backend.config.eos_token_id
    )
    params = SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)

    def once() -> None:
        batch = DecodeBatch(backend, tokenizer)
        run_to_completion(batch, [batch.new_sequence(s, params) for s in src])

    seconds = _median_time(once, cfg.repeats)
    return _figures(seconds, batch_size, cfg.new_tokens)


def _figures(seconds: float, batch_size: int, new_tokens: int) -> dict[str, float]:
    return {
        "ms_per_step": round(1000 * seconds / new_tokens, 3),
        "tokens_per_s": round(batch_size * new_tokens / seconds, 1),
    }


def bench_uncached(model: Any, cfg: BenchConfig, batch_size: int) -> dict[str, float]:
    """Greedy decoding that recomputes the whole decoder prefix every step (no cache)."""
    import torch

    from seq2serve.model.cache import KVCache

    mc = model.cfg
    src = torch.tensor(sources(mc.vocab_size, batch_size, cfg.source_tokens, mc.eos_token_id))
    mask = torch.ones_like(src)

    @torch.inference_mode()
    def once() -> None:
        cross = model.cross_kv(model.encode(src, mask))
        tokens = torch.full((batch_size, 1), mc.decoder_start_token_id)
        for _ in range(cfg.new_tokens):
            t = tokens.shape[1]
            logits = model.decode(
                tokens,
                torch.arange(t).expand(batch_size, t),
                torch.ones(batch_size, t, dtype=torch.long),
                KVCache.empty(mc, batch_size),
                cross,
                mask,
            )
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    seconds = _median_time(once, max(1, cfg.repeats // 2))
    return _figures(seconds, batch_size, cfg.new_tokens)


def bench_step_growth(backend: Backend, tokenizer: Any, cfg: BenchConfig) -> dict[str, float]:
    """Per-step time of one sequence around step 16 and around step ``long_steps``."""
    steps = min(cfg.long_steps, backend.config.max_target_positions - 8)
    (src,) = sources(backend.config.vocab_size, 1, cfg.source_tokens, backend.config.eos_token_id)
    per_step: list[list[float]] = []
    for _ in range(3):
        batch = DecodeBatch(backend, tokenizer)
        batch.add(
            [batch.new_sequence(src, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True))]
        )
        times = []
        while len(batch):
            start = time.perf_counter()
            batch.step()
            times.append(time.perf_counter() - start)
        per_step.append(times)
    early = statistics.median(t for run in per_step for t in run[12:20])
    late = statistics.median(t for run in per_step for t in run[steps - 4 : steps + 4])
    return {
        "step": steps,
        "ms_at_step_16": round(1000 * early, 3),
        f"ms_at_step_{steps}": round(1000 * late, 3),
        "ratio": round(late / early, 3),
    }


# ----------------------------------------------------------------------------------------
# Server load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(model: Path, port: int) -> list[str]:
    """`seq2serve serve` for ``model`` on 127.0.0.1:``port``, in this Python."""
    return [
        sys.executable,
        *("-m", "seq2serve.cli", "serve", "--model", str(model)),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


def start_server(model: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    # The server's log goes to a file: an unread pipe fills up and blocks the server.
    log_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
    env = {**os.environ, "SEQ2SERVE_LOG_LEVEL": "WARNING", **env_extra}
    proc = subprocess.Popen(
        serve_command(model, port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready within 120 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _load(
    url: str, texts: list[str], clients: int, seconds: float, new_tokens: int
) -> dict[str, Any]:
    import httpx
    from httpx_sse import aconnect_sse

    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    errors = 0
    requests = 0
    deadline = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors, requests
        n = 0
        while time.monotonic() < deadline:
            body = {
                "inputs": texts[(i + n) % len(texts)],
                "parameters": {"max_new_tokens": new_tokens},
                "stream": True,
            }
            n += 1
            start = last = time.perf_counter()
            first = True
            try:
                async with aconnect_sse(http, "POST", f"{url}/v1/generate", json=body) as source:
                    if source.response.status_code != 200:
                        errors += 1
                        continue
                    async for event in source.aiter_sse():
                        if event.event == "error":
                            errors += 1
                            break
                        now = time.perf_counter()
                        (ttft if first else itl).append(now - (start if first else last))
                        first, last = False, now
                        tokens += 1
                requests += 1
            except httpx.HTTPError:
                errors += 1

    async with httpx.AsyncClient(
        timeout=60, limits=httpx.Limits(max_connections=clients + 4)
    ) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - started

    def pct(values: list[float], q: float) -> float:
        return round(1000 * float(np.percentile(values, q)), 2) if values else float("nan")

    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": requests,
        "tokens_per_s": round(tokens / elapsed, 1),
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p95": pct(ttft, 95),
        "itl_ms_p50": pct(itl, 50),
        "itl_ms_p95": pct(itl, 95),
        "errors": errors,
    }


def bench_server(cfg: BenchConfig, max_batch_size: int) -> dict[str, Any]:
    texts = [
        ">>fr<< 2021-03-04",
        ">>de<< 1234",
        ">>ru<< 1999-12-31",
        ">>ja<< 8031",
        ">>en<< 2024-07-01",
    ]
    env = {"SEQ2SERVE_MAX_BATCH_SIZE": str(max_batch_size), "SEQ2SERVE_MAX_QUEUE": "4096"}
    if cfg.threads:
        env["SEQ2SERVE_NUM_THREADS"] = str(cfg.threads)
    proc, url = start_server(cfg.model, env)
    try:
        return asyncio.run(_load(url, texts, cfg.server_clients, cfg.server_seconds, 32))
    finally:
        stop_server(proc)


# ----------------------------------------------------------------------------------------
# The suite


def run(cfg: BenchConfig, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
    }
    bundle = load_bundle(cfg.model, threads=cfg.threads)
    tokenizer = bundle.tokenizer
    engines: dict[str, Callable[[], Backend]] = {"onnx fp32": lambda: OnnxBackend(bundle)}
    if (cfg.model / "encoder.int8.onnx").exists():
        engines["onnx int8"] = lambda: OnnxBackend(
            load_bundle(cfg.model, quantized=True, threads=cfg.threads)
        )
    model = None
    try:
        import torch

        from seq2serve.model.backend import TorchBackend
        from seq2serve.model.checkpoint import load_model

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, _ = load_model(cfg.model)
        engines["torch cached"] = lambda: TorchBackend(model)
    except ImportError:
        progress("PyTorch is not installed: torch rows skipped")

    decode: dict[str, dict[str, dict[str, float]]] = {}
    for name, make in engines.items():
        backend = make()
        decode[name] = {}
        for b in cfg.batch_sizes:
            progress(f"decode: {name}, batch {b}")
            decode[name][str(b)] = bench_engine(backend, tokenizer, cfg, b)
    if model is not None and cfg.uncached:
        decode["torch uncached"] = {}
        for b in cfg.batch_sizes:
            progress(f"decode: torch uncached, batch {b}")
            decode["torch uncached"][str(b)] = bench_uncached(model, cfg, b)
    hf_dir = None
    try:
        from seq2serve.hf.peers import find_hf_source, peer_rows

        hf_dir = find_hf_source(cfg.model, cfg.hf_model)
    except ImportError:
        progress("the hf extra is not installed: peer rows skipped")
    if hf_dir is not None:
        mc = bundle.config
        src = {
            b: sources(mc.vocab_size, b, cfg.source_tokens, mc.eos_token_id)
            for b in cfg.batch_sizes
        }
        decode.update(
            peer_rows(
                hf_dir,
                tokenizer,
                src,
                cfg.new_tokens,
                cfg.repeats,
                cfg.threads,
                _median_time,
                _figures,
                progress,
            )
        )
    results["decode"] = decode
    progress("step cost: step 16 vs step 256 (onnx fp32)")
    results["step_growth"] = bench_step_growth(OnnxBackend(bundle), tokenizer, cfg)
    if cfg.server:
        progress(f"server: {cfg.server_clients} streaming clients, continuous batching")
        batched = bench_server(cfg, max_batch_size=max(32, cfg.server_clients))
        progress(f"server: {cfg.server_clients} streaming clients, batch size 1")
        single = bench_server(cfg, max_batch_size=1)
        results["server"] = {
            "continuous_batching": batched,
            "batch_size_1": single,
            "throughput_ratio": round(
                batched["tokens_per_s"] / max(single["tokens_per_s"], 1e-9), 2
            ),
        }
    return results


def table(results: dict[str, Any]) -> str:
    lines = []
    batch_sizes = list(next(iter(results["decode"].values())).keys())
    header = (
        "| engine | "
        + " | ".join(f"batch {b}: ms/step | batch {b}: tokens/s" for b in batch_sizes)
        + " |"
    )
    lines += [header, "|" + "---|" * (1 + 2 * len(batch_sizes))]
    for name, rows in results["decode"].items():
        cells = []
        for b in batch_sizes:
            cells += [f"{rows[b]['ms_per_step']:.2f}", f"{rows[b]['tokens_per_s']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    g = results["step_growth"]
    late = g[f"ms_at_step_{g['step']}"]
    lines.append("")
    lines.append(
        f"Step cost (onnx fp32, batch 1): step 16 {g['ms_at_step_16']:.2f} ms, "
        f"step {g['step']} {late:.2f} ms, ratio {g['ratio']:.2f}"
    )
    if "server" in results:
        lines += [
            "",
            "| server load | clients | tokens/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | errors |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("continuous_batching", "batch_size_1"):
            s = results["server"][name]
            lines.append(
                f"| {name.replace('_', ' ')} | {s['clients']} | {s['tokens_per_s']:.0f} | "
                f"{s['ttft_ms_p50']:.1f} / {s['ttft_ms_p95']:.1f} | "
                f"{s['itl_ms_p50']:.1f} / {s['itl_ms_p95']:.1f} | {s['errors']} |"
            )
        ratio = results["server"]["throughput_ratio"]
        lines.append(f"\nContinuous batching / batch size 1 throughput: {ratio:.2f}x")
    m = results["machine"]
    cpu = m.get("cpu", "unknown CPU")
    lines.append(f"\nMachine: {cpu}, {m['cpus']} cores, onnxruntime {m['onnxruntime']}")
    return "\n".join(lines)


def main(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    results = run(cfg, progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results
