"""``python -m seq2serve.reliability``: the server under load, faults and hostile input.

What users of a model server fear, each measured against a bar on a real server process on
127.0.0.1 (``seq2serve.bench.start_server``), whose resident memory, threads and open file
descriptors are read from ``/proc/PID``:

1. load: concurrent streaming clients with varied input and output lengths; every stream's
   text equals the same request run alone (greedy), zero errors; throughput and latency;
2. soak: mixed encode/classify/generate traffic with sources of every length up to
   ``max_input_tokens``; memory after warm-up grows < 5 %, threads and descriptors do not
   grow, no sequence is left active;
3. cancellation: streams dropped at random points free their slot within a second, and the
   streams running beside them are unchanged;
4. overload: past the queue bound, 429 with ``Retry-After`` before any stream opens, never a
   5xx, and every accepted request completes;
5. faults: a bad bundle is refused at start with one line naming the file; SIGTERM during
   streams turns readiness 503 at once, finishes every stream, exits 0 in the grace period
   (an exception inside the engine for one request is tested in-process, in
   ``tests/test_reliability.py``: the runner has no backdoor into a production server);
6. hostile input: invalid UTF-8, NUL bytes, oversize and deeply nested bodies, absurd
   parameters, a client that stalls mid-stream; none yields a 5xx, a crash or a hang;
   schemathesis over the whole OpenAPI in the long form;
7. security: every ``/v1`` route refuses a missing or wrong key, the key is compared in
   constant time, weights load only from safetensors/ONNX, and ``pip-audit`` over the runtime
   dependencies.

The report prints each figure against its bar with PASS/FAIL and is written as JSON. Every
loop is bounded in count and time; every server started here is stopped by its process id.
This module prints: it is a command, and the report is its output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tokenizers import Tokenizer

from seq2serve import contract
from seq2serve.bench import free_port, serve_command, start_server, stop_server
from seq2serve.bench_engines import proc_status, status_mb

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"

# Phrases of the bundled model's task, in several scripts: realistic greedy outputs.
PHRASES = (
    ">>fr<< 2021-03-04",
    ">>de<< 1234",
    ">>ru<< 1999-12-31",
    ">>ja<< 8031",
    ">>en<< 2024-07-01",
    ">>es<< 77",
    ">>it<< 2020-02-29",
    ">>de<< 1000000",
    "jeudi 4 mars 2021",
    ">>fr<< 31",
)
# A sampled generation this hot almost never draws EOS: a stream that runs to its length
# limit, long enough to drop, stall or drain in the middle of.
LONG_STREAM = {"do_sample": True, "temperature": 20.0}


@dataclass(frozen=True)
class ReliabilityConfig:
    model: Path = DEFAULT_MODEL
    load_clients: int = 64
    load_seconds: float = 60.0
    soak_seconds: float = 600.0
    soak_warmup_s: float = 60.0
    soak_clients: int = 8
    # Resident memory may grow at most this much from warm-up to the end. Over 10 minutes 5 %
    # separates a leak from allocator noise; a 20-second soak swings by tens of MB between
    # readings, so its bar only catches gross leaks.
    soak_rss_growth_pct: float = 5.0
    cancel_streams: int = 100
    overload_clients: int = 48
    drain_streams: int = 16
    slow_client_s: float = 10.0
    schemathesis_examples: int = 300  # 0: leave schemathesis to the test suite
    pip_audit: bool = True
    threads: int | None = None


SHORT = {
    "load_clients": 16,
    "load_seconds": 10.0,
    "soak_seconds": 20.0,
    "soak_warmup_s": 6.0,
    "soak_clients": 4,
    "soak_rss_growth_pct": 30.0,
    "cancel_streams": 20,
    "overload_clients": 24,
    "slow_client_s": 5.0,
    "schemathesis_examples": 0,
    "pip_audit": False,
}


def short_config(model: Path = DEFAULT_MODEL, **overrides: Any) -> ReliabilityConfig:
    """The form ``make test`` runs: the same checks, scaled to about a minute."""
    return ReliabilityConfig(model=model, **{**SHORT, **overrides})


# ----------------------------------------------------------------------------------------
# The report


@dataclass
class Check:
    part: str
    name: str
    value: Any
    bar: str
    passed: bool | None  # None: a figure reported without a bar


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, part: str, name: str, value: Any, bar: str, passed: bool) -> None:
        self.checks.append(Check(part, name, value, bar, bool(passed)))

    def figure(self, part: str, name: str, value: Any) -> None:
        self.checks.append(Check(part, name, value, "-", None))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def table(self) -> str:
        lines = ["| part | figure | value | bar | result |", "|---|---|---|---|---|"]
        for c in self.checks:
            result = {True: "PASS", False: "FAIL", None: "info"}[c.passed]
            lines.append(f"| {c.part} | {c.name} | {c.value} | {c.bar} | {result} |")
        verdict = "FAIL" if self.failed else "PASS"
        lines.append(f"\n{len(self.checks)} figures, {len(self.failed)} failed: {verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": not self.failed,
            "checks": [asdict(c) for c in self.checks],
            "details": self.details,
        }


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """Milliseconds at each percentile (NaN with no sample)."""
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": round(1000 * float(np.percentile(values, q)), 2) for q in qs}


# ----------------------------------------------------------------------------------------
# The server process, seen from outside


@dataclass(frozen=True)
class ProcSample:
    rss_mb: float
    threads: int
    fds: int


def sample_process(pid: int) -> ProcSample:
    """Resident memory, threads and open file descriptors of a process, from /proc."""
    fields = proc_status(pid)
    return ProcSample(
        rss_mb=round(status_mb(fields, "VmRSS"), 1),
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metric(url: str, name: str) -> float:
    """One unlabelled series of /metrics (a gauge)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name and not m.group(2):
            return float(m.group(3))
    raise KeyError(f"{name} not in /metrics")


def wait_metric(url: str, name: str, target: float, timeout_s: float) -> float | None:
    """Seconds until the gauge reads ``target`` (None if it did not within ``timeout_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if metric(url, name) == target:
            return time.monotonic() - start
        time.sleep(0.01)
    return None


@contextlib.contextmanager
def server(cfg: ReliabilityConfig, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A ``seq2serve serve`` process on 127.0.0.1, stopped by its pid on the way out."""
    settings = dict(env)
    if cfg.threads:
        settings["SEQ2SERVE_NUM_THREADS"] = str(cfg.threads)
    proc, url = start_server(cfg.model, settings)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            stop_server(proc)


# ----------------------------------------------------------------------------------------
# Inputs and a streaming client


# Texts repeated to make an input of a given length: digits first (one token each with the
# default model's byte-level BPE), then letters and punctuation for tokenizers that merge
# digits (a SentencePiece vocabulary like opus-mt's has pieces of several digits).
FILLERS = ("0123456789", "a", "x", ". ", "a ")


def _repeated(filler: str, chars: int) -> str:
    return (filler * (chars // len(filler) + 1))[:chars]


def text_of_tokens(tokenizer: Tokenizer, n: int) -> str:
    """A text the tokenizer turns into exactly ``n`` ids (its special tokens included): the
    first filler whose repetitions can be counted out to ``n`` ids, as the tokenizer
    itself counts them."""
    if n < 2:
        raise ValueError("a non-empty text is at least 2 ids (one token and end-of-sequence)")
    for filler in FILLERS:
        k = max(1, n - len(tokenizer.encode(_repeated(filler, 1)).ids) + 1)
        for _ in range(4):  # each try moves by what the last one missed
            got = len(tokenizer.encode(_repeated(filler, k)).ids)
            if got == n:
                return _repeated(filler, k)
            k += n - got
            if k < 1:
                break
    raise ValueError(f"no filler text makes exactly {n} ids with this tokenizer")


def texts_by_length(tokenizer: Tokenizer, longest: int) -> dict[int, str]:
    """A text for each length from 2 ids to ``longest`` that the tokenizer can give: one
    that starts every text with a word-start piece of its own (a SentencePiece ``▁``) has no
    text of 2 ids."""
    out = {}
    for n in range(2, longest + 1):
        with contextlib.suppress(ValueError):
            out[n] = text_of_tokens(tokenizer, n)
    return out


@dataclass
class StreamResult:
    status: int
    text: str = ""  # the token texts, concatenated
    generated_text: str | None = None  # from the final event
    finished: bool = False  # the final event arrived
    error: str | None = None  # an `event: error` payload, or what went wrong
    events: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    dropped_at: float | None = None  # when the client dropped the connection on purpose


async def stream_generate(
    http: httpx.AsyncClient,
    url: str,
    inputs: str,
    parameters: dict[str, Any],
    drop_after: int | None = None,
) -> StreamResult:
    """POST a streaming /v1/generate and read its events (by hand: what a client sees).
    ``drop_after``: close the connection after that many events."""
    body = {"inputs": inputs, "parameters": parameters, "stream": True}
    start = last = time.perf_counter()
    async with http.stream("POST", f"{url}/v1/generate", json=body) as response:
        result = StreamResult(response.status_code, headers=dict(response.headers))
        if response.status_code != 200:
            await response.aread()
            result.error = response.text[:300]
            return result
        if drop_after == 0:
            result.dropped_at = time.monotonic()
            return result
        kind = "message"
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            payload = json.loads(line[5:])
            if kind == "error":
                result.error = json.dumps(payload)
                return result
            now = time.perf_counter()
            if result.ttft is None:
                result.ttft = now - start
            else:
                result.gaps.append(now - last)
            last = now
            result.events += 1
            result.text += payload["token"]["text"]
            if payload["details"] is not None:
                result.generated_text = payload["generated_text"]
                result.finished = True
            if drop_after is not None and result.events >= drop_after and not result.finished:
                result.dropped_at = time.monotonic()
                return result
    return result


def async_client(connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=60, limits=httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    )


@dataclass(frozen=True)
class Prompt:
    inputs: str
    max_new_tokens: int

    def parameters(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens}


def prompt_pool(tokenizer: Tokenizer, max_input: int, seed: int = 0) -> list[Prompt]:
    """Varied input lengths (task phrases, and filler texts up to the limit) and varied
    output lengths."""
    rng = random.Random(seed)
    lengths = [8, 24, 64, 160, max_input // 2, max_input]
    texts = [*PHRASES, *(text_of_tokens(tokenizer, n) for n in lengths)]
    return [Prompt(t, rng.choice([2, 6, 12, 24, 48, 64])) for t in texts]


def alone_results(url: str, prompts: list[Prompt]) -> dict[Prompt, str]:
    """Each prompt's greedy text, one request at a time (nothing shares its batch)."""
    out: dict[Prompt, str] = {}
    with httpx.Client(timeout=60) as http:
        for p in prompts:
            r = http.post(f"{url}/v1/generate", json={"inputs": p.inputs, **_params(p)})
            r.raise_for_status()
            out[p] = r.json()["generated_text"]
    return out


def _params(p: Prompt) -> dict[str, Any]:
    return {"parameters": p.parameters()}


# ----------------------------------------------------------------------------------------
# 1. Load


async def _load(
    url: str, prompts: list[Prompt], alone: dict[Prompt, str], clients: int, seconds: float
) -> dict[str, Any]:
    ttft: list[float] = []
    gaps: list[float] = []
    tokens = requests = errors = mismatches = 0
    first_problem: str | None = None
    deadline = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, requests, errors, mismatches, first_problem
        n = i
        while time.monotonic() < deadline:
            p = prompts[n % len(prompts)]
            n += 1
            try:
                r = await stream_generate(http, url, p.inputs, p.parameters())
            except httpx.HTTPError as err:
                errors += 1
                first_problem = first_problem or f"{type(err).__name__}: {err}"
                continue
            requests += 1
            tokens += r.events
            if r.ttft is not None:
                ttft.append(r.ttft)
            gaps.extend(r.gaps)
            if r.status != 200 or r.error or not r.finished:
                errors += 1
                first_problem = first_problem or f"{r.status} {r.error}"
            elif r.text != alone[p] or r.generated_text != alone[p]:
                mismatches += 1
                first_problem = first_problem or f"{p.inputs[:40]!r}: {r.text!r} != {alone[p]!r}"

    async with async_client(clients + 4) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": requests,
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "requests_per_s": round(requests / elapsed, 1),
        "ttft_ms": percentiles(ttft),
        "itl_ms": percentiles(gaps),
        "errors": errors,
        "mismatches": mismatches,
        "first_problem": first_problem,
    }


def part_load(
    cfg: ReliabilityConfig, url: str, prompts: list[Prompt], alone: dict[Prompt, str], r: Report
) -> None:
    out = asyncio.run(_load(url, prompts, alone, cfg.load_clients, cfg.load_seconds))
    r.details["load"] = out
    part = "1 load"
    r.figure(part, "streaming clients x seconds", f"{out['clients']} x {out['seconds']}")
    r.figure(part, "requests (distinct prompts)", f"{out['requests']} ({len(prompts)})")
    r.check(part, "errors", out["errors"], "0", out["errors"] == 0)
    r.check(part, "streams != alone (greedy)", out["mismatches"], "0", out["mismatches"] == 0)
    r.figure(part, "throughput tokens/s", out["tokens_per_s"])
    t, i = out["ttft_ms"], out["itl_ms"]
    r.figure(part, "TTFT p50/p95/p99 ms", f"{t['p50']} / {t['p95']} / {t['p99']}")
    r.figure(part, "ITL p50/p95/p99 ms", f"{i['p50']} / {i['p95']} / {i['p99']}")
    if out["first_problem"]:
        r.details["load"]["first_problem"] = out["first_problem"]


# ----------------------------------------------------------------------------------------
# 2. Soak


@dataclass
class _Soak:
    requests: int = 0
    errors: int = 0
    first_problem: str | None = None
    lengths: set[int] = field(default_factory=set)


SOAK_KINDS = ("encode", "classify", "generate", "stream")


async def _soak_traffic(
    url: str,
    texts: dict[int, str],
    clients: int,
    seconds: float,
    state: _Soak,
    seed: int,
    kinds: tuple[str, ...],
) -> None:
    deadline = time.monotonic() + seconds
    labels = ("first", "mean")
    sizes = sorted(texts)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            kind = rng.choice(kinds)
            lengths = [rng.choice(sizes) for _ in range(rng.randint(1, 4))]
            state.lengths.update(lengths)
            inputs = [texts[n] for n in lengths]
            try:
                if kind == "stream":
                    params = {"max_new_tokens": rng.randint(1, 32)}
                    res = await stream_generate(http, url, inputs[0], params)
                    ok = res.status == 200 and res.finished and not res.error
                    status, problem = res.status, res.error
                else:
                    if kind == "encode":
                        path = "/v1/encode"
                        body: dict[str, Any] = {"inputs": inputs, "pooling": rng.choice(labels)}
                    elif kind == "classify":
                        path, body = "/v1/classify", {"inputs": inputs, "top_k": rng.randint(1, 3)}
                    else:
                        path = "/v1/generate"
                        body = {
                            "inputs": inputs[0],
                            "parameters": {"max_new_tokens": rng.randint(1, 32)},
                        }
                    resp = await http.post(f"{url}{path}", json=body)
                    ok, status, problem = resp.status_code == 200, resp.status_code, resp.text[:200]
            except httpx.HTTPError as err:
                ok, status, problem = False, 0, f"{type(err).__name__}: {err}"
            state.requests += 1
            if not ok:
                state.errors += 1
                state.first_problem = state.first_problem or f"{kind} {status} {problem}"

    async with async_client(clients + 2) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))


async def _warm_extremes(url: str, texts: dict[int, str], max_input: int) -> None:
    """The largest shapes first: a full encoder batch and concurrent generations at the
    maximum source length, so warm-up sees what the soak will."""
    longest = texts[max_input]
    async with async_client(40) as http:
        r = await http.post(f"{url}/v1/encode", json={"inputs": [longest] * 32})
        r.raise_for_status()
        body = {"inputs": longest, "parameters": {"max_new_tokens": 32}}
        for resp in await asyncio.gather(
            *(http.post(f"{url}/v1/generate", json=body) for _ in range(32))
        ):
            resp.raise_for_status()


def _quiet_sample(pid: int) -> ProcSample:
    time.sleep(1.0)  # connections closed, to_thread workers idle
    return sample_process(pid)


def part_soak(
    cfg: ReliabilityConfig,
    proc: subprocess.Popen[bytes],
    url: str,
    texts: dict[int, str],
    r: Report,
    classifies: bool,
) -> None:
    """Mixed traffic (encode, classify where the model has a classification head, generate,
    stream) at every input length, watching the server's memory, threads and files."""
    max_input = max(texts)
    kinds = tuple(k for k in SOAK_KINDS if classifies or k != "classify")
    state = _Soak()
    warm: list[ProcSample] = []
    samples: list[ProcSample] = []

    async def sampled(seconds: float, seed: int, into: list[ProcSample]) -> None:
        async def sampler() -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                into.append(sample_process(proc.pid))
                await asyncio.sleep(0.5)

        traffic = _soak_traffic(url, texts, cfg.soak_clients, seconds, state, seed, kinds)
        await asyncio.gather(traffic, sampler())

    asyncio.run(_warm_extremes(url, texts, max_input))
    warm.append(sample_process(proc.pid))
    asyncio.run(sampled(cfg.soak_warmup_s, 1, warm))
    before = _quiet_sample(proc.pid)
    warm.append(before)
    # Without an arena, what malloc keeps between requests swings with the mix in flight:
    # the level warm-up reached is its high-water mark, and a leak shows as the end of the
    # soak rising above it.
    high_water = max(s.rss_mb for s in warm)
    asyncio.run(sampled(max(cfg.soak_seconds - cfg.soak_warmup_s, 1.0), 2, samples))
    after = _quiet_sample(proc.pid)
    active = metric(url, "seq2serve_active_sequences")
    growth = 100 * (after.rss_mb / high_water - 1)
    quarter = max(1, len(samples) // 4)
    first_q = float(np.median([x.rss_mb for x in samples[:quarter]])) if samples else 0.0
    last_q = float(np.median([x.rss_mb for x in samples[-quarter:]])) if samples else 0.0
    peak = max(s.rss_mb for s in samples) if samples else after.rss_mb
    r.details["soak"] = {
        "requests": state.requests,
        "errors": state.errors,
        "first_problem": state.first_problem,
        "source_lengths": [min(state.lengths), max(state.lengths), len(state.lengths)],
        "after_warmup": asdict(before),
        "warmup_high_water_rss_mb": high_water,
        "rss_median_first_last_quarter_mb": [first_q, last_q],
        "end": asdict(after),
        "peak_rss_mb": peak,
        "rss_mb_over_time": [s.rss_mb for s in samples[:: max(1, len(samples) // 40)]],
    }
    part = "2 soak"
    r.figure(
        part,
        "seconds (warm-up) / requests",
        f"{cfg.soak_seconds:.0f} ({cfg.soak_warmup_s:.0f}) / {state.requests}",
    )
    r.figure(
        part,
        "source lengths (min-max, distinct)",
        f"{min(state.lengths)}-{max(state.lengths)}, {len(state.lengths)}",
    )
    r.check(part, "errors", state.errors, "0", state.errors == 0)
    r.check(
        part,
        "RSS warm-up high-water -> end, quiet (MB)",
        f"{high_water} -> {after.rss_mb} ({growth:+.1f} %)",
        f"< +{cfg.soak_rss_growth_pct:.0f} %",
        growth < cfg.soak_rss_growth_pct,
    )
    r.figure(
        part,
        "RSS under traffic: median 1st -> last quarter, peak (MB)",
        f"{first_q:.0f} -> {last_q:.0f}, peak {peak}",
    )
    r.check(
        part,
        "threads after warm-up -> end",
        f"{before.threads} -> {after.threads}",
        "no growth",
        after.threads <= before.threads,
    )
    r.check(
        part,
        "open fds after warm-up -> end",
        f"{before.fds} -> {after.fds}",
        "no growth",
        after.fds <= before.fds,
    )
    r.check(part, "active sequences at the end", active, "0", active == 0)


# ----------------------------------------------------------------------------------------
# 3. Cancellation


async def _cancel_rounds(
    url: str,
    prompts: list[Prompt],
    alone: dict[Prompt, str],
    victims: int,
    max_new: int,
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    per_round, companions = 4, 2
    free_times: list[float] = []
    mid_stream = companions_ok = companions_total = victims_done = 0
    problems: list[str] = []
    round_deadline = time.monotonic() + 30 + victims  # bounded whatever happens
    async with async_client(16) as http:
        # Count only streams really dropped mid-stream (a sampled victim may reach EOS before
        # its drop point); the deadline bounds the rounds whatever happens.
        while mid_stream < victims and time.monotonic() < round_deadline:
            n = min(per_round, victims - mid_stream)
            points = [0, 1, 2, 5, 10, 20, 40, rng.randint(1, max_new - 1)]
            drops = [min(rng.choice(points), max_new - 2) for _ in range(n)]
            chosen = [prompts[rng.randrange(len(prompts))] for _ in range(companions)]
            tasks = [
                stream_generate(
                    http,
                    url,
                    PHRASES[rng.randrange(len(PHRASES))],
                    {**LONG_STREAM, "max_new_tokens": max_new, "seed": rng.randrange(1 << 30)},
                    drop_after=d,
                )
                for d in drops
            ] + [stream_generate(http, url, p.inputs, p.parameters()) for p in chosen]
            results = await asyncio.gather(*tasks)
            victims_done += n
            dropped = [res.dropped_at for res in results[:n] if res.dropped_at is not None]
            mid_stream += len(dropped)
            for p, res in zip(chosen, results[n:], strict=True):
                companions_total += 1
                if res.finished and res.text == alone[p] and res.generated_text == alone[p]:
                    companions_ok += 1
                else:
                    problems.append(f"companion {p.inputs[:30]!r}: {res.status} {res.error}")
            for res in results[:n]:
                if res.status != 200 or res.error:
                    problems.append(f"victim: {res.status} {res.error}")
            waited = await asyncio.to_thread(
                wait_metric, url, "seq2serve_active_sequences", 0.0, 5.0
            )
            last_drop = max(dropped, default=time.monotonic())
            if waited is None:
                free_times.append(float("inf"))
            else:
                free_times.append(time.monotonic() - last_drop)
    return {
        "victims": victims_done,
        "dropped_mid_stream": mid_stream,
        "max_free_s": round(max(free_times), 3) if free_times else float("nan"),
        "median_free_s": round(float(np.median(free_times)), 3) if free_times else float("nan"),
        "companions_ok": companions_ok,
        "companions": companions_total,
        "problems": problems[:5],
    }


def part_cancel(
    cfg: ReliabilityConfig,
    url: str,
    prompts: list[Prompt],
    alone: dict[Prompt, str],
    max_new: int,
    r: Report,
) -> None:
    out = asyncio.run(_cancel_rounds(url, prompts, alone, cfg.cancel_streams, max_new, seed=3))
    r.details["cancel"] = out
    part = "3 cancel"
    r.check(
        part,
        "streams dropped mid-stream",
        f"{out['dropped_mid_stream']}/{out['victims']}",
        f">= {cfg.cancel_streams}",
        out["dropped_mid_stream"] >= cfg.cancel_streams,
    )
    r.check(
        part,
        "drop -> active sequences 0 (max / median s)",
        f"{out['max_free_s']} / {out['median_free_s']}",
        "< 1 s each",
        out["max_free_s"] < 1.0,
    )
    r.check(
        part,
        "streams beside them == alone",
        f"{out['companions_ok']}/{out['companions']}",
        "all",
        out["companions_ok"] == out["companions"] and not out["problems"],
    )


# ----------------------------------------------------------------------------------------
# 4. Overload


async def _overload(url: str, clients: int, max_new: int) -> list[StreamResult]:
    async with async_client(clients + 4) as http:
        return await asyncio.gather(
            *(
                stream_generate(
                    http,
                    url,
                    PHRASES[i % len(PHRASES)],
                    {**LONG_STREAM, "max_new_tokens": max_new, "seed": i},
                )
                for i in range(clients)
            )
        )


def part_overload(cfg: ReliabilityConfig, r: Report) -> None:
    env = {"SEQ2SERVE_MAX_QUEUE": "4", "SEQ2SERVE_MAX_BATCH_SIZE": "2"}
    with server(cfg, **env) as (_, url):
        max_new = int(httpx.get(f"{url}/info", timeout=10).json()["limits"]["max_new_tokens"])
        results = asyncio.run(_overload(url, cfg.overload_clients, max_new))
        active = metric(url, "seq2serve_active_sequences")
        after = asyncio.run(_overload(url, 2, 8))  # the server recovers once the load is gone
    statuses: dict[int, int] = {}
    for res in results:
        statuses[res.status] = statuses.get(res.status, 0) + 1
    refused = [res for res in results if res.status == 429]
    retry_ok = all(
        res.headers.get("retry-after", "").isdigit()
        and int(res.headers["retry-after"]) >= 1
        and res.headers.get("content-type", "").startswith("application/json")
        and res.events == 0
        for res in refused
    )
    accepted = [res for res in results if res.status == 200]
    completed = sum(res.finished and not res.error for res in accepted)
    server_errors = sum(n for s, n in statuses.items() if s >= 500)
    r.details["overload"] = {"statuses": statuses, "max_queue": 4, "max_batch_size": 2}
    part = "4 overload"
    r.figure(part, "concurrent streams (queue 4, batch 2)", cfg.overload_clients)
    r.check(part, "429 answers", len(refused), "> 0", len(refused) > 0)
    r.check(
        part, "429 with Retry-After, JSON, no stream", "yes" if retry_ok else "no", "all", retry_ok
    )
    r.check(part, "5xx answers", server_errors, "0", server_errors == 0)
    r.check(
        part,
        "accepted streams completed",
        f"{completed}/{len(accepted)}",
        "all",
        completed == len(accepted) and len(accepted) > 0,
    )
    r.check(part, "active sequences after", active, "0", active == 0)
    ok_after = all(res.status == 200 and res.finished for res in after)
    r.check(part, "served after the overload", "yes" if ok_after else "no", "yes", ok_after)


# ----------------------------------------------------------------------------------------
# 5. Faults: bad bundles, SIGTERM drain


def _rehash(bundle: Path, name: str) -> None:
    manifest_file = bundle / contract.MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    digest = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    manifest["files"][name]["sha256"] = digest
    manifest_file.write_text(json.dumps(manifest))


def bad_bundles(model: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Three broken copies of ``model``: what each is and the file its refusal must name."""
    out: dict[str, tuple[Path, str]] = {}
    checksum = root / "checksum"
    shutil.copytree(model, checksum)
    data = checksum / contract.ONNX_DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    out["wrong checksum"] = (checksum, contract.ONNX_DATA_FILE)
    missing = root / "missing"
    shutil.copytree(model, missing)
    (missing / contract.DECODER_FILE).unlink()
    out["missing file"] = (missing, contract.DECODER_FILE)
    graph = root / "graph"
    shutil.copytree(model, graph)
    shutil.copy(graph / contract.ENCODER_FILE, graph / contract.DECODER_FILE)
    _rehash(graph, contract.DECODER_FILE)
    out["mismatched graph"] = (graph, contract.DECODER_FILE)
    return out


def part_bad_bundles(cfg: ReliabilityConfig, r: Report) -> None:
    part = "5 faults"
    with tempfile.TemporaryDirectory() as tmp:
        for what, (bundle, name) in bad_bundles(cfg.model, Path(tmp)).items():
            started = time.monotonic()
            out = subprocess.run(
                serve_command(bundle, free_port()),
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "SEQ2SERVE_LOG_LEVEL": "WARNING"},
            )
            seconds = time.monotonic() - started
            lines = [line for line in out.stderr.splitlines() if line.strip()]
            ok = (
                out.returncode != 0
                and len(lines) == 1
                and str(bundle / name) in lines[0]
                and "Traceback" not in out.stderr
            )
            r.details.setdefault("bad_bundles", {})[what] = {
                "exit": out.returncode,
                "stderr": out.stderr[-600:],
                "seconds": round(seconds, 2),
            }
            r.check(
                part,
                f"bundle with a {what}: exit, stderr lines",
                f"exit {out.returncode}, {len(lines)} line(s), {seconds:.1f} s",
                f"non-zero, 1 line naming {name}",
                ok,
            )


async def _drain(
    proc: subprocess.Popen[bytes], url: str, streams: int, max_new: int
) -> dict[str, Any]:
    started = [asyncio.Event() for _ in range(streams)]
    last_event: list[float] = [0.0] * streams
    results: list[StreamResult | None] = [None] * streams

    async def one(i: int, http: httpx.AsyncClient) -> None:
        body = {
            "inputs": PHRASES[i % len(PHRASES)],
            "parameters": {**LONG_STREAM, "max_new_tokens": max_new, "seed": i},
            "stream": True,
        }
        async with http.stream("POST", f"{url}/v1/generate", json=body) as response:
            res = StreamResult(response.status_code)
            async for line in response.aiter_lines():
                if line.startswith("event: error"):
                    res.error = "error event"
                if not line.startswith("data:"):
                    continue
                payload = json.loads(line[5:])
                if "token" in payload:
                    res.events += 1
                    res.text += payload["token"]["text"]
                    last_event[i] = time.monotonic()
                    started[i].set()
                    if payload["details"] is not None:
                        res.finished = True
                        res.generated_text = payload["generated_text"]
            results[i] = res

    async with async_client(streams + 8) as http:
        tasks = [asyncio.create_task(one(i, http)) for i in range(streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ready = await http.get(f"{url}/ready")
        ready_after = time.monotonic() - signalled
        refused = await http.post(f"{url}/v1/generate", json={"inputs": PHRASES[0]})
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    exit_code = await asyncio.to_thread(proc.wait, 60)
    exited_after = time.monotonic() - signalled
    done = [res for res in results if res is not None]
    finished = sum(
        res.finished and not res.error and res.text == res.generated_text for res in done
    )
    return {
        "ready_status": ready.status_code,
        "ready_ms": round(1000 * ready_after, 1),
        "new_request_status": refused.status_code,
        "finished": finished,
        "streams": streams,
        "last_event_after_signal_s": round(max(last_event) - signalled, 2),
        "exit_code": exit_code,
        "exit_after_s": round(exited_after, 2),
    }


def part_drain(cfg: ReliabilityConfig, r: Report) -> None:
    grace = 20.0
    with server(cfg, SEQ2SERVE_DRAIN_TIMEOUT_S=str(grace)) as (proc, url):
        max_new = int(httpx.get(f"{url}/info", timeout=10).json()["limits"]["max_new_tokens"])
        out = asyncio.run(_drain(proc, url, cfg.drain_streams, max_new))
    r.details["drain"] = out
    part = "5 faults"
    r.check(
        part,
        "SIGTERM: /ready status (ms after the signal)",
        f"{out['ready_status']} ({out['ready_ms']} ms)",
        "503 at once",
        out["ready_status"] == 503 and out["ready_ms"] < 1000,
    )
    r.check(
        part,
        "SIGTERM: new request",
        out["new_request_status"],
        "503",
        out["new_request_status"] == 503,
    )
    r.check(
        part,
        "SIGTERM: streams finished (last event after signal)",
        f"{out['finished']}/{out['streams']} ({out['last_event_after_signal_s']} s)",
        "all",
        out["finished"] == out["streams"],
    )
    r.check(
        part,
        "SIGTERM: exit code, seconds",
        f"{out['exit_code']}, {out['exit_after_s']} s",
        f"0 within {grace:.0f} s",
        out["exit_code"] == 0 and out["exit_after_s"] < grace,
    )


# ----------------------------------------------------------------------------------------
# 6. Hostile input


def hostile_cases(max_new: int) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(name, path, raw body, headers): requests a client should never be able to hurt the
    server with."""
    jh = {"content-type": "application/json"}

    def j(body: Any) -> bytes:
        return json.dumps(body).encode()

    def gen(**parameters: Any) -> bytes:
        return j({"inputs": "1", "parameters": parameters})

    g = "/v1/generate"
    nested = b"[" * 100_000 + b"]" * 100_000
    long_texts = ["5" * 100_000] * 8
    return [
        ("invalid UTF-8", g, b'{"inputs": "\xff\xfe\xc3("}', jh),
        ("NUL bytes in text", g, j({"inputs": "12\u000034\u0000"}), jh),
        ("raw NUL byte in JSON", g, b'{"inputs": "12\x0034"}', jh),
        ("10 MB body", g, b'{"inputs": "' + b"7" * (10 << 20) + b'"}', jh),
        ("100k levels of [", g, b"[" * 100_000, jh),
        ("100k nested arrays as inputs", "/v1/encode", b'{"inputs": ' + nested + b"}", jh),
        ("huge max_new_tokens", g, gen(max_new_tokens=10**12), jh),
        ("max_new_tokens at the limit", g, gen(max_new_tokens=max_new), jh),
        ("top_p 0", g, gen(do_sample=True, top_p=0), jh),
        ("top_p tiny", g, gen(do_sample=True, top_p=1e-30), jh),
        ("negative seed", g, gen(do_sample=True, seed=-7), jh),
        ("seed 2**64", g, gen(do_sample=True, seed=2**64), jh),
        ("10,000 stop strings", g, gen(stop=["x"] * 10_000), jh),
        ("stop string of 100k chars", g, gen(stop=["x" * 100_000]), jh),
        ("temperature 1e308", g, gen(do_sample=True, temperature=1e308), jh),
        ("repetition_penalty 1e308", g, gen(repetition_penalty=1e308), jh),
        ("top_k 10**18", g, gen(do_sample=True, top_k=10**18), jh),
        ("num_beams 10**6", g, gen(num_beams=10**6), jh),
        ("NaN literal", g, b'{"inputs": "1", "parameters": {"temperature": NaN}}', jh),
        ("1e999 float", g, b'{"inputs": "1", "parameters": {"temperature": 1e999}}', jh),
        ("lone surrogate", g, b'{"inputs": "\\ud800"}', jh),
        ("8 inputs of 100k chars", "/v1/encode", j({"inputs": long_texts}), jh),
        ("truncate 8 x 100k chars", "/v1/encode", j({"inputs": long_texts, "truncate": True}), jh),
        ("65 inputs", "/v1/classify", j({"inputs": ["1"] * 65}), jh),
        ("form body", g, b"inputs=1", {"content-type": "application/x-www-form-urlencoded"}),
        ("empty body", g, b"", jh),
        ("JSON null", g, b"null", jh),
        ("openai: 10,000 stops", "/v1/completions", j({"prompt": "1", "stop": ["x"] * 10_000}), jh),
    ]


def _slow_client(
    url: str, seconds: float, max_new: int, alone: dict[Prompt, str], prompts: list[Prompt]
) -> dict[str, Any]:
    """A raw-socket client with a tiny receive buffer that reads one byte a second, for
    ``seconds`` or until two samples after its generation should be over (``over_after``),
    whichever is longer: a large model on a slow host may take longer than ``seconds`` to
    generate ``max_new`` tokens."""
    host, port = url.removeprefix("http://").split(":")
    request = {
        "inputs": PHRASES[0],
        "parameters": {**LONG_STREAM, "max_new_tokens": max_new, "seed": 11},
    }
    started = time.monotonic()
    httpx.post(f"{url}/v1/generate", json=request, timeout=600).raise_for_status()
    generation_s = time.monotonic() - started
    seconds = max(seconds, over_after(generation_s) + 2)
    body = json.dumps({**request, "stream": True}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((host, int(port)))
    sock.sendall(
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sock.settimeout(2.0)
    active: list[float] = []
    in_flight: list[float] = []
    sampled_at: list[float] = []  # seconds after the request was sent
    others_ok = others = 0
    got = 0
    closed_after: float | None = None  # the server closed the connection (it should not)
    start = time.monotonic()
    with httpx.Client(timeout=30) as http:
        while time.monotonic() - start < seconds:
            try:
                chunk = sock.recv(1)
            except TimeoutError:
                chunk = b"?"  # nothing to read this second: still open
            if chunk == b"":
                closed_after = time.monotonic() - start
                break
            got += len(chunk) if chunk != b"?" else 0
            # While it stalls, others are served and its slot is not held.
            p = prompts[others % len(prompts)]
            resp = http.post(f"{url}/v1/generate", json={"inputs": p.inputs, **_params(p)})
            others += 1
            others_ok += resp.status_code == 200 and resp.json()["generated_text"] == alone[p]
            active.append(metric(url, "seq2serve_active_sequences"))
            in_flight.append(metric(url, "seq2serve_requests_in_flight"))
            sampled_at.append(round(time.monotonic() - start, 2))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - start) % 1.0))
    sock.close()
    return {
        "bytes_read": got,
        "generation_alone_s": round(generation_s, 2),
        "sampled_at_s": sampled_at,
        "active_sequences_while_stalled": active,
        "in_flight_while_stalled": in_flight,
        "others_ok": others_ok,
        "others": others,
        "server_closed_after_s": None if closed_after is None else round(closed_after, 1),
    }


def over_after(generation_s: float) -> float:
    """Seconds after the slow reader's request by which its generation should be over,
    beside the requests sent meanwhile: twice its time alone, and a second."""
    return 2 * generation_s + 1


def held_after_generation(slow: dict[str, Any]) -> tuple[list[float], list[float], int]:
    """Of the slow reader's samples taken once its generation should be over
    (``over_after``): the batch slots still active, the server requests still in flight
    beyond the /metrics request that reads them, and how many samples that was. Its tokens
    are generated whether it reads them or not, so both should be none."""
    after = over_after(slow["generation_alone_s"])
    late = [i for i, t in enumerate(slow["sampled_at_s"]) if t >= after]
    active, in_flight = slow["active_sequences_while_stalled"], slow["in_flight_while_stalled"]
    slots = [active[i] for i in late if active[i] > 0]
    requests = [in_flight[i] for i in late if in_flight[i] > 1]
    return slots, requests, len(late)


def part_hostile(
    cfg: ReliabilityConfig,
    url: str,
    prompts: list[Prompt],
    alone: dict[Prompt, str],
    max_new: int,
    r: Report,
    classifies: bool,
) -> None:
    part = "6 hostile"
    outcomes: dict[str, Any] = {}
    bad: list[str] = []
    with httpx.Client(timeout=60) as http:
        for name, path, raw, headers in hostile_cases(max_new):
            started = time.monotonic()
            try:
                resp = http.post(f"{url}{path}", content=raw, headers=headers)
                status: int | str = resp.status_code
            except httpx.HTTPError as err:
                status = type(err).__name__  # a reset after a refused 10 MB body is fair
            seconds = round(time.monotonic() - started, 2)
            healthy = http.get(f"{url}/health").status_code == 200
            outcomes[name] = {"status": status, "seconds": seconds}
            if (isinstance(status, int) and status >= 500) or not healthy or seconds > 30:
                bad.append(f"{name}: {status} in {seconds} s")
    r.details["hostile"] = outcomes
    statuses = sorted({str(o["status"]) for o in outcomes.values()})
    r.check(
        part,
        f"{len(outcomes)} hand-written cases: statuses",
        " ".join(statuses),
        "no 5xx, crash or hang",
        not bad,
    )
    if bad:
        r.details["hostile_failures"] = bad
    slow = _slow_client(url, cfg.slow_client_s, max_new, alone, prompts)
    r.details["slow_client"] = slow
    slots, requests, judged = held_after_generation(slow)
    r.check(
        part,
        "slow reader: batch slots held after its generation",
        f"{len(slots)} of {judged}",
        "0",
        judged > 0 and not slots,
    )
    r.check(
        part,
        "slow reader: others served == alone meanwhile",
        f"{slow['others_ok']}/{slow['others']}",
        "all",
        slow["others"] > 0 and slow["others_ok"] == slow["others"],
    )
    r.check(
        part,
        "slow reader: server requests held after its generation",
        f"{len(requests)} of {judged}",
        "0",
        judged > 0 and not requests,
    )
    active = metric(url, "seq2serve_active_sequences")
    r.check(part, "active sequences after", active, "0", active == 0)
    if cfg.schemathesis_examples:
        _schemathesis(cfg, url, r, classifies)


def schemathesis_command(
    exe: str, url: str, max_examples: int, seed: int, *extra: str
) -> list[str]:
    """Fuzz every operation of the server's OpenAPI document with every check but
    ``positive_data_acceptance``: a schema-valid text can still hold more tokens than the
    model takes, a 422 that JSON Schema cannot express (it counts characters, not tokens)."""
    return [
        *(exe, "run", f"{url}/openapi.json", "--checks", "all"),
        *("--exclude-checks", "positive_data_acceptance"),
        *("--max-examples", str(max_examples), "--seed", str(seed)),
        *("--workers", "2", "--request-timeout", "30"),
        *extra,
    ]


def _schemathesis(cfg: ReliabilityConfig, url: str, r: Report, classifies: bool) -> None:
    """schemathesis over the server's OpenAPI; without a classification head, every
    /v1/classify is the same 422, which schemathesis reports as a schema that rejects
    what it allows, so that operation is left out."""
    exe = Path(sys.executable).parent / "schemathesis"
    part = "6 hostile"
    if not exe.exists():
        r.figure(part, "schemathesis", "not installed: skipped")
        return
    left_out = () if classifies else ("--exclude-path", "/v1/classify")
    command = schemathesis_command(str(exe), url, cfg.schemathesis_examples, 1, *left_out)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=tmp)
    found = re.findall(r"(\d+) generated", out.stdout)
    r.details["schemathesis"] = out.stdout[-3000:]
    r.check(
        part,
        f"schemathesis (max {cfg.schemathesis_examples} examples/operation"
        + (")" if classifies else "; no classification head: /v1/classify left out)"),
        f"exit {out.returncode}, {found[-1] if found else '?'} cases",
        "no issues",
        out.returncode == 0 and "No issues found" in out.stdout,
    )


# ----------------------------------------------------------------------------------------
# 7. Security


SERVING_SOURCES = (
    "seq2serve/engine",
    "seq2serve/service",
    "seq2serve/contract.py",
    "seq2serve/config.py",
    "seq2serve/model/backend.py",
    "seq2serve/model/checkpoint.py",
)
UNSAFE_LOADING = re.compile(
    r"\bimport pickle\b|\bpickle\.|\btorch\.load\(|allow_pickle\s*=\s*True|\bjoblib\b|\bdill\b"
)


def unsafe_loading(root: Path = REPO) -> list[str]:
    """Lines on the serving path that could unpickle (``torch.load``, ``pickle``...)."""
    hits = []
    for source in SERVING_SOURCES:
        path = root / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for n, line in enumerate(file.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if UNSAFE_LOADING.search(code):
                    hits.append(f"{file.relative_to(root)}:{n}: {line.strip()}")
    return hits


def weight_loaders(root: Path = REPO) -> dict[str, bool]:
    """Where weights are read: the torch runtime through safetensors, the ONNX runtime
    through onnxruntime sessions."""
    checkpoint = (root / "seq2serve/model/checkpoint.py").read_text()
    bundle = (root / "seq2serve/engine/bundle.py").read_text()
    return {
        "checkpoint loads with safetensors": "from safetensors" in checkpoint
        and "load_file(" in checkpoint,
        "bundle loads with onnxruntime": "ort.InferenceSession(" in bundle,
    }


def key_comparison_is_constant_time() -> bool:
    from seq2serve.service.deps import require_api_key

    return "hmac.compare_digest(" in inspect.getsource(require_api_key)


def runtime_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def pip_audit(timeout_s: float = 300) -> dict[str, Any]:
    """``pip-audit`` over the runtime dependencies (pinned, so without resolving them).

    Returns ``{"skipped": reason}`` when pip-audit is missing or cannot reach its advisory
    database."""
    exe = Path(sys.executable).parent / "pip-audit"
    if not exe.exists():
        return {"skipped": "pip-audit is not installed (pip install '.[dev]')"}
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(runtime_requirements()) + "\n")
        try:
            out = subprocess.run(
                [
                    str(exe),
                    "-r",
                    str(reqs),
                    "--no-deps",
                    "--progress-spinner",
                    "off",
                    "--format",
                    "json",
                ],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"skipped": f"pip-audit did not answer within {timeout_s:.0f} s"}
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"pip-audit could not run (exit {out.returncode}): {reason[:300]}"}
    audited = [d for d in report["dependencies"] if "skip_reason" not in d]
    skipped = {d["name"]: d["skip_reason"] for d in report["dependencies"] if "skip_reason" in d}
    vulns = [
        f"{d['name']} {d['version']}: {v['id']} (fixed in {', '.join(v['fix_versions']) or '-'})"
        for d in audited
        for v in d.get("vulns", [])
    ]
    return {
        "dependencies": len(report["dependencies"]),
        "audited": len(audited),
        "skipped": skipped,
        "vulnerabilities": vulns,
    }


def part_security(cfg: ReliabilityConfig, r: Report) -> None:
    part = "7 security"
    key = "reliability-" + hashlib.sha256(os.urandom(16)).hexdigest()[:16]
    refused: list[str] = []
    routes: list[tuple[str, str]] = []
    with server(cfg, SEQ2SERVE_API_KEY=key) as (_, url), httpx.Client(timeout=30) as http:
        spec = http.get(f"{url}/openapi.json").json()
        routes = [
            (method.upper(), path)
            for path, ops in spec["paths"].items()
            if path.startswith("/v1")
            for method in ops
        ]
        # TGI's paths are served outside the document, behind the same key.
        routes += [("POST", "/"), ("POST", "/generate"), ("POST", "/generate_stream")]
        body = {"inputs": "1"}
        for method, path in routes:
            for label, headers in (
                ("missing", {}),
                ("wrong", {"Authorization": f"Bearer {key[:-1]}x"}),
                ("not bearer", {"Authorization": f"Basic {key}"}),
            ):
                resp = http.request(method, f"{url}{path}", json=body, headers=headers)
                if resp.status_code != 401:
                    refused.append(f"{method} {path} {label} key: {resp.status_code}")
        good = http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    r.check(
        part,
        "/v1 routes refusing missing/wrong key",
        f"{len(routes) * 3 - len(refused)}/{len(routes) * 3}",
        "all 401",
        not refused,
    )
    r.check(part, "right key accepted", good.status_code, "200", good.status_code == 200)
    constant = key_comparison_is_constant_time()
    r.check(part, "key compared with hmac.compare_digest", constant, "True", constant)
    hits = unsafe_loading()
    r.details["unsafe_loading"] = hits
    r.check(part, "pickle / torch.load on the serving path", len(hits), "0", not hits)
    for name, ok in weight_loaders().items():
        r.check(part, name, ok, "True", ok)
    if not cfg.pip_audit:
        r.figure(part, "pip-audit", "not in this form (tests/test_reliability.py runs it)")
        return
    audit = pip_audit()
    r.details["pip_audit"] = audit
    if "vulnerabilities" not in audit:
        r.figure(part, "pip-audit", f"skipped: {audit['skipped']}")
        return
    r.figure(
        part,
        "pip-audit: runtime deps audited / not on pypi.org",
        f"{audit['audited']} / {len(audit['skipped'])} of {audit['dependencies']}",
    )
    r.check(
        part,
        "pip-audit: known vulnerabilities",
        len(audit["vulnerabilities"]),
        "0",
        not audit["vulnerabilities"],
    )


# ----------------------------------------------------------------------------------------
# The suite


def run(cfg: ReliabilityConfig, progress: Callable[[str], None] | None = None) -> Report:
    say = progress or (lambda msg: None)
    report = Report()
    report.details["config"] = {**asdict(cfg), "model": str(cfg.model)}
    tokenizer = Tokenizer.from_file(str(cfg.model / contract.TOKENIZER_FILE))
    with server(cfg) as (proc, url):
        info = httpx.get(f"{url}/info", timeout=10).json()
        limits = info["limits"]
        max_input, max_new = int(limits["max_input_tokens"]), int(limits["max_new_tokens"])
        prompts = prompt_pool(tokenizer, max_input)
        say("alone: each prompt, one request at a time")
        alone = alone_results(url, prompts)
        say(f"load: {cfg.load_clients} streaming clients for {cfg.load_seconds:.0f} s")
        part_load(cfg, url, prompts, alone, report)
        say(f"soak: {cfg.soak_seconds:.0f} s of mixed traffic")
        texts = texts_by_length(tokenizer, max_input)
        classifies = bool(info.get("config", {}).get("labels", True))
        part_soak(cfg, proc, url, texts, report, classifies)
        say(f"cancel: {cfg.cancel_streams} streams dropped at random points")
        part_cancel(cfg, url, prompts, alone, max_new, report)
        say("hostile input")
        part_hostile(cfg, url, prompts, alone, max_new, report, classifies)
    say("overload: past the queue bound")
    part_overload(cfg, report)
    say("faults: bad bundles")
    part_bad_bundles(cfg, report)
    say(f"faults: SIGTERM during {cfg.drain_streams} streams")
    part_drain(cfg, report)
    say("security")
    part_security(cfg, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seq2serve.reliability",
        description="Load, soak, cancellation, overload, faults, hostile input and security "
        "checks against a real server on 127.0.0.1; prints a report and writes JSON.",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundle directory")
    parser.add_argument("--short", action="store_true", help="the short form (about a minute)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench-results" / "reliability.json", help="JSON out"
    )
    parser.add_argument("--threads", type=int, help="onnxruntime threads for the servers")
    args = parser.parse_args(argv)
    cfg = short_config(args.model) if args.short else ReliabilityConfig(model=args.model)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    started = time.monotonic()
    report = run(cfg, progress=lambda m: print(f"[reliability] {m}", file=sys.stderr, flush=True))
    report.details["seconds"] = round(time.monotonic() - started, 1)
    print(report.table())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    print(f"\nJSON: {args.out}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
