"""Giving memory back to the OS once a reload or a large request is done with it.

Without this the server's resident memory only ever grows: a replaced model sits in reference
cycles until a (rare, with VAE_GC_THRESHOLDS) full collection; onnxruntime's arena keeps the peak
of the largest call it ever ran; and glibc keeps freed pages in its heaps. Measured with
`python -m tests.stress.attacks` (BENCHMARKS.md, hardening).
"""

import ctypes
import ctypes.util
import gc
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c"))
# glibc's: hand the heaps' free pages back to the OS (absent on musl, whose free does it)
_malloc_trim = getattr(_libc, "malloc_trim", None)

M_ARENA_MAX = -8  # glibc's mallopt parameter number

# a request of at least this many network rows (images x draws; seconds of work) gives its memory
# back when it is done; the release costs about 0.2 s of a worker thread, in the background
RELEASE_ROWS = 4096


def trim() -> None:
    """Free unreachable objects now (a full collection), then trim the C heaps."""
    gc.collect()
    trim_heaps()


def trim_heaps() -> None:
    """Hand the C heaps' free pages back to the OS. Alone after a large request, whose arrays
    reference counting has freed: a full collection holds the GIL (about 50 ms here) and would
    stall the event loop for nothing."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def limit_arenas() -> None:
    """At most one glibc malloc arena per usable core (glibc's default: 8 per core), unless
    MALLOC_ARENA_MAX says otherwise. Each worker thread that allocates gets an arena, and each
    arena fragments on its own: 100 reloads under load left RSS +16 % with the default, +3 % with
    2 arenas on 2 cores, flat after 20 (BENCHMARKS.md section 6)."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, max(2, len(os.sched_getaffinity(0))))
