"""The benchmark's own instruments: the bytes a step reads, the per-engine child process and
the load client. (Speed itself is measured by `seq2serve bench`, never asserted here.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from seq2serve import bench, bench_engines, contract
from seq2serve.config import ModelConfig
from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import DecodeBatch
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.engine.scheduler import AUTO_NICE, lower_priority


def _decoder_weight_bytes(bundle, quantized: bool) -> int:
    graph = onnx.load(
        str(bundle / contract.onnx_file(contract.DECODER_FILE, quantized)), load_external_data=True
    ).graph
    return sum(numpy_helper.to_array(i).nbytes for i in graph.initializer)


@pytest.mark.parametrize("quantized", [False, True])
def test_step_bytes_count_the_weights_a_step_reads_and_the_caches(tiny_bundle, quantized):
    cfg = ModelConfig.load(tiny_bundle / contract.CONFIG_FILE)
    weights = _decoder_weight_bytes(tiny_bundle, quantized)
    empty = bench.step_bytes(tiny_bundle, quantized, cfg, source=0, past=0)
    # Every weight but the tables only gathered from (positions; the scales of int8 rows).
    positions = cfg.max_target_positions * cfg.d_model * 4
    assert weights - positions - cfg.vocab_size * 4 <= empty <= weights
    grown = bench.step_bytes(tiny_bundle, quantized, cfg, source=7, past=9)
    kv = 2 * cfg.n_decoder_layers * cfg.n_heads * cfg.head_dim * (7 + 9) * 4
    assert grown - empty == kv


def test_int8_steps_read_under_half_of_fp32s(tiny_bundle):
    cfg = ModelConfig.load(tiny_bundle / contract.CONFIG_FILE)
    fp32 = bench.step_bytes(tiny_bundle, False, cfg, source=0, past=0)
    int8 = bench.step_bytes(tiny_bundle, True, cfg, source=0, past=0)
    assert int8 < fp32 / 2, (int8, fp32)  # biases and norms stay fp32: tiny model


def test_an_engine_row_runs_in_its_own_process(tiny_bundle):
    cmd = bench_engines.command(
        "onnx int8", tiny_bundle, batch_sizes=(1, 2), new_tokens=4, repeats=1, threads=None
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["rows"]) == {"1", "2"}
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in result["rows"].values())
    # Taken while the model is loaded: more than the interpreter alone.
    assert result["rss_mb"] > 30 and result["peak_rss_mb"] >= result["rss_mb"]


def test_the_load_client_counts_every_streamed_token(server, client):
    texts = [">>fr<< 2021-03-04", ">>de<< 1234"]
    result = bench.summarize(
        [asyncio.run(bench._load(server.base_url, texts, clients=2, seconds=1.0, new_tokens=8))]
    )
    assert result["errors"] == 0 and result["requests"] >= 2
    # The same requests through httpx: the client saw as many events as tokens generated.
    for text in texts:
        body = {"inputs": text, "parameters": {"max_new_tokens": 8, "details": True}}
        tokens = client.post("/v1/generate", json=body).json()["details"]["generated_tokens"]
        seen: list[bool] = []

        async def one(text: str = text, seen: list[bool] = seen) -> None:
            host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
            connection = bench._Connection(host, int(port))
            body = {"inputs": text, "parameters": {"max_new_tokens": 8}, "stream": True}
            assert await connection.post_stream("/v1/generate", body, seen.append) == 200
            await connection.close()

        asyncio.run(one())
        assert seen == [False] * tokens


def test_the_load_client_reports_refusals_as_errors(server):
    result = bench.summarize(
        [asyncio.run(bench._load(server.base_url, [""], clients=1, seconds=0.3, new_tokens=8))]
    )
    assert result["errors"] >= 1 and result["requests"] == 0


def _serving(rss: float, peer_rss: float | None) -> dict:
    load = {"clients": 16, "tokens_per_s": 100.0, "ttft_ms_p95": 10.0, "rss_mb_max": rss}
    s = {
        "http_n": load,
        "ratio_http_1": 1.0,
        "ratio_http_n_engine": 1.0,
        "ttft_bound_ms": 20.0,
    }
    if peer_rss is not None:
        s["ctranslate2_http"] = {"http_n": {**load, "rss_mb_max": peer_rss}}
    return s


def test_memory_is_weighed_against_ctranslate2_serving_when_its_server_ran():
    decode = {"ctranslate2 int8": {"rows": {"1": {"ms_per_step": 1.0}}, "rss_mb": 100.0}}
    for peer, expected, whose in ((150.0, 2.0, "FastAPI + CTranslate2"), (None, 3.0, "decoding")):
        results = {"decode": decode, "step_growth": {}, "serving": {"int8": _serving(300, peer)}}
        (memory,) = [g for g in bench.goals(results) if "resident memory" in g["goal"]]
        assert memory["value"] == expected and whose in memory["goal"]
        assert not memory["met"]


def _replace_the_loads(monkeypatch) -> None:
    """The serving loads and the server replaced by fixed figures: 150 tokens/s over HTTP,
    300 for the engine handed the same arrivals."""

    def load(*args, **kwargs):
        return {"clients": 1, "seconds": 1.0, "requests": 1, "tokens": 150, "errors": 0,
                "ttft": [0.01], "itl": [0.01]}  # fmt: skip

    async def served(*args, **kwargs):
        return load()

    async def engine_load(*args, **kwargs):
        return {**load(), "tokens": 300}

    monkeypatch.setattr(bench, "_load", served)
    monkeypatch.setattr(bench, "_engine_load", engine_load)
    server = types.SimpleNamespace(pid=0)
    monkeypatch.setattr(bench, "start_server", lambda model, env: (server, "http://127.0.0.1:1"))
    monkeypatch.setattr(bench, "stop_server", lambda proc: None)
    sampler = types.SimpleNamespace(samples=[])
    monkeypatch.setattr(bench, "ResidentMemory", lambda pid: contextlib.nullcontext(sampler))


def test_each_load_is_weighed_against_the_baselines_measured_around_it(tiny_bundle, monkeypatch):
    """The in-process baselines drift with the machine: each load's ratio is taken against
    the mean of the baselines measured just before and just after it, round by round."""
    rates = iter(range(100, 10_000, 100))  # each baseline measured is 100 tokens/s faster
    monkeypatch.setattr(bench.InProcess, "alone", lambda self, part=None: float(next(rates)))
    monkeypatch.setattr(
        bench.InProcess,
        "batch",
        lambda self: {
            "batch_tokens_per_s": float(next(rates)),
            "batch_step_ms": 1.0,
            "encoder_ms": 2.0,
        },
    )

    _replace_the_loads(monkeypatch)
    cfg = bench.BenchConfig(tiny_bundle, server_clients=2, new_tokens=4, server_seconds=0.3)
    out = bench.bench_serving(cfg, True, lambda _: None, compare_batch_1=False)
    # The warm-up measures 100. Round 1 measures 200, 300 (alone, around the one stream),
    # 400, 500, 600 (batches around the staggered streams, then the simultaneous ones);
    # round 2 700 ... 1100; round 3 1200 ... 1600. The medians are round 2's.
    assert bench.ROUNDS == 3
    assert out["ratio_http_1"] == round(150 / 750, 3)
    assert out["ratio_http_n"] == round(150 / 950, 3)
    assert out["ratio_http_n_together"] == round(150 / 1050, 3)
    assert out["ratio_http_n_engine"] == 0.5  # the engine's run against the server's
    assert out["in_process"]["alone_tokens_per_s"] == 750
    assert out["in_process"]["batch_tokens_per_s"] == 1000
    assert out["ttft_bound_ms"] == 4.0  # the encoder and two steps


def test_a_single_client_has_a_baseline_on_each_side_of_its_stream(tiny_bundle, monkeypatch):
    """With one request to cycle through, the halves of the one-at-a-time baseline are that
    request, before and after the stream (the real engine runs them)."""
    _replace_the_loads(monkeypatch)
    cfg = bench.BenchConfig(tiny_bundle, server_clients=1, new_tokens=4, server_seconds=0.3)
    out = bench.bench_serving(cfg, True, lambda _: None, compare_batch_1=False)
    assert out["in_process"]["alone_tokens_per_s"] > 0
    assert 0 < out["ratio_http_1"] < float("inf")


def test_the_step_cost_takes_early_and_late_steps_in_turn(tiny_bundle, monkeypatch):
    """Step 16 and step ``long_steps`` are timed one after the other, a step at a time, on
    two sequences that stand at those steps, so that a drifting host slows both alike."""
    b = load_bundle(tiny_bundle)
    cfg = bench.BenchConfig(tiny_bundle, long_steps=40)
    timed: list[int] = []  # the step each timed call takes, in call order
    step = DecodeBatch.step

    def counting(self):
        (seq,) = self.rows
        timed.append(len(seq.generated))
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", counting)
    out = bench.bench_step_growth(OnnxBackend(b), b.tokenizer, cfg)
    assert out["step"] == 40 and out["ratio"] > 0
    # Per round: 12 steps to stand at step 12 (the first token came from the prefill, so a
    # sequence 12 steps in holds 13 tokens), 36 more for the other, then eight pairs.
    advance = 12 + 36
    per_round = advance + 16
    assert len(timed) == 3 * per_round
    for r in range(3):
        pairs = timed[r * per_round + advance : (r + 1) * per_round]
        assert pairs[0::2] == list(range(13, 21))  # the early sequence: steps 13..20
        assert pairs[1::2] == list(range(37, 45))  # the late one: steps 37..44


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values")
def test_the_load_client_sits_between_the_servers_event_loop_and_its_compute_threads():
    """Halfway between the main thread's nice value and the least favoured thread's: here a
    thread lowered to the engine's ``AUTO_NICE``, then gone again."""
    lowered, release = threading.Event(), threading.Event()

    def compute() -> None:
        lower_priority((threading.get_native_id(),), AUTO_NICE)
        lowered.set()
        release.wait(10)

    loop = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's
    before = bench.client_nice(os.getpid())
    assert loop <= before <= loop + (AUTO_NICE - loop) // 2  # other tests' threads, if any
    worker = threading.Thread(target=compute)
    worker.start()
    try:
        assert lowered.wait(10)
        assert bench.client_nice(os.getpid()) == loop + (AUTO_NICE - loop) // 2
    finally:
        release.set()
        worker.join()
    # A joined thread can stay listed in /proc for a moment after it has exited.
    deadline = time.monotonic() + 5
    while str(worker.native_id) in os.listdir("/proc/self/task") and time.monotonic() < deadline:
        time.sleep(0.001)
    assert bench.client_nice(os.getpid()) == before
    assert bench.client_nice(2**22 + 1) == 0  # no such process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values")
def test_a_load_runs_on_a_thread_of_its_own_at_the_nice_value_asked_for():
    """The caller keeps its own priority, and a failure of the load reaches the caller."""

    async def recorded() -> dict:
        return {"nice": _nice(), "thread": threading.get_ident()}

    before = _nice()
    out = bench.run_client(recorded(), 5)
    assert out["nice"] == max(5, before)
    assert out["thread"] != threading.get_ident()
    assert _nice() == before

    async def failing() -> dict:
        raise ConnectionRefusedError("no server")

    with pytest.raises(ConnectionRefusedError):
        bench.run_client(failing(), 0)


def test_resident_memory_counts_new_arrays_as_anonymous_pages_and_libraries_as_files():
    """The server's memory row is told apart: what it allocates (anonymous pages) and what it
    maps from files (its libraries' code). 64 MB written during the samples show up whole on
    the anonymous side and not on the files' side."""
    with bench.ResidentMemory(os.getpid(), interval=0.01) as sampler:
        time.sleep(0.1)
        before = sampler.samples[-1]
        array = np.ones(64 * 2**20 // 8)  # every page written
        time.sleep(0.1)
    figures = bench.memory_figures(sampler.samples)
    assert array.sum() > 0
    assert figures["rss_anon_mb_at_max"] - before.anonymous > 60
    assert abs(figures["rss_file_mb_at_max"] - before.files) < 8
    assert before.files > 5  # libpython, numpy and onnxruntime's code, at least


def test_the_memory_figures_split_the_peak_sample_not_the_largest_parts():
    samples = [
        bench.Resident(100, 90),
        bench.Resident(120, 70),
        bench.Resident(110, 95),
    ]
    assert bench.memory_figures(samples) == {
        "rss_mb_median": 110,
        "rss_mb_max": 120,
        "rss_anon_mb_at_max": 70,
        "rss_file_mb_at_max": 50,
    }
    assert bench.memory_figures([]) == {}


def test_the_peers_load_is_also_served_at_the_peers_batch_limit(tiny_bundle, monkeypatch):
    """Beside CTranslate2's server, the same streams go to a server of ours that decodes as
    many requests at a time as that server does (one per worker thread); without that
    server's figures, there is nothing to weigh it against and it does not run."""
    from seq2serve.hf import ct2_server

    _replace_the_loads(monkeypatch)
    limits: list[str] = []  # each server's batch limit, in the order they start
    start = bench.start_server

    def starting(model, env):
        limits.append(env["SEQ2SERVE_MAX_BATCH_SIZE"])
        return start(model, env)

    monkeypatch.setattr(bench, "start_server", starting)
    peer = {"http_1": {}, "http_n": {"tokens_per_s": 50.0, "ttft_ms_p95": 900.0}}
    monkeypatch.setattr(bench, "bench_ct2_server", lambda *args: peer)
    cfg = bench.BenchConfig(tiny_bundle, server_clients=2, new_tokens=4, server_seconds=0.3)
    workers = ct2_server.workers(cfg.threads)  # a worker per core
    out = bench.bench_serving(
        cfg, True, lambda _: None, compare_batch_1=True, ct2_model=tiny_bundle
    )
    assert workers == os.cpu_count()
    # The measured server, one at the peer's limit, then one at batch size 1.
    assert limits == ["32", str(workers), "1"]
    assert out["http_n_peer_batch"]["max_batch_size"] == workers
    assert out["http_n_peer_batch"]["tokens_per_s"] == 150  # the replaced load's figures
    assert out["http_n_batch_1"]["max_batch_size"] == 1

    def failed(*args):
        raise RuntimeError("CTranslate2 is not installed")

    limits.clear()
    monkeypatch.setattr(bench, "bench_ct2_server", failed)
    out = bench.bench_serving(
        cfg, True, lambda _: None, compare_batch_1=False, ct2_model=tiny_bundle
    )
    assert limits == ["32"] and "http_n_peer_batch" not in out


def test_the_table_weighs_the_peer_against_ours_at_its_batch_limit():
    ours = {"max_batch_size": 2, "tokens_per_s": 595.2, "ttft_ms_p95": 1612.0, "rss_mb_max": 213.7,
            "rss_anon_mb_at_max": 161.4, "rss_file_mb_at_max": 52.3}  # fmt: skip
    peer = {"tokens_per_s": 340.1, "ttft_ms_p95": 2720.8, "rss_mb_max": 179.2,
            "rss_anon_mb_at_max": 149.4, "rss_file_mb_at_max": 29.8}  # fmt: skip
    line = bench.at_peer_batch(
        "int8", {"http_n_peer_batch": ours, "ctranslate2_http": {"http_n": peer}}
    )
    assert line.startswith("int8, the same streams with seq2serve's batch limit at 2 ")
    assert "214 vs 179 MB at the peak (anonymous 161 vs 149, mapped files 52 vs 30)" in line
    assert line.endswith(", 595 vs 340 tokens/s, p95 TTFT 1612 vs 2721 ms")
    assert bench.at_peer_batch("int8", {"http_n_peer_batch": ours}) == ""
