"""The serving process's memory: which large blocks are mappings of their own, and when free
memory goes back to the system.

- The engine's long-lived arrays (the cache ring, the batch's cross-attention keys/values,
  the bound logits) come from ``zeros``: each one a private anonymous mapping with its pages
  in memory from the start, unmapped when the last array over it goes. From malloc they
  stayed: glibc's mmap threshold moves up to the largest block freed (up to 32 MB), so after
  the first cache buffers were freed the next ones came from the heap or a thread's arena,
  where freeing them hands nothing back. Under 16 staggered int8 streams the heap grew from
  87 to 141 MB and the arenas by as much again.
- Everything else, onnxruntime's activations above all, comes from malloc under glibc's own
  policy, so that a call's large blocks reuse the memory the call before freed. With every
  block of 256 KB or more a mapping of its own (a fixed ``M_MMAP_THRESHOLD``), each call
  mapped and faulted in its activations afresh: opus-mt-sized int8 encoder calls over
  32-token sources took 3.30 against 2.75 ms for one row and 30.5 against 19.5 ms for 16
  rows (10,000 page faults a call), and 68 against 39 ms for one source of 512 tokens, on a
  2-core virtual machine.
- ``release_free_memory`` hands the free memory of every malloc arena back when the engine
  goes idle.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Arrays of at least this many bytes from ``zeros`` are mappings of their own. Below it: the
# small arrays of a step's inputs, which a mapping would only cost page faults.
LARGE_BLOCK = 256 * 1024
MADV_POPULATE_WRITE = 23  # madvise's advice number (Linux 5.14 and later)
PAGE = 4096


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def _madvise_function() -> Any:
    madvise = getattr(_LIBC, "madvise", None)
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    return madvise


_madvise = _madvise_function()


def release_free_memory() -> None:
    """Hand the free memory of every malloc arena back to the system (a few ms)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(ctypes.c_size_t(0))


def zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.zeros`` for the engine's long-lived arrays: of ``LARGE_BLOCK`` bytes or more, a
    private anonymous mapping of its own (zeros from the kernel, returned to the system when
    the last array over it goes: see the module's docstring), with every page in memory,
    each written once, before it is used.

    A new mapping's pages come lazily: the first read of a page maps the kernel's shared
    zero page, the first write then copies it. A cache ring that onnxruntime reads whole
    every step and writes a column at a time took those two faults per page inside the
    step, where both compute threads wait on whichever faults (opus-mt-sized int8, batch 16:
    the 15 steps after the ring grew to 65 columns ran 6.4 ms against 4.1 ms for the steps
    after them). Populated up front, in one call where the kernel allows it: in-process
    batch-16 decoding 2,471-2,571 -> 2,607-2,886 tokens/s (six alternating runs), 16 HTTP
    streams started together 2,256 -> 2,399, the server's resident memory under 16 streams
    unchanged (259-261 MB). A ring's columns not yet written are resident from the start,
    where the zero page stood for them before.
    """
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < LARGE_BLOCK or not hasattr(mmap, "MAP_PRIVATE"):  # small, or not Unix
        return np.zeros(shape, dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    array = np.frombuffer(mapping, dtype, count).reshape(shape)
    populate(array)
    return array


def populate(array: np.ndarray) -> None:
    """Bring every page of ``array`` (C-contiguous) into memory now, writable, its contents
    unchanged: ``madvise(MADV_POPULATE_WRITE)`` over the whole pages it spans, or, where the
    kernel lacks it or refuses it (before Linux 5.14, a sandbox, not Linux), one write of
    each page."""
    if not array.flags.c_contiguous:
        raise ValueError("populate needs a C-contiguous array")
    start = array.ctypes.data
    first = (start + PAGE - 1) // PAGE * PAGE
    last = (start + array.nbytes) // PAGE * PAGE
    if last > first and _madvise is not None:
        if _madvise(first, last - first, MADV_POPULATE_WRITE) == 0:
            return
        if ctypes.get_errno() == errno.ENOMEM:
            return  # out of memory now: the pages will come as they are touched
    pages = array.reshape(-1).view(np.uint8)[::PAGE]
    np.add(pages, 0, out=pages)  # a ufunc writes (numpy skips assigning an array to itself)
