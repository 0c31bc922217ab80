"""catalog.json on each store disk: the agent's record of staged models (lastUsed…) and job quotas.

Crash-safe (temp + fsync + rename) and thread-safe (the stager and the reconcile pass both write it). The
directories are the truth for *what* exists: on start the catalog is
reconciled with them (entries without a directory dropped, directories without an entry adopted), so a
catalog that is stale after a kill -9 heals itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kubeflash_node.store.format import atomic_write_json

log = logging.getLogger(__name__)
VERSION = 1


@dataclass
class ModelRecord:
    uri: str = ""
    dtype: str = ""
    quantization: str = "none"
    bytes: int = 0
    staged_at: float = 0.0
    last_used: float = 0.0


@dataclass
class JobRecord:
    quota: int = 0
    created: float = 0.0


class Catalog:
    def __init__(self, path: Path):
        self.path = path
        self.models: dict[str, ModelRecord] = {}
        self.jobs: dict[str, JobRecord] = {}
        self._lock = threading.RLock()
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("catalog unreadable; rebuilding it from the model directories",
                        extra={"path": str(self.path), "error": str(e)})
            return
        try:
            self.models = {k: ModelRecord(**v) for k, v in (data.get("models") or {}).items()}
            self.jobs = {k: JobRecord(**v) for k, v in (data.get("jobs") or {}).items()}
        except (TypeError, AttributeError) as e:
            log.warning("catalog malformed; rebuilding it", extra={"path": str(self.path), "error": str(e)})
            self.models, self.jobs = {}, {}

    def save(self) -> None:
        with self._lock:
            atomic_write_json(self.path, {
                "version": VERSION,
                "models": {k: asdict(v) for k, v in sorted(self.models.items())},
                "jobs": {k: asdict(v) for k, v in sorted(self.jobs.items())},
            })

    def add_model(self, model_id: str, record: ModelRecord) -> None:
        with self._lock:
            self.models[model_id] = record
            self.save()

    def remove_model(self, model_id: str) -> None:
        with self._lock:
            if self.models.pop(model_id, None) is not None:
                self.save()

    def touch(self, model_id: str, now: float | None = None, *, every: float = 60.0) -> None:
        """Record a use; written at most once a minute per model, to spare the disk."""
        now = time.time() if now is None else now
        with self._lock:
            rec = self.models.get(model_id)
            if rec is not None and now - rec.last_used >= every:
                rec.last_used = now
                self.save()

    def set_job(self, key: str, quota: int) -> None:
        with self._lock:
            rec = self.jobs.get(key)
            if rec is None or rec.quota != quota:
                self.jobs[key] = JobRecord(quota=quota, created=rec.created if rec else time.time())
                self.save()

    def remove_job(self, key: str) -> None:
        with self._lock:
            if self.jobs.pop(key, None) is not None:
                self.save()
