"""File I/O of the disk KV tier (kvcache.DiskKV): one KV file's descriptors, a bounded pool of page-aligned host
buffers, and one byte range read or written as task-sized pieces over the I/O threads.

A range's whole 4 KiB pages go through O_DIRECT where the file takes it (a 32K-token cache neither fills the page
cache nor waits on its write-back: the disk's own rate, as the probe measures it), the partial pages at its two ends
through the buffered descriptor; the kernel keeps the two coherent (a direct read writes back dirty pages of its
range first). A failed read or write raises an OSError that names the file, with the errno of the failure.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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
        os.ftruncate(fd, size)
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
    """Reads and writes byte ranges of KV files as pieces of at most `task` bytes, the first on the calling thread
    and the rest on `threads` I/O threads; counts the bytes that went through O_DIRECT."""

    def __init__(self, threads: int, task: int):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="kf-kv-io")
        self.task = max(ALIGN, task // ALIGN * ALIGN)
        self.lock = threading.Lock()
        self.direct = {"read": 0, "write": 0}

    def run(self, f: KVFile, buf: torch.Tensor, at: int, n: int, offset: int, *, write: bool) -> None:
        """File bytes [offset, offset + n) to (write) or from buf[at:at + n] (buf: 1-D host uint8)."""
        lo, hi = offset, offset + n
        a0, a1 = -(-lo // ALIGN) * ALIGN, hi // ALIGN * ALIGN  # the range's whole pages
        direct = f.dfd is not None and a1 > a0 and (buf.data_ptr() + at + a0 - lo) % ALIGN == 0
        spans = [(f.dfd, a0, a1), (f.fd, lo, a0), (f.fd, a1, hi)] if direct else [(f.fd, lo, hi)]
        pieces = [(fd, x, min(x + self.task, b)) for fd, a, b in spans for x in range(a, b, self.task)]
        if not pieces:
            return
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

        subs = [self.pool.submit(piece, *p) for p in pieces[1:]]
        errors = []
        try:
            piece(*pieces[0])
        except OSError as e:
            errors.append(e)
        for s in subs:  # every piece has finished with the buffer before this returns or raises
            try:
                s.result()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
