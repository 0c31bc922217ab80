"""The on-SSD prefix KV cache: content-addressed blocks of a fixed number of tokens, shared by every job on a node.

A block holds the K and V of `block_tokens` consecutive tokens for every layer. Its key is chained:

    key_0 = sha256(scope || tokens[0:n]),  key_i = sha256(key_{i-1} || tokens[i*n:(i+1)*n])

where `scope` digests the model id, the KV dtype, the KV compression, the block size and the KV layout, so two
models or two settings never share a block, and a block's key names its whole prefix (the same tokens after a
different prefix have other K, V and another key).

Block size: 256 tokens (BLOCK_TOKENS). Shared prefixes that matter are system prompts, few-shot blocks and documents
(hundreds to thousands of tokens), so a coarse block loses little reuse (at most 255 tokens per prompt are
recomputed), while each block stays one large sequential read on the SSD (SmolLM2-135M float16: 5.6 MiB;
Llama-3-8B float16: 32 MiB) and the file count stays small (1 TB of cache is ~30k files for an 8B model).
LMCache's default chunk is the same size.

Layout under `root`: `blocks/<key[:2]>/<key>.kvb` and `tmp/` for writes in progress. A file is
MAGIC | u32 header length | JSON header {key, meta, payload_bytes, sha256} | payload; the sha256 covers key, meta
and payload. Rules:
- writes go to `tmp/` (the writer holds an exclusive flock on its temp file), are fsynced, then renamed into
  place and the directory fsynced: a block is either absent or whole. A killed writer's temp file is removed by
  the next store opened on the root (its lock is free once the writer is dead).
- readers hold a shared flock on the block while reading; eviction takes an exclusive non-blocking flock and
  skips a block it cannot lock, so a block being read is never evicted (and a reader that opened a block just
  before its unlink still reads the whole file: POSIX keeps it until the last close).
- a block that fails its checks (magic, length, key, checksum) is a miss, counted as corrupt, and removed.
- LRU by bytes: a hit bumps the block's mtime; once the bytes on disk pass `budget_bytes` one process at a time
  (flock on `evict.lock`) removes the least recently used blocks down to LOW_WATER of the budget.
- a full disk or any failed write is "not cached": put() returns False, never raises.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import struct
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from kubeflash_api import contract as c

BLOCK_TOKENS = 256
MAGIC = b"KFKVB1\0\0"
LOW_WATER = 0.9  # eviction goes down to this fraction of the budget, so it runs once per ~10% of new bytes
MAX_HEADER = 1 << 16
SUFFIX = ".kvb"
DEFAULT_BUDGET = 20 << 30  # bytes of SSD the cache may take unless $KUBEFLASH_KV_CACHE_BUDGET (a quantity) says
ENV_KV_CACHE_BUDGET = c.ENV_KV_CACHE_BUDGET
ENV_KV_CACHE_DIR = c.ENV_KV_CACHE_DIR  # the pod's node cache directory, when the runner provides one
CACHE_DIR = "kvcache"  # under a store disk's root
USAGE_DIR = "usage"  # under a cache root: one small JSON of counters per engine run, folded in by the agent


def scoped_root(disk_root: Path, namespace: str, model_id: str) -> Path:
    """The cache root a cluster job sees: one per (namespace, model) on a store disk, so a job's pod can read and
    write only blocks of its own namespace and model (`kubeflash run` uses `<store>/kvcache` itself)."""
    return Path(disk_root) / CACHE_DIR / "ns" / namespace / model_id


@dataclass(frozen=True)
class Scope:
    """What makes two blocks of the same tokens interchangeable: same model, KV dtype, compression, size, layout."""

    model_id: str
    dtype: str  # the dtype the K, V are kept in (float32, float16, bfloat16)
    compression: str = "none"  # KV compression (none | int8 | int4)
    block_tokens: int = BLOCK_TOKENS
    layout: str = ""  # the KV shape per token, e.g. "30x2x3x64" (layers x K/V x kv heads x head dim)

    def digest(self) -> bytes:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).digest()


def chain_keys(scope: Scope, tokens, limit: int | None = None) -> list[str]:
    """Keys of the full blocks of `tokens` (at most `limit`), each chained from its parent's."""
    n = scope.block_tokens
    count = len(tokens) // n if limit is None else min(limit, len(tokens) // n)
    parent, keys = scope.digest(), []
    for i in range(count):
        block = [int(t) for t in tokens[i * n:(i + 1) * n]]
        parent = hashlib.sha256(parent + struct.pack(f"<{n}q", *block)).digest()
        keys.append(parent.hex())
    return keys


def _digest(key: str, meta_json: bytes, payload) -> str:
    h = hashlib.sha256(key.encode())
    h.update(meta_json)
    h.update(payload)
    return h.hexdigest()


def encode_block(key: str, payload: bytes | memoryview, meta: dict) -> tuple[bytes, memoryview]:
    """(header bytes, payload view) of one block file."""
    meta_json = json.dumps(meta, sort_keys=True).encode()
    payload = memoryview(payload).cast("B")
    header = json.dumps({"key": key, "meta": meta, "payload_bytes": payload.nbytes,
                         "sha256": _digest(key, meta_json, payload)}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header, payload


def decode_block(key: str, data: bytes) -> tuple[dict, memoryview]:
    """(meta, payload) of a block file's bytes; ValueError names what does not match."""
    if data[:len(MAGIC)] != MAGIC:
        raise ValueError("not a KV block (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if hlen > MAX_HEADER or start + hlen > len(data):
        raise ValueError("truncated header")
    try:
        header = json.loads(data[start:start + hlen])
        meta, size, digest = header["meta"], int(header["payload_bytes"]), header["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable header: {e}") from None
    if header.get("key") != key:
        raise ValueError("header names another key")
    payload = memoryview(data)[start + hlen:]
    if payload.nbytes != size:
        raise ValueError(f"payload is {payload.nbytes} bytes, header says {size} (truncated?)")
    if _digest(key, json.dumps(meta, sort_keys=True).encode(), payload) != digest:
        raise ValueError("checksum mismatch")
    return meta, payload


def _zero_stats() -> dict:
    return {k: 0 for k in ("hits", "misses", "corrupt", "blocks_read", "bytes_read", "blocks_written",
                           "bytes_written", "write_failures", "blocks_evicted", "bytes_evicted")}


class KVBlockStore:
    """The block files under `root`, LRU-evicted down from `budget_bytes`; safe for many processes at once."""

    def __init__(self, root: Path, *, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"KV block cache budget must be positive, got {budget_bytes} bytes")
        self.root, self.budget = Path(root), int(budget_bytes)
        self.blocks, self.tmp = self.root / "blocks", self.root / "tmp"
        self.blocks.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.stats = _zero_stats()
        self._lock = threading.Lock()  # stats and usage across the engine's writer thread and its reader
        self.clean_tmp()
        self.usage = self.scan_bytes()

    # ------------------------------------------------------------------------------------ paths
    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"KV block key must be 64 hex digits, got {key!r}")
        return self.blocks / key[:2] / (key + SUFFIX)

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def longest(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, have a block on disk (unverified: get() checks each)."""
        n = 0
        while n < len(keys) and self.contains(keys[n]):
            n += 1
        return n

    # ------------------------------------------------------------------------------------ read
    def get(self, key: str) -> tuple[dict, memoryview] | None:
        """(meta, payload) of a verified block, or None (absent, or corrupt: then it is removed)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            self._count(misses=1)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # eviction skips a block while this is held
            size = os.fstat(fd).st_size
            data = bytearray(size)  # writable: the engine views it as a tensor without a copy
            with os.fdopen(os.dup(fd), "rb", closefd=True) as f:
                got = f.readinto(data)
            del data[got:]
            try:
                meta, payload = decode_block(key, data)
            except (ValueError, struct.error):
                self._count(misses=1, corrupt=1)
                self._remove_locked(fd, path)
                return None
            try:
                os.utime(fd)  # LRU: last use
            except OSError:
                pass
            self._count(hits=1, blocks_read=1, bytes_read=size)
            return meta, payload
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------ write
    def put(self, key: str, payload: bytes | memoryview, meta: dict) -> bool:
        """Store a block crash-safely; False (never an exception) when it could not be written."""
        path = self.path(key)
        if path.exists():
            return True
        header, view = encode_block(key, payload, meta)
        size = len(header) + view.nbytes
        if size > self.budget * LOW_WATER:
            self._count(write_failures=1)
            return False
        if self.usage + size > self.budget:
            self.evict(need=size)
        tmp, fd = None, None
        try:
            tmp = self.tmp / f"{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live: clean_tmp removes only temp files nobody holds
            _write_all(fd, header)
            _write_all(fd, view)
            os.fsync(fd)
            path.parent.mkdir(exist_ok=True)
            os.rename(tmp, path)
            tmp = None
            _fsync_dir(path.parent)
        except OSError:  # ENOSPC, EIO, a removed root: not cached
            self._count(write_failures=1)
            return False
        finally:
            if fd is not None:
                os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        with self._lock:
            self.usage += size
        self._count(blocks_written=1, bytes_written=size)
        return True

    # ------------------------------------------------------------------------------------ space
    def scan_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[Path, int, float]]:
        out = []
        for sub in self.blocks.iterdir() if self.blocks.is_dir() else ():
            try:
                with os.scandir(sub) as it:
                    for e in it:
                        if e.name.endswith(SUFFIX):
                            try:
                                st = e.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            out.append((Path(e.path), st.st_size, st.st_mtime))
            except (NotADirectoryError, FileNotFoundError):
                continue
        return out

    def evict(self, need: int = 0) -> int:
        """Remove least recently used blocks until `need` more bytes fit under LOW_WATER of the budget; a block
        being read (shared flock held) is skipped. One process evicts at a time; returns the bytes removed."""
        lock = os.open(self.root / "evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is evicting right now
            entries = sorted(self._entries(), key=lambda e: e[2])
            total = sum(size for _, size, _ in entries)
            target, freed = self.budget * LOW_WATER - need, 0
            for path, size, _ in entries:
                if total <= target:
                    break
                if self._try_remove(path):
                    total -= size
                    freed += size
                    self._count(blocks_evicted=1, bytes_evicted=size)
            with self._lock:
                self.usage = total
            return freed
        finally:
            os.close(lock)

    def _try_remove(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            return self._remove_locked(fd, path)
        finally:
            os.close(fd)

    def _remove_locked(self, fd: int, path: Path) -> bool:
        """Unlink `path` if it still names the file open as `fd` (a writer may have renamed a new one in)."""
        try:
            st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(path)
                return True
        except OSError:
            pass
        return False

    def clean_tmp(self) -> list[str]:
        """Remove temp files of writers that died mid-write (their flock is gone); returns their names."""
        removed = []
        for entry in list(self.tmp.iterdir()):
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry)
                removed.append(entry.name)
            except OSError:
                pass
            finally:
                os.close(fd)
        return removed

    def record_usage(self, counters: dict[str, int], *, prefixes: list[str] = ()) -> bool:
        """Leave this run's counters in `usage/` (one small JSON, crash-safe) for the node agent to fold into the
        node's totals, with the prefix fingerprints of the prompts whose blocks it wrote or read (for placement);
        False when it could not be written (never raises)."""
        from .format import atomic_write_json  # format imports numpy; kvblocks stays light for the agent

        try:
            folder = self.root / USAGE_DIR
            folder.mkdir(exist_ok=True)
            atomic_write_json(folder / f"{os.getpid()}-{secrets.token_hex(6)}.json",
                              {k: int(v) for k, v in counters.items()} | ({"prefixes": list(prefixes)}
                                                                           if prefixes else {}))
            return True
        except (OSError, ValueError, TypeError):
            return False

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.stats[k] += v


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view[:64 << 20])
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
