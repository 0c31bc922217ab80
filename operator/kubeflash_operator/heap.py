"""glibc's malloc and CPython's cyclic collector set up for a long-lived operator whose memory comes and goes in bursts.

With 1,000 jobs placed, tracemalloc traced 47 MiB of live allocations in the operator, while the RSS of an
untraced run grew by 75 MiB for the same burst (bench/operator_scale.py, KUBEFLASH_BENCH_TRACEMALLOC and
operator_rss_by_map_mib): the rest was memory the burst freed and malloc kept. The API calls run on API_THREADS
threads (handlers.py), and glibc gives each thread that allocates an arena of its own (up to 8 per core), each
keeping its freed chunks. `limit_arenas` caps them (mallopt M_ARENA_MAX: the threads hold the GIL to allocate
anyway), `trim` hands free pages back (malloc_trim); with both, 155-163 MiB at 1,000 jobs instead of 174 and 371 MiB
at 5,000 instead of 561-604. `tune_gc` sets the cyclic collector for a heap of many long-lived objects. The malloc
calls are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

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


GC_YOUNG = 20_000  # allocations (net) between young collections; CPython's default is 700


def tune_gc(young: int = GC_YOUNG) -> None:
    """The cyclic collector set for a heap of many long-lived objects (call once the imports are done).

    With 5,000 jobs placed the operator holds ~1.1 million gc-tracked objects (kopf's per-object memories, daemon
    tasks and coroutines, job bodies). CPython moves an object to the oldest generation once it has lived through
    two young collections (700 and 7,000 allocations with the defaults: a few hundred milliseconds in a burst, less
    than one job step waiting on the API), and scans everything once the oldest generation has grown by a quarter:
    bench/operator_scale.py --jobs 5000 --nodes 500 with KUBEFLASH_BENCH_GCSTATS counted 13 full collections (26 s)
    in the 60 s after every job was placed. A larger young generation lets a step's short-lived objects die young,
    and gc.freeze() takes what exists at start-up (modules, classes, kopf's registry) out of every later scan."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
