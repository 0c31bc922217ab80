"""All-reduce through a ring of SSDs: each rank writes to its neighbour's disk, reads what the other wrote to its own.

The source slides' reduction for GPUs without NVLink. Rank r owns directory dirs[r] (on the SSD paired with its
GPU). The tensor is cut into N chunks (sizes may differ by one element); then

  reduce-scatter, steps s = 0..N-2: write chunk (r - s) mod N into dirs[r+1], read chunk (r - 1 - s) mod N
  from dirs[r] (written by rank r-1) and add it to ours; afterwards rank r holds the full sum of chunk (r+1) mod N;
  all-gather, steps s = 0..N-2: write chunk (r + 1 - s) mod N into dirs[r+1], read chunk (r - s) mod N from
  dirs[r] and take it as is.

Pipelined: every chunk is cut into segments of at most `segment_bytes`, and a segment moves on as soon as it is
ready: the chunk a rank sends at step s+1 is the one it received and reduced at step s, so each reduced segment
is handed to a writer thread at once, and the disk write of segment j (to the next rank's SSD) runs while the
rank reads and adds segment j+1 (from its own SSD). The N-1 steps of each phase, and the two phases, overlap
this way; the reads are never waiting for a whole chunk. Meanwhile the weight streamer's own threads keep
reading the next layers' weights (engine/stream.py), so the ring's I/O also runs beside weight streaming.

Each message is one file written under a temporary name and renamed into place, so a reader never sees half a
segment; its name carries the session, the call's sequence number, the phase, the step and the segment, so
messages of two calls (or of an earlier, killed job with another session) never mix. The reader polls for the
file, checks its size, reads it and deletes it.

A dead peer is noticed within about a second, not at the timeout: every rank keeps a heartbeat file in its own
directory (`kfring-SESSION-alive<R>`: pid and host, touched every `heartbeat_s`); a waiting rank checks the
others' while it waits: a rank on this host whose process is gone (kill -9) or a heartbeat older than
`dead_after_s` ends the wait with an error naming that rank. A rank that fails for any reason leaves
`kfring-SESSION-abort` (its message) in every ring directory, so the others stop at once instead of waiting on a
rank that will never write. Every wait still has `timeout_s` (a peer that lives but never writes). Sums run in
the tensor's dtype, as NCCL's do; the order of additions follows the ring, the same with or without segments.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "kfring-"


class SSDRingError(RuntimeError):
    """The ring cannot run: a directory missing or unwritable, a disk full, a dead peer, or one that never wrote."""


@dataclass(frozen=True)
class RingConfig:
    """Where the ring's files go and how long a rank waits for its peer."""

    dirs: tuple[Path, ...]  # dirs[r]: rank r's directory, on the SSD paired with its GPU
    session: str  # the same on every rank of one job, different across jobs (stale files never match)
    timeout_s: float = 60.0  # longest wait for one peer's file
    fsync: bool = False  # fsync each message (only for durability across a host crash; a reader never needs it)
    segment_bytes: int = 1 << 20  # pipeline unit: a chunk moves on in segments of at most this many bytes
    heartbeat_s: float = 0.5  # how often a rank touches its heartbeat file
    dead_after_s: float = 10.0  # a heartbeat older than this (a rank on another host, or stopped) is a dead rank


class SSDRing:
    """One rank's end of the ring; `all_reduce(t)` sums `t` over all ranks in place, as dist.all_reduce does.
    `close()` stops its threads and removes its heartbeat file."""

    def __init__(self, rank: int, cfg: RingConfig):
        self.rank, self.cfg, self.world = rank, cfg, len(cfg.dirs)
        if not 0 <= rank < self.world:
            raise SSDRingError(f"rank {rank} is outside 0..{self.world - 1} (one directory per rank)")
        if not cfg.session or "/" in cfg.session or cfg.session.startswith("."):
            raise SSDRingError(f"session {cfg.session!r}: expected a non-empty name without '/' or a leading '.'")
        if cfg.segment_bytes < 1:
            raise SSDRingError(f"segment_bytes {cfg.segment_bytes}: expected at least 1")
        self.mine = Path(cfg.dirs[rank])
        self.next = Path(cfg.dirs[(rank + 1) % self.world])
        self.seq = 0
        for who, d in ((rank, self.mine), ((rank + 1) % self.world, self.next)):
            check_dir(who, d)
        self.host = socket.gethostname()
        self._closed = threading.Event()
        self._sendq: queue.Queue = queue.Queue()
        self._send_error: SSDRingError | None = None
        self._pending = 0  # sends queued and not yet written (guarded by _cv)
        self._cv = threading.Condition()
        self._last_check = 0.0
        self.alive = self.mine / f"{PREFIX}{cfg.session}-alive{rank}"
        if self.world > 1:
            try:
                _atomic_write(self.alive, f"{os.getpid()} {self.host}\n".encode())
            except OSError as e:  # a full disk takes the empty probe but not the heartbeat's bytes
                raise SSDRingError(f"rank {rank}: cannot write its heartbeat {self.alive} into its ring directory "
                                   f"({e.strerror or e})") from e
            self._threads = [threading.Thread(target=self._heartbeat, name="kf-ring-beat", daemon=True),
                             threading.Thread(target=self._writer, name="kf-ring-write", daemon=True)]
            for th in self._threads:
                th.start()

    # ------------------------------------------------------------------------------ public
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` (contiguous, on the host) over the ring's ranks, in place; returns `t`."""
        n = self.world
        if n == 1:
            return t
        if t.device.type != "cpu" or not t.is_contiguous():
            raise SSDRingError(f"rank {self.rank}: all_reduce takes a contiguous host tensor, got {t.device} "
                               f"contiguous={t.is_contiguous()}")
        if self._closed.is_set():
            raise SSDRingError(f"rank {self.rank}: the ring was closed")
        try:
            return self._all_reduce(t)
        except SSDRingError as e:
            self._abort(str(e))
            raise

    def close(self) -> None:
        """Stop the heartbeat and the writer; remove the heartbeat file (the others then see this rank as gone)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self.world > 1:
            self._sendq.put(None)
            for th in self._threads:
                th.join(timeout=5)
            self.alive.unlink(missing_ok=True)

    def __enter__(self) -> SSDRing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ the pipelined ring
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        n, r = self.world, self.rank
        seq = self.seq
        self.seq += 1
        chunks = torch.tensor_split(t.view(-1), n)  # views into t: sums land in t itself
        per = max(1, self.cfg.segment_bytes // t.element_size())
        segs = [torch.tensor_split(c, max(1, -(-c.numel() // per))) for c in chunks]  # same cut on every rank
        for j, seg in enumerate(segs[r % n]):  # reduce-scatter step 0: our own chunk r
            self._send(seg, seq, "rs", 0, j)
        for s in range(n - 1):  # reduce-scatter: receive, add, forward each segment at once
            c = (r - 1 - s) % n
            last = s == n - 2
            for j, seg in enumerate(segs[c]):
                seg.add_(self._recv(seg, seq, "rs", s, j))
                # the chunk reduced at step s is the one sent at step s+1; after the last step it is whole
                # (chunk r+1) and opens the all-gather
                self._send(seg, seq, "ag" if last else "rs", 0 if last else s + 1, j)
        for s in range(n - 1):  # all-gather: receive, keep, forward
            c = (r - s) % n
            for j, seg in enumerate(segs[c]):
                seg.copy_(self._recv(seg, seq, "ag", s, j))
                if s < n - 2:
                    self._send(seg, seq, "ag", s + 1, j)
        self._flush()
        return t

    # ------------------------------------------------------------------------------ messages
    def _name(self, sender: int, seq: int, phase: str, step: int, seg: int) -> str:
        return f"{PREFIX}{self.cfg.session}-{seq:08d}-{phase}{step:03d}-{seg:05d}-from{sender}.bin"

    def _send(self, seg: torch.Tensor, seq: int, phase: str, step: int, j: int) -> None:
        """Queue one segment for the writer thread; its bytes are copied now (the tensor may change after)."""
        self._raise_send_error()
        data = seg.contiguous().view(torch.uint8).numpy().tobytes() if seg.numel() else b""
        with self._cv:
            self._pending += 1
        self._sendq.put((self.next / self._name(self.rank, seq, phase, step, j), data))

    def _writer(self) -> None:
        """Write queued segments into the next rank's directory: temp file, then rename (all or nothing)."""
        while (item := self._sendq.get()) is not None:
            final, data = item
            if self._send_error is None:
                try:
                    _atomic_write(final, data, fsync=self.cfg.fsync)
                except OSError as e:
                    nxt = (self.rank + 1) % self.world
                    self._send_error = SSDRingError(f"rank {self.rank}: cannot write {final} into rank {nxt}'s ring "
                                                    f"directory ({e.strerror or e})")
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()

    def _raise_send_error(self) -> None:
        if self._send_error is not None:
            raise self._send_error

    def _flush(self) -> None:
        """Wait until every queued segment is on disk (the caller may change the tensor once we return)."""
        with self._cv:
            while self._pending:
                self._cv.wait(0.1)
        self._raise_send_error()

    def _recv(self, like: torch.Tensor, seq: int, phase: str, step: int, j: int) -> torch.Tensor:
        """Wait for the previous rank's file in our directory, read it, delete it."""
        prev = (self.rank - 1) % self.world
        path = self.mine / self._name(prev, seq, phase, step, j)
        want = like.numel() * like.element_size()
        deadline, pause = time.monotonic() + self.cfg.timeout_s, 1e-4
        while True:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                break
            except FileNotFoundError:
                now = time.monotonic()
                self._raise_send_error()
                if now - self._last_check > 0.2:
                    self._last_check = now
                    self._check_peers()
                if now > deadline:
                    raise SSDRingError(f"rank {self.rank}: timed out after {self.cfg.timeout_s:g} s waiting for "
                                       f"{path} (to be written by rank {prev})") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
        path.unlink()
        if len(data) != want:
            raise SSDRingError(f"rank {self.rank}: {path} from rank {prev} holds {len(data)} bytes, expected {want}")
        return torch.frombuffer(bytearray(data), dtype=like.dtype) if want else torch.empty(0, dtype=like.dtype)

    # ------------------------------------------------------------------------------ liveness
    def _heartbeat(self) -> None:
        while not self._closed.wait(self.cfg.heartbeat_s):
            try:
                os.utime(self.alive)
            except OSError:
                pass  # our own directory vanished: the peers see a stale heartbeat, our sends fail

    def _check_peers(self) -> None:
        """Raise, naming the rank, when another rank aborted the ring or is gone (kill -9, stale heartbeat)."""
        abort = self.mine / f"{PREFIX}{self.cfg.session}-abort"
        try:
            msg = abort.read_text(errors="replace").strip()
        except OSError:
            msg = None
        if msg is not None:
            raise SSDRingError(f"rank {self.rank}: the ring was stopped by another rank: {msg}")
        for k, d in enumerate(self.cfg.dirs):
            if k == self.rank:
                continue
            p = Path(d) / f"{PREFIX}{self.cfg.session}-alive{k}"
            try:
                st = p.stat()
                pid_s, host = p.read_text().split()[:2]
            except (OSError, ValueError):
                continue  # not started yet (or just closed): the timeout covers a rank that never comes
            if host == self.host and not _pid_alive(int(pid_s)):
                raise SSDRingError(f"rank {self.rank}: rank {k} (pid {pid_s}) died during the all-reduce "
                                   f"(its process is gone; heartbeat {p})")
            age = time.time() - st.st_mtime
            if age > self.cfg.dead_after_s:
                raise SSDRingError(f"rank {self.rank}: rank {k} (pid {pid_s} on {host}) stopped: no heartbeat for "
                                   f"{age:.1f} s in {p}")

    def _abort(self, message: str) -> None:
        """Leave our error in every ring directory so the other ranks stop now (best effort)."""
        for d in self.cfg.dirs:
            try:
                _atomic_write(Path(d) / f"{PREFIX}{self.cfg.session}-abort", message.encode())
            except OSError:
                pass


def _atomic_write(final: Path, data: bytes, *, fsync: bool = False) -> None:
    tmp = final.parent / f".{final.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    """Whether a process of this host (this pid namespace) still runs; a zombie (killed, not reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def check_dir(rank: int, d: Path) -> None:
    """Refuse at start-up, naming the rank, a ring directory that is missing or cannot take a file."""
    if not d.is_dir():
        raise SSDRingError(f"rank {rank}'s ring directory {d} does not exist or is not a directory")
    probe = d / f".{PREFIX}probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SSDRingError(f"rank {rank}'s ring directory {d} is not writable ({e.strerror or e})") from e


def clear(directory: Path, session: str) -> int:
    """Remove a session's leftover messages (a killed job's) from one rank's directory; returns how many."""
    n = 0
    for p in Path(directory).glob(f"*{PREFIX}{session}-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
