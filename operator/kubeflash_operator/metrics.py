"""Prometheus metrics of the operator: jobs by phase, scheduling and staging latency, pods and failed attempts.

One registry per Metrics object (not the process-global one), so an operator restarted in the same process
(tests) starts clean; `serve` exposes it on /metrics.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubeflash_operator.status import PHASES

_LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = None
        self.jobs = Gauge("kubeflash_jobs", "InferenceJobs by phase", ["phase"], registry=self.registry)
        self.scheduling = Histogram("kubeflash_scheduling_latency_seconds",
                                    "From job creation to its first placement on a GPU<->SSD pair",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.staging = Histogram("kubeflash_staging_latency_seconds",
                                 "From placement to the model Ready on the node's SSD (jobs that needed staging)",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.pods = Counter("kubeflash_engine_pods_created", "Inference pods created", registry=self.registry)
        self.failed_attempts = Counter("kubeflash_failed_attempts", "Failed job attempts by reason", ["reason"],
                                       registry=self.registry)
        self.conflicts = Counter("kubeflash_operator_conflicts", "Conditional writes answered 409, by object",
                                 ["object"], registry=self.registry)
        self._tally: _Tally[str] = _Tally()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def job_phase(self, job: str, phase: str | None) -> None:
        """Record a job's current phase (None: the job is gone); O(1), it runs on every job event."""
        with self._lock:
            old = self._phases.pop(job, None) if phase is None else self._phases.get(job)
            if phase is not None:
                self._phases[job] = phase
            if old == phase:
                return
            if old is not None:
                self._tally[old] -= 1
            if phase is not None:
                self._tally[phase] += 1
            changed = {p: self._tally[p] for p in (old, phase) if p is not None}
        for p, n in changed.items():
            self.jobs.labels(phase=p).set(n)

    def conflict(self, obj: str) -> None:
        self.conflicts.labels(object=obj).inc()

    def phase_counts(self) -> dict[str, int]:
        with self._lock:
            return {p: n for p, n in self._tally.items() if n}

    def observe(self, name: str, value: float | str) -> None:
        """A reconcile observation: ("scheduling"|"staging", seconds) or ("failed_attempt", reason)."""
        if name == "failed_attempt":
            self.failed_attempts.labels(reason=str(value)).inc()
        else:
            {"scheduling": self.scheduling, "staging": self.staging}[name].observe(max(float(value), 0.0))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
