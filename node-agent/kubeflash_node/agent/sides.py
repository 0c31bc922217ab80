"""What the agent reconciles against, and where it reports: the cluster (kube.py) or this machine (local.py).

Both sides answer the same questions, so the reconcile pass in agent.py is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from .config import JobWant, ModelWant
from .models import Problem


@dataclass(frozen=True)
class JobState:
    exists: bool | None  # None: could not tell (API trouble): keep its space, change nothing
    quota: int = 0  # bytes; 0: the agent's default


class Side(Protocol):
    def start(self) -> None: ...
    def desired_models(self) -> tuple[list[ModelWant], list[Problem]]: ...
    def job_pods(self) -> list[JobWant]: ...
    def job_state(self, key: str) -> JobState: ...
    def publish(self, status: dict[str, Any]) -> None: ...
    def relay(self, key: str, patch: dict[str, Any]) -> None: ...
    def export_results(self, key: str, job_dir: Path, read: Callable[[int], bytes]) -> None:
        """read(cap): the job's results.jsonl, opened no-follow, at most cap bytes; raises FileNotFoundError or
        safefs.Unsafe (a link, not a regular file, over cap). job_dir only names the place in messages."""
    def set_labels(self, labels: dict[str, str | None]) -> None: ...
