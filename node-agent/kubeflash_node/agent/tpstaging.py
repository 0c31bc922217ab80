"""Per-pair tensor-parallel shards: a Ready model wanted with tensorParallel N is also cut into N shard stores,
shard k on the disk of GPU<->SSD pair k, so each GPU of a tensor-parallel job streams only its own bytes from
its own SSD (docs/multi-gpu.md).

Layout: `<disk>/shards/<model-id>.tp<N>/<k>/` (a complete store: manifest.json + one file per stage, sha256 per
file; store/tpshards.py). Outside `models/`, so the model catalog never adopts or evicts a shard as a model.

A child process (torch stays out of the agent) checks the shards already there and cuts only the missing ones:
each shard is written into a scratch directory beside its final place, on the same disk, and published by one
rename once whole (store/format.ModelWriter), under a lock on `<model-id>.tp<N>/`. A killed cut leaves only
scratch directories, which the next run removes (store/scratch.clean_stale); shards already published are
verified (sha256) and kept, so staging resumes where it stopped. A shard cut from another version of the model
(its recorded manifest sha256 differs) or corrupt is removed and cut again. A disk without room for its shard
fails that model's shards with the disk and the sizes named; nothing is evicted for a shard.

    python -m kubeflash_node.agent.tpstaging '{"model": DIR, "world": N, "targets": [{"rank": 0, "path": P0}, ...]}'

prints one JSON event per line (progress, shard, done, error), like agent/stageworker.py.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .devices import Disk

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
RETRY_S = 60.0  # a failed cut is tried again after this long


class ShardPlanError(ValueError):
    """The node cannot hold N shards (fewer pairs than N); the message names the numbers."""


@dataclass(frozen=True)
class Target:
    """Shard `rank` of the model goes to `path`, on the disk of the pair of GPU `gpu`."""

    rank: int
    gpu: int
    disk: Disk
    path: Path


def shard_path(disk_root: Path, mid: str, world: int, rank: int) -> Path:
    return Path(disk_root) / SHARDS_DIR / f"{mid}.tp{world}" / str(rank)


def plan_targets(mid: str, world: int, pairs: Sequence[tuple[int, Disk]]) -> list[Target]:
    """Shard k on the disk of pair k (pairs in GPU index order); refused when the node has fewer pairs than N."""
    if world > len(pairs):
        raise ShardPlanError(f"tensorParallel {world}: this node has {len(pairs)} GPU<->SSD pair"
                             f"{'s' if len(pairs) != 1 else ''}; shard k goes on pair k's disk, so at most "
                             f"{len(pairs)} shards")
    return [Target(k, gpu, disk, shard_path(disk.path, mid, world, k)) for k, (gpu, disk) in enumerate(pairs[:world])]


@dataclass
class _Job:
    mid: str
    model_dir: Path
    targets: list[Target]
    model_sha: str
    state: str = "Pending"  # Pending | Staging | Ready | Failed (the whole set)
    since: float = 0.0
    message: str = ""
    percent: float = 0.0
    ranks: dict[int, dict] = field(default_factory=dict)  # rank -> {"state", "bytes", "message"}


class ShardStager:
    """Cuts the shards of wanted models, one model at a time, on a thread of the agent; keeps their states."""

    def __init__(self, python: str = ""):
        self.python = python or sys.executable
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._jobs: dict[tuple[str, int], _Job] = {}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._loop, name="shard-stager", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)
        if (p := self._proc) is not None and p.poll() is None:
            p.kill()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def ensure(self, mid: str, model_dir: Path, targets: list[Target]) -> None:
        """Have the shards of `mid` (cut from the store at `model_dir`) on `targets`; queued unless they are
        known Ready and still match the model's manifest, or a failed try is recent."""
        from kubeflash_node.store.tpshards import manifest_sha256

        key = (mid, len(targets))
        try:
            sha = manifest_sha256(model_dir)
        except OSError:
            return  # the model is being replaced; the next reconcile sees the new one
        now = time.time()
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.model_sha == sha and [t.path for t in job.targets] == [t.path for t in targets]:
                if job.state in ("Pending", "Staging"):
                    return
                if job.state == "Ready" and all((t.path / "manifest.json").exists() for t in targets):
                    return
                if job.state == "Failed" and now - job.since < RETRY_S:
                    return
            job = _Job(mid, Path(model_dir), list(targets), sha, since=now,
                       ranks={t.rank: {"state": "Pending"} for t in targets})
            self._jobs[key] = job
        self._q.put(job)

    def forget(self, keep: set[tuple[str, int]]) -> None:
        """Drop the states of shard sets no longer wanted (their files stay; a later want finds them)."""
        with self._lock:
            for key in [k for k in self._jobs if k not in keep]:
                if self._jobs[key].state not in ("Pending", "Staging"):
                    del self._jobs[key]

    def status(self, mid: str, world: int) -> tuple[list[dict], str]:
        """FlashNode.status.models[].shards for one model, and the set's message (empty when none)."""
        with self._lock:
            job = self._jobs.get((mid, world))
            if job is None:
                return [], ""
            rows = []
            for t in job.targets:
                r = job.ranks.get(t.rank, {})
                st = r.get("state", "Pending")
                row = {"rank": t.rank, "gpu": t.gpu, "disk": t.disk.name, "path": str(t.path), "state": st,
                       "progress": 100.0 if st == "Ready" else round(job.percent, 1) if st == "Staging" else 0.0}
                if r.get("bytes"):
                    row["bytes"] = r["bytes"]
                if r.get("message"):
                    row["message"] = r["message"]
                rows.append(row)
            return rows, job.message

    def idle(self) -> bool:
        with self._lock:
            return not any(j.state in ("Pending", "Staging") for j in self._jobs.values())

    # ------------------------------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while (job := self._q.get()) is not None:
            try:
                self._run(job)
            except Exception as e:  # keep the thread alive whatever one model does
                log.exception("shard staging crashed", extra={"model": job.mid})
                self._finish(job, "Failed", f"{type(e).__name__}: {e}")

    def _run(self, job: _Job) -> None:
        req = {"model": str(job.model_dir), "world": len(job.targets),
               "targets": [{"rank": t.rank, "path": str(t.path), "disk": t.disk.name} for t in job.targets]}
        with self._lock:
            job.state = "Staging"
            for r in job.ranks.values():
                r["state"] = "Staging"
        log.info("staging tensor-parallel shards", extra={"model": job.mid, "shards": len(job.targets)})
        from .staging import _die_with_parent

        self._proc = proc = subprocess.Popen([self.python, "-m", "kubeflash_node.agent.tpstaging", json.dumps(req)],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             preexec_fn=_die_with_parent)  # killed with the agent
        tail: list[str] = []
        reader = threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True)
        reader.start()
        error = None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                kind = ev.get("event")
                if kind == "progress":
                    job.percent = float(ev.get("percent", 0.0))
                elif kind == "shard":
                    job.ranks[int(ev["rank"])] = {"state": "Ready", "bytes": int(ev.get("bytes", 0))}
                elif kind == "error":
                    error = str(ev.get("message", ""))
                    if "rank" in ev:
                        job.ranks[int(ev["rank"])] = {"state": "Failed", "message": error}
        rc = proc.wait()
        reader.join(timeout=5)
        if rc == 0 and error is None:
            self._finish(job, "Ready", "")
            log.info("tensor-parallel shards ready", extra={"model": job.mid, "shards": len(job.targets)})
        else:
            msg = error or f"shard worker died ({f'signal {-rc}' if rc < 0 else f'exit code {rc}'}) " \
                           f"{''.join(tail).strip().splitlines()[-1:] or ''}"
            log.warning("tensor-parallel shards not staged", extra={"model": job.mid, "error": msg})
            self._finish(job, "Failed", msg)

    def _finish(self, job: _Job, state: str, message: str) -> None:
        with self._lock:
            job.state, job.message, job.since = state, message, time.time()
            for r in job.ranks.values():
                if r.get("state") in ("Pending", "Staging"):
                    r["state"] = "Failed" if state == "Failed" else r["state"]


# ----------------------------------------------------------------------------------------- the worker


def _emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _shard_bytes(model_dir: Path, world: int) -> int:
    """What one shard takes on disk, about: layer stages split N ways, embed and head whole."""
    from kubeflash_node.store.format import load_manifest

    m = load_manifest(model_dir)
    return sum(e.size // world if name.startswith("layer_") else e.size for name, e in m.files.items())


def work(req: dict) -> int:
    """Check the shards there, cut the missing ones, one JSON event a line; 0 when every shard is Ready."""
    import fcntl

    from kubeflash_node.store.format import MANIFEST, StoreError
    from kubeflash_node.store.scratch import clean_stale
    from kubeflash_node.store.tpshards import check_shard, shard_store

    from .fsutil import is_no_space, trash, tree_bytes

    model_dir, world = Path(req["model"]), int(req["world"])
    targets = sorted(req["targets"], key=lambda t: t["rank"])
    paths = [Path(t["path"]) for t in targets]
    fds = []
    try:
        for p in paths:  # one lock per disk's shard set, in rank order: concurrent agents cut it once
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            clean_stale(p.parent)  # scratch of a killed cut
        todo = []
        for t, p in zip(targets, paths):
            if (p / MANIFEST).exists():
                try:
                    check_shard(p, model_dir=model_dir, rank=t["rank"], world=world)
                    _emit("shard", rank=t["rank"], bytes=tree_bytes(p), reused=True)
                    continue
                except StoreError as e:
                    print(f"replacing shard {p}: {e}", file=sys.stderr)
                    trash(p)
            todo.append(t["rank"])
        if not todo:
            _emit("done")
            return 0
        need = _shard_bytes(model_dir, world)
        for t, p in zip(targets, paths):
            if t["rank"] in todo:
                st = os.statvfs(p.parent)
                free = st.f_bavail * st.f_frsize
                if free < need:
                    _emit("error", rank=t["rank"], message=f"shard {t['rank']} does not fit on disk {t['disk']} "
                                                           f"({p.parent}): needs ~{need} bytes, {free} free")
                    return 1

        def progress(done: int, total: int, stage: str) -> None:
            _emit("progress", percent=100.0 * done / total, stage=stage)

        try:
            shard_store(model_dir, paths, overwrite=True, progress=progress, only=todo)
        except OSError as e:
            where = next((f"disk {t['disk']} ({p})" for t, p in zip(targets, paths)
                          if e.filename and str(e.filename).startswith(str(p.parent))), "a shard's disk")
            why = "no space left" if is_no_space(e) else (e.strerror or str(e))
            _emit("error", message=f"cutting shards of {model_dir.name} failed on {where}: {why}")
            return 1
        for t, p in zip(targets, paths):
            if t["rank"] in todo:
                _emit("shard", rank=t["rank"], bytes=tree_bytes(p), reused=False)
        _emit("done")
        return 0
    except (StoreError, ValueError) as e:
        _emit("error", message=f"cannot cut tensor-parallel shards of {model_dir}: {e}")
        return 1
    finally:
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    raise SystemExit(work(json.loads(sys.argv[1])))
