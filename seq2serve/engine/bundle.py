"""Load a model bundle for onnxruntime, refusing anything that is not what the manifest says.

Checked at start, each failure naming the file: every file the manifest lists exists and
matches its sha256; config.json is a valid config; the graphs' inputs and outputs match the
contract in ``seq2serve.contract``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from seq2serve import contract
from seq2serve.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


class BundleError(RuntimeError):
    """A bundle that must not be served; the message names the file and what is wrong."""


class SharedTables:
    """The bundle's lookup tables (the embedding rows its graphs gather), mapped once from
    the data file and handed to every session as its initializer.

    Each session otherwise maps its own view of the file, and a gather's page faults bring
    in pages around each row looked up (the kernel maps neighbours already in the page
    cache): with the encoder and the step graph both reading the 58,101 x 512 fp32 table of
    an opus-mt-sized model, both views ended nearly whole, 113 MB resident twice.

    Once the sessions are open (``release``), the tables' pages leave this process's
    resident set and the page cache, and the mapping reads without readahead: from then on
    a lookup brings in the page of its own row and nothing around it, so what stays
    resident is the rows that traffic uses. The checksums and the sessions' loading read
    the whole file, and a page fault maps every neighbour still cached (fault-around, which
    ``MADV_RANDOM`` does not stop): 2,000 random rows of the table above left 79 MB of its
    119 MB resident, and 16 streams' sources, tokens and rescored candidates (the fp32
    screen reads rows of the table) all of it. A row's first lookup then costs a read from
    the file, once."""

    def __init__(self, data_file: Path, entries: list[dict[str, Any]]) -> None:
        self.values: dict[str, ort.OrtValue] = {}
        self._arrays: list[np.ndarray] = []  # the memory the values point at
        self._map: mmap.mmap | None = None
        self._file = data_file
        self._ranges: list[tuple[int, int]] = []  # (offset, length) of each table in the file
        if not entries:
            return
        with data_file.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for entry in entries:
            try:
                dtype, shape = np.dtype(entry["dtype"]), tuple(int(d) for d in entry["shape"])
                offset, length = int(entry["offset"]), int(entry["length"])
                names = [str(n) for n in entry["names"]]
            except (KeyError, TypeError, ValueError) as err:
                raise BundleError(
                    f"{data_file.parent / contract.MANIFEST_FILE}: bad lookup_tables entry "
                    f"{entry!r} ({err})"
                ) from err
            count = math.prod(shape)
            if count * dtype.itemsize != length or offset + length > len(self._map):
                raise BundleError(
                    f"{data_file}: lookup table {names} ({length} bytes at {offset}) does not "
                    f"fit the file or its shape {list(shape)}"
                )
            array = np.frombuffer(self._map, dtype, count, offset).reshape(shape)
            self._arrays.append(array)
            self._ranges.append((offset, length))
            value = ort.OrtValue.ortvalue_from_numpy(array)
            for name in names:
                self.values[name] = value

    def add_to(self, options: ort.SessionOptions) -> None:
        for name, value in self.values.items():
            options.add_initializer(name, value)

    def release(self) -> None:
        """Drop the tables' pages from this process's resident set and from the page cache;
        later faults read one page each (see the class docstring)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return  # not Linux: the tables stay as the loading left them
        self._map.madvise(mmap.MADV_DONTNEED)
        self._map.madvise(mmap.MADV_RANDOM)
        # Pages mapped elsewhere (another process serving the same file) stay cached.
        fd = os.open(self._file, os.O_RDONLY)
        try:
            for offset, length in self._ranges:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Bundle:
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    encoder: ort.InferenceSession
    open_decoder: Callable[[], ort.InferenceSession]  # decoder.onnx, opened once, when needed
    quantized: bool
    provider: str  # the execution provider actually in use
    # decoder_step.onnx: every call of one new token a row, decode steps over cache buffers
    # written in place among them (None: a bundle exported before it existed, or CUDA;
    # then decoder.onnx serves every call)
    step: ort.InferenceSession | None = None
    # The step graph's LM head is screened: fp32 in int8, int8 in 4 bits (it takes
    # ``exact_logits``; see ``contract.decoder_step_inputs``).
    screened: bool = False
    tables: SharedTables | None = None  # held for the sessions, which point into it

    @property
    def decoder(self) -> ort.InferenceSession:
        return self.open_decoder()

    @property
    def model_id(self) -> str:
        return self.path.name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / contract.MANIFEST_FILE
    if not file.exists():
        raise BundleError(f"{file}: missing (is {path} a seq2serve bundle? run `seq2serve export`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{file}: has no 'files' table")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any], names: list[str]) -> None:
    for name in names:
        file = path / name
        entry = manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"{file}: not listed in {contract.MANIFEST_FILE}")
        if not file.exists():
            raise BundleError(f"{file}: missing")
        if sha256_file(file) != entry.get("sha256"):
            raise BundleError(
                f"{file}: sha256 does not match {contract.MANIFEST_FILE} (corrupted or replaced)"
            )


# The size of onnxruntime's process-wide thread pool, once this process has made it, and the
# native ids of the worker threads it started (Linux).
_pool_threads: int | None = None
_pool_thread_ids: tuple[int, ...] = ()


def _thread_ids() -> set[int]:
    tasks = Path("/proc/self/task")
    return {int(t.name) for t in tasks.iterdir()} if tasks.is_dir() else set()


def pool_thread_ids() -> tuple[int, ...]:
    """The native ids of the shared pool's worker threads (empty before the pool exists,
    and off Linux)."""
    return _pool_thread_ids


def shared_thread_pool(threads: int | None) -> int:
    """Make (once per process) the intra-op thread pool every session of ours runs on.

    With a pool per session, the encoder's and the decoder's worker threads keep spinning
    after their own calls and take the cores from each other: a server that encodes a
    joining request between two decoder steps ran those steps at half speed on 2 cores
    (14.1 against 7.9 ms per batch-16 step, opus-mt-sized int8; 913 against 1,613 tokens/s
    with requests coming and going). One shared pool has no such fight. Its size is a
    process setting: the first load decides it (``threads`` None: no preference).
    """
    global _pool_threads, _pool_thread_ids
    if threads is None and _pool_threads is not None:
        return _pool_threads
    n = threads or os.cpu_count() or 1
    if _pool_threads is None:
        before = _thread_ids()
        ort.set_global_thread_pool_sizes(n, 1)  # starts the workers
        _pool_threads = n
        _pool_thread_ids = tuple(sorted(_thread_ids() - before))
    elif n != _pool_threads:
        log.warning(
            "onnxruntime's thread pool already has %d threads in this process; "
            "%d asked for, %d used",
            _pool_threads,
            n,
            _pool_threads,
        )
    return _pool_threads


def session_options(threads: int | None, arena: bool = False) -> ort.SessionOptions:
    """Options of every onnxruntime session of ours: the shared thread pool, full graph
    optimization (less ``CPU_DISABLED_OPTIMIZERS`` on the CPU: ``open_session``), no memory
    pattern, and no arena unless ``arena`` (``threads`` None: no preference)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    shared_thread_pool(threads)
    opts.use_per_session_threads = False
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Every request brings new shapes (batch rows, source length, cached length). A memory
    # pattern is planned per shape and kept, and the CPU arena keeps its peak for good: one
    # encoder batch of 32 x 512 tokens left the default bundle at 1.6 GB resident for the
    # rest of the process (1.05 GB with the pattern off), against 0.18-0.22 GB with both
    # off, for the same traffic. Decode steps measured the same either way (within noise,
    # 2 cores); large encoder batches cost about 15 % more. Bounded memory wins for a
    # server under a container memory limit.
    #
    # ``arena``: for graphs whose every call has one row of a few shapes (a decode step: one
    # token a row, at most the batch limit of rows; the step's log-softmax), so that the
    # arena's peak is one step's activations at the largest batch. Their large blocks (the
    # int32 and float logits of a batch, 3.7 MB each at 16 opus-mt-sized rows) are then
    # reused from step to step, where malloc would map each afresh under
    # ``memory.map_large_blocks`` (batch-16 steps 5 to 8 % slower).
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = arena
    return opts


# Graph rewrites of onnxruntime's full optimization that make our graphs slower on its CPU
# provider. SkipLayerNormFusion folds each residual Add and the LayerNormalization after it
# into one SkipLayerNormalization, whose CPU kernel (onnxruntime 1.32) takes about three times
# as long as the two nodes it replaces: 42 against 14 us over 32 rows of 512, 22 against 8 us
# over 16. The encoder has two a layer (the decoder graphs' LayerNormalization nodes are not
# fused). Without it, an opus-mt-sized int8 encoder call over 32 tokens took 6.18 against
# 6.57 ms for one row and 36.7 against 43.4 ms for 16 (fp32: 9.02 against 9.44, 123.2 against
# 131.0), on 2 cores. Other providers keep every rewrite: CUDA's fused kernel is its fast path.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def open_session(
    model: str, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """An onnxruntime session of the graph file ``model``, one of a bundle's."""
    disabled = list(CPU_DISABLED_OPTIMIZERS) if providers[0] == "CPUExecutionProvider" else []
    return ort.InferenceSession(
        model, sess_options=options, providers=providers, disabled_optimizers=disabled
    )


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning(
            "CUDA was asked for but onnxruntime has no CUDAExecutionProvider "
            "(available: %s); falling back to CPU",
            ", ".join(available),
        )
    elif device != "cpu":
        raise BundleError(f"device must be cpu or cuda, got {device!r}")
    return ["CPUExecutionProvider"]


def _graph_io(
    session: ort.InferenceSession, outputs: bool
) -> list[tuple[str, str, tuple[Any, ...]]]:
    items = session.get_outputs() if outputs else session.get_inputs()
    kinds = {"tensor(int64)": "int64", "tensor(float)": "float", "tensor(bool)": "bool"}
    return [(i.name, kinds.get(i.type, i.type), tuple(i.shape)) for i in items]


def takes_exact_logits(step: ort.InferenceSession) -> bool:
    """Whether a step graph's LM head is screened (see ``contract.decoder_step_inputs``)."""
    return any(i.name == contract.EXACT_LOGITS for i in step.get_inputs())


def check_files(path: str | Path, quantized: bool = False) -> tuple[dict[str, Any], ModelConfig]:
    """The checks that need no session: manifest, checksums, config. Cheap enough to run
    before a server starts, so a bad bundle is refused with one clear line."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory")
    manifest = read_manifest(path)
    encoder_file = contract.onnx_file(contract.ENCODER_FILE, quantized)
    needed = [
        contract.CONFIG_FILE,
        contract.TOKENIZER_FILE,
        encoder_file,
        contract.onnx_file(contract.DECODER_FILE, quantized),
        contract.onnx_data_file(quantized),
    ]
    if quantized and encoder_file not in manifest["files"]:
        raise BundleError(
            f"{path / encoder_file}: this bundle has no int8 graphs (export with --quantize int8)"
        )
    verify_files(path, manifest, needed)
    try:
        config = ModelConfig.load(path / contract.CONFIG_FILE)
    except ConfigError as err:
        raise BundleError(str(err)) from err
    return manifest, config


def load_bundle(
    path: str | Path, quantized: bool = False, device: str = "cpu", threads: int | None = None
) -> Bundle:
    path = Path(path)
    manifest, config = check_files(path, quantized)
    encoder_file = contract.onnx_file(contract.ENCODER_FILE, quantized)
    decoder_file = contract.onnx_file(contract.DECODER_FILE, quantized)
    try:
        tokenizer = Tokenizer.from_file(str(path / contract.TOKENIZER_FILE))
    except Exception as err:  # the tokenizers library raises a bare Exception
        raise BundleError(f"{path / contract.TOKENIZER_FILE}: cannot be loaded ({err})") from err
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise BundleError(
            f"{path / contract.TOKENIZER_FILE}: {tokenizer.get_vocab_size()} tokens, "
            f"more than config vocab_size {config.vocab_size}"
        )

    providers = providers_for(device)
    specs = {
        contract.onnx_file(file, quantized): io for file, io in contract.graph_specs(config).items()
    }
    step_file = contract.onnx_file(contract.DECODER_STEP_FILE, quantized)
    entries = manifest.get("lookup_tables", {}).get("int8" if quantized else "fp32", [])
    tables = None
    if entries and providers[0] == "CPUExecutionProvider":
        tables = SharedTables(path / contract.onnx_data_file(quantized), entries)

    def session(file: str, check_only: bool = False) -> ort.InferenceSession:
        """``file``'s session, its inputs and outputs checked against the contract
        (``check_only``: a session for that check alone, unoptimized and unpacked)."""
        options = session_options(threads, arena=file == step_file)
        if tables is not None:
            tables.add_to(options)
        if check_only:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            made = open_session(str(path / file), options, providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise BundleError(f"{path / file}: onnxruntime cannot load it ({err})") from err
        inputs, outputs = specs[file]
        if file == step_file and takes_exact_logits(made):
            inputs, outputs = contract.graph_specs(config, screened=True)[
                contract.DECODER_STEP_FILE
            ]
        # The full path, first in the message: the one line `seq2serve serve` prints names it.
        name = str(path / file)
        problems = contract.check_io(name, inputs, _graph_io(made, False), "inputs")
        problems += contract.check_io(name, outputs, _graph_io(made, True), "outputs")
        if problems:
            raise BundleError("; ".join(problems) + " (the graphs do not match the contract)")
        if tables is not None:
            tables.release()
        return made

    encoder = session(encoder_file)
    step = None
    if step_file in manifest["files"] and providers[0] == "CPUExecutionProvider":
        verify_files(path, manifest, [step_file])
        step = session(step_file)
    # With the step graph, decoder.onnx serves only calls of several new tokens a row, which
    # the engine never makes: it is opened on first use. Each session keeps its own packed
    # copy of the weights (opus-mt-sized fp32: 290 MB more resident with both open).
    decoder = cache(partial(session, decoder_file))
    if step is None:
        decoder()
    else:  # refused now if it breaks the contract, not at its first use
        session(decoder_file, check_only=True)
    provider = encoder.get_providers()[0]
    if quantized and provider == "CUDAExecutionProvider":
        # onnxruntime has no CUDA kernels for the dynamic quantization ops: each int8 MatMul
        # runs on the CPU with copies to and from the GPU (98 copy nodes in the decoder).
        log.warning(
            "%s: the int8 graphs run mostly on the CPU under CUDA (their dynamic quantization "
            "has no CUDA kernels): an opus-mt-sized int8 step took 4.5 ms on an H200 against "
            "2.3 ms for fp32; serve the fp32 graphs on a GPU",
            path,
        )
    return Bundle(
        path=path,
        config=config,
        tokenizer=tokenizer,
        manifest=manifest,
        encoder=encoder,
        open_decoder=decoder,
        quantized=quantized,
        provider=provider,
        step=step,
        screened=step is not None and takes_exact_logits(step),
        tables=tables,
    )
