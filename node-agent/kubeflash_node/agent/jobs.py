"""Job spaces: `<disk>/jobs/<ns>/<name>/` (kv/, results, progress.json) with a recorded size quota.

Created for each job on this node, checked against its quota (real quotas need file-system support, so usage
is measured and over-quota jobs are reported), and removed when the job is gone. Removal renames the
directory aside first, so a crash mid-delete leaves only a `.trash-*` entry, cleaned on the next start.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import safefs
from .catalog import Catalog
from .config import JobWant
from .devices import Disk
from .fsutil import TRASH, clean_leftovers, trash, tree_bytes
from .paths import job_dir, jobs_dir

log = logging.getLogger(__name__)
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class Allocation:
    job: str  # ns/name
    disk: str
    quota: int
    used: int
    path: Path

    @property
    def over(self) -> bool:
        return self.used > self.quota > 0

    @property
    def unused(self) -> int:
        return max(0, self.quota - self.used)


class JobSpaces:
    def __init__(self, disks: tuple[Disk, ...], catalogs: dict[str, Catalog]):
        self.disks = {d.name: d for d in disks}
        self.catalogs = catalogs
        self.allocations: dict[str, Allocation] = {}  # replaced whole by refresh(), read from other threads
        self.problems: dict[str, dict[str, str]] = {}  # job -> {file: why the agent refused it}, for status

    def startup(self) -> None:
        for d in self.disks.values():
            root = jobs_dir(d.path)
            root.mkdir(mode=0o755, parents=True, exist_ok=True)
            clean_leftovers(root, (TRASH,))

    def existing(self) -> dict[str, str]:
        """ns/name -> disk name, for every job directory on the store disks."""
        out: dict[str, str] = {}
        for d in self.disks.values():
            root = jobs_dir(d.path)
            for ns in sorted(root.iterdir()) if root.is_dir() else []:
                if not ns.is_dir() or not _K8S_NAME.match(ns.name):
                    continue
                for job in sorted(ns.iterdir()):
                    if job.is_dir() and _K8S_NAME.match(job.name):
                        out.setdefault(f"{ns.name}/{job.name}", d.name)
        return out

    def ensure(self, job: JobWant, disk: str, quota: int) -> Path:
        """Create the job's directory (and kv/) owned by the pod's user, and record its quota.

        The pod writes its directory, so kv/ may be a planted symlink: every component is opened without
        following links and chowned through its own fd; a link is refused (noted in `problems`), never followed."""
        base = self.disks[disk].path
        path = job_dir(base, job.namespace, job.name)
        created = not os.path.lexists(path)
        uid = job.uid if job.uid is not None and os.geteuid() == 0 else None
        gid = (job.gid if job.gid is not None else job.uid) if uid is not None else None
        try:
            fd = safefs.make_dirs(base, ("jobs", job.namespace))
            try:
                safefs.ensure_dir_owned(fd, job.name, uid, gid, shown=str(path))
                with safefs.dir_fd(base, ("jobs", job.namespace, job.name)) as jfd:
                    safefs.ensure_dir_owned(jfd, "kv", uid, gid, shown=str(path / "kv"))
            finally:
                os.close(fd)
            self.note(job.key, "kv", "")
        except safefs.Unsafe as e:
            self.note(job.key, "kv", str(e))
        self.catalogs[disk].set_job(job.key, quota)
        if created:
            log.info("job space created", extra={"job": job.key, "disk": disk, "quota": quota, "path": str(path)})
        return path

    def note(self, key: str, what: str, why: str) -> None:
        """Record (or, with why "", clear) a refusal of one of a job's files; logged once when it appears."""
        old = self.problems.get(key, {})
        if why and old.get(what) != why:
            log.warning("job directory entry refused", extra={"job": key, "file": what, "error": why})
        new = {k: v for k, v in {**old, what: why}.items() if v}
        if new:
            self.problems[key] = new
        else:
            self.problems.pop(key, None)

    def read(self, key: str, disk: str, name: str, cap: int) -> bytes:
        """A file of the job's directory, no-follow and size-capped (safefs.read_under); raises
        FileNotFoundError or safefs.Unsafe."""
        ns, job = key.split("/", 1)
        return safefs.read_under(self.disks[disk].path, ("jobs", ns, job, name), cap)

    def check(self, key: str, disk: str, name: str) -> None:
        """Note (or clear) a refusal of the job's file `name` without reading it: a link, a FIFO, a directory."""
        ns, job = key.split("/", 1)
        try:
            safefs.check_under(self.disks[disk].path, ("jobs", ns, job, name))
        except FileNotFoundError:
            self.note(key, name, "")
        except safefs.Unsafe as e:
            self.note(key, name, str(e))
        else:
            self.note(key, name, "")

    def remove(self, key: str, disk: str) -> None:
        ns, name = key.split("/", 1)
        path = job_dir(self.disks[disk].path, ns, name)
        trash(path)
        try:
            path.parent.rmdir()  # the namespace directory, when it was the last job in it
        except OSError:
            pass
        self.catalogs[disk].remove_job(key)
        self.problems.pop(key, None)
        log.info("job space removed", extra={"job": key, "disk": disk})

    def refresh(self, alive: dict[str, str]) -> dict[str, Allocation]:
        """Measure every live job's usage against its quota."""
        out = {}
        for key, disk in sorted(alive.items()):
            ns, name = key.split("/", 1)
            path = job_dir(self.disks[disk].path, ns, name)
            rec = self.catalogs[disk].jobs.get(key)
            out[key] = Allocation(job=key, disk=disk, quota=rec.quota if rec else 0, used=tree_bytes(path), path=path)
        for a in out.values():
            old = self.allocations.get(a.job)
            if a.over and not (old and old.over):
                log.warning("job is over its KV quota", extra={"job": a.job, "used": a.used, "quota": a.quota})
        self.allocations = out
        return out

    def kv_unused(self, disk: str) -> int:
        return sum(a.unused for a in self.allocations.values() if a.disk == disk)

    def path(self, key: str, disk: str) -> Path:
        ns, name = key.split("/", 1)
        return job_dir(self.disks[disk].path, ns, name)
