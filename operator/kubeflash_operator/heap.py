"""glibc's malloc set up for a long-lived operator whose memory comes and goes in bursts.

The operator's resident memory grew by about twice what its live Python objects hold: tracemalloc of the operator
with 1,000 jobs placed (bench/operator_scale.py, KUBEFLASH_BENCH_TRACEMALLOC) traced 47 MiB while its RSS grew by
~100 MiB. The rest is memory freed after the burst that malloc keeps: the API calls run on API_THREADS threads
(handlers.py), and glibc gives each thread that allocates its own arena (up to 8 per core), each keeping its freed
chunks. `limit_arenas` caps them (mallopt M_ARENA_MAX: the threads hold the GIL to allocate anyway, so one shared
arena costs no contention worth the name), `trim` hands free pages back (malloc_trim). Both are no-ops where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
ARENAS = 2  # the main thread's and one for all the API threads
TRIM_EVERY_S = 30.0  # how often the operator gives freed heap pages back (25-75 ms of one thread for a 60 MiB heap
# in 13,000 pieces on the benchmark's loaded box; in a thread, as ctypes lets the GIL go)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc's
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas (call before the worker threads start); False where that is not glibc."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Give free memory at the heap's top and free whole pages inside it back to the system; True if any went."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
