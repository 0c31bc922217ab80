"""The model shard cache: makes the staged models match the wanted ones, disk by disk.

Ready models are whatever catalog.json + models/<id> hold; Pending/Staging/Failed/Evicted live here in
memory. Missing models are handed to the Stager; when a worker asks for room the cache evicts unused models
(space.plan_eviction) or refuses with a message; on start it removes staging leftovers and adopts (verified)
or drops model directories so the catalog matches the disk.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from kubeflash_node.store import pins
from kubeflash_node.store.fetch import redact
from kubeflash_node.store.format import StoreError, verify_model
from kubeflash_node.store.ids import model_id
from kubeflash_node.store.scratch import clean_stale

from .catalog import Catalog, ModelRecord
from .config import AgentConfig, ModelWant, http_policy
from .devices import Disk
from .fsutil import TRASH, clean_leftovers, trash, tree_bytes
from .metrics import Metrics
from .paths import SourceRejected, catalog_path, model_dir, models_dir, resolve_source
from .space import Candidate, evictable_bytes, human, plan_eviction
from .staging import Stager, Task
from .timefmt import rfc3339
from .tpstaging import ShardPlanError, ShardStager, plan_targets

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """A wanted model that is not Ready (or a problem with a wanted one)."""

    id: str
    uri: str
    disk: str
    state: str  # Pending | Staging | Failed | Evicted
    message: str = ""
    since: float = 0.0  # when it entered this state
    evicted: str = ""  # why it was evicted; kept through retries that do not fit, so status still says it


@dataclass(frozen=True)
class Problem:
    """A spec.models entry the agent cannot act on (bad fields, id mismatch)."""

    id: str
    uri: str
    message: str


class ModelCache:
    def __init__(self, cfg: AgentConfig, disks: tuple[Disk, ...], *, metrics: Metrics,
                 paired_disks: tuple[str, ...], free_of: Callable[[Disk], int],
                 pairs: tuple[tuple[int, str], ...] = ()):
        self.cfg, self.disks, self.metrics = cfg, {d.name: d for d in disks}, metrics
        self.paired = paired_disks or tuple(self.disks)
        self.free_of = free_of
        self.catalogs = {d.name: Catalog(catalog_path(d.path)) for d in disks}
        self.entries: dict[str, Entry] = {}
        self.problems: list[Problem] = []
        self.wanted: set[str] = set()
        self.in_use: set[str] = set()
        self.lock = threading.RLock()
        self.stager = Stager(on_need=self._need, on_done=self._done, on_fail=self._fail, python=cfg.python,
                             http=http_policy(cfg))
        self.pairs = tuple((g, self.disks[d]) for g, d in pairs if d in self.disks)  # (gpu, disk), GPU order
        self.shards = ShardStager(python=cfg.python)  # tensorParallel N: shard k on pair k's disk
        self.tp: dict[str, tuple[int, str]] = {}  # model id -> (N, why not staged) for wanted N > 1

    # --------------------------------------------------------------------------------------- startup

    def startup(self) -> None:
        """Remove what a kill -9 left behind, reconcile each catalog with its model directories."""
        for d in self.disks.values():
            root = models_dir(d.path)
            root.mkdir(mode=0o755, parents=True, exist_ok=True)
            left = clean_stale(root) + clean_leftovers(root, (TRASH, ".old-"))  # staging dirs no live process holds
            left += clean_leftovers(d.path, (".catalog.json.", ".probe-"))
            if left:
                log.info("removed leftovers of an interrupted run", extra={"disk": d.name, "entries": left})
            self._adopt(d, self.catalogs[d.name])
        self.stager.start()
        self.shards.start()

    def _adopt(self, d: Disk, cat: Catalog) -> None:
        found = {}
        for entry in sorted(models_dir(d.path).iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                manifest = verify_model(entry)  # sha256 only where the stamp written at staging no longer matches
            except StoreError as e:
                log.warning("removing an unreadable or corrupt model directory (staged again if wanted)",
                            extra={"disk": d.name, "error": str(e)})
                trash(entry)
                continue
            found[entry.name] = manifest
        for mid, manifest in found.items():
            if mid not in cat.models:
                st = model_dir(d.path, mid).stat()
                cat.models[mid] = ModelRecord(uri="", dtype=manifest.dtype, bytes=tree_bytes(model_dir(d.path, mid)),
                                              staged_at=st.st_mtime, last_used=st.st_mtime)
        for mid in [m for m in cat.models if m not in found]:
            del cat.models[mid]
        cat.save()

    def stop(self) -> None:
        self.stager.stop()
        self.shards.stop()

    # ------------------------------------------------------------------------------------- reconcile

    def ready(self) -> dict[str, str]:
        """model id -> the disk holding it Ready (first disk in config order when on several)."""
        out: dict[str, str] = {}
        for name, cat in self.catalogs.items():
            for mid in cat.models:
                out.setdefault(mid, name)
        return out

    def reconcile(self, wanted: list[ModelWant], problems: list[Problem], in_use: set[str]) -> None:
        now = time.time()
        with self.lock:
            self.problems = list(problems)
            self.in_use = set(in_use)
            for cat in self.catalogs.values():
                for mid in in_use & set(cat.models):
                    cat.touch(mid, now)
            ready = self.ready()
            previous, self.wanted = self.wanted, set()
            for i, want in enumerate(wanted):
                mid = model_id(want.uri, dtype=want.dtype, quantization=want.quantization)
                if want.id and want.id != mid:
                    self.problems.append(Problem(want.id, want.uri, f"spec.models[{i}].id {want.id!r} does not match "
                                                 f"the id of this uri/dtype/quantization ({mid!r})"))
                    continue
                self.wanted.add(mid)
                if want.tensor_parallel > 1:
                    self.tp[mid] = (want.tensor_parallel, "")
                if mid in ready:
                    if mid not in previous:
                        self.metrics.cache_hits.inc()
                    self.entries.pop(mid, None)
                    if want.tensor_parallel > 1:
                        self._ensure_shards(mid, want.tensor_parallel, ready[mid])
                    continue
                self._ensure_staging(mid, want, now, newly=mid not in previous)
            self.tp = {m: v for m, v in self.tp.items() if m in self.wanted}
            self.shards.forget({(m, n) for m, (n, _) in self.tp.items()})
            for mid in list(self.entries):
                if mid not in self.wanted:
                    self.stager.cancel(mid)
                    del self.entries[mid]

    def _ensure_staging(self, mid: str, want: ModelWant, now: float, *, newly: bool) -> None:
        e = self.entries.get(mid)
        if e and e.state in ("Pending", "Staging"):
            return
        needed_now = e is not None and e.state == "Evicted" and mid in self.in_use  # a placed job waits for it
        if e and e.state in ("Failed", "Evicted") and now - e.since < self.cfg.retry_seconds and not needed_now:
            return
        try:
            source = resolve_source(want.uri, allowed_roots=self.cfg.allowed_roots, allow_http=self.cfg.allow_http,
                                    http_hosts=self.cfg.http_allow_hosts,
                                    allow_dummy=self.cfg.allow_dummy)
        except SourceRejected as err:
            if not e or e.message != str(err):
                log.warning("model source refused", extra={"model": mid, "uri": redact(want.uri), "error": str(err)})
            self.entries[mid] = Entry(mid, want.uri, "", "Failed", str(err), now)
            return
        disk = self._choose_disk(want)
        if newly:
            self.metrics.cache_misses.inc()
        evicted = e is not None and e.state == "Evicted"
        self.entries[mid] = Entry(mid, want.uri, disk.name, "Pending", e.message if evicted else "", now,
                                  evicted=e.evicted if evicted else "")
        # an evicted model comes back by pushing out wanted ones only when a job on this node needs it
        self.stager.submit(Task(id=mid, want=want, source=source, disk=disk,
                                evict_only_unwanted=evicted and mid not in self.in_use))

    def _ensure_shards(self, mid: str, world: int, disk: str) -> None:
        try:
            targets = plan_targets(mid, world, self.pairs)
        except ShardPlanError as e:
            self.tp[mid] = (world, str(e))
            return
        self.shards.ensure(mid, model_dir(self.disks[disk].path, mid), targets)

    def _choose_disk(self, want: ModelWant) -> Disk:
        if want.disk in self.disks:
            return self.disks[want.disk]
        return max((self.disks[n] for n in self.paired), key=self.free_of)

    # ------------------------------------------------------------------ stager callbacks (its thread)

    def _need(self, task: Task, nbytes: int, phase: str) -> tuple[bool, str]:
        with self.lock:
            if (e := self.entries.get(task.id)) is not None:
                e.state = "Staging"
            cat, free = self.catalogs[task.disk.name], self.free_of(task.disk)
            busy = self.in_use | pins.pinned(task.disk.path)  # pins: models a CSI volume has mounted
            cands = [Candidate(mid, r.bytes, r.last_used or r.staged_at, mid in self.wanted, mid in busy)
                     for mid, r in cat.models.items()]
            plan = plan_eviction(nbytes, free, cands, only_unwanted=task.evict_only_unwanted)
            if plan is None:
                spare = evictable_bytes(cands, only_unwanted=task.evict_only_unwanted)
                return False, (f"does not fit on disk {task.disk.name}: {phase} needs ~{human(nbytes)}, "
                               f"{human(free)} free and {human(spare)} in unused models that could be evicted")
            for victim in plan:
                self._evict(task.disk, victim, for_id=task.id)
            return True, ""

    def _evict(self, disk: Disk, mid: str, *, for_id: str) -> None:
        record = self.catalogs[disk.name].models.get(mid)
        trash(model_dir(disk.path, mid))
        self.catalogs[disk.name].remove_model(mid)
        self.metrics.evictions.labels(disk=disk.name).inc()
        log.info("evicted model", extra={"model": mid, "disk": disk.name, "for": for_id})
        if mid in self.wanted:
            why = (f"evicted from disk {disk.name} to make room for {for_id}; staged again when it fits without "
                   "evicting a wanted model")
            self.entries[mid] = Entry(mid, record.uri if record else "", disk.name, "Evicted", why, time.time(),
                                      evicted=why)

    def _done(self, task: Task, nbytes: int) -> None:
        now = time.time()
        with self.lock:
            w = task.want
            self.catalogs[task.disk.name].add_model(task.id, ModelRecord(
                uri=w.uri, dtype=w.dtype, quantization=w.quantization, bytes=nbytes, staged_at=now, last_used=now))
            self.entries.pop(task.id, None)
            self.metrics.bytes_staged.labels(disk=task.disk.name).inc(nbytes)

    def _fail(self, task: Task, kind: str, message: str) -> None:
        with self.lock:
            self.metrics.staging_failures.labels(kind=kind).inc()
            old = self.entries.get(task.id)
            state = "Evicted" if kind == "nofit" and task.evict_only_unwanted else "Failed"
            evicted = old.evicted if old is not None and state == "Evicted" else ""
            shown = f"{evicted} (last try: {message})" if evicted else message
            if old is None or old.message != shown:
                log.warning("model not staged", extra={"model": task.id, "kind": kind, "error": message})
            if task.id in self.wanted:
                self.entries[task.id] = Entry(task.id, task.want.uri, task.disk.name, state, shown, time.time(),
                                              evicted=evicted)

    # ----------------------------------------------------------------------------------------- status

    def status(self) -> list[dict]:
        """FlashNode.status.models: every Ready copy, then every wanted model that is not Ready."""
        tasks = self.stager.tasks()
        out = []
        with self.lock:
            ready = self.ready()
            for name, cat in self.catalogs.items():
                for mid, r in sorted(cat.models.items()):
                    out.append({"id": mid, "uri": redact(r.uri), "disk": name, "state": "Ready", "bytes": r.bytes,
                                "progress": 100.0, "lastUsed": rfc3339(r.last_used or r.staged_at)})
                    if mid in self.tp and ready.get(mid) == name:  # the copy the shards are cut from
                        out[-1].update(self._shard_status(mid))
            for mid, e in sorted(self.entries.items()):
                t = tasks.get(mid)
                state = "Staging" if e.state == "Pending" and t is not None and t.running else e.state
                row = {"id": mid, "uri": redact(e.uri), "disk": e.disk, "state": state,
                       "progress": round(t.percent, 1) if t is not None and state == "Staging" else 0.0}
                if e.message:
                    row["message"] = e.message
                out.append(row)
            for p in self.problems:
                out.append({"id": p.id, "uri": redact(p.uri), "state": "Failed", "progress": 0.0, "message": p.message})
        return out

    def _shard_status(self, mid: str) -> dict:
        world, why = self.tp[mid]
        rows, message = self.shards.status(mid, world)
        out = {"tensorParallel": world, "shards": rows}
        return {**out, "message": why or message} if why or message else out

    def counts(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for row in self.status():
            states[row["state"]] = states.get(row["state"], 0) + 1
        return states

    def idle(self) -> bool:
        """Nothing queued or staging (for --once)."""
        with self.lock:
            ready = self.ready()
            shards_due = any(m in ready and not why and not self.shards.status(m, n)[0]  # Ready, cut not yet asked
                             for m, (n, why) in self.tp.items())
            return (self.stager.idle() and self.shards.idle() and not shards_due
                    and not any(e.state in ("Pending", "Staging") for e in self.entries.values()))
