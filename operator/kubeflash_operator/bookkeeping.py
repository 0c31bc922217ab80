"""Placements made but not yet seen in the watch stream, so two jobs placed a moment apart never share a pair.

The claims index is fed by watch events, which trail the status patch that records a placement. Until the
index shows a job where this book says it is, the book's claim counts; a claim the watch never confirms
expires after `ttl` seconds (its patch failed, the next tick places the job again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from kubeflash_operator.scheduler import Claim


class Bookkeeping:
    def __init__(self, *, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.RLock()  # held around "read claims, place, hold" so placements serialize
        self._held: dict[str, tuple[Claim, float]] = {}
        self._ttl = ttl
        self._clock = clock

    def claims(self, observed: Iterable[Claim]) -> tuple[Claim, ...]:
        """Observed claims, overridden by newer ones this operator made and the watch has not shown yet."""
        merged = {c.job: c for c in observed}
        now = self._clock()
        with self.lock:
            for job, (claim, since) in list(self._held.items()):
                seen = merged.get(job)
                if now - since > self._ttl or (seen and (seen.node, seen.gpus) == (claim.node, claim.gpus)):
                    del self._held[job]
                else:
                    merged[job] = claim
        return tuple(merged.values())

    def hold(self, claim: Claim) -> None:
        with self.lock:
            self._held[claim.job] = (claim, self._clock())

    def drop(self, job: str) -> None:
        with self.lock:
            self._held.pop(job, None)
