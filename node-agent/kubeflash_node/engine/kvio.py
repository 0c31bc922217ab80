"""File I/O of the disk KV tier (kvcache.DiskKV): one KV file's descriptors, a bounded pool of page-aligned host
buffers, and one byte range read or written as task-sized pieces over the I/O threads.

A range's whole 4 KiB pages go through O_DIRECT where the file takes it (a 32K-token cache neither fills the page
cache nor waits on its write-back: the disk's own rate, as the probe measures it), the partial pages at its two ends
through the buffered descriptor; the kernel keeps the two coherent (a direct read writes back dirty pages of its
range first). A failed read or write raises an OSError that names the file, with the errno of the failure.

A file's blocks are allocated when it is made (fallocate): the I/O threads then write a range's pieces in whatever
order they finish into extents already laid out in file order, and a prefix read later walks the disk in order, as
the ceilings probe's sequentially written file does. Into a sparse file the concurrent pieces were placed in the
order they landed (a 536 MB file written as 32 x 16 MiB pieces by 16 threads: 19 extents out of order, 5 in order
with the blocks allocated first).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import pinned

ALIGN = 4096


@dataclass(eq=False)
class KVFile:
    """One (layer, micro-batch) file: its buffered descriptor, its O_DIRECT one (or None), its batch rows."""

    path: Path
    fd: int
    dfd: int | None
    batch: int

    @classmethod
    def create(cls, path: Path, size: int, batch: int, *, direct: bool) -> "KVFile":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            allocate(fd, size, path)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)  # nothing half-allocated left on the disk
            raise
        dfd = None
        if direct:
            try:
                dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
            except OSError:  # a file system without O_DIRECT: buffered only
                dfd = None
        return cls(path, fd, dfd, batch)

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)


_libc = None


def allocate(fd: int, size: int, path: Path) -> None:
    """Size the file to `size` bytes with its blocks allocated (fallocate(2), mode 0: unwritten extents, no bytes
    written), so concurrent piece writes land in file order on the disk; a file system without fallocate gets a
    sparse file (ftruncate). A disk without room for it raises now, naming the file, not at a write mid-run."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if size > 0 and _libc.fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, f"KV file {path}: no room for its {size} bytes: {os.strerror(err)}")
    os.ftruncate(fd, size)  # the size, where fallocate is not supported (allocated files already have it)


def aligned(n: int, *, pin: bool, device: int | None = None) -> torch.Tensor:
    """n uninitialized host bytes starting on a page; page-locked when `pin` (a GPU copies them asynchronously), in
    CUDA device `device`'s context (a reader thread starts on device 0)."""
    if pin:
        if device is not None:
            torch.cuda.set_device(device)
        return pinned.empty((n,), torch.uint8)  # page aligned unless the driver refused (then: buffered I/O)
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    at = -raw.data_ptr() % ALIGN
    return raw[at:at + n]


class Slots:
    """At most `count` reusable host buffers. `take(n)` hands out a free one of at least n bytes (a smaller one is
    dropped and made again), makes one while fewer than `count` exist, else waits for `give` (with `wait=False` it
    makes a spare instead, which `give` drops). `give(buf, event)`: the buffer is free once `event` (a CUDA copy out of
    it) has completed."""

    def __init__(self, count: int, *, pin: bool, device: int | None = None):
        self.count, self.pin, self.device = count, pin, device
        self.free: list[tuple[torch.Tensor, object]] = []
        self.made = 0
        self.cv = threading.Condition()

    def take(self, n: int, *, wait: bool = True) -> torch.Tensor:
        with self.cv:
            while wait and not self.free and self.made >= self.count:
                self.cv.wait()
            buf, ev = self.free.pop() if self.free else (None, None)
            if buf is None:
                self.made += 1  # a new one (a spare beyond `count` when not waiting)
        if ev is not None:
            ev.synchronize()  # before it is written again, or freed: no copy may still read it
        if buf is None or buf.numel() < n:  # none free, or too small: made (again, in its place)
            buf = aligned(n, pin=self.pin, device=self.device)
        return buf

    def give(self, buf: torch.Tensor, event=None) -> None:
        with self.cv:
            spare = self.made > self.count
            if spare:
                self.made -= 1
            else:
                self.free.append((buf, event))
            self.cv.notify()
        if spare and event is not None:
            event.synchronize()  # a spare is dropped (its memory freed) only after the copy out of it has run


class SpanIO:
    """Reads and writes byte ranges of KV files as pieces of at most `task` bytes on `threads` I/O threads (`run`: the
    first on the calling thread, waited for; `start`: all queued, not waited for); counts the bytes that went
    through O_DIRECT."""

    def __init__(self, threads: int, task: int):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="kf-kv-io")
        self.task = max(ALIGN, task // ALIGN * ALIGN)
        self.lock = threading.Lock()
        self.direct = {"read": 0, "write": 0}

    def run(self, f: KVFile, buf: torch.Tensor, at: int, n: int, offset: int, *, write: bool) -> None:
        """File bytes [offset, offset + n) to (write) or from buf[at:at + n] (buf: 1-D host uint8): the first piece on
        the calling thread, the rest on the I/O threads; returns once every piece has finished."""
        pieces = self._pieces(f, buf, at, n, offset, write=write)
        if not pieces:
            return
        subs = [self.pool.submit(p) for p in pieces[1:]]
        errors = []
        try:
            pieces[0]()
        except OSError as e:
            errors.append(e)
        self.wait(subs, errors)

    def start(self, f: KVFile, buf: torch.Tensor, at: int, n: int, offset: int, *, write: bool) -> list[Future]:
        """As `run`, every piece queued on the I/O threads and none waited for: a read started while another range's
        pieces are still in flight follows them in the queue, so each thread goes from that range's last piece straight
        to this one's (the reads in flight do not drain to none between two ranges). `wait` on the result."""
        return [self.pool.submit(p) for p in self._pieces(f, buf, at, n, offset, write=write)]

    @staticmethod
    def wait(pieces: list[Future], errors: list[OSError] | None = None) -> None:
        """Wait for every piece (none is left using its buffer), then raise the first failure."""
        errors = [] if errors is None else errors
        for s in pieces:
            try:
                s.result()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def _pieces(self, f: KVFile, buf: torch.Tensor, at: int, n: int, offset: int, *, write: bool) -> list:
        """The range as task-sized pieces, each a call that moves its bytes."""
        lo, hi = offset, offset + n
        a0, a1 = -(-lo // ALIGN) * ALIGN, hi // ALIGN * ALIGN  # the range's whole pages
        direct = f.dfd is not None and a1 > a0 and (buf.data_ptr() + at + a0 - lo) % ALIGN == 0
        spans = [(f.dfd, a0, a1), (f.fd, lo, a0), (f.fd, a1, hi)] if direct else [(f.fd, lo, hi)]
        pieces = [(fd, x, min(x + self.task, b)) for fd, a, b in spans for x in range(a, b, self.task)]
        if not pieces:
            return []
        mv = memoryview(buf.numpy()).cast("B")
        shift = at - lo  # buffer index of file offset x: x + shift

        def piece(fd: int, x0: int, x1: int) -> None:
            done = x0
            try:
                while done < x1:
                    part = mv[done + shift:x1 + shift]
                    got = os.pwrite(fd, part, done) if write else os.preadv(fd, [part], done)
                    if got == 0:
                        raise OSError(errno.EIO, "the file is shorter than expected")
                    done += got
            except OSError as e:
                raise OSError(e.errno, f"KV file {f.path}: {'write' if write else 'read'} of bytes {done}..{x1} "
                                       f"failed: {e.strerror}") from e
            if fd == f.dfd:
                with self.lock:
                    self.direct["write" if write else "read"] += x1 - x0

        return [lambda p=p: piece(*p) for p in pieces]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
