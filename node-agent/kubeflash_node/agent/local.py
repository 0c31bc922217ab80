"""The no-cluster side (`kubeflash agent --no-kube`): wanted models and jobs come from the config file and
the local HTTP API; status goes to <stateDir>/status.json and the API.

What the API adds is kept in <stateDir>/local-desired.json, so it survives a restart; what the config file
declares is always wanted (remove it from the file and restart to drop it).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from kubeflash_node.store.format import atomic_write_json
from kubeflash_node.store.ids import model_id

from .config import AgentConfig, ConfigError, JobWant, ModelWant, parse_job, parse_model
from .models import Problem
from .sides import JobState


class LocalSide:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.path = Path(cfg.state_dir) / "local-desired.json"
        self.lock = threading.Lock()
        self.models: dict[str, ModelWant] = {}  # added through the API, by model id
        self.jobs: dict[str, JobWant] = {}
        self.raw: dict[str, dict] = {"models": {}, "jobs": {}}
        self.progress: dict[str, dict] = {}
        self.labels: dict[str, str | None] = {}
        self.status: dict[str, Any] = {}

    def start(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except ValueError as e:
            raise ConfigError(f"{self.path}: not valid JSON ({e}); fix or delete it") from e
        for raw in (saved.get("models") or {}).values():
            self._add_model(raw)
        for raw in (saved.get("jobs") or {}).values():
            self._put_job(raw)

    def _save(self) -> None:
        atomic_write_json(self.path, self.raw)

    # ---------------------------------------------------------------------------------- API mutations

    def _add_model(self, raw: Any) -> str:
        want = parse_model(raw, "body")
        mid = model_id(want.uri, dtype=want.dtype, quantization=want.quantization)
        self.models[mid] = want
        self.raw["models"][mid] = {"uri": want.uri, "dtype": want.dtype, "quantization": want.quantization,
                                   "disk": want.disk}
        return mid

    def add_model(self, raw: Any) -> str:
        with self.lock:
            mid = self._add_model(raw)
            self._save()
            return mid

    def remove_model(self, mid: str) -> bool:
        with self.lock:
            if self.models.pop(mid, None) is None:
                return False
            self.raw["models"].pop(mid, None)
            self._save()
            return True

    def _put_job(self, raw: Any) -> str:
        job = parse_job(raw, "body")
        self.jobs[job.key] = job
        self.raw["jobs"][job.key] = dict(raw)
        return job.key

    def put_job(self, namespace: str, name: str, raw: Any) -> str:
        if not isinstance(raw, dict):
            raise ConfigError("body must be a JSON object")
        with self.lock:
            key = self._put_job({**raw, "namespace": namespace, "name": name})
            self._save()
            return key

    def delete_job(self, namespace: str, name: str) -> bool:
        with self.lock:
            key = f"{namespace}/{name}"
            if self.jobs.pop(key, None) is None:
                return False
            self.raw["jobs"].pop(key, None)
            self._save()
            return True

    # ------------------------------------------------------------------------------------- the side

    def desired_models(self) -> tuple[list[ModelWant], list[Problem]]:
        with self.lock:
            return list(self.cfg.models) + list(self.models.values()), []

    def job_pods(self) -> list[JobWant]:
        with self.lock:
            return list(self.cfg.jobs) + list(self.jobs.values())

    def job_state(self, key: str) -> JobState:
        job = next((j for j in self.job_pods() if j.key == key), None)
        return JobState(job is not None, job.quota if job else 0)

    def publish(self, status: dict[str, Any]) -> None:
        self.status = status
        atomic_write_json(Path(self.cfg.state_dir) / "status.json", status)

    def relay(self, key: str, patch: dict[str, Any]) -> None:
        self.progress[key] = patch

    def export_results(self, key: str, job_dir: Path, read) -> None:
        """Nothing to copy to without a cluster: results stay in the job directory."""

    def set_labels(self, labels: dict[str, str | None]) -> None:
        self.labels = {k: v for k, v in labels.items() if v is not None}
