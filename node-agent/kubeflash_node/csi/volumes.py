"""Publish and unpublish kubeflash.io volumes on this node; the state lives on the store disks and in the mounts.

Per disk: `csi/volumes/<h>.json` records what each volume id was published with and at which targets (written
before anything is mounted, so a crash leaves a record that the next start or unpublish cleans up),
`csi/kv/<h>.img` + `csi/kv/<h>/` a KV volume's sparse ext4 image and its loop mount, `pins/<model>/<h>` a
model's pin against eviction (a shard volume pins its model on the shard's disk),
`kvcache/ns/<namespace>/<model>/` the prefix KV cache a cache volume binds (it
outlives the pod: the agent keeps it under its budget). What is really mounted is read from /proc/self/mountinfo, never assumed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from kubeflash_node.store import pins
from kubeflash_node.store.format import StoreError, atomic_write_json, load_manifest
from kubeflash_node.store.kvblocks import scoped_root

from . import mounts
from .attrs import DISK, JOB, KV_CACHE, KV_SIZE, MODEL_ID, SHARD, Request
from .errors import CsiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverConfig:
    """Everything the node plugin needs, built once from the command line (kubeflash csi --help)."""

    node_id: str
    disks: tuple[tuple[str, Path], ...]  # (name, store path), in preference order
    pods_dir: Path = Path("/var/lib/kubelet/pods")  # targets must lie under it
    kv_owner: tuple[int, int] = (1000, 1000)  # uid:gid owning a new KV volume's root (the engine's user)
    kv_reserve: int = 0  # bytes per disk that KV volumes never take


@dataclass
class Record:
    """One published volume id: its arguments, the disk it lives on, the targets it is mounted at."""

    req: Request
    disk: str
    targets: list[str]

    def to_json(self) -> dict:
        return {"request": self.req.to_json(), "disk": self.disk, "targets": self.targets}


def _h(volume_id: str) -> str:
    return pins.holder_name("volume", volume_id)


class Volumes:
    def __init__(self, cfg: DriverConfig):
        self.cfg = cfg
        self.disks = dict(cfg.disks)
        self.lock = threading.Lock()
        self.records: dict[str, Record] = {}

    # ------------------------------------------------------------------------------------ state

    def _csi(self, disk: str, *parts: str) -> Path:
        return self.disks[disk] / "csi" / Path(*parts)

    def _save(self, rec: Record) -> None:
        path = self._csi(rec.disk, "volumes", _h(rec.req.volume_id) + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, rec.to_json())
        self.records[rec.req.volume_id] = rec

    def _drop(self, rec: Record) -> None:
        self._csi(rec.disk, "volumes", _h(rec.req.volume_id) + ".json").unlink(missing_ok=True)
        self.records.pop(rec.req.volume_id, None)

    def recover(self) -> list[str]:
        """On start: load the records, forget targets that are no longer mounted, release volumes with none."""
        notes = []
        with self.lock:
            for name, path in self.disks.items():
                folder = path / "csi" / "volumes"
                for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                    try:
                        raw = json.loads(f.read_text())
                        rec = Record(Request.from_json(raw["request"]), name, list(raw["targets"]))
                    except (OSError, ValueError, KeyError, TypeError) as e:
                        notes.append(f"{f}: unreadable record dropped ({e})")
                        f.unlink(missing_ok=True)
                        continue
                    live = [t for t in rec.targets if mounts.mounted_at(t) is not None]
                    self.records[rec.req.volume_id] = rec
                    if live != rec.targets:
                        notes.append(f"volume {rec.req.volume_id}: {len(rec.targets) - len(live)} target(s) not "
                                     "mounted any more")
                        rec.targets = live
                        self._save(rec)
                    if not live:
                        self._release(rec)
                        notes.append(f"volume {rec.req.volume_id}: released")
        return notes

    # -------------------------------------------------------------------------------- checks

    def check_target(self, target: str) -> str:
        """The target as a normal absolute path under the kubelet's pods directory; INVALID_ARGUMENT if not."""
        if not target:
            raise CsiError.invalid("target_path is required")
        norm = os.path.normpath(target)
        if not os.path.isabs(target) or ".." in Path(target).parts:
            raise CsiError.invalid(f"target_path {target!r} must be an absolute path without '..'")
        root = os.path.realpath(self.cfg.pods_dir)
        parent = os.path.realpath(os.path.dirname(norm))
        if not (parent == root or parent.startswith(root + os.sep)):
            raise CsiError.invalid(f"target_path {target!r} is outside the kubelet pods directory "
                                   f"{str(self.cfg.pods_dir)!r} (kubeflash csi --pods-dir)")
        return os.path.join(parent, os.path.basename(norm))

    def _disk_named(self, name: str) -> str:
        if name not in self.disks:
            raise CsiError.invalid(f"volume attribute {DISK} {name!r} is not a store disk of this node "
                                   f"(have: {', '.join(self.disks)})")
        return name

    def health(self) -> tuple[bool, str]:
        """Probe: every store disk is a writable directory."""
        for name, path in self.disks.items():
            if not path.is_dir():
                return False, f"store disk {name}: {path} is not a directory"
            if not os.access(path, os.W_OK | os.X_OK):
                return False, f"store disk {name}: {path} is not writable"
        return True, ""

    # ------------------------------------------------------------------------------- publish

    def publish(self, req: Request) -> None:
        with self.lock:
            rec = self.records.get(req.volume_id)
            if rec is not None and not rec.req.same_volume(req):
                raise CsiError.exists(f"volume {req.volume_id!r} is already published with other arguments "
                                      f"({_describe(rec.req)}); this request asks for {_describe(req)}")
            if mounts.mounted_at(req.target) is not None:
                if rec is not None and req.target in rec.targets:
                    return  # already done: publish is idempotent
                raise CsiError.exists(f"target_path {req.target!r} already has something mounted on it")
            new = rec is None
            if new:
                rec = Record(req, self._choose_disk(req), [])
                self._prepare(rec)  # checks and creates what the volume needs; raises before anything is saved
            created = not os.path.isdir(req.target)
            try:
                rec.targets.append(req.target)
                self._save(rec)
                if created:
                    os.makedirs(req.target, mode=0o750)
                mounts.bind(self._source(rec), Path(req.target), read_only=req.read_only)
            except BaseException as e:
                rec.targets.remove(req.target)
                if created and os.path.isdir(req.target):
                    os.rmdir(req.target)
                if rec.targets:
                    self._save(rec)
                else:
                    self._release(rec)
                if isinstance(e, (OSError, mounts.MountError)):
                    raise CsiError.internal(f"mounting volume {req.volume_id!r} at {req.target!r}: {e}") from e
                raise
            log.info("published", extra={"volume": req.volume_id, "kind": req.kind, "target": req.target})

    def _choose_disk(self, req: Request) -> str:
        if req.disk:
            return self._disk_named(req.disk)
        if req.kind == "model":
            held = [n for n, p in self.disks.items() if (p / "models" / req.model_id).is_dir()]
            if not held:
                raise CsiError.precondition(f"volume attribute {MODEL_ID} {req.model_id!r}: the model is not staged "
                                            "on this node (add it to FlashNode.spec.models; the agent stages it)")
            return held[0]
        if req.kind == "shard":
            held = [n for n, p in self.disks.items() if _shard_dir(p, req).is_dir()]
            if not held:
                raise CsiError.precondition(f"volume attribute {SHARD} {req.rank}: shard {req.rank} of "
                                            f"{req.world} of model {req.model_id!r} is not staged on this node (add "
                                            "the model with tensorParallel to FlashNode.spec.models; the agent cuts "
                                            "shard k on pair k's disk)")
            return held[0]
        if req.kind == "job":
            ns, name = req.job.split("/", 1)
            held = [n for n, p in self.disks.items() if (p / "jobs" / ns / name).is_dir()]
            return held[0] if held else next(iter(self.disks))
        if req.kind == "cache":  # where this namespace's blocks of the model are, else beside the model
            for where in (lambda p: scoped_root(p, req.namespace, req.model_id), lambda p: p / "models" / req.model_id):
                held = [n for n, p in self.disks.items() if where(p).is_dir()]
                if held:
                    return held[0]
            return next(iter(self.disks))
        return max(self.disks, key=lambda n: self.kv_free(n))

    def _prepare(self, rec: Record) -> None:
        req, disk = rec.req, self.disks[rec.disk]
        h = _h(req.volume_id)
        if req.kind == "model":
            folder = disk / "models" / req.model_id
            try:
                load_manifest(folder)
            except StoreError as e:
                raise CsiError.precondition(f"volume attribute {MODEL_ID} {req.model_id!r}: the model is not "
                                            f"staged and verified on disk {rec.disk}: {e}") from None
            pins.pin(disk, req.model_id, h)
        elif req.kind == "shard":
            folder = _shard_dir(disk, req)
            try:
                tp = load_manifest(folder).extra.get("tensor_parallel") or {}
            except StoreError as e:
                raise CsiError.precondition(f"volume attribute {SHARD} {req.rank}: shard {req.rank} of {req.world} "
                                            f"of model {req.model_id!r} is not staged on disk {rec.disk}: {e}") from None
            if (tp.get("rank"), tp.get("world")) != (req.rank, req.world):
                raise CsiError.precondition(f"volume attribute {SHARD} {req.rank}: {folder} holds "
                                            f"{tp or 'no shard'}, not shard {req.rank} of {req.world}")
            pins.pin(disk, req.model_id, h)
        elif req.kind == "job":
            self._job_dir(disk, *req.job.split("/", 1))
        elif req.kind == "cache":
            parts = scoped_root(disk, req.namespace, req.model_id).relative_to(disk).parts
            self._owned_dirs(disk, parts, KV_CACHE, req.model_id)
        else:
            free = self.kv_free(rec.disk)
            if req.size > free:
                raise CsiError.exhausted(f"volume attribute {KV_SIZE} asks for {req.size} bytes; disk {rec.disk} "
                                         f"has {free} bytes free for KV volumes")
            image, mnt = self._csi(rec.disk, "kv", h + ".img"), self._csi(rec.disk, "kv", h)
            mnt.mkdir(parents=True, exist_ok=True)
            try:
                mounts.make_ext4(image, req.size, owner=self.cfg.kv_owner)
                mounts.loop_mount(image, mnt)
            except BaseException as e:
                image.unlink(missing_ok=True)
                shutil.rmtree(mnt, ignore_errors=True)
                if isinstance(e, (OSError, mounts.MountError)):
                    raise CsiError.internal(f"creating the KV volume {req.volume_id!r}: {e}") from e
                raise

    def _job_dir(self, disk: Path, ns: str, name: str) -> None:
        """The job's directory, created owned by the engine's user when the pod starts before the agent made it
        (the agent adopts it: it sets the pod's owner, and removes it with the job)."""
        self._owned_dirs(disk, ("jobs", ns, name), JOB, name)

    def _owned_dirs(self, disk: Path, parts: tuple[str, ...], attr: str, value: str) -> None:
        """disk/parts..., each level a real directory (never a link out of the store), the missing ones created
        owned by the engine's user (a non-root agent of that user removes what lies in them later)."""
        p = disk
        for part in parts:
            p = p / part
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                raise CsiError.precondition(f"volume attribute {attr} {value!r}: {p} is not a directory")
            if not p.exists():
                p.mkdir(mode=0o755)
                os.chown(p, *self.cfg.kv_owner)

    def _source(self, rec: Record) -> Path:
        req, disk = rec.req, self.disks[rec.disk]
        if req.kind == "model":
            return disk / "models" / req.model_id
        if req.kind == "shard":
            return _shard_dir(disk, req)
        if req.kind == "job":
            return disk.joinpath("jobs", *req.job.split("/", 1))
        if req.kind == "cache":
            return scoped_root(disk, req.namespace, req.model_id)
        mnt = self._csi(rec.disk, "kv", _h(req.volume_id))
        if mounts.mounted_at(mnt) is not None:
            return mnt
        # after a restart the loop mount may live on only in targets: bind from one (never mount the image twice)
        live = [t for t in rec.targets if mounts.mounted_at(t) is not None]
        if live:
            return Path(live[0])
        mounts.loop_mount(self._csi(rec.disk, "kv", _h(req.volume_id) + ".img"), mnt)
        return mnt

    # ----------------------------------------------------------------------------- unpublish

    def unpublish(self, volume_id: str, target: str) -> None:
        with self.lock:
            rec = self.records.get(volume_id)
            try:
                mounts.unmount(Path(target))
            except mounts.MountError as e:
                raise CsiError.internal(f"unmounting volume {volume_id!r} at {target!r}: {e}") from e
            if os.path.isdir(target) and not os.path.islink(target):
                try:
                    os.rmdir(target)
                except OSError as e:
                    raise CsiError.internal(f"removing target_path {target!r}: {e}") from e
            if rec is None:
                return
            if target in rec.targets:
                rec.targets.remove(target)
            if rec.targets:
                self._save(rec)
            else:
                self._release(rec)
            log.info("unpublished", extra={"volume": volume_id, "target": target})

    def _release(self, rec: Record) -> None:
        """The volume has no target left: free its KV image, drop its pin, then its record."""
        req, disk, h = rec.req, self.disks[rec.disk], _h(rec.req.volume_id)
        if req.kind == "kv":
            mnt = self._csi(rec.disk, "kv", h)
            mounts.unmount(mnt)
            self._csi(rec.disk, "kv", h + ".img").unlink(missing_ok=True)
            if mnt.is_dir():
                mnt.rmdir()
        elif req.kind in ("model", "shard"):
            pins.unpin(disk, req.model_id, h)
        self._drop(rec)

    # --------------------------------------------------------------------------------- stats

    def stats(self, volume_id: str, path: str) -> os.statvfs_result:
        with self.lock:
            rec = self.records.get(volume_id)
            if rec is None:
                raise CsiError.not_found(f"volume {volume_id!r} is not published on this node")
            norm = os.path.normpath(path) if path else ""
            if norm not in rec.targets or mounts.mounted_at(norm) is None:
                raise CsiError.not_found(f"volume_path {path!r} is not where volume {volume_id!r} is mounted")
            return os.statvfs(norm)

    def kv_free(self, disk: str) -> int:
        """Bytes a new KV volume may take: the file system's free space less the reserve and less what the
        existing (sparse) KV images may still grow into."""
        path = self.disks[disk]
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize - self.cfg.kv_reserve
        folder = path / "csi" / "kv"
        for img in folder.glob("*.img") if folder.is_dir() else []:
            try:
                s = img.stat()
            except FileNotFoundError:
                continue
            free -= max(0, s.st_size - s.st_blocks * 512)
        return max(0, free)


def _shard_dir(disk: Path, req: Request) -> Path:
    """Where the node agent cuts a shard (agent/tpstaging.py shard_path): shards/<id>.tp<N>/<rank>."""
    return disk / "shards" / f"{req.model_id}.tp{req.world}" / str(req.rank)


def _describe(req: Request) -> str:
    if req.kind == "shard":
        return f"{MODEL_ID}={req.model_id} {SHARD}={req.rank} of {req.world}"
    if req.kind == "model":
        return f"{MODEL_ID}={req.model_id}" + (" readOnly" if req.read_only else "")
    if req.kind == "kv":
        return f"{KV_SIZE}={req.size} bytes"
    if req.kind == "cache":
        return f"{KV_CACHE}={req.model_id} in namespace {req.namespace}"
    return f"{JOB}={req.job.split('/', 1)[1]}" + (" readOnly" if req.read_only else "")

