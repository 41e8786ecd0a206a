"""``seq2serve bench``: decode speed per engine against the memory-bandwidth floor, per-step
cost growth, and what serving over HTTP costs against the engine in-process.

Everything is measured in one run so that ratios are meaningful on a shared machine where
absolute numbers drift. Timings are medians over repeats, after a warm-up.

Parts:
- decode: greedy generation of ``--new-tokens`` tokens (EOS ignored, so every engine does the
  same work) from ``--source-tokens``-token sources, encoder included, at each batch size, for
  onnx fp32 and int8, torch with the KV cache and recomputing the whole prefix, and the peers
  (``transformers``, CTranslate2 fp32 and int8) on the same weights when installed. Each
  engine runs in a process of its own (``seq2serve.bench_engines``), which also gives its
  resident memory;
- floor: the bytes a batch-1 decode step must read (the decoder's weights, the LM head
  included, and the KV caches) over the machine's measured read bandwidth;
- step cost: decoder step 16 against step 256 for one sequence, the two taking turns (the
  cache keeps a step's cost flat; recomputation would grow it linearly);
- serving, per precision: one streaming client over loopback against the same requests one at
  a time in-process; N concurrent streaming clients (started evenly over one request's
  length, so they join the running batch one by one as real traffic does) against the same
  requests as one in-process batch of N; time to first token against the encoder's time plus
  two decode steps at batch N; the server's resident memory; the same loads against
  CTranslate2 behind FastAPI (``seq2serve.hf.ct2_server``, one ``generate_tokens`` per request:
  how people serve it today) when its peer rows run; then continuous batching against a batch
  size of 1;
- goals: the ratios above, each against its bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from seq2serve import bench_engines, contract
from seq2serve.bench_engines import proc_status, sources, status_mb
from seq2serve.config import ModelConfig
from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import DecodeBatch, SamplingParams
from seq2serve.engine.memory import map_large_blocks
from seq2serve.engine.runtime import Backend, OnnxBackend
from seq2serve.engine.scheduler import Engine, EngineLimits, lower_priority

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    model: Path
    batch_sizes: tuple[int, ...] = (1, 8)
    source_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 5
    threads: int | None = None
    device: str = "cpu"  # cuda: torch rows on the GPU, onnx with CUDA's execution provider
    long_steps: int = 256
    server_clients: int = 16
    server_seconds: float = 15.0
    server: bool = True
    decode: bool = True  # the per-engine decode rows (the slow part with every peer)
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


# ----------------------------------------------------------------------------------------
# The memory-bandwidth floor


# The floors of the engine's batch-1 steps when their LM heads are screened: fp32 in int8,
# int8 in 4 bits.
SCREENED = "fp32 screened head"
SCREENED_INT8 = "int8 screened head"


def read_bandwidth(threads: int, megabytes: int = 512) -> float:
    """GB/s that ``threads`` threads read from memory: each sums its share of a buffer far
    larger than any cache (numpy's reduction releases the GIL). Best of five."""
    data = np.ones(megabytes * (1 << 20) // 4, np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(5):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


# onnx.TensorProto data types: FLOAT, UINT8, INT8.
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1}


def step_bytes(
    model: Path,
    quantized: bool,
    cfg: ModelConfig,
    source: int,
    past: int,
    file: str = contract.DECODER_FILE,
) -> int:
    """Bytes one batch-1 decode step reads: every decoder weight a step multiplies by (the LM
    head included; a table only gathered from, like the positions, reads a row), the cached
    self-attention keys/values of ``past`` tokens and the cross-attention ones of ``source``.

    ``file``: the graph whose weights count. decoder.onnx holds the model's weights as they
    are; a step graph with a screened head multiplies by the head's screen and only gathers
    rows of the table it screens: of the fp32 table (its exact branch, a subgraph, does not
    count), or of the int8 one, which the int8 head that a batch-1 step skips reads through a
    ``Transpose``."""
    import onnx  # an export dependency: imported only when the floor is computed

    from seq2serve.export.screen import is_screened

    proto = onnx.load(str(model / contract.onnx_file(file, quantized)), load_external_data=False)
    graph = proto.graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    skipped = {"Gather", "Transpose"} if is_screened(proto) else {"Gather"}
    weights = sum(
        int(np.prod(init.dims)) * _ELEMENT_BYTES.get(init.data_type, 4)
        for init in graph.initializer
        if init.data_type in _ELEMENT_BYTES and readers.get(init.name, set()) - skipped
    )
    kv = 2 * cfg.n_decoder_layers * cfg.n_heads * cfg.head_dim * (past + source) * 4
    return weights + kv


def screened_step(model: Path, quantized: bool) -> bool:
    """Whether the bundle's step graph of this precision has a screened LM head."""
    import onnx

    from seq2serve.export.screen import is_screened

    path = model / contract.onnx_file(contract.DECODER_STEP_FILE, quantized)
    return path.exists() and is_screened(onnx.load(str(path), load_external_data=False))


# ----------------------------------------------------------------------------------------
# Decode rows, one child process per engine


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def peer_models(
    cfg: BenchConfig, tmp: Path, progress: Progress
) -> tuple[Path | None, dict[str, Path]]:
    """The Hugging Face directory of the bundle's weights (for the transformers row), and
    those weights converted for CTranslate2 into ``tmp``, per precision (for its decode rows
    and its server); empty where a package or the directory is missing."""
    hf_dir = None
    if _installed("transformers"):
        from seq2serve.hf.peers import find_hf_source

        hf_dir = find_hf_source(cfg.model, cfg.hf_model)
    if hf_dir is None:
        progress("no Hugging Face model of these weights (or the hf extra): peer rows skipped")
        return None, {}
    if not _installed("ctranslate2"):
        progress("ctranslate2 is not installed: its rows are skipped")
        return hf_dir, {}
    from seq2serve.hf.peers import convert_ctranslate2

    converted: dict[str, Path] = {}
    for precision in ("fp32", "int8"):
        out = tmp / f"ct2-{precision}"
        progress(f"converting the model for CTranslate2 {precision}")
        try:
            convert_ctranslate2(hf_dir, out, "int8" if precision == "int8" else None)
        except (ValueError, RuntimeError, OSError) as err:
            progress(f"CTranslate2 cannot convert this model ({err}): rows skipped")
            break
        converted[precision] = out
    return hf_dir, converted


def decode_rows(
    cfg: BenchConfig,
    progress: Progress,
    bandwidth: list[float] | None = None,
    hf_dir: Path | None = None,
    ct2_models: dict[str, Path] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every available engine's figures per batch size, and its resident memory (the peers
    from ``peer_models``). After each engine's run the machine's read bandwidth is measured
    again, into ``bandwidth``."""
    engines = ["onnx fp32"]
    if (cfg.model / contract.onnx_file(contract.ENCODER_FILE, True)).exists():
        engines.append("onnx int8")
    if _installed("torch"):
        engines += ["torch cached", *(["torch uncached"] if cfg.uncached else [])]
    else:
        progress("PyTorch is not installed: torch rows skipped")
    options = {
        "batch_sizes": cfg.batch_sizes,
        "source_tokens": cfg.source_tokens,
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "threads": cfg.threads,
        "device": cfg.device,
    }
    rows: dict[str, dict[str, Any]] = {}
    jobs: list[tuple[str, dict[str, Any]]] = [(engine, {}) for engine in engines]
    if hf_dir is not None:
        jobs.append(("transformers (cached)", {"hf_model": hf_dir}))
    for precision, path in (ct2_models or {}).items():
        jobs.append((f"ctranslate2 {precision}", {"ct2_model": path}))
    # Two rounds, the second in reverse order: a slow spell of the shared host lands on one
    # round of an engine, and each figure is the faster round's (noise only adds).
    for r, order in enumerate((jobs, jobs[::-1])):
        for engine, extra in order:
            if r and engine not in rows:
                continue  # it failed in the first round
            progress(f"decode, round {r + 1}/2: {engine}")
            cmd = bench_engines.command(engine, cfg.model, **options, **extra)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                progress(f"{engine} failed, its row is skipped: {done.stderr.strip()[-500:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows[engine] = _faster(rows[engine], result) if engine in rows else result
            if bandwidth is not None:
                bandwidth.append(read_bandwidth(cfg.threads or os.cpu_count() or 1))
    return rows


def _faster(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per batch size the faster of two rounds' figures; the larger resident memory."""
    rows = {k: min(a["rows"][k], b["rows"][k], key=lambda f: f["ms_per_step"]) for k in a["rows"]}
    memory: dict[str, Any] = {
        k: max(a[k], b[k]) for k in ("rss_mb", "peak_rss_mb") if k in a and k in b
    }
    return {"rows": rows, **memory}


def bench_step_growth(backend: Backend, tokenizer: Any, cfg: BenchConfig) -> dict[str, float]:
    """Per-step time of one sequence around step 16 and around step ``long_steps``, the two
    taking turns: a sequence 12 steps in and one ``long_steps - 4`` steps in step one after
    the other, eight times each, so that both figures come from the same second of a host
    whose speed drifts (int8 reference model, 2-core Xeon: 1.45 in a full run when step 256
    was timed half a second after step 16; taking turns, 1.03-1.07 in three runs)."""
    steps = min(cfg.long_steps, backend.config.max_target_positions - 8)
    (src,) = sources(backend.config.vocab_size, 1, cfg.source_tokens, backend.config.eos_token_id)

    def stepped(n: int) -> DecodeBatch:
        """A batch of one sequence that has taken ``n`` steps (of ``steps + 8``)."""
        batch = DecodeBatch(backend, tokenizer)
        params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
        batch.add([batch.new_sequence(src, params)])
        for _ in range(n):
            batch.step()
        return batch

    def timed(batch: DecodeBatch) -> float:
        start = time.perf_counter()
        batch.step()
        return time.perf_counter() - start

    early_times: list[float] = []
    late_times: list[float] = []
    for _ in range(3):
        early, late = stepped(12), stepped(steps - 4)
        for _ in range(8):
            early_times.append(timed(early))
            late_times.append(timed(late))
    early_s, late_s = statistics.median(early_times), statistics.median(late_times)
    return {
        "step": steps,
        "ms_at_step_16": round(1000 * early_s, 3),
        f"ms_at_step_{steps}": round(1000 * late_s, 3),
        "ratio": round(late_s / early_s, 3),
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
    """`seq2serve serve` for ``model`` on a free port of 127.0.0.1 (see ``launch``)."""
    return launch(partial(serve_command, model), env_extra)


def launch(
    command: Callable[[int], list[str]], env_extra: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    """``command(port)`` on a free port of 127.0.0.1, once its ``/ready`` answers 200;
    returns the process and its URL."""
    import httpx

    port = free_port()
    # The server's log goes to a file: an unread pipe fills up and blocks the server.
    log_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
    env = {**os.environ, "SEQ2SERVE_LOG_LEVEL": "WARNING", **env_extra}
    proc = subprocess.Popen(
        command(port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_file.seek(0)
            raise RuntimeError(f"server exited: {log_file.read().decode()[-2000:]}")
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


class _Connection:
    """A minimal HTTP/1.1 client for Server-Sent Events over one kept-alive connection.

    The load runs on the machine it measures; httpx spends more CPU per event than the server
    does, which would take cores from the server being measured. This reads the status line,
    the headers and the chunked body, and counts events without parsing their JSON.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(
        self, path: str, body: dict[str, Any], on_event: Callable[[bool], None]
    ) -> int:
        """POST ``body``; ``on_event(is_error)`` per SSE event. Returns the status code."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = head.lower()
        if b"transfer-encoding: chunked" not in headers:
            length = 0
            for line in headers.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await self.reader.readexactly(length)
            return status
        pending = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return status
            pending += data[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data:"):
                    on_event(False)
                elif event.startswith(b"event: error"):
                    on_event(True)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


class _Timing:
    """One request's token times: time to first token, inter-token latencies, stamps."""

    def __init__(
        self,
        start: float,
        window: float,
        ttft: list[float],
        itl: list[float],
        stamps: list[float],
    ) -> None:
        self.start = self.last = start
        self.counted = start >= window  # requests started during the ramp-up are not timed
        self.ttft, self.itl, self.stamps = ttft, itl, stamps
        self.failed = False

    def event(self, is_error: bool) -> None:
        now = time.perf_counter()
        if is_error:
            self.failed = True
            return
        if self.counted:
            (self.ttft if self.last == self.start else self.itl).append(now - self.last)
        self.last = now
        self.stamps.append(now)


async def _closed_loop(
    clients: int,
    seconds: float,
    stagger: float,
    request: Callable[[int, int, _Timing], Awaitable[bool]],
) -> dict[str, Any]:
    """``clients`` closed-loop clients; client i starts ``i * stagger`` seconds in and sends
    its n-th request with ``request(i, n, timing)`` (True: it succeeded). Figures cover the
    window after the last client started: ``seconds`` long."""
    ttft: list[float] = []
    itl: list[float] = []
    stamps: list[float] = []
    outcomes: list[bool] = []
    window = time.perf_counter() + (clients - 1) * stagger
    deadline = window + seconds

    async def client(i: int) -> None:
        await asyncio.sleep(i * stagger)
        n = 0
        while time.perf_counter() < deadline:
            timing = _Timing(time.perf_counter(), window, ttft, itl, stamps)
            outcomes.append(await request(i, n, timing))
            n += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": sum(outcomes),
        "tokens": sum(window <= t <= deadline for t in stamps),
        "errors": len(outcomes) - sum(outcomes),
        "ttft": ttft,
        "itl": itl,
    }


async def _load(
    url: str,
    texts: list[str],
    clients: int,
    seconds: float,
    new_tokens: int,
    stagger: float = 0.0,
) -> dict[str, Any]:
    """Closed-loop streaming clients over HTTP (see ``_closed_loop``), one kept-alive
    connection each."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connections = [_Connection(host, int(port)) for _ in range(clients)]

    async def request(i: int, n: int, timing: _Timing) -> bool:
        body = {
            "inputs": texts[(i + n) % len(texts)],
            "parameters": {"max_new_tokens": new_tokens},
            "stream": True,
        }
        try:
            status = await connections[i].post_stream("/v1/generate", body, timing.event)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await connections[i].close()
            connections[i] = _Connection(host, int(port))
            return False
        return status == 200 and not timing.failed

    try:
        return await _closed_loop(clients, seconds, stagger, request)
    finally:
        for connection in connections:
            await connection.close()


def client_nice(pid: int) -> int:
    """The nice value for a load client of the server ``pid``: halfway between its event loop
    (the main thread) and its least favoured thread, the compute threads when a token costs
    enough for the server to lower them (``scheduler.AUTO_NICE``); 0 off Linux.

    The client runs on the cores the server uses, where real clients are elsewhere. At the
    loop's priority it preempted the loop for the tokens it had just been sent: int8
    reference, 16 streams started together, 0.1 to 0.8 involuntary switches of the loop a
    token, 0.00 to 0.02 at nice 5 with the compute threads at 10. Four interleaved rounds on
    2 cores: 16 streams started together 2,038 -> 2,128 tokens/s, arriving one by one 1,843
    -> 1,933, time to first token p50 / p95 8.18 / 16.88 -> 8.02 / 16.71 ms. Below the
    compute threads it would read its tokens late: where they stay at the loop's priority
    (the HTTP-bound default model), nice 5 raised its time to first token p50 from 4.8 to
    6.0 ms, so it stays at the loop's."""
    try:
        nice = {
            int(tid): os.getpriority(os.PRIO_PROCESS, int(tid))
            for tid in os.listdir(f"/proc/{pid}/task")
        }
    except OSError:  # no such process, a thread gone, not Linux
        return 0
    loop = nice.get(pid, 0)
    return loop + max(0, max(nice.values(), default=loop) - loop) // 2


def run_client(load: Coroutine[Any, Any, dict[str, Any]], nice: int) -> dict[str, Any]:
    """Run ``load`` (a ``_load``) to its end on a thread of its own at ``nice`` (see
    ``client_nice``; the caller's own priority stays as it is: lowering a nice value back
    needs privilege)."""

    def run() -> dict[str, Any]:
        lower_priority((threading.get_native_id(),), nice)
        return asyncio.run(load)

    with ThreadPoolExecutor(1, thread_name_prefix="seq2serve-bench-client") as pool:
        return pool.submit(run).result()


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Load runs of one kind, pooled: tokens/s over their windows, latency percentiles over
    every sample."""

    def pct(values: list[float], q: float) -> float:
        return round(1000 * float(np.percentile(values, q)), 2) if values else float("nan")

    ttft = [t for r in runs for t in r["ttft"]]
    itl = [t for r in runs for t in r["itl"]]
    return {
        "clients": runs[0]["clients"],
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "requests": sum(r["requests"] for r in runs),
        "tokens_per_s": round(sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs), 1),
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p95": pct(ttft, 95),
        "itl_ms_p50": pct(itl, 50),
        "itl_ms_p95": pct(itl, 95),
        "errors": sum(r["errors"] for r in runs),
    }


class Resident(NamedTuple):
    """One sample of a process's resident memory, MB: the whole, and its anonymous pages
    (heap, arrays, caches) apart."""

    rss: float
    anonymous: float

    @property
    def files(self) -> float:
        """The rest: the libraries' and bundle's mapped files, which the kernel can drop and
        read back (``/proc/PID/status``: VmRSS is RssAnon + RssFile + RssShmem; shared
        memory counts with the files)."""
        return self.rss - self.anonymous


class ResidentMemory:
    """Samples a process's resident memory from /proc every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[Resident] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                fields = proc_status(self.pid)
            except OSError:
                return
            self.samples.append(Resident(status_mb(fields, "VmRSS"), status_mb(fields, "RssAnon")))

    def __enter__(self) -> ResidentMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_figures(samples: list[Resident]) -> dict[str, float]:
    """The median and peak resident memory of ``samples``, and the peak's anonymous and file
    pages."""
    if not samples:
        return {}
    peak = max(samples, key=lambda r: r.rss)
    return {
        "rss_mb_median": round(statistics.median(r.rss for r in samples), 1),
        "rss_mb_max": round(peak.rss, 1),
        "rss_anon_mb_at_max": round(peak.anonymous, 1),
        "rss_file_mb_at_max": round(peak.files, 1),
    }


def serving_texts(tokenizer: Any, cfg: ModelConfig, n: int, length: int) -> list[str]:
    """``n`` request texts of about ``length`` tokens each: random ordinary tokens, as text.

    Random pieces written out need not tokenize back to themselves (a filler piece a
    SentencePiece model lacks comes back as characters); each text is cut until the server's
    tokenization of it (nearly) fits."""
    rows = sources(cfg.vocab_size, n, length, cfg.eos_token_id, seed=1)
    texts = []
    for row in rows:
        text = tokenizer.decode(row[:-1], skip_special_tokens=True)
        for _ in range(8):
            ids = tokenizer.encode(text).ids
            if len(ids) <= length:
                break
            text = tokenizer.decode(ids[: length - 1], skip_special_tokens=True)
        texts.append(text)
    return texts


class InProcess:
    """The engine alone (no HTTP, no scheduler) on the serving requests: the baselines the
    server is measured against. ``alone`` runs requests one at a time (the single HTTP stream
    cycles through the same requests); ``batch`` runs ``clients`` of them as one batch, each
    with its encoder call (EOS ends a request as it does over HTTP)."""

    def __init__(
        self, backend: Backend, tokenizer: Any, texts: list[str], clients: int, new_tokens: int
    ) -> None:
        self.backend, self.tokenizer, self.clients = backend, tokenizer, clients
        self.params = SamplingParams(max_new_tokens=new_tokens)
        self.ids = [tokenizer.encode(t).ids for t in texts]

    def _generate(self, rows: list[list[int]]) -> tuple[int, float, list[float]]:
        """Tokens made, seconds taken, and each decoder step's seconds."""
        batch = DecodeBatch(self.backend, self.tokenizer)
        seqs = [batch.new_sequence(r, self.params) for r in rows]
        start = time.perf_counter()
        batch.add(seqs)
        steps = []
        while len(batch):
            t = time.perf_counter()
            batch.step()
            steps.append(time.perf_counter() - t)
        return sum(len(s.generated) for s in seqs), time.perf_counter() - start, steps

    def alone(self, part: slice = slice(None)) -> float:
        """Tokens/s over the requests of ``part``, one after another."""
        tokens = seconds = 0.0
        for row in self.ids[part]:
            n, t, _ = self._generate([row])
            tokens, seconds = tokens + n, seconds + t
        return tokens / seconds

    def batch(self) -> dict[str, float]:
        """The batch's tokens/s and median step, and one request's encoder call (the time to
        first token's bound is the encoder's time plus two steps, taken together)."""
        rows = [self.ids[i % len(self.ids)] for i in range(self.clients)]
        n, t, steps = self._generate(rows)
        one = np.asarray([self.ids[0]], np.int64)
        encoder = []
        for _ in range(10):
            start = time.perf_counter()
            self.backend.encode(one, np.ones_like(one))
            encoder.append(time.perf_counter() - start)
        return {
            "batch_tokens_per_s": n / t,
            "batch_step_ms": 1000 * statistics.median(steps),
            "encoder_ms": 1000 * statistics.median(encoder),
        }


async def _engine_load(
    engine: Engine,
    ids: list[list[int]],
    clients: int,
    seconds: float,
    new_tokens: int,
    stagger: float,
) -> dict[str, Any]:
    """``_load``'s traffic handed to the engine directly: no HTTP, no SSE, no tokenizing."""
    logging.getLogger("seq2serve.engine.scheduler").setLevel(logging.WARNING)  # no ready/stop
    params = SamplingParams(max_new_tokens=new_tokens)

    async def request(i: int, n: int, timing: _Timing) -> bool:
        async for _ in engine.generate_stream(ids[(i + n) % len(ids)], params):
            timing.event(False)
        return True

    await engine.start()
    try:
        return await _closed_loop(clients, seconds, stagger, request)
    finally:
        await engine.stop()


def _tokens_per_s(run: dict[str, Any]) -> float:
    return float(run["tokens"]) / run["seconds"]


def _median_ratio(pairs: Iterable[tuple[float, float]]) -> float:
    """The median over rounds of (measured / baseline): each round against its own baseline."""
    return round(statistics.median(a / max(b, 1e-9) for a, b in pairs), 3)


# The machine's speed drifts by tens of percent over seconds to minutes on shared hosts.
# Each load is bracketed by its in-process baseline, measured just before and just after it
# (their mean is the round's baseline), and each ratio is the median of the rounds' ratios.
ROUNDS = 3


def bench_serving(
    cfg: BenchConfig,
    quantized: bool,
    progress: Progress,
    compare_batch_1: bool,
    ct2_model: Path | None = None,
) -> dict[str, Any]:
    name = "int8" if quantized else "fp32"
    # The baselines run under the server's allocator policy from the first round on (the
    # engine sets it when it starts, in the server and here in round one's engine run): large
    # blocks are mappings of their own, so a burst's buffers cost page faults on both sides.
    map_large_blocks()
    bundle = load_bundle(cfg.model, quantized=quantized, device=cfg.device, threads=cfg.threads)
    backend = OnnxBackend(bundle)
    clients = cfg.server_clients
    texts = serving_texts(bundle.tokenizer, bundle.config, clients, cfg.source_tokens)
    engine = InProcess(backend, bundle.tokenizer, texts, clients, cfg.new_tokens)
    InProcess(backend, bundle.tokenizer, texts[:1], 1, 4).alone()  # warm-up
    env = {
        "SEQ2SERVE_MAX_BATCH_SIZE": str(max(32, clients)),
        "SEQ2SERVE_MAX_QUEUE": "4096",
        "SEQ2SERVE_QUANTIZED": "true" if quantized else "false",
    }
    if cfg.threads:
        env["SEQ2SERVE_NUM_THREADS"] = str(cfg.threads)
    if cfg.device != "cpu":
        env["SEQ2SERVE_DEVICE"] = cfg.device
    # Per round: the load, and its in-process baseline (the mean of the two around it).
    single: list[tuple[dict[str, Any], float]] = []
    many: list[tuple[dict[str, Any], float]] = []  # staggered arrivals
    together: list[tuple[dict[str, Any], float]] = []  # as many streams, started at once
    alike: list[dict[str, Any]] = []  # the same arrivals, to the engine in-process
    alone: list[float] = []
    batches: list[dict[str, float]] = []
    limits = EngineLimits(max_batch_size=max(32, clients), max_queue=4096)
    memory: list[Resident] = []
    # The single stream's baseline: half the requests before it, half after (one: before and after).
    half = slice(0, max(1, len(texts) // 2)), slice(len(texts) // 2, None)
    proc, url = start_server(cfg.model, env)
    nice = client_nice(proc.pid)
    try:
        run_client(_load(url, texts, 1, 1.0, cfg.new_tokens), nice)  # warm-up
        for r in range(ROUNDS):
            progress(f"serving {name}, round {r + 1}/{ROUNDS}: in-process, 1 and {clients} streams")
            seconds = cfg.server_seconds / ROUNDS
            alone.append(engine.alone(half[0]))
            run = run_client(_load(url, texts, 1, seconds / 2, cfg.new_tokens), nice)
            alone.append(engine.alone(half[1]))
            single.append((run, statistics.mean(alone[-2:])))
            batches.append(engine.batch())
            # Clients start evenly over one request's length: they reach the batch one by one.
            stagger = cfg.new_tokens * batches[-1]["batch_step_ms"] / 1000 / clients
            with ResidentMemory(proc.pid) as sampler:
                run = run_client(_load(url, texts, clients, seconds, cfg.new_tokens, stagger), nice)
            memory += sampler.samples
            served = Engine(backend, bundle.tokenizer, limits)
            alike.append(
                asyncio.run(
                    _engine_load(served, engine.ids, clients, seconds, cfg.new_tokens, stagger)
                )
            )
            batches.append(engine.batch())
            many.append((run, _mean_rate(batches[-2:])))
            # The static batch's own traffic: every stream starts at once (the comparison that
            # leaves only what HTTP, SSE and the scheduler cost).
            run = run_client(_load(url, texts, clients, seconds, cfg.new_tokens), nice)
            batches.append(engine.batch())
            together.append((run, _mean_rate(batches[-2:])))
    finally:
        stop_server(proc)
    figures = {
        "source_tokens": float(np.mean([len(i) for i in engine.ids])),
        "alone_tokens_per_s": round(statistics.median(alone), 3),
        **{k: round(statistics.median(b[k] for b in batches), 3) for k in batches[0]},
    }
    result: dict[str, Any] = {
        "rounds": ROUNDS,
        "in_process": figures,
        "http_1": summarize([h for h, _ in single]),
        "http_n": summarize([h for h, _ in many]),
        "engine_n": summarize(alike),
        "http_n_together": summarize([h for h, _ in together]),
        "ttft_bound_ms": round(figures["encoder_ms"] + 2 * figures["batch_step_ms"], 2),
        "ratio_http_1": _median_ratio((_tokens_per_s(h), base) for h, base in single),
        "ratio_http_n": _median_ratio((_tokens_per_s(h), base) for h, base in many),
        "ratio_http_n_together": _median_ratio((_tokens_per_s(h), base) for h, base in together),
        # HTTP's own share: the server against the engine in-process under the same arrivals.
        "ratio_http_n_engine": _median_ratio(
            (_tokens_per_s(h), _tokens_per_s(e)) for (h, _), e in zip(many, alike, strict=True)
        ),
    }
    result["http_n"].update(memory_figures(memory))
    del backend, bundle, engine
    gc.collect()
    stagger = cfg.new_tokens * figures["batch_step_ms"] / 1000 / clients
    if ct2_model is not None:
        progress(f"serving {name}: FastAPI + CTranslate2, 1 and {clients} streams")
        try:
            result["ctranslate2_http"] = bench_ct2_server(cfg, ct2_model, texts, stagger)
        except RuntimeError as err:
            progress(f"the CTranslate2 server failed, its row is skipped: {err}")
        if "ctranslate2_http" in result:
            from seq2serve.hf.ct2_server import workers

            # The peer's load with seq2serve decoding as many requests at a time as the peer:
            # the server's memory apart from the requests in flight that the peer keeps waiting.
            limit = workers(cfg.threads)
            progress(f"serving {name}: {clients} streams, batch limit {limit} (the peer's)")
            result["http_n_peer_batch"] = bench_at_batch_limit(
                cfg, env, limit, texts, stagger, cfg.server_seconds / ROUNDS
            )
    if compare_batch_1:
        progress(f"serving {name}: {clients} streaming clients, batch size 1")
        result["http_n_batch_1"] = bench_at_batch_limit(
            cfg, env, 1, texts, stagger, cfg.server_seconds
        )
    return result


def _mean_rate(batches: list[dict[str, float]]) -> float:
    return statistics.mean(b["batch_tokens_per_s"] for b in batches)


def bench_ct2_server(
    cfg: BenchConfig, ct2_model: Path, texts: list[str], stagger: float
) -> dict[str, Any]:
    """The same loads against CTranslate2 behind FastAPI (``seq2serve.hf.ct2_server``, what
    people serve with today): one stream, then ``server_clients`` streams arriving one by one
    with the server's stagger, with its resident memory."""
    from seq2serve.hf import ct2_server

    tokenizer = cfg.model / contract.TOKENIZER_FILE
    proc, url = launch(lambda port: ct2_server.command(ct2_model, tokenizer, port, cfg.threads), {})
    nice = client_nice(proc.pid)
    try:
        run_client(_load(url, texts, 1, 1.0, cfg.new_tokens), nice)  # warm-up
        seconds = cfg.server_seconds / ROUNDS
        one = run_client(_load(url, texts, 1, seconds / 2, cfg.new_tokens), nice)
        many = staggered_load(proc.pid, url, cfg, texts, stagger, seconds)
    finally:
        stop_server(proc)
    return {"http_1": summarize([one]), "http_n": many}


def bench_at_batch_limit(
    cfg: BenchConfig,
    env: dict[str, str],
    limit: int,
    texts: list[str],
    stagger: float,
    seconds: float,
) -> dict[str, Any]:
    """``staggered_load`` for ``seconds`` against a server of ours whose batch limit is
    ``limit``, after a one-second warm-up stream."""
    proc, url = start_server(cfg.model, {**env, "SEQ2SERVE_MAX_BATCH_SIZE": str(limit)})
    try:
        run_client(_load(url, texts, 1, 1.0, cfg.new_tokens), client_nice(proc.pid))  # warm-up
        load = staggered_load(proc.pid, url, cfg, texts, stagger, seconds)
        return {"max_batch_size": limit, **load}
    finally:
        stop_server(proc)


def staggered_load(
    pid: int, url: str, cfg: BenchConfig, texts: list[str], stagger: float, seconds: float
) -> dict[str, Any]:
    """``server_clients`` streams arriving ``stagger`` seconds apart against the server
    ``pid`` at ``url`` for ``seconds``: the load's figures and the server's resident memory
    under it."""
    with ResidentMemory(pid) as sampler:
        run = run_client(
            _load(url, texts, cfg.server_clients, seconds, cfg.new_tokens, stagger),
            client_nice(pid),
        )
    return {**summarize([run]), **memory_figures(sampler.samples)}


# ----------------------------------------------------------------------------------------
# Goals and the suite


def _goal(name: str, value: float, bar: float, at_most: bool) -> dict[str, Any]:
    ok = value <= bar if at_most else value >= bar
    return {"goal": name, "value": round(value, 3), "bar": bar, "at_most": at_most, "met": ok}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ratio the benchmark exists to watch, against its bar."""
    out = []
    decode = results["decode"]

    def row(engine: str, batch: str) -> dict[str, float] | None:
        rows: dict[str, dict[str, float]] = decode.get(engine, {}).get("rows", {})
        return rows.get(batch)

    one = "1"
    most = str(max(int(b) for e in decode.values() for b in e["rows"]) if decode else 1)
    for ours, peer, bar in (
        ("onnx fp32", "ctranslate2 fp32", 0.9),
        ("onnx int8", "ctranslate2 int8", 0.6),
    ):
        a, b = row(ours, one), row(peer, one)
        if a and b:
            out.append(
                _goal(
                    f"{ours} / {peer} ms per step, batch 1",
                    a["ms_per_step"] / b["ms_per_step"],
                    bar,
                    True,
                )
            )
    a, b = row("onnx int8", most), row("ctranslate2 int8", most)
    if a and b and most != one:
        out.append(
            _goal(
                f"onnx int8 / ctranslate2 int8 tokens/s, batch {most}",
                a["tokens_per_s"] / b["tokens_per_s"],
                1.2,
                False,
            )
        )
    for name, growth in results["step_growth"].items():
        out.append(
            _goal(f"{name}: step {growth['step']} / step 16 cost", growth["ratio"], 1.3, True)
        )
    for name, s in results.get("serving", {}).items():
        n = s["http_n"]["clients"]
        out.append(
            _goal(
                f"serving {name}: 1 HTTP stream / in-process tokens/s",
                s["ratio_http_1"],
                0.9,
                False,
            )
        )
        if "ratio_http_n_together" in s:
            out.append(
                _goal(
                    f"serving {name}: {n} HTTP streams started together / in-process batch {n} "
                    "tokens/s",
                    s["ratio_http_n_together"],
                    0.9,
                    False,
                )
            )
        out.append(
            _goal(
                f"serving {name}: {n} HTTP streams arriving one by one / the engine under the "
                "same arrivals, tokens/s",
                s["ratio_http_n_engine"],
                0.9,
                False,
            )
        )
        out.append(
            _goal(
                f"serving {name}: p95 TTFT / (encoder + 2 steps at batch {n})",
                s["http_n"]["ttft_ms_p95"] / s["ttft_bound_ms"],
                1.0,
                True,
            )
        )
        # Memory while serving against CTranslate2's while serving the same streams (its
        # server, when it ran; else its decode process, which holds no web stack).
        served = s.get("ctranslate2_http", {}).get("http_n", {}).get("rss_mb_max")
        peer = served or decode.get(f"ctranslate2 {name}", {}).get("rss_mb")
        if peer and "rss_mb_max" in s["http_n"]:
            whose = (
                f"FastAPI + CTranslate2 {name}'s" if served else f"CTranslate2 {name}'s decoding"
            )
            out.append(
                _goal(
                    f"serving {name}: server resident memory / {whose}",
                    s["http_n"]["rss_mb_max"] / peer,
                    1.0,
                    True,
                )
            )
    return out


def run(cfg: BenchConfig, progress: Progress = log.info) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="seq2serve-bench-") as tmp:
        return _run(cfg, progress, Path(tmp))


def _run(cfg: BenchConfig, progress: Progress, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
    }
    hf_dir, ct2_models = peer_models(cfg, tmp, progress) if cfg.decode or cfg.server else (None, {})
    # A shared host's memory bandwidth varies over minutes as much as its decode speed: the
    # floor uses the best of the measurements taken between the engines' rows and now.
    bandwidth: list[float] = []
    results["decode"] = (
        decode_rows(cfg, progress, bandwidth, hf_dir, ct2_models) if cfg.decode else {}
    )
    progress("floor: bytes per step and the machine's read bandwidth")
    bundle = load_bundle(cfg.model, device=cfg.device, threads=cfg.threads)
    threads = cfg.threads or os.cpu_count() or 1
    bandwidth.append(read_bandwidth(threads))
    floor: dict[str, Any] = {
        "bandwidth_gb_s": round(max(bandwidth), 1),
        "bandwidth_gb_s_samples": [round(b, 1) for b in bandwidth],
        "threads": threads,
    }
    past = cfg.new_tokens // 2  # the middle of a generation
    int8 = (cfg.model / contract.onnx_file(contract.ENCODER_FILE, True)).exists()
    precisions = [False, *([True] if int8 else [])]
    for quantized in precisions:
        files = {"int8" if quantized else "fp32": contract.DECODER_FILE}
        if screened_step(cfg.model, quantized):  # what the engine's steps read instead
            files[SCREENED_INT8 if quantized else SCREENED] = contract.DECODER_STEP_FILE
        for name, file in files.items():
            n = step_bytes(cfg.model, quantized, bundle.config, cfg.source_tokens, past, file)
            floor[name] = {
                "bytes_per_step": n,
                "floor_ms": round(n / floor["bandwidth_gb_s"] / 1e6, 3),
            }
    results["floor"] = floor
    results["step_growth"] = {}
    for quantized in precisions:
        name = "onnx int8" if quantized else "onnx fp32"
        progress(f"step cost: step 16 vs step {cfg.long_steps} ({name})")
        b = (
            load_bundle(cfg.model, quantized=quantized, device=cfg.device, threads=cfg.threads)
            if quantized
            else bundle
        )
        results["step_growth"][name] = bench_step_growth(OnnxBackend(b), b.tokenizer, cfg)
    del bundle
    gc.collect()
    if cfg.server:
        results["serving"] = {}
        for quantized in precisions:
            name = "int8" if quantized else "fp32"
            results["serving"][name] = bench_serving(
                cfg,
                quantized,
                progress,
                compare_batch_1=not quantized,
                # the peer server runs CTranslate2 on the CPU: a peer only beside a CPU server
                ct2_model=ct2_models.get(name) if cfg.device == "cpu" else None,
            )
    results["goals"] = goals(results)
    return results


def _precision(engine: str) -> str:
    return "int8" if engine.endswith("int8") else "fp32"


def _load_cells(load: dict[str, Any], bound: str) -> str:
    """A serving row's TTFT, TTFT bound, ITL and memory cells."""
    return (
        f"| {load['ttft_ms_p50']:.1f} / {load['ttft_ms_p95']:.1f} | {bound} "
        f"| {load['itl_ms_p50']:.1f} / {load['itl_ms_p95']:.1f} "
        f"| {load.get('rss_mb_max', float('nan')):.0f} "
    )


def _split(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    """The two peaks' anonymous and file pages, where both servers were sampled
    (``memory_figures`` gives all of its figures or none)."""
    if "rss_mb_max" not in ours or "rss_mb_max" not in peer:
        return ""
    return (
        f" (anonymous {ours['rss_anon_mb_at_max']:.0f} vs {peer['rss_anon_mb_at_max']:.0f}, "
        f"mapped files {ours['rss_file_mb_at_max']:.0f} vs {peer['rss_file_mb_at_max']:.0f})"
    )


def at_peer_batch(name: str, serving: dict[str, Any]) -> str:
    """The line weighing the peer's server against ours at the peer's batch limit (empty
    without both runs): the memory, throughput and time to first token of each."""
    if "http_n_peer_batch" not in serving or "ctranslate2_http" not in serving:
        return ""
    ours, peer = serving["http_n_peer_batch"], serving["ctranslate2_http"]["http_n"]
    return (
        f"{name}, the same streams with seq2serve's batch limit at {ours['max_batch_size']} "
        "(the requests CTranslate2's server decodes at a time): "
        f"{ours.get('rss_mb_max', float('nan')):.0f} vs "
        f"{peer.get('rss_mb_max', float('nan')):.0f} MB at the peak"
        + _split(ours, peer)
        + f", {ours['tokens_per_s']:.0f} vs {peer['tokens_per_s']:.0f} tokens/s, "
        f"p95 TTFT {ours['ttft_ms_p95']:.0f} vs {peer['ttft_ms_p95']:.0f} ms"
    )


def table(results: dict[str, Any]) -> str:
    decode, floor = results["decode"], results["floor"]
    batch_sizes = [str(b) for b in results["config"]["batch_sizes"]]
    lines = [
        "Decode: greedy, EOS ignored, encoder included; each engine in its own process "
        f"({results['config']['source_tokens']}-token sources, "
        f"{results['config']['new_tokens']} new tokens"
        + (
            ", on " + results["config"]["device"]
            if results["config"].get("device", "cpu") != "cpu"
            else ""
        )
        + ")",
        "",
        "| engine | "
        + " | ".join(f"batch {b}: ms/step | batch {b}: tokens/s" for b in batch_sizes)
        + " | resident MB | batch 1: floor / measured |",
        "|" + "---|" * (3 + 2 * len(batch_sizes)),
    ]
    for name, engine in decode.items():
        cells = []
        for b in batch_sizes:
            r = engine["rows"][b]
            cells += [f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:.0f}"]
        rss = f"{engine['rss_mb']:.0f}" if "rss_mb" in engine else "-"
        share = "-"
        screened = {"onnx fp32": SCREENED, "onnx int8": SCREENED_INT8}.get(name, "")
        f = floor.get(screened, floor.get(_precision(name)))
        if f and "1" in engine["rows"]:
            share = f"{100 * f['floor_ms'] / engine['rows']['1']['ms_per_step']:.0f} %"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rss} | {share} |")
    lines.append("")
    parts = [
        f"{p} {floor[p]['bytes_per_step'] / 1e6:.1f} MB -> floor {floor[p]['floor_ms']:.2f} ms"
        for p in ("fp32", SCREENED, "int8", SCREENED_INT8)
        if p in floor
    ]
    samples = floor.get("bandwidth_gb_s_samples", [floor["bandwidth_gb_s"]])
    lines.append(
        f"Bytes read per batch-1 step: {'; '.join(parts)} at the measured read bandwidth of "
        f"{floor['bandwidth_gb_s']:.1f} GB/s ({floor['threads']} threads; the best of "
        f"{len(samples)} measurements, {min(samples):.1f} to {max(samples):.1f})"
    )
    for name, g in results["step_growth"].items():
        late = g[f"ms_at_step_{g['step']}"]
        lines.append(
            f"Step cost ({name}, batch 1): step 16 {g['ms_at_step_16']:.2f} ms, "
            f"step {g['step']} {late:.2f} ms, ratio {g['ratio']:.2f}"
        )
    serving = results.get("serving", {})
    if serving:
        first = next(iter(serving.values()))
        n, rounds = first["http_n"]["clients"], first["rounds"]
        lines += [
            "",
            f"Serving (medians of {rounds} rounds, the engine in-process and the server taking "
            f"turns; TTFT, ITL and memory from {n} streams that start evenly over one "
            "request's length)",
            "",
            f"| serving | in-process 1 | HTTP 1 stream | in-process batch {n} "
            f"| HTTP {n} streams started together "
            f"| engine, {n} streams' arrivals | HTTP {n} streams "
            "| TTFT p50 / p95 ms | encoder + 2 steps ms | ITL p50 / p95 ms | server MB | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in serving.items():
            e, h1, hn, en = s["in_process"], s["http_1"], s["http_n"], s["engine_n"]
            ht = s.get("http_n_together", {})
            lines.append(
                f"| {name} | {e['alone_tokens_per_s']:.0f} tok/s | {h1['tokens_per_s']:.0f} tok/s "
                f"| {e['batch_tokens_per_s']:.0f} tok/s "
                f"| {ht.get('tokens_per_s', float('nan')):.0f} tok/s "
                f"| {en['tokens_per_s']:.0f} tok/s "
                f"| {hn['tokens_per_s']:.0f} tok/s "
                + _load_cells(hn, f"{s['ttft_bound_ms']:.1f}")
                + f"| {h1['errors'] + hn['errors'] + ht.get('errors', 0)} |"
            )
        for name, s in serving.items():
            if "ctranslate2_http" in s:
                c1, cn = s["ctranslate2_http"]["http_1"], s["ctranslate2_http"]["http_n"]
                lines.append(
                    f"| FastAPI + CTranslate2 {name} | - | {c1['tokens_per_s']:.0f} tok/s | - | - "
                    f"| - | {cn['tokens_per_s']:.0f} tok/s "
                    + _load_cells(cn, "-")
                    + f"| {c1['errors'] + cn['errors']} |"
                )
        for name, s in serving.items():
            if "ctranslate2_http" in s:
                hn, cn = s["http_n"], s["ctranslate2_http"]["http_n"]
                lines.append(
                    f"\n{name}, {n} streams arriving one by one, seq2serve vs FastAPI + "
                    f"CTranslate2 (one generate_tokens per request): "
                    f"{hn['tokens_per_s']:.0f} vs {cn['tokens_per_s']:.0f} tokens/s "
                    f"({hn['tokens_per_s'] / max(cn['tokens_per_s'], 1e-9):.1f}x), "
                    f"p95 TTFT {hn['ttft_ms_p95']:.0f} vs {cn['ttft_ms_p95']:.0f} ms, "
                    f"{hn.get('rss_mb_max', float('nan')):.0f} vs "
                    f"{cn.get('rss_mb_max', float('nan')):.0f} MB at the peak" + _split(hn, cn)
                )
        lines += [f"\n{line}" for name, s in serving.items() if (line := at_peer_batch(name, s))]
        for name, s in serving.items():
            lines.append(
                f"\n{name}: HTTP {n} streams / the engine under the same arrivals: "
                f"{s['ratio_http_n_engine']:.2f} (what HTTP and SSE cost); the engine under "
                f"those arrivals / one static batch: "
                f"{s['engine_n']['tokens_per_s'] / s['in_process']['batch_tokens_per_s']:.2f} "
                "(what requests coming and going cost)"
            )
        for name, s in serving.items():
            if "http_n_batch_1" in s:
                b1 = s["http_n_batch_1"]
                ratio = s["http_n"]["tokens_per_s"] / max(b1["tokens_per_s"], 1e-9)
                lines.append(
                    f"\nContinuous batching vs batch size 1 ({name}, {n} streams): "
                    f"{s['http_n']['tokens_per_s']:.0f} vs {b1['tokens_per_s']:.0f} tokens/s "
                    f"({ratio:.2f}x), TTFT p50 {s['http_n']['ttft_ms_p50']:.1f} vs "
                    f"{b1['ttft_ms_p50']:.1f} ms, errors {b1['errors']}"
                )
    if results.get("goals"):
        lines += ["", "| goal | measured | bar | met |", "|---|---|---|---|"]
        for g in results["goals"]:
            bar = f"{'<=' if g['at_most'] else '>='} {g['bar']}"
            lines.append(
                f"| {g['goal']} | {g['value']:.2f} | {bar} | {'yes' if g['met'] else 'no'} |"
            )
    m = results["machine"]
    cpu = m.get("cpu", "unknown CPU")
    lines.append(f"\nMachine: {cpu}, {m['cpus']} cores, onnxruntime {m['onnxruntime']}")
    return "\n".join(lines)


def main(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    results = run(cfg, progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results
