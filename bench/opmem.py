"""Run `kubeflash operator` under tracemalloc and say where its memory is on SIGUSR1 (bench/operator_scale.py's
KUBEFLASH_BENCH_TRACEMALLOC): RSS, the traced total, the largest allocating lines, the largest allocating call
stacks (KUBEFLASH_BENCH_TRACEMALLOC_FRAMES deep, default 1: lines only) and the gc-tracked objects by type. What is
imported before it starts (kopf, the kubernetes client's API classes, the operator) is not traced.

  python bench/opmem.py OUT_TXT kubeflash-args...      (the benchmark starts it; SIGUSR1 writes OUT_TXT)

With KUBEFLASH_BENCH_GCSTATS set and no tracemalloc (bench/operator_scale.py's KUBEFLASH_BENCH_GCSTATS=<prefix>):
the cyclic garbage collector's passes instead, per generation: how many and their wall seconds, since the start
and since the previous SIGUSR1 (the benchmark sends one before and one after its idle window).
"""

from __future__ import annotations

import collections
import gc
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def report() -> str:
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    current, peak = tracemalloc.get_traced_memory()
    out = [f"RSS {_rss_mib():.1f} MiB; traced {current / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)", "",
           "by line:"]
    out += [f"{s.size / 2**20:9.2f} MiB {s.count:8d} {s.traceback}" for s in snap.statistics("lineno")[:60]]
    if tracemalloc.get_traceback_limit() > 1:
        out += ["", "by call stack (innermost last):"]
        for s in snap.statistics("traceback")[:30]:
            out.append(f"{s.size / 2**20:9.2f} MiB {s.count:8d}")
            out += [f"      {f.filename}:{f.lineno}" for f in s.traceback]
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    out += ["", "gc-tracked objects by type:"] + [f"{n:9d} {t}" for t, n in types.most_common(40)]
    return "\n".join(out) + "\n"


class GcClock:
    """Count and time the collector's passes by generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.total = {g: [0, 0.0, 0] for g in range(3)}  # generation -> [passes, seconds, objects collected]
        self.mark = {g: list(v) for g, v in self.total.items()}
        self._began = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            t = self.total[info["generation"]]
            t[0], t[1], t[2] = t[0] + 1, t[1] + time.perf_counter() - self._began, t[2] + info["collected"]

    def report(self) -> str:
        lines = [f"gc-tracked objects now: {len(gc.get_objects())}"]
        for g, (n, s, c) in self.total.items():
            n0, s0, _ = self.mark[g]
            lines.append(f"generation {g}: {n} passes, {s:.3f} s, {c} collected since start; "
                         f"{n - n0} passes, {s - s0:.3f} s since the previous report")
        self.mark = {g: list(v) for g, v in self.total.items()}
        return "\n".join(lines) + "\n"


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    # the client's models and kopf imported first, untraced: traced, importing CoreV1Api alone takes minutes
    import kopf  # noqa: F401
    from kubernetes import client

    from kubeflash_operator import handlers  # noqa: F401
    client.CoreV1Api, client.CustomObjectsApi, client.CoordinationV1Api  # noqa: B018
    if os.environ.get("KUBEFLASH_BENCH_TRACEMALLOC"):
        tracemalloc.start(int(os.environ.get("KUBEFLASH_BENCH_TRACEMALLOC_FRAMES", "1")))
        signal.signal(signal.SIGUSR1, lambda *_: Path(out).write_text(report()))
    else:
        clock = GcClock()
        signal.signal(signal.SIGUSR1, lambda *_: Path(out).open("a").write(clock.report()))
    from kubeflash_node.cli import main as kubeflash
    sys.argv = ["kubeflash", *args]
    kubeflash()


if __name__ == "__main__":
    main()
