"""progress.json in a job's directory: what the node agent relays to InferenceJob.status.progress."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from ..store.format import atomic_write_json


class Progress:
    """progress.json in the job directory (rewritten atomically), read by the node agent: the prompts that have a
    result and those results' completion tokens (as results.jsonl holds them); the rate counts this run's."""

    def __init__(self, job_dir: Path | None, total: int, done: int, tokens: int = 0):
        self.path = Path(job_dir) / "progress.json" if job_dir else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total, self.done, self.tokens, self.t0 = total, done, tokens, time.perf_counter()
        self.tokens0 = tokens

    def write(self, phase: str, timings: dict | None = None, message: str = "") -> None:
        if self.path is None:
            return
        dt = time.perf_counter() - self.t0
        atomic_write_json(self.path, {
            "phase": phase, "promptsDone": self.done, "promptsTotal": self.total, "tokens": self.tokens,
            "tokensPerSecond": round((self.tokens - self.tokens0) / dt, 3) if dt > 0 else 0.0,
            "timings": timings or {},
            "message": message, "updated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
