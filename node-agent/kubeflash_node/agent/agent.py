"""The agent: start-up (lock, discovery, pairing, cleanup, probes) and the reconcile pass, run every interval.

One pass reads what is wanted (FlashNode.spec.models and the job pods, or the local config/API), makes the
job spaces and staged models match, relays engine progress, and publishes status. Staging runs on its own
thread (staging.py), so heartbeats continue while a model is copied.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from kubeflash_node.store.format import StoreError, atomic_write_json
from kubeflash_node.store.routing import JOB_ROUTING_FILE, publish_routing
from kubeflash_node.store.routing import MAX_BYTES as ROUTING_MAX_BYTES
from kubeflash_node.store.routingprofile import JOB_PROFILE_FILE, publish_profile
from kubeflash_node.store.routingprofile import MAX_BYTES as PROFILE_MAX_BYTES

from . import progress as progress_doc
from . import status as status_mod
from .config import AgentConfig, JobWant
from .devices import Disk
from .discovery import Inventory, discover
from .fsutil import fs_space, tree_bytes
from .jobs import JobSpaces
from .kvcache import NodeKVCache
from .metrics import Metrics
from .models import ModelCache
from .pairing import pair
from .paths import model_dir
from .pods import merge
from .probe import DiskProbe, GpuProbe, ProbeCache, measure
from .safefs import Unsafe
from .sides import Side
from .space import free_bytes
from .timefmt import rfc3339

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"


class AgentError(RuntimeError):
    """The agent cannot start (another agent holds the store, a disk path is unusable)."""


class Agent:
    def __init__(self, cfg: AgentConfig, side_factory, *, metrics: Metrics | None = None):
        self.cfg = cfg
        self.side_factory = side_factory  # (cfg, disks) -> Side, called once the disks are known
        self.metrics = metrics or Metrics()
        self.side: Side | None = None
        self.inv: Inventory | None = None
        self.disk_probes: dict[str, DiskProbe] = {}
        self.gpu_probes: dict[int, GpuProbe] = {}
        self.conditions: list[dict] = []
        self.relayed: dict[str, dict] = {}
        self._routing_seen: dict[str, bytes] = {}  # job -> sha256 of the routing.json last published
        self._profile_seen: dict[str, bytes] = {}  # job -> sha256 of the routing-profile.json last published
        self.last_status: dict[str, Any] = {}
        self.last_ok: float | None = None
        self.last_error = ""
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------------------------------- start-up

    def start(self) -> None:
        self._take_lock()
        self.inv = discover(self.cfg)
        self.pairs = pair(self.inv.gpus, self.inv.disks)
        log.info("devices discovered", extra={
            "gpus": [g.index for g in self.inv.gpus], "disks": [d.name for d in self.inv.disks],
            "pairs": [f"{p.gpu}->{p.disk} ({p.reason})" for p in self.pairs]})
        paired = tuple(dict.fromkeys(p.disk for p in self.pairs))
        self.cache = ModelCache(self.cfg, self.inv.disks, metrics=self.metrics, paired_disks=paired,
                                free_of=self.free_of, pairs=tuple((p.gpu, p.disk) for p in self.pairs))
        self.jobs = JobSpaces(self.inv.disks, self.cache.catalogs)
        self.jobs.startup()
        self.cache.startup()
        self._kv_cache_seen: set[str] = set()
        self.kv_cache = NodeKVCache(self.inv.disks, budget=self.cfg.kv_cache_budget, state_dir=self.cfg.state_dir,
                                    metrics=self.metrics)
        if self.cfg.probe:
            self.disk_probes, self.gpu_probes = measure(
                list(self.inv.disks), list(self.inv.gpus), ProbeCache(self.cfg.state_dir / "probe.json"),
                max_bytes=self.cfg.probe_bytes, max_seconds=self.cfg.probe_seconds, reprobe=self.cfg.reprobe,
                python=self.cfg.python)
        self._probe_metrics()
        self.side = self.side_factory(self.cfg, self.inv.disks)
        self.side.start()
        self.side.set_labels(status_mod.node_labels(self.pairs))

    def _take_lock(self) -> None:
        state = Path(self.cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(state / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentError(f"another agent is running on {state} (agent.lock is held)") from None
        self._lock_fd = fd

    def _probe_metrics(self) -> None:
        m = self.metrics
        for name, p in self.disk_probes.items():
            m.disk_read.labels(disk=name).set(p.read_gbps * 1e9)
            m.disk_write.labels(disk=name).set(p.write_gbps * 1e9)
        for idx, p in self.gpu_probes.items():
            m.gpu_h2d.labels(gpu=str(idx)).set(p.h2d_gbps * 1e9)
            m.gpu_d2h.labels(gpu=str(idx)).set(p.d2h_gbps * 1e9)
        m.pairs.set(len(self.pairs))

    # ------------------------------------------------------------------------------------------ space

    def space_of(self, d: Disk) -> tuple[int, int]:
        """(capacity, free) of a store disk, free with the reserve and unused KV quotas subtracted."""
        fs = fs_space(d.path)
        used = tree_bytes(d.path) if d.capacity else 0
        free = free_bytes(fs_free=fs.free, capacity=d.capacity, used=used, reserve=d.reserve,
                          kv_unused=self.jobs.kv_unused(d.name))
        return (d.capacity or fs.capacity), free

    def free_of(self, d: Disk) -> int:
        return self.space_of(d)[1]

    # ------------------------------------------------------------------------------------- the pass

    def step(self) -> None:
        wanted, problems = self.side.desired_models()
        pods = self._merge_pods(self.side.job_pods())
        alive = self._reconcile_jobs(pods)
        allocations = self.jobs.refresh(alive)
        in_use = {j.model_id for j in pods.values() if j.running and j.model_id}
        self.cache.reconcile(wanted, problems, in_use)
        self._relay(alive)
        self._publish_routing(alive, pods)
        self._refresh_kv_cache()
        self._publish(allocations)
        self.last_ok, self.last_error = time.time(), ""

    def _refresh_kv_cache(self) -> None:
        """Fold the jobs' cache counters, measure and evict; a failure here never stops the pass's status."""
        try:
            self.kv_cache.refresh()
        except OSError as e:
            log.warning("prefix KV cache pass failed", extra={"error": str(e)})
        for p in self.kv_cache.problems:
            if p not in self._kv_cache_seen:  # a planted link stays until its job is gone: say so once
                log.warning("prefix KV cache", extra={"problem": p})
        self._kv_cache_seen = set(self.kv_cache.problems)

    def _merge_pods(self, pods: list[JobWant]) -> dict[str, JobWant]:
        """One entry per job (a job has pods for several attempts, and its InferenceJob)."""
        out: dict[str, JobWant] = {}
        for j in pods:
            out[j.key] = merge(out[j.key], j) if j.key in out else j
        return out

    def _reconcile_jobs(self, pods: dict[str, JobWant]) -> dict[str, str]:
        """Create spaces for live jobs, remove those of jobs that are gone; returns live job -> disk."""
        existing = self.jobs.existing()
        alive: dict[str, str] = {}
        for key in sorted(set(pods) | set(existing)):
            state = self.side.job_state(key)
            if state.exists is False:
                if key in existing:
                    self.jobs.remove(key, existing[key])
                self.relayed.pop(key, None)
                continue
            if state.exists is None:
                if key in existing:
                    alive[key] = existing[key]
                continue
            ns, name = key.split("/", 1)
            want = pods.get(key) or JobWant(namespace=ns, name=name)
            disk = existing.get(key) or self._job_disk(want)
            self.jobs.ensure(want, disk, want.quota or state.quota or self.cfg.default_job_quota)
            alive[key] = disk
        return alive

    def _job_disk(self, want: JobWant) -> str:
        names = [d.name for d in self.inv.disks]
        if want.disk in names:
            return want.disk
        paired = [p.disk for p in self.pairs] or names
        return max(dict.fromkeys(paired), key=lambda n: self.free_of(self.inv.disk(n)))

    def _relay(self, alive: dict[str, str]) -> None:
        """progress.json -> the job's status, results.jsonl -> its output: both read no-follow and size-capped
        (the pod writes them; a planted link or an oversized file is refused and noted, never followed)."""
        for key, disk in alive.items():
            doc = None
            try:
                doc = progress_doc.parse(self.jobs.read(key, disk, "progress.json", progress_doc.MAX_BYTES)
                                         .decode(errors="replace"))
                self.jobs.note(key, "progress.json", "")
            except FileNotFoundError:
                self.jobs.note(key, "progress.json", "")
            except Unsafe as e:
                self.jobs.note(key, "progress.json", str(e))
            except OSError:
                continue
            self.jobs.check(key, disk, RESULTS)
            patch = progress_doc.status_patch(doc) if doc else {}
            # status.refused: what the agent would not read; the operator fails the job when it names the results.
            # Sent only while there is a refusal, and once more (null) when it clears: no extra write per job.
            refused = dict(self.jobs.problems.get(key, {}))
            before = (self.relayed.get(key) or {}).get("refused") or {}
            if refused or before:  # a merge patch: a file no longer refused is sent as null
                patch["refused"] = {f: refused.get(f) for f in sorted({*refused, *before})} if refused else None
            if patch and patch != self.relayed.get(key):
                self.side.relay(key, patch)
                self.relayed[key] = patch
        for key, disk in alive.items():
            self.side.export_results(key, self.jobs.path(key, disk), self._results_reader(key, disk))

    def _publish_routing(self, alive: dict[str, str], pods: dict[str, JobWant]) -> None:
        """A MoE job's routing counts (<job dir>/routing.json: its model volume is read-only) folded into its model's
        .routing.json on this node (store/routing.py), which the next pod of the model reads to start its hot-expert
        cache warm; and its routing profile (<job dir>/routing-profile.json: the model's plus its run) made the
        model's .routing-profile.json (store/routingprofile.py), which the next pod's policy: auto prices with. Read
        no-follow and capped, each new version once; a bad file is logged and left."""
        self._routing_seen = {k: v for k, v in self._routing_seen.items() if k in alive}
        self._profile_seen = {k: v for k, v in self._profile_seen.items() if k in alive}
        ready = self.cache.ready()
        for key, disk in alive.items():
            mid = pods[key].model_id if key in pods else ""
            if mid not in ready:
                continue
            self._publish_profile(key, disk, model_dir(self.inv.disk(ready[mid]).path, mid), mid)
            try:
                raw = self.jobs.read(key, disk, JOB_ROUTING_FILE, ROUTING_MAX_BYTES)
            except (OSError, Unsafe):  # none yet (the engine writes it as it closes), or not a regular file
                continue
            if self._routing_seen.get(key) == (digest := hashlib.sha256(raw).digest()):
                continue
            self._routing_seen[key] = digest
            try:
                if publish_routing(model_dir(self.inv.disk(ready[mid]).path, mid), raw, where=f"{key}/{JOB_ROUTING_FILE}"):
                    log.info("routing counts published", extra={"job": key, "model": mid})
            except (ValueError, StoreError, OSError) as e:
                log.warning("routing counts refused", extra={"job": key, "model": mid, "error": str(e)})

    def _publish_profile(self, key: str, disk: str, mdir: Path, mid: str) -> None:
        try:
            raw = self.jobs.read(key, disk, JOB_PROFILE_FILE, PROFILE_MAX_BYTES)
        except (OSError, Unsafe):  # none (yet: the engine writes it as it closes), or not a regular file
            return
        if self._profile_seen.get(key) == (digest := hashlib.sha256(raw).digest()):
            return
        self._profile_seen[key] = digest
        try:
            if publish_profile(mdir, raw, where=f"{key}/{JOB_PROFILE_FILE}"):
                log.info("routing profile published", extra={"job": key, "model": mid})
        except (ValueError, OSError) as e:
            log.warning("routing profile refused", extra={"job": key, "model": mid, "error": str(e)})

    def _results_reader(self, key: str, disk: str):
        """read(cap) -> the job's results.jsonl, no-follow and capped; a refusal is noted for the job's status."""
        def read(cap: int) -> bytes:
            try:
                data = self.jobs.read(key, disk, RESULTS, cap)
            except Unsafe as e:
                self.jobs.note(key, RESULTS, str(e))
                raise
            self.jobs.note(key, RESULTS, "")
            return data
        return read

    def _publish(self, allocations, *, running: bool = True) -> None:
        now = rfc3339()
        disks, m = [], self.metrics
        for d in self.inv.disks:
            capacity, free = self.space_of(d)
            disks.append(status_mod.disk_row(d, self.disk_probes.get(d.name), capacity, free))
            m.disk_capacity.labels(disk=d.name).set(capacity)
            m.disk_free.labels(disk=d.name).set(free)
            m.kv_quota.labels(disk=d.name).set(sum(a.quota for a in allocations.values() if a.disk == d.name))
            m.kv_used.labels(disk=d.name).set(sum(a.used for a in allocations.values() if a.disk == d.name))
        models = self.cache.status()
        conds = status_mod.conditions(pairs=self.pairs, models=models, allocations=list(allocations.values()),
                                      running=running)
        self.conditions = status_mod.merge_conditions(self.conditions, conds, now)
        status = status_mod.flashnode_status(
            gpus=[status_mod.gpu_row(g, self.gpu_probes.get(g.index)) for g in self.inv.gpus], disks=disks,
            pairs=self.pairs, models=models, allocations=list(allocations.values()), conditions=self.conditions,
            heartbeat=now, kv_cache=self.kv_cache.status())
        self.side.publish(status)
        self.last_status = status
        for state in ("Pending", "Staging", "Ready", "Failed", "Evicted"):
            m.models.labels(state=state).set(sum(1 for r in models if r["state"] == state))
        m.kv_over_quota.set(sum(1 for a in allocations.values() if a.over))
        m.jobs.set(len(allocations))
        m.heartbeat.set(time.time())

    # -------------------------------------------------------------------------------------- the loop

    def run(self, stop: threading.Event) -> int:
        """Reconcile every interval until `stop` (or, with --once, until staging is done); exit code."""
        interval = min(self.cfg.interval, 0.5) if self.cfg.once else self.cfg.interval
        while True:
            try:
                self.step()
            except Exception as e:  # an API outage or a full disk must not kill the agent: log, retry
                self.last_error = f"{type(e).__name__}: {e}"
                self.metrics.reconcile_errors.inc()
                log.exception("reconcile pass failed")
            if self.cfg.once and self.last_ok and self.cache.idle():
                self.step()
                return 0 if all(r["state"] == "Ready" for r in self.cache.status()) else 3
            if stop.wait(interval):
                return 0

    def shutdown(self) -> None:
        """Stop staging (workers are killed), report Ready=False and take the agent label off the node."""
        if self.inv is None or self.side is None:
            return
        self.cache.stop()
        try:
            self._publish(self.jobs.allocations, running=False)
            self.side.set_labels(status_mod.node_labels(self.pairs, running=False))
        except Exception:  # best effort on the way out
            log.exception("could not publish the final status")

    # -------------------------------------------------------------------------------- for the API

    def health(self) -> tuple[bool, str]:
        if self.last_ok is None:
            return False, f"starting{': ' + self.last_error if self.last_error else ''}"
        age = time.time() - self.last_ok
        if age > 3 * self.cfg.interval + 30:
            return False, f"no reconcile pass completed for {age:.0f}s: {self.last_error}"
        return True, "ok"

    def inventory(self) -> dict[str, Any]:
        inv = self.inv
        local = self.local()
        return {
            "node": self.cfg.node_name,
            "mode": "kube" if self.cfg.kube else "local",
            "status": self.last_status,
            "pairs": [{"gpu": p.gpu, "disk": p.disk, "reason": p.reason} for p in getattr(self, "pairs", [])],
            "probes": {"disks": {k: vars(v) for k, v in self.disk_probes.items()},
                       "gpus": {str(k): vars(v) for k, v in self.gpu_probes.items()}},
            "ssds": [{"name": s.name, "sizeBytes": s.size_bytes, "pciRoot": s.location.root,
                      "numaNode": s.location.numa_node} for s in (inv.ssds if inv else ())],
            "staging": {k: {"disk": t.disk.name, "phase": t.phase, "percent": t.percent, "running": t.running}
                        for k, t in (self.cache.stager.tasks().items() if inv else [])},
            "jobs": {k: {"disk": a.disk, "quotaBytes": a.quota, "usedBytes": a.used, "overQuota": a.over,
                         "path": str(a.path), "progress": {f: v for f, v in self.relayed.get(k, {}).items() if f != "refused"},
                         "problems": dict(self.jobs.problems.get(k, {}))}
                     for k, a in (self.jobs.allocations.items() if inv else [])},
            "labels": local.labels if local else None,
            "lastError": self.last_error,
        }

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def local(self):
        return self.side if not self.cfg.kube else None

    def write_pidfile(self, api_address: str) -> None:
        atomic_write_json(Path(self.cfg.state_dir) / "agent.json",
                          {"pid": os.getpid(), "api": api_address, "node": self.cfg.node_name})
