"""Timers for FlexGen's per-layer breakdown; one accumulator wraps the one schedule, never a copy of it.

On CUDA a region is timed with a pair of CUDA events on the current stream (no host synchronisation in the
loop); the pairs are resolved once, when the report is built.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager


class Timings:
    """Accumulates (seconds, count, bytes) per category; thread-safe (reader threads add load times)."""

    def __init__(self, cuda: bool = False):
        self.sec: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.cuda = cuda
        self.pending: list[tuple[str, object, object]] = []

    def add(self, name: str, seconds: float, *, bytes: int = 0) -> None:
        with self.lock:
            self.sec[name] += seconds
            self.count[name] += 1
            self.bytes[name] += bytes

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
            if len(self.pending) > 4096:
                self.resolve()
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def resolve(self) -> None:
        """Fold recorded CUDA event pairs into the totals (waits for them)."""
        for name, start, end in self.pending:
            end.synchronize()
            self.add(name, start.elapsed_time(end) / 1e3)
        self.pending.clear()

    # the read categories that move weights: layers, resident copies, routed experts, activation sparsity's bundles
    WEIGHT_READS = ("load_weight", "load_weight_resident", "load_expert", "load_neurons", "load_neurons_resident")

    def weight_bytes(self) -> int:
        """Weight bytes read so far, every read category together."""
        with self.lock:
            return sum(self.bytes[k] for k in self.WEIGHT_READS)

    def mean(self, name: str) -> float:
        self.resolve()
        return self.sec[name] / self.count[name] if self.count[name] else 0.0
