"""The serving process's memory and glibc's allocator.

With onnxruntime's arena off (``bundle.session_options``), every activation, cache buffer and
logits array comes from malloc, and glibc's defaults keep what a server frees:

- its mmap threshold moves up to the largest block freed (up to 32 MB), so after the first
  cache buffers are freed, the next ones (3 MB each for 16 opus-mt-sized rows) come from the
  heap or a thread's arena, where freeing them hands nothing back. Under 16 staggered int8
  streams the heap grew from 87 to 141 MB and the arenas by as much again, all of it free
  memory that only ``malloc_trim`` returned, and only once the engine went idle.
  ``map_large_blocks`` fixes the threshold: a block of ``LARGE_BLOCK`` bytes or more is a
  mapping of its own, returned to the system when freed.
- the free memory a burst of small blocks leaves stays with the process:
  ``release_free_memory`` hands it back when the engine goes idle.

Elsewhere (not glibc) both do nothing.

A new mapping's pages come one fault at a time, when first touched. ``zeros`` makes the
arrays a decode step reads and writes in place with every page already there (see there).
"""

from __future__ import annotations

import ctypes
import errno
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Blocks of at least this many bytes get a mapping of their own. Below it: a step's
# activations up to batch 16 (16 x 2048 fp32 is 128 KB), which come and go every step and
# would cost page faults as mappings. At or above it: the cache buffers, cross-attention
# keys/values and encoder batches, which live for many steps or are large. (A step's own
# large blocks, its logits, come from the step graph's arena: ``bundle.session_options``.)
LARGE_BLOCK = 256 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
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


def map_large_blocks() -> None:
    """Give every block of ``LARGE_BLOCK`` bytes or more a mapping of its own, from now on
    and for the whole process (glibc then stops moving the threshold)."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None and not mallopt(
        ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(LARGE_BLOCK)
    ):
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) was refused", LARGE_BLOCK)


def release_free_memory() -> None:
    """Hand the free memory of every malloc arena back to the system (a few ms)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(ctypes.c_size_t(0))


def zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.zeros`` whose pages are all in memory, each written once, before it is used.

    ``np.zeros`` of a large array is a new mapping whose pages come lazily: the first read
    of a page maps the kernel's shared zero page, the first write then copies it. A cache
    ring that onnxruntime reads whole every step and writes a column at a time took those
    two faults per page inside the step, where both compute threads wait on whichever
    faults (opus-mt-sized int8, batch 16: the 15 steps after the ring grew to 65 columns
    ran 6.4 ms against 4.1 ms for the steps after them). Populated up front, in one call
    where the kernel allows it: in-process batch-16 decoding 2,471-2,571 -> 2,607-2,886
    tokens/s (six alternating runs), 16 HTTP streams started together 2,256 -> 2,399, the
    server's resident memory under 16 streams unchanged (259-261 MB). A ring's columns not
    yet written are resident from the start, where the zero page stood for them before.
    """
    array = np.zeros(shape, dtype)
    if array.nbytes >= LARGE_BLOCK:
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
