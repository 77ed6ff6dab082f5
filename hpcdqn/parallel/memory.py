"""Process-wide allocator setting for training: keep freed memory for reuse.

glibc's malloc serves large blocks (above a threshold that grows to at most 32 MB) with a fresh
``mmap`` and gives them back with ``munmap`` when freed, and trims the heap top as soon as a few
MB are free there. Torch on the CPU allocates every activation, gradient temporary and Recv
buffer anew on each step, so each of those bytes is page-faulted and zeroed by the kernel again,
every step. With ``M_MMAP_MAX = 0`` (no mmap'ed blocks) and a 1 GiB ``M_TRIM_THRESHOLD`` the
blocks come from the heap and are reused. Measured (``benchmarks/pipeline.py``, 512 -> 4096 x 4 ->
18, batch 512): pp=2 at 4 micro-batches 1.48x -> 1.55x of pp=1, both with the setting applied.

``hpcdqn train`` applies it at start; ``HPCDQN_MALLOC_TUNING=0`` leaves the allocator alone (e.g.
when running under jemalloc/tcmalloc or a memory-tight job). Not glibc: nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
ENV = "HPCDQN_MALLOC_TUNING"


@functools.lru_cache(maxsize=None)
def libc():
    """The C library through ctypes (errno kept), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Apply the setting (idempotent); True if it took effect."""
    mallopt = getattr(libc(), "mallopt", None)
    if os.environ.get(ENV, "1") == "0" or mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_freed_memory() -> bool:
    """Give the pages of freed blocks back to the OS (glibc ``malloc_trim(0)``, which also
    releases free pages inside the heap, not only at its top). With ``keep_freed_memory`` a
    start-up temporary (the hand-written backward's check clones a gradient; a resume reads
    arrays before copying them in) would otherwise stay resident as a hole the training state,
    allocated later, cannot reuse: called once the learner is built (and after a resume).
    True if it ran."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
