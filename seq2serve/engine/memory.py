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
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# Blocks of at least this many bytes get a mapping of their own. Below it: a step's
# activations up to batch 16 (16 x 2048 fp32 is 128 KB), which come and go every step and
# would cost page faults as mappings. At or above it: the cache buffers, cross-attention
# keys/values and encoder batches, which live for many steps or are large. (A step's own
# large blocks, its logits, come from the step graph's arena: ``bundle.session_options``.)
LARGE_BLOCK = 256 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _libc()


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
