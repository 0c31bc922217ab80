"""heap.py against the real glibc malloc: the arena cap keeps threads that allocate at once in one shared arena,
and trim gives freed memory back (resident memory drops). Each check runs in a fresh interpreter (mallopt acts on
the whole process); skipped where the C library is not glibc."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubeflash_operator import heap

OPERATOR = Path(heap.__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(heap._libc() is None, reason="not glibc")

ARENAS = """
import json, sys, threading
from kubeflash_operator import heap
limited = heap.limit_arenas() if sys.argv[1] == "limit" else None
hold, together = [], threading.Barrier(8)
def work():
    hold.append([bytearray(2000) for _ in range(200)])  # malloc'd (> 512 bytes) in this thread's arena
    together.wait()  # all eight alive at once
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
heaps = 0  # a thread arena is a 64 MiB-aligned mapping of its own
for line in open("/proc/self/maps"):
    f = line.split()
    if len(f) == 5 and f[1] == "rw-p" and int(f[0].split("-")[0], 16) % (64 << 20) == 0:
        heaps += 1
print(json.dumps({"limited": limited, "heaps": heaps}))
"""

TRIM = """
import json
from pathlib import Path
from kubeflash_operator import heap
def rss():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024
chunks = [bytearray(4000) for _ in range(20000)]  # ~80 MiB in malloc's heap
pin = bytearray(4000)  # above them: malloc cannot shrink its heap from the top by itself
del chunks
before = rss()
trimmed = heap.trim()
print(json.dumps({"trimmed": trimmed, "freed_mib": before - rss()}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(OPERATOR)})
    return json.loads(out.stdout)


def test_limit_arenas_shares_one_arena_among_threads():
    free = _run(ARENAS, "free")
    limited = _run(ARENAS, "limit")
    assert free["heaps"] >= 2, free  # glibc's default: an arena per allocating thread (8 per core at most)
    assert limited == {"limited": True, "heaps": 1}, limited  # the main arena and one for every thread


def test_trim_returns_freed_memory():
    got = _run(TRIM)
    assert got["trimmed"] is True
    assert got["freed_mib"] > 40, got


YOUNG = """
import gc, json, sys
from kubeflash_operator import heap
if sys.argv[1] == "tuned":
    heap.tune_gc()
marker = []  # lives through 5,000 allocations of gc-tracked objects, as a job step's objects live through an API call
churn = [[i] for i in range(5000)]
print(json.dumps({"young": any(o is marker for o in gc.get_objects(0)), "frozen": gc.get_freeze_count() > 0,
                  "threshold": gc.get_threshold()[0]}))
"""


def test_tune_gc_lets_short_lived_objects_die_young():
    default = _run(YOUNG, "default")
    tuned = _run(YOUNG, "tuned")
    assert default["young"] is False  # CPython's 700: moved on to an older generation already
    assert tuned == {"young": True, "frozen": True, "threshold": heap.GC_YOUNG}
