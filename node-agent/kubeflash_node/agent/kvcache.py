"""The node's prefix KV cache as the agent serves it: what it holds, its budget, and the totals of every job.

Job pods read and add blocks through their cache volumes (the CSI driver binds `kvcache/ns/<namespace>/<model>/`
of a store disk, store/kvblocks.scoped_root); each engine evicts within its own directory and, when it ends,
leaves its counters in `usage/`. The agent, once per pass:
- folds those usage files into the node's totals (kept in `<stateDir>/kvcache.json`, so they survive restarts)
  and removes them (a crash between the two loses at most one pass's counts, never counts twice), and keeps the
  prefix fingerprints each job left (kubeflash_api.prefixes), the newest few per cache, for the operator to
  place a job where its prefix already is;
- measures every directory (blocks and bytes per disk, namespace and model, and when a block was last used);
- keeps the whole cache under the budget of its config (`kvCache.budget`): past it, the least recently used
  blocks of every namespace and model go, down to LOW_WATER of the budget, skipping a block being read.
Everything below `kvcache/ns/` is written by pods, so it is hostile input: every directory is opened without
following links (relative to its parent's fd), only regular files count, usage files are size-capped.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeflash_api.flashnode import MAX_KV_CACHE_ENTRIES
from kubeflash_api.prefixes import MAX_PER_ENTRY, PATTERN
from kubeflash_node.store.format import atomic_write_json
from kubeflash_node.store.kvblocks import CACHE_DIR, LOW_WATER, SUFFIX, USAGE_DIR

from . import safefs
from .devices import Disk
from .timefmt import rfc3339

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # namespaces and model ids
_USAGE = re.compile(r"^[0-9]+-[0-9a-f]{12}\.json$")
USAGE_CAP = 4096  # bytes of one usage file the agent reads
COUNTERS = ("hits", "misses", "prefill_tokens_saved", "blocks_evicted", "bytes_evicted")
STALE_TMP = 3600.0  # a usage temp file this old belongs to a killed engine


@dataclass(frozen=True)
class Entry:
    """One namespace's cache of one model on one disk."""

    disk: str
    namespace: str
    model_id: str
    blocks: int
    bytes: int
    last_used: float  # newest block mtime (a hit bumps it), epoch seconds


@dataclass(frozen=True)
class Block:
    """Where one block file is (for eviction): disk, the names below kvcache/ns/, its size and last use."""

    disk: str
    rel: tuple[str, ...]  # (namespace, model, "blocks", key[:2])
    name: str
    size: int
    mtime: float


class NodeKVCache:
    """The agent's view of the prefix KV cache on its store disks, refreshed once per reconcile pass."""

    def __init__(self, disks: Sequence[Disk], *, budget: int, state_dir: Path, metrics=None):
        self.disks, self.budget, self.metrics = list(disks), int(budget), metrics
        self.totals_path = Path(state_dir) / "kvcache.json"
        self.totals = self._load_totals()
        self.prefixes = self._load_prefixes()  # "disk/namespace/model" -> fingerprints, newest first
        self.fresh = False
        self.entries: list[Entry] = []
        self.problems: list[str] = []

    # ------------------------------------------------------------------------------------ the pass
    def refresh(self) -> None:
        self.problems = []
        folded = self._fold_usage()
        blocks = self._scan()
        evicted = self._evict(blocks)
        if evicted[0]:
            folded["blocks_evicted"] = folded.get("blocks_evicted", 0) + evicted[0]
            folded["bytes_evicted"] = folded.get("bytes_evicted", 0) + evicted[1]
            blocks = self._scan()
        held = {_entry_key(b.disk, b.rel[0], b.rel[1]) for b in blocks}
        gone = [k for k in self.prefixes if k not in held]  # every block of that cache evicted or removed
        for k in gone:
            del self.prefixes[k]
        if any(folded.values()) or self.fresh or gone:
            for k, v in folded.items():
                self.totals[k] = self.totals.get(k, 0) + v
            try:
                atomic_write_json(self.totals_path, self.totals | {"prefixes": self.prefixes})
            except OSError as e:
                self.problems.append(f"{self.totals_path}: {e}")
        self._measure(blocks)
        self._metrics(folded)

    def status(self) -> dict[str, Any]:
        """FlashNode status.kvCache."""
        entries = sorted(self.entries, key=lambda e: (-e.bytes, e.disk, e.namespace, e.model_id))
        return {
            "budgetBytes": self.budget,
            "bytes": sum(e.bytes for e in self.entries),
            "blocks": sum(e.blocks for e in self.entries),
            "hits": self.totals.get("hits", 0),
            "misses": self.totals.get("misses", 0),
            "prefillTokensSaved": self.totals.get("prefill_tokens_saved", 0),
            "blocksEvicted": self.totals.get("blocks_evicted", 0),
            "bytesEvicted": self.totals.get("bytes_evicted", 0),
            "entries": [{"disk": e.disk, "namespace": e.namespace, "modelId": e.model_id, "blocks": e.blocks,
                         "bytes": e.bytes, "lastUsed": rfc3339(e.last_used)}
                        | ({"prefixes": list(p)} if (p := self.prefixes.get(_entry_key(e.disk, e.namespace,
                                                                                         e.model_id))) else {})
                        for e in entries[:MAX_KV_CACHE_ENTRIES]],
        }

    # ------------------------------------------------------------------------------------ walking
    def _caches(self):
        """(disk, namespace, model, fd of kvcache/ns/<namespace>/<model>) of every cache directory; caller closes."""
        for disk in self.disks:
            try:
                top = safefs.open_dir(disk.path, (CACHE_DIR, "ns"))
            except FileNotFoundError:
                continue
            except OSError as e:
                self.problems.append(str(e))
                continue
            try:
                for ns in sorted(n for n in os.listdir(top) if _NAME.match(n)):
                    for model, fd in _subdirs(top, ns, self.problems, f"{disk.path}/{CACHE_DIR}/ns"):
                        yield disk.name, ns, model, fd
            finally:
                os.close(top)

    def _fold_usage(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTERS, 0)
        self.fresh = False  # a usage file brought fingerprints (the totals file is rewritten then)
        for disk, ns, model, fd in self._caches():
            try:
                ufd = os.open(USAGE_DIR, _DIR, dir_fd=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                for name in os.listdir(ufd):
                    where = f"{disk}:{ns}/{model}/{USAGE_DIR}/{name}"
                    if not _USAGE.match(name):
                        _drop_stale_tmp(ufd, name)
                        continue
                    try:
                        doc = json.loads(safefs.read_capped(ufd, name, USAGE_CAP, shown=where))
                        os.unlink(name, dir_fd=ufd)
                    except (OSError, ValueError) as e:
                        self.problems.append(f"{where}: {e}")
                        _unlink_quietly(ufd, name)
                        continue
                    for k in COUNTERS:
                        v = doc.get(k) if isinstance(doc, dict) else None
                        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53:
                            out[k] += v
                    self._remember(_entry_key(disk, ns, model), doc.get("prefixes") if isinstance(doc, dict)
                                   else None)
            finally:
                os.close(ufd)
                os.close(fd)
        return out

    def _scan(self) -> list[Block]:
        out: list[Block] = []
        for disk, ns, model, fd in self._caches():
            try:
                for sub, sfd in _subdirs(fd, "blocks", self.problems, f"{disk}:{ns}/{model}"):
                    try:
                        for e in os.scandir(sfd):
                            if not e.name.endswith(SUFFIX):
                                continue
                            try:
                                st = e.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            if stat.S_ISREG(st.st_mode):
                                out.append(Block(disk, (ns, model, "blocks", sub), e.name, st.st_size, st.st_mtime))
                    finally:
                        os.close(sfd)
            finally:
                os.close(fd)
        return out

    def _measure(self, blocks: list[Block]) -> None:
        acc: dict[tuple[str, str, str], list] = {}
        for b in blocks:
            a = acc.setdefault((b.disk, b.rel[0], b.rel[1]), [0, 0, 0.0])
            a[0], a[1], a[2] = a[0] + 1, a[1] + b.size, max(a[2], b.mtime)
        self.entries = [Entry(d, ns, m, n, size, last) for (d, ns, m), (n, size, last) in sorted(acc.items())]

    # ------------------------------------------------------------------------------------ budget
    def _evict(self, blocks: list[Block]) -> tuple[int, int]:
        """LRU over the whole node down to LOW_WATER of the budget once past it; (blocks, bytes) removed."""
        total = sum(b.size for b in blocks)
        if total <= self.budget:
            return 0, 0
        target, n, freed = self.budget * LOW_WATER, 0, 0
        paths = {d.name: d.path for d in self.disks}
        for b in sorted(blocks, key=lambda b: b.mtime):
            if total <= target:
                break
            if _remove_block(paths[b.disk], b):
                total -= b.size
                n, freed = n + 1, freed + b.size
        log.info("kv cache evicted", extra={"blocks": n, "bytes": freed, "budget": self.budget})
        return n, freed

    # ------------------------------------------------------------------------------------ state
    def _remember(self, key: str, fingerprints: Any) -> None:
        """Put one usage file's fingerprints (a pod wrote them: only well-formed strings count) first in its
        cache's list, which keeps the newest MAX_PER_ENTRY."""
        if not isinstance(fingerprints, list):
            return
        new = [f for f in fingerprints[:MAX_PER_ENTRY] if isinstance(f, str) and PATTERN.match(f)]
        if new:
            kept = self.prefixes.get(key, [])
            self.prefixes[key] = list(dict.fromkeys(new + kept))[:MAX_PER_ENTRY]
            self.fresh = True

    def _read_state(self) -> dict:
        try:
            raw = json.loads(self.totals_path.read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def _load_totals(self) -> dict[str, int]:
        raw = self._read_state()
        return {k: int(raw[k]) for k in COUNTERS if isinstance(raw.get(k), int)}

    def _load_prefixes(self) -> dict[str, list[str]]:
        raw = self._read_state().get("prefixes")
        if not isinstance(raw, dict):
            return {}
        return {k: [f for f in v if isinstance(f, str) and PATTERN.match(f)][:MAX_PER_ENTRY]
                for k, v in raw.items() if isinstance(k, str) and isinstance(v, list)}

    def _metrics(self, folded: dict[str, int]) -> None:
        m = self.metrics
        if m is None:
            return
        m.kv_cache_budget.set(self.budget)
        m.kv_cache_bytes.set(sum(e.bytes for e in self.entries))
        m.kv_cache_blocks.set(sum(e.blocks for e in self.entries))
        for k, counter in (("hits", m.kv_cache_hits), ("misses", m.kv_cache_misses),
                           ("prefill_tokens_saved", m.kv_cache_tokens_saved),
                           ("blocks_evicted", m.kv_cache_evicted_blocks), ("bytes_evicted", m.kv_cache_evicted_bytes)):
            if folded.get(k):
                counter.inc(folded[k])


def _entry_key(disk: str, namespace: str, model_id: str) -> str:
    return f"{disk}/{namespace}/{model_id}"


def _subdirs(parent: int, name: str, problems: list[str], shown: str):
    """(child name, fd) of every real directory in parent/name (no link followed); caller closes each fd."""
    try:
        fd = os.open(name, _DIR, dir_fd=parent)
    except OSError as e:
        if e.errno not in (errno.ENOENT,):
            problems.append(f"{shown}/{name}: not a directory the agent reads (a link?)")
        return
    try:
        for child in sorted(os.listdir(fd)):
            if name != "blocks" and not _NAME.match(child):
                continue
            try:
                yield child, os.open(child, _DIR, dir_fd=fd)
            except OSError:
                continue  # a file, a link: not a cache directory
    finally:
        os.close(fd)


def _remove_block(disk_path: Path, b: Block) -> bool:
    """Unlink one block unless a reader holds it (shared flock) or it changed since the scan."""
    try:
        dfd = safefs.open_dir(disk_path, (CACHE_DIR, "ns", *b.rel))
    except OSError:
        return False
    try:
        fd = os.open(b.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        os.close(dfd)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st, now = os.fstat(fd), os.stat(b.name, dir_fd=dfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino) or not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(b.name, dir_fd=dfd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.close(dfd)


def _drop_stale_tmp(dfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return
    if name.startswith(".") and name.endswith(".tmp") and time.time() - st.st_mtime > STALE_TMP:
        _unlink_quietly(dfd, name)


def _unlink_quietly(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
