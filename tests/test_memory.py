"""What the serving process keeps resident: the lookup tables' rows that traffic uses, large
blocks handed back to the system when freed, and cache buffers that arrive in memory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from seq2serve.engine import memory
from seq2serve.engine.bundle import load_bundle
from seq2serve.engine.generation import SamplingParams
from seq2serve.engine.runtime import OnnxBackend
from seq2serve.engine.scheduler import Engine, EngineLimits

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/smaps"
)

PAGE = 4096


def resident_kb(address: int) -> int:
    """Resident kilobytes of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's line
            start, end = (int(x, 16) for x in head[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("Rss:"):
            return int(head[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory) -> Path:
    """A bundle whose embedding rows are a page apart (400 x 1024 fp32: 1.6 MB)."""
    from seq2serve.export.bundle import export_bundle
    from tests.conftest import make_checkpoint

    tmp = tmp_path_factory.mktemp("wide")
    checkpoint = make_checkpoint(tmp / "ckpt", d_model=1024, n_heads=4, d_ff=64)
    export_bundle(checkpoint, tmp / "bundle")
    return tmp / "bundle"


def test_a_warm_engine_keeps_only_the_table_rows_it_looked_up(wide_bundle):
    bundle = load_bundle(wide_bundle)
    assert bundle.tables is not None
    # The engine's one mapping of the data file: only the tables are read through it.
    table = bundle.tables.values[next(iter(bundle.tables.values))].data_ptr()
    table_kb = max(int(e["length"]) for e in bundle.manifest["lookup_tables"]["fp32"]) // 1024
    engine = Engine(OnnxBackend(bundle), bundle.tokenizer, EngineLimits())
    ids = bundle.tokenizer.encode(">>fr<< 7").ids

    async def serve() -> int:
        await engine.start()  # warm-up generates, then hands the tables' pages back
        warm = resident_kb(table)
        await engine.generate_stream(ids, SamplingParams(max_new_tokens=3)).result()
        await engine.stop()
        return warm

    warm = asyncio.run(serve())
    # The source's rows, the start token's and two generated tokens' (a row spans two pages
    # at most). The kernel would map up to 64 KB around each fault from the page cache,
    # which holds all of the file once the checksums are read: 16 pages a row.
    rows = len(ids) + 3
    assert table_kb > 16 * rows * PAGE // 1024
    assert warm <= 2 * PAGE // 1024, warm
    assert resident_kb(table) <= 2 * rows * PAGE // 1024, (resident_kb(table), table_kb)


def test_large_blocks_go_back_to_the_system_when_freed():
    """After a 3 MB block is freed, glibc's default serves 2 MB blocks from the heap and keeps
    them when freed; with ``map_large_blocks`` each is a mapping, returned at once."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from seq2serve.engine import memory

        def rss_kb():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1])

        if sys.argv[1] == "mapped":
            memory.map_large_blocks()
        np.ones(3 << 20, np.uint8)  # freed at once: glibc raises its threshold past it
        keep = [np.zeros(1, np.uint8)]
        before = rss_kb()
        for _ in range(8):
            block = np.ones(2 << 20, np.uint8)  # written: resident
            keep.append(np.zeros(64, np.uint8))  # a small block after it pins the heap top
            del block
        print(rss_kb() - before)
        """
    )

    def kept_kb(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    if kept_kb("default") < 1024:
        pytest.skip("this allocator hands the blocks back by itself")
    assert kept_kb("mapped") < 1024


def _present(mode: str) -> float:
    """The share of an array's pages in memory right after it is made, in a fresh process
    (where a large array is a mapping of its own: no heap a library left behind)."""
    script = textwrap.dedent(
        """
        import ctypes
        import errno
        import sys
        import numpy as np
        from seq2serve.engine import memory

        memory.map_large_blocks()
        if sys.argv[1] == "fallback":
            memory._madvise = None  # as where the kernel cannot populate
        elif sys.argv[1] == "refused":  # as a sandbox that forbids the call

            def refuse(start, length, advice):
                ctypes.set_errno(errno.EPERM)
                return -1

            memory._madvise = refuse
        shape = (64, 8, 128, 64)  # (B, H, C, D) fp32: 16 MB
        make = np.zeros if sys.argv[1] == "np" else memory.zeros
        array = make(shape, np.float32)
        first, last = array.ctypes.data // 4096, (array.ctypes.data + array.nbytes) // 4096
        with open("/proc/self/pagemap", "rb") as pagemap:  # 8 bytes a page; bit 63: present
            pagemap.seek(8 * first)
            entries = np.frombuffer(pagemap.read(8 * (last - first)), np.uint64)
        # Read after the pages are counted: reading maps the shared zero page.
        assert array.shape == shape and array.dtype == np.float32 and not array.any()
        print(float((entries >> np.uint64(63)).mean()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def test_zeros_arrive_in_memory():
    """``np.zeros`` of 16 MB is a mapping whose pages come as they are touched;
    ``memory.zeros`` has every page in memory, whether the kernel populates them or each is
    written (a kernel without the call, or one that refuses it), and holds zeros."""
    assert _present("np") < 0.01
    assert _present("kernel") == 1.0
    assert _present("fallback") == 1.0
    assert _present("refused") == 1.0


@pytest.mark.parametrize("kernel", [True, False], ids=["madvise", "one write a page"])
def test_populating_keeps_what_an_array_holds(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(memory, "_madvise", None)
    array = np.arange(3 << 20, dtype=np.float32)[1:]  # 12 MB, not page-aligned
    memory.populate(array)
    np.testing.assert_array_equal(array, np.arange(1, 3 << 20, dtype=np.float32))


def test_small_zeros_are_plain_zeros():
    small = memory.zeros((3, 5), np.int64)
    assert small.shape == (3, 5) and small.dtype == np.int64 and not small.any()
