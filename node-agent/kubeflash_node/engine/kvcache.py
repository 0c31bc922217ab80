"""KV cache tiers behind one interface: `load(layer, mb, start) -> LayerKV` and `store(layer, mb, kv)`.

device: tensors stay on the compute device, updated in place. cpu: host tensors, prefix copied in and new
slice copied out per step. disk: one file per (layer, micro-batch) in the job directory, token-major
([T, B, 2, Nk, D]) so the prefix is one sequential read and a step's new tokens one sequential write.
The schedule calls `prefetch(layer, mb, start)` for the next (layer, micro-batch) before computing the current
one: the host tier then copies that prefix on a copy stream of its own, so the transfer overlaps the compute
instead of queueing behind it on the compute stream (the other tiers ignore it).
With bits 8 or 4 every tier keeps each row of D values group-wise quantized (quant.KVCodec: codes, float16
scale and zero in one uint8 row): encoded on the compute device before it leaves, decoded there after it comes
back, so PCIe and disk carry the compressed bytes; on the device the cache takes a quarter (4-bit) of the memory.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from . import pinned
from .kvio import ALIGN, KVFile, Slots, SpanIO, aligned
from .model import attention
from .quant import KVCodec


class LayerKV:
    """The cache of one layer for one micro-batch during one step; the model calls `update` once."""

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, in_place: bool):
        # k, v: [B, Nk, T_cap or T_prefix, D]
        self.k, self.v, self.in_place = k, v, in_place
        self.new: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int):
        # k_new: [B, Nk, S, D] -> full K, V [B, Nk, start+S, D]
        s = k_new.shape[2]
        self.new = (k_new, v_new, start)
        if self.in_place:
            self.k[:, :, start:start + s] = k_new
            self.v[:, :, start:start + s] = v_new
            return self.k[:, :, :start + s], self.v[:, :, :start + s]
        if self.k is None or start == 0:
            return k_new, v_new
        return torch.cat([self.k, k_new], dim=2), torch.cat([self.v, v_new], dim=2)

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, start: int, mask: torch.Tensor,
               x: torch.Tensor | None = None, project=None):
        """Add the new K, V and attend over the whole cache; a tier may do this where its data lives.
        x [B, S, H] is the layer's attention input and `project` maps a prefix of it to K, V (X-cache tiers)."""
        # q: [B, Nh, S, D] -> [B, Nh, S, D]
        k, v = self.update(k_new, v_new, start)
        return attention(q, k, v, mask)


class DeviceKV:
    """KV resident on the compute device (preallocated to the block's full length); with bits 8 or 4 it is
    CompressedDeviceKV instead (make_kv picks)."""

    compressible = False

    def __init__(self, *, device, dtype, num_kv_heads: int, head_dim: int, bits: int = 16, **_):
        self.device, self.dtype, self.nk, self.d = device, dtype, num_kv_heads, head_dim
        self.bufs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.codec = _codec(bits, head_dim) if self.compressible else None

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        shape = (batch, self.nk, capacity, self.d)
        self.bufs[layer, mb] = (torch.empty(shape, dtype=self.dtype, device=self.device),
                                torch.empty(shape, dtype=self.dtype, device=self.device))

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        k, v = self.bufs[layer, mb]
        return LayerKV(k, v, in_place=True)

    def prefetch(self, layer: int, mb: int, start: int) -> None:
        pass  # nothing crosses a link: the cache is where the compute is

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        pass

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.bufs.values())

    def close(self) -> None:
        self.bufs.clear()


def _codec(bits: int, head_dim: int) -> KVCodec | None:
    if bits not in (16, 8, 4):
        raise ValueError(f"KV compression: bits must be 16, 8 or 4, got {bits}")
    return None if bits == 16 else KVCodec(bits, head_dim)


class HostKV(DeviceKV):
    """KV in host memory (pinned when the compute device is a GPU), token-major [T_cap, B, Nk, D] so a step's
    prefix is one contiguous DMA in and its new rows one contiguous DMA out.

    On a GPU, page-locking the buffers is slow (~7 GB/s: a 36 GB cache takes 5 s), so `allocate` only queues
    them and a background thread locks them in the order the prefill stores them, while the prefill runs; the
    first use of an entry waits for its buffers. `store` copies the new rows out on a store stream of its own, after
    the compute that made them, so the next layer's kernels do not queue behind the copy (a 16 x 8K-token prefill
    stores ~0.5 GB a layer: 10 ms at 55 GB/s); the rows stay alive until that copy has run, and every reader of the
    entry waits for its last store's event. `prefetch` starts the next (layer, micro-batch)'s prefix copy on a
    copy stream once that entry's last store has drained (the two streams use the link's two directions at once);
    `load` then only makes the compute stream wait."""

    compressible = True
    prefetches = True  # the buffers are on the host: locked in the background and copied ahead (subclasses that
    # keep their buffers elsewhere or never copy them turn both off)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.device = torch.device(self.device)
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda and self.prefetches else None  # host -> device
        self.store_stream = torch.cuda.Stream(self.device) if cuda and self.prefetches else None  # device -> host
        self.stored: dict[tuple[int, int], torch.cuda.Event] = {}  # the last store's copy out, per entry
        self.ahead: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = {}
        self.loads = {"prefetched": 0, "waited": 0}  # decode loads served from a prefetch / copied when asked
        self.locker = ThreadPoolExecutor(1, thread_name_prefix="kf-kv-lock") if cuda and self.prefetches else None
        self.locking: dict[tuple[int, int], Future] = {}
        self.device_index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.locker else None

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        # [T_cap, B, Nk, D] in the compute dtype, or [T_cap, B, Nk, codec.nbytes] uint8 when compressed
        shape = (capacity, batch, self.nk, self.codec.nbytes if self.codec else self.d)
        dtype = torch.uint8 if self.codec else self.dtype
        if self.locker is None:
            self.bufs[layer, mb] = (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
            return
        self.bufs.pop((layer, mb), None)
        self.locking[layer, mb] = self.locker.submit(self._lock, shape, dtype)

    def _lock(self, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        torch.cuda.set_device(self.device_index)  # register with the compute device's context
        return pinned.empty(shape, dtype), pinned.empty(shape, dtype)

    def _bufs(self, layer: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        fut = self.locking.pop((layer, mb), None)
        if fut is not None:
            self.bufs[layer, mb] = fut.result()
        return self.bufs[layer, mb]

    def prefetch(self, layer: int, mb: int, start: int) -> None:
        if self.copy_stream is None or start == 0 or (layer, mb, start) in self.ahead:
            return
        bufs = self._bufs(layer, mb)
        with torch.cuda.stream(self.copy_stream):
            if (layer, mb) in self.stored:
                self.copy_stream.wait_event(self.stored[layer, mb])  # the rows stored last step are in
            k, v = (b[:start].to(self.device, non_blocking=True) for b in bufs)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.ahead[layer, mb, start] = (k, v, done)

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        if start == 0:
            return LayerKV(None, None, in_place=False)
        got = self.ahead.pop((layer, mb, start), None)
        self.loads["waited" if got is None else "prefetched"] += 1
        if got is None:
            bufs = self._bufs(layer, mb)
            if (layer, mb) in self.stored:
                torch.cuda.current_stream(self.device).wait_event(self.stored[layer, mb])  # the rows stored last are in
            k, v = (b[:start].to(self.device, non_blocking=True) for b in bufs)
        else:
            k, v, done = got
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            k.record_stream(compute)  # allocated on the copy stream, used and freed on the compute stream
            v.record_stream(compute)
        if self.codec:
            k, v = self.codec.decode(k, self.dtype), self.codec.decode(v, self.dtype)
        return LayerKV(k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), in_place=False)  # -> [B, Nk, T, D]

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        k_new, v_new, start = kv.new
        k_new, v_new = k_new.permute(2, 0, 1, 3).contiguous(), v_new.permute(2, 0, 1, 3).contiguous()  # [S, B, Nk, D]
        if self.codec:
            k_new, v_new = self.codec.encode(k_new), self.codec.encode(v_new)
        k, v = self._bufs(layer, mb)
        s = k_new.shape[0]
        if self.store_stream is None:  # the host, or a device-resident codec cache: in order on the current stream
            k[start:start + s].copy_(k_new, non_blocking=True)
            v[start:start + s].copy_(v_new, non_blocking=True)
            return
        self.store_stream.wait_stream(torch.cuda.current_stream(self.device))  # after the work that made the rows
        with torch.cuda.stream(self.store_stream):
            k[start:start + s].copy_(k_new, non_blocking=True)
            v[start:start + s].copy_(v_new, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.store_stream)
        k_new.record_stream(self.store_stream)  # made on the compute stream, reused there only once the copy has run
        v_new.record_stream(self.store_stream)
        self.stored[layer, mb] = ev

    def drain(self) -> None:
        """Wait for every store's copy out: host readers of the buffers, and freeing them, come after."""
        for ev in self.stored.values():
            ev.synchronize()

    def nbytes(self) -> int:
        for layer, mb in list(self.locking):
            self._bufs(layer, mb)
        return super().nbytes()

    def close(self) -> None:
        self.drain()  # a page-locked buffer is unregistered when dropped: no copy may still write into it
        if self.locker is not None:
            for fut in self.locking.values():
                fut.cancel()
            self.locker.shutdown(wait=True)
        self.locking.clear()
        self.ahead.clear()
        self.stored.clear()
        super().close()


class DiskKV:
    """KV in files under `directory`: kv_l{layer}_m{mb}.bin, rows of [B, 2, Nk, D] per token position.

    Writes are queued on a writer thread, so a prefill layer's compute overlaps the previous layer's write: a store of
    at least DIRECT_MIN bytes is copied into a page-aligned staging buffer (page-locked on a GPU, copied on a side
    stream, asynchronously) and the writer writes it once that copy is done; smaller ones (a decode step's row) go
    as a host copy. At most WRITES_IN_FLIGHT writes are queued or being written (a store waits for the oldest beyond
    that), so staging holds at most WRITES_IN_FLIGHT stores' bytes: one micro-batch's prompt rows of one layer each.
    A failed write raises, naming the file, at the next store, load or at close (which waits for every write).
    A read or write of a range is split into `io_task_bytes` pieces over `io_threads` threads (the policy's, which
    the disk probe chose); whole pages go through O_DIRECT where `io_backend` and the file system allow (kvio).
    `prefetch` starts the next (layer, micro-batch)'s prefix read while the current one's is still read and computes:
    a reader thread waits for that entry's writes (its rows were written by its last store, which came before: a step
    stores every entry once) and takes its buffer, then queues its pieces on the I/O threads behind the current
    read's (kvio.SpanIO.start), so the threads go from one prefix's last pieces to the next one's and the reads in
    flight never drain between layers, as the ceilings probe's one long read never does. On a GPU a prefix is read
    into one of READ_SLOTS page-locked buffers, reused once its copy to the device has run."""

    WRITES_IN_FLIGHT = 2
    READ_SLOTS = 2  # the prefix being copied to the device, and the next one being read
    DIRECT_MIN = 1 << 20

    def __init__(self, *, device, dtype, num_kv_heads: int, head_dim: int, directory: Path, bits: int = 16,
                 io_threads: int = 4, io_task_bytes: int = 16 << 20, io_backend: str = "auto"):
        self.device, self.dtype, self.nk, self.d = torch.device(device), dtype, num_kv_heads, head_dim
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[tuple[int, int], KVFile] = {}
        self.codec = _codec(bits, head_dim)
        # bytes of one head's K (or V) row: D values, or the codec's packed row
        self.head_bytes = self.codec.nbytes if self.codec else head_dim * torch.empty((), dtype=dtype).element_size()
        self.io = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0}
        self.io_lock = threading.Lock()
        cuda = self.device.type == "cuda"
        # O_DIRECT as the weight reads choose it (io.make_reader): asked for, or 'auto' on a GPU
        self.direct = io_backend in ("odirect", "kvikio") or (io_backend == "auto" and cuda)
        self.spans = SpanIO(io_threads, io_task_bytes)
        index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        self.copy_stream = None  # a GPU's side stream for the staging copies (made on first use)
        self.staging = Slots(self.WRITES_IN_FLIGHT, pin=cuda, device=index)
        self.read_slots = Slots(self.READ_SLOTS, pin=True, device=index) if cuda else None  # CPU: K, V are views
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="kf-kv-read")
        self.ahead: dict[tuple[int, int, int, int], Future] = {}  # (layer, mb, file rows, prefix rows) -> buffer
        self.loads = {"prefetched": 0, "waited": 0}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="kf-kv-write")
        self.writing: list[tuple[KVFile, Future]] = []  # (file, write) in submission order

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        old = self.files.pop((layer, mb), None)
        if old:
            self._writes_of(old, wait=True)  # nothing may still write to a descriptor about to close
            old.close()
        path = self.dir / f"kv_l{layer:03d}_m{mb:03d}.bin"
        self.files[layer, mb] = KVFile.create(path, capacity * self._row(batch), batch, direct=self.direct)

    def _row(self, batch: int) -> int:
        return batch * 2 * self.nk * self.head_bytes

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        if start == 0:
            return LayerKV(None, None, in_place=False)
        return self._kv(self._prefix(layer, mb, start), start, self.files[layer, mb].batch)

    def _file_rows(self, layer: int, mb: int, start: int) -> int:
        """Token rows of the prefix that are read from the file (all of them here)."""
        return start

    def _prefix(self, layer: int, mb: int, start: int) -> torch.Tensor:
        """A host uint8 buffer of at least `start` rows whose first rows hold the file's part of the prefix: from a
        prefetch if one was made, else read now."""
        self._raise_failed()
        n = self._file_rows(layer, mb, start)
        if n == 0:  # every row is still buffered (write-back): nothing to read
            return self._buffer(start * self._row(self.files[layer, mb].batch))
        fut = self.ahead.pop((layer, mb, n, start), None)
        self.loads["waited" if fut is None else "prefetched"] += 1
        f = self.files[layer, mb]
        if fut is not None:
            return self._finish_read(n * self._row(f.batch), fut.result())
        return self._read(f, n * self._row(f.batch), start * self._row(f.batch), self._writes_of(f))

    def prefetch(self, layer: int, mb: int, start: int) -> None:
        n = self._file_rows(layer, mb, start) if start else 0
        if n == 0 or (layer, mb, n, start) in self.ahead:
            return
        f = self.files[layer, mb]
        self.ahead[layer, mb, n, start] = self.reader.submit(self._start_read, f, n * self._row(f.batch),
                                                             start * self._row(f.batch), self._writes_of(f))

    def _writes_of(self, f: KVFile | None, wait: bool = False) -> list[Future]:
        """The writes still in flight (all of them, or those to `f`); with `wait`, waited for (errors raised)."""
        self.writing = [(g, w) for g, w in self.writing if not w.done() or w.exception() is not None]
        found = [w for g, w in self.writing if f is None or g is f]
        if wait:
            for w in found:
                w.result()
        return found

    def _raise_failed(self) -> None:
        """A write that failed on the writer thread raises here (its message names the file)."""
        for _, w in self.writing:
            if w.done() and w.exception() is not None:
                w.result()

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        k_new, v_new, start = kv.new
        f = self.files[layer, mb]
        self._write(f, self._rows(k_new, v_new), start * self._row(f.batch))

    # ---- byte-level pieces shared with the write-back tier (kvnear.WriteBackDiskKV)
    def _rows(self, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        # k_new, v_new: [B, Nk, S, D] -> uint8 [S, row bytes] on their device (encoded when compressed)
        rows = torch.stack([k_new, v_new], dim=1).permute(3, 0, 1, 2, 4).contiguous()  # [S, B, 2, Nk, D]
        rows = self.codec.encode(rows) if self.codec else rows
        return rows.view(torch.uint8).reshape(rows.shape[0], -1)

    def _kv(self, raw: torch.Tensor, t: int, b: int) -> LayerKV:
        # raw: host uint8 holding t token rows first -> K, V [B, Nk, t, D] on the compute device
        data = raw[:t * self._row(b)]
        if self.read_slots is not None:  # a page-locked slot: copied asynchronously, reused once the copy ran
            data = data.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.read_slots.give(raw, done)
        if self.codec:
            rows = self.codec.decode(data.view(t, b, 2, self.nk, self.head_bytes).to(self.device), self.dtype)
        else:
            rows = data.view(self.dtype).view(t, b, 2, self.nk, self.d).to(self.device)
        kv = rows.permute(1, 2, 3, 0, 4)  # [B, 2, Nk, T, D]
        return LayerKV(kv[:, 0], kv[:, 1], in_place=False)

    def _read(self, f: KVFile, n: int, room: int, after: list[Future] = ()) -> torch.Tensor:
        """A host buffer of `room` bytes or more whose first `n` are the file's first `n` bytes."""
        return self._finish_read(n, self._start_read(f, n, room, after))

    def _start_read(self, f: KVFile, n: int, room: int, after: list[Future] = ()) -> tuple[torch.Tensor, list[Future]]:
        """The buffer of a read of the file's first `n` bytes and its pieces, queued on the I/O threads."""
        for w in after:  # the rows being read were submitted for writing before this read
            w.result()
        buf = self._buffer(room)
        return buf, self.spans.start(f, buf, 0, n, 0, write=False)

    def _finish_read(self, n: int, started: tuple[torch.Tensor, list[Future]]) -> torch.Tensor:
        buf, pieces = started
        self.spans.wait(pieces)  # a failed piece raises here, naming the file
        with self.io_lock:
            self.io["reads"] += 1
            self.io["read_bytes"] += n
        return buf

    def _buffer(self, n: int) -> torch.Tensor:
        # never waits: a read slot comes back when the main thread's copy of an earlier prefix has run
        return self.read_slots.take(n, wait=False) if self.read_slots is not None else aligned(n, pin=False)

    def _write(self, f: KVFile, rows: torch.Tensor, offset: int) -> None:
        """Queue `rows` (uint8, on the compute device or the host, not changed by the caller from now on) for writing
        at `offset` of `f`: through a staging slot when large, else as a host copy."""
        self._raise_failed()
        n = rows.numel() * rows.element_size()
        while len(self._writes_of(None)) >= self.WRITES_IN_FLIGHT:
            self.writing[0][1].result()
        if n >= self.DIRECT_MIN:
            at = offset % ALIGN  # the slot's bytes lie on the file's page boundaries: its whole pages go direct
            buf = self.staging.take(at + n)
            copied = self._stage(rows, buf[at:at + n])
            job = self.writer.submit(self._write_staged, f, buf, at, n, offset, copied)
        else:
            host = rows.cpu().contiguous().reshape(-1).view(torch.uint8)
            job = self.writer.submit(self.spans.run, f, host, 0, n, offset, write=True)
        self.writing.append((f, job))
        with self.io_lock:  # counted when queued: every queued write is done before a read of its file or close
            self.io["writes"] += 1
            self.io["write_bytes"] += n

    def _stage(self, rows: torch.Tensor, dest: torch.Tensor):
        """Copy `rows` into the staging bytes `dest`; from a GPU on a copy stream of its own, after the work that made
        them, so the next layer's compute does not queue behind it: returns the copy's CUDA event (None on the host)."""
        flat = rows.reshape(-1).view(torch.uint8)
        if not flat.is_cuda:
            dest.copy_(flat)
            return None
        if self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(flat.device)
        self.copy_stream.wait_stream(torch.cuda.current_stream(flat.device))
        with torch.cuda.stream(self.copy_stream):
            dest.copy_(flat, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        flat.record_stream(self.copy_stream)  # made on the compute stream, freed there once the copy has run
        return copied

    def _write_staged(self, f: KVFile, buf: torch.Tensor, at: int, n: int, offset: int, copied) -> None:
        try:
            if copied is not None:
                copied.synchronize()  # the device -> staging copy has landed
            self.spans.run(f, buf, at, n, offset, write=True)
        finally:
            self.staging.give(buf)

    def nbytes(self) -> int:
        return sum(os.fstat(f.fd).st_size for f in self.files.values())

    def close(self) -> None:
        for fut in self.ahead.values():
            fut.cancel()
        self.reader.shutdown(wait=True)  # no read or write is left on a descriptor about to close
        self.writer.shutdown(wait=True)
        self.spans.close()
        self.ahead.clear()
        for f in self.files.values():
            f.close()
        self.files.clear()
        self._writes_of(None, wait=True)  # a write that failed says so here


class NoKV(DeviceKV):
    """Prefill-only jobs (max_new_tokens == 1): attention uses the chunk's own K, V; nothing is kept."""

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        pass

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        return LayerKV(None, None, in_place=False)


class CompressedDeviceKV(HostKV):
    """KV on the compute device, group-wise quantized (FlexGen's compressed cache): the host tier's token-major
    codec rows, kept in device memory, so a step decodes its prefix without crossing PCIe."""

    prefetches = False

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        shape = (capacity, batch, self.nk, self.codec.nbytes)
        self.bufs[layer, mb] = (torch.empty(shape, dtype=torch.uint8, device=self.device),
                                torch.empty(shape, dtype=torch.uint8, device=self.device))


TIERS = {"device": DeviceKV, "cpu": HostKV, "disk": DiskKV, "none": NoKV}


def make_kv(tier: str, **kw):
    if tier == "disk" and kw.get("directory") is None:
        raise ValueError("kv tier 'disk' needs a job directory for its files")
    if tier != "disk":
        kw.pop("directory", None)
    if tier == "device" and kw.get("bits", 16) != 16:
        return CompressedDeviceKV(**kw)
    return TIERS[tier](**kw)
