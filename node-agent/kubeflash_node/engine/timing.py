"""Timers for FlexGen's per-layer breakdown; one accumulator wraps the one schedule, never a copy of it."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager


class Timings:
    """Accumulates (seconds, count, bytes) per category; thread-safe (reader threads add load times)."""

    def __init__(self, sync=None):
        self.sec: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.sync = sync or (lambda: None)  # CUDA: synchronize so a region's time is its device time

    def add(self, name: str, seconds: float, *, bytes: int = 0) -> None:
        with self.lock:
            self.sec[name] += seconds
            self.count[name] += 1
            self.bytes[name] += bytes

    @contextmanager
    def __call__(self, name: str, sync: bool = False):
        if sync:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                self.sync()
            self.add(name, time.perf_counter() - t0)

    def mean(self, name: str) -> float:
        return self.sec[name] / self.count[name] if self.count[name] else 0.0
