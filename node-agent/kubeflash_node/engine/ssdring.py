"""All-reduce through a ring of SSDs: each rank writes to its neighbour's disk, reads what the other wrote to its own.

The source slides' reduction for GPUs without NVLink. Rank r owns directory dirs[r] (on the SSD paired with its
GPU). The tensor is cut into N chunks (sizes may differ by one element); then

  reduce-scatter, steps s = 0..N-2: write chunk (r - s) mod N into dirs[r+1], read chunk (r - 1 - s) mod N
  from dirs[r] (written by rank r-1) and add it to ours; afterwards rank r holds the full sum of chunk (r+1) mod N;
  all-gather, steps s = 0..N-2: write chunk (r + 1 - s) mod N into dirs[r+1], read chunk (r - s) mod N from
  dirs[r] and take it as is.

Each message is one file written under a temporary name and renamed into place, so a reader never sees half a
chunk; its name carries the session, the call's sequence number, the phase and the step, so messages of two
calls (or of an earlier, killed job with another session) never mix. The reader polls for the file, checks its
size, reads it and deletes it. Every wait has a timeout whose error names the rank that did not write and the
file. Sums run in the tensor's dtype, as NCCL's do; the order of additions follows the ring.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "kfring-"


class SSDRingError(RuntimeError):
    """The ring cannot run: a directory missing or unwritable, a disk full, or a peer that never wrote."""


@dataclass(frozen=True)
class RingConfig:
    """Where the ring's files go and how long a rank waits for its peer."""

    dirs: tuple[Path, ...]  # dirs[r]: rank r's directory, on the SSD paired with its GPU
    session: str  # the same on every rank of one job, different across jobs (stale files never match)
    timeout_s: float = 60.0  # longest wait for one peer's file
    fsync: bool = False  # fsync each message (only for durability across a host crash; a reader never needs it)


class SSDRing:
    """One rank's end of the ring; `all_reduce(t)` sums `t` over all ranks in place, as dist.all_reduce does."""

    def __init__(self, rank: int, cfg: RingConfig):
        self.rank, self.cfg, self.world = rank, cfg, len(cfg.dirs)
        if not 0 <= rank < self.world:
            raise SSDRingError(f"rank {rank} is outside 0..{self.world - 1} (one directory per rank)")
        if not cfg.session or "/" in cfg.session or cfg.session.startswith("."):
            raise SSDRingError(f"session {cfg.session!r}: expected a non-empty name without '/' or a leading '.'")
        self.mine = Path(cfg.dirs[rank])
        self.next = Path(cfg.dirs[(rank + 1) % self.world])
        self.seq = 0
        for who, d in ((rank, self.mine), ((rank + 1) % self.world, self.next)):
            _check_dir(who, d)

    # ------------------------------------------------------------------------------ public
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` (contiguous, on the host) over the ring's ranks, in place; returns `t`."""
        n = self.world
        if n == 1:
            return t
        if t.device.type != "cpu" or not t.is_contiguous():
            raise SSDRingError(f"rank {self.rank}: all_reduce takes a contiguous host tensor, got {t.device} "
                               f"contiguous={t.is_contiguous()}")
        chunks = torch.tensor_split(t.view(-1), n)  # views into t: sums land in t itself
        r, seq = self.rank, self.seq
        self.seq += 1
        for s in range(n - 1):
            self._send(chunks[(r - s) % n], seq, "rs", s)
            chunks[(r - 1 - s) % n].add_(self._recv(chunks[(r - 1 - s) % n], seq, "rs", s))
        for s in range(n - 1):
            self._send(chunks[(r + 1 - s) % n], seq, "ag", s)
            chunks[(r - s) % n].copy_(self._recv(chunks[(r - s) % n], seq, "ag", s))
        return t

    # ------------------------------------------------------------------------------ messages
    def _name(self, sender: int, seq: int, phase: str, step: int) -> str:
        return f"{PREFIX}{self.cfg.session}-{seq:08d}-{phase}{step:03d}-from{sender}.bin"

    def _send(self, chunk: torch.Tensor, seq: int, phase: str, step: int) -> None:
        """Write one chunk into the next rank's directory: temp file, then rename (a reader sees all or nothing)."""
        final = self.next / self._name(self.rank, seq, phase, step)
        tmp = self.next / f".{final.name}.tmp"
        data = chunk.contiguous().view(torch.uint8).numpy().tobytes() if chunk.numel() else b""
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.cfg.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            nxt = (self.rank + 1) % self.world
            raise SSDRingError(f"rank {self.rank}: cannot write {final} into rank {nxt}'s ring directory "
                               f"({e.strerror or e})") from e

    def _recv(self, like: torch.Tensor, seq: int, phase: str, step: int) -> torch.Tensor:
        """Wait for the previous rank's file in our directory, read it, delete it."""
        prev = (self.rank - 1) % self.world
        path = self.mine / self._name(prev, seq, phase, step)
        want = like.numel() * like.element_size()
        deadline, pause = time.monotonic() + self.cfg.timeout_s, 1e-4
        while True:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise SSDRingError(f"rank {self.rank}: timed out after {self.cfg.timeout_s:g} s waiting for "
                                       f"{path} (to be written by rank {prev})") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
        path.unlink()
        if len(data) != want:
            raise SSDRingError(f"rank {self.rank}: {path} from rank {prev} holds {len(data)} bytes, expected {want}")
        return torch.frombuffer(bytearray(data), dtype=like.dtype) if want else torch.empty(0, dtype=like.dtype)


def _check_dir(rank: int, d: Path) -> None:
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
