"""The disk KV tier's own I/O rate on this machine: a prefill's stores and a decode step's prefix loads through
DiskKV / WriteBackDiskKV (the classes the engine runs), beside the disk's sequential rate (run dd next to it).

    .venv/bin/python bench/kvdisk_io.py --dir /tmp/kvio --layers 8 --tokens 8192 --batch 4 --compute-ms 100
    dd if=/dev/zero of=/tmp/kvio/dd bs=16M count=128 oflag=direct; dd if=/tmp/kvio/dd of=/dev/null bs=16M iflag=direct

Prefill: for each layer one store of `batch x tokens` rows (the Llama-3-8B shape: 8 KV heads of 128 float16 values),
then --compute-ms of sleep standing in for the next layer's GPU compute (the CPU is free meanwhile, as it is while
the GPU computes); the figures are the wall time to the last byte written and synced (fsync: a 32K cache is more
than the page cache holds), the time the stores held the schedule and, of that, rows_s: the stores' CPU work laying
the rows out token-major (a device kernel on a GPU).
Decode: the files' page cache dropped (fsync + fadvise DONTNEED), then one step: each layer's prefix loaded in
schedule order (prefetch of the next layer, load of this one, --decode-compute-ms of sleep); reads_in_flight_mean is
the time-weighted mean of the preadv calls in flight from the first read to the last (the ceilings probe keeps
--threads in flight throughout) and below_threads_s the time with fewer than --threads in flight.
Reads and writes use the tier's O_DIRECT path where it has one (--backend odirect), else buffered.

    .venv/bin/python bench/kvdisk_io.py --dir /tmp/kvio --io-only --io-gib 1

--io-only: the tier's byte mover alone (kvio.SpanIO, --threads x --task-mib pieces) writing --io-gib GiB from a
page-aligned buffer into a fresh KV file, fsync included, then reading it back cold, with O_DIRECT and buffered.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from kubeflash_node.engine.bench import drop_file_pages
from kubeflash_node.engine.kvcache import DiskKV, LayerKV
from kubeflash_node.engine.kvio import KVFile, SpanIO, aligned
from kubeflash_node.engine.kvnear import WriteBackDiskKV

GB = 1e9


def _tier(args, directory: Path):
    cls = WriteBackDiskKV if args.write_back else DiskKV
    kw = dict(device="cpu", dtype=torch.float16, num_kv_heads=8, head_dim=128, directory=directory)
    extra = dict(io_threads=args.threads, io_task_bytes=args.task_mib << 20, io_backend=args.backend)
    accepted = inspect.signature(DiskKV.__init__).parameters
    kw |= {k: v for k, v in extra.items() if k in accepted}  # the tier before this bench's change took none
    return cls(**kw)


class _ReadsInFlight:
    """Counts the preadv calls in flight (the tier's reads: one per piece) from now until `stop`."""

    def __init__(self):
        self.events, self.lock, self.orig = [], threading.Lock(), os.preadv

        def preadv(fd, bufs, offset):
            with self.lock:
                self.events.append((time.perf_counter(), 1))
            try:
                return self.orig(fd, bufs, offset)
            finally:
                with self.lock:
                    self.events.append((time.perf_counter(), -1))

        os.preadv = preadv

    def stop(self, threads: int) -> tuple[float, float]:
        """(mean reads in flight, seconds with fewer than `threads` in flight) from the first read to the last."""
        os.preadv = self.orig
        ev = sorted(self.events)
        if not ev:
            return 0.0, 0.0
        n, last, area, below = 0, ev[0][0], 0.0, 0.0
        for t, d in ev:
            area += n * (t - last)
            below += (t - last) if n < threads else 0.0
            n, last = n + d, t
        return area / max(ev[-1][0] - ev[0][0], 1e-9), below


def io_only(args) -> None:
    n = args.io_gib << 30
    buf = aligned(n, pin=False)
    buf.fill_(7)
    path = args.dir / "span.bin"
    args.dir.mkdir(parents=True, exist_ok=True)
    for direct in (True, False):
        f, spans = KVFile.create(path, n, 1, direct=direct), SpanIO(args.threads, args.task_mib << 20)
        t0 = time.perf_counter()
        spans.run(f, buf, 0, n, 0, write=True)
        os.fsync(f.fd)
        w = time.perf_counter() - t0
        drop_file_pages([path])
        t0 = time.perf_counter()
        spans.run(f, buf, 0, n, 0, write=False)
        r = time.perf_counter() - t0
        print(json.dumps({"direct": f.dfd is not None, "threads": args.threads, "task_mib": args.task_mib,
                          "write_fsync_gbps": round(n / w / GB, 3), "cold_read_gbps": round(n / r / GB, 3),
                          "direct_bytes": spans.direct}))
        f.close()
        spans.close()
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kvio"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--compute-ms", type=float, default=100.0)
    ap.add_argument("--decode-compute-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--task-mib", type=int, default=16)
    ap.add_argument("--backend", default="odirect")
    ap.add_argument("--write-back", action="store_true")
    ap.add_argument("--io-only", action="store_true")
    ap.add_argument("--io-gib", type=int, default=1)
    args = ap.parse_args()
    if args.io_only:
        return io_only(args)
    d = args.dir / "kv"
    shutil.rmtree(d, ignore_errors=True)
    kv = _tier(args, d)
    k = torch.randn(args.batch, 8, args.tokens, 128, dtype=torch.float16)
    v = torch.randn_like(k)
    for j in range(args.layers):
        kv.allocate(j, 0, args.batch, args.tokens + 1)
    s0 = time.perf_counter()
    kv._rows(k, v)  # the token-major layout the store makes first: a device kernel on a GPU, CPU work here
    rows_s = (time.perf_counter() - s0) * args.layers
    t0, held = time.perf_counter(), 0.0
    for j in range(args.layers):
        lk = LayerKV(None, None, in_place=False)
        lk.new = (k, v, 0)
        s0 = time.perf_counter()
        kv.store(j, 0, lk)
        held += time.perf_counter() - s0
        time.sleep(args.compute_ms / 1e3)
    kv._writes_of(None, wait=True)  # every write done
    files = sorted(d.glob("kv_*.bin"))
    for p in files:  # and on the disk: a 32K cache does not fit the page cache (the GPU run's cgroup: 12 GiB)
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    prefill = time.perf_counter() - t0
    written = kv.io["write_bytes"]
    drop_file_pages(files)
    reads = _ReadsInFlight()
    t0 = time.perf_counter()
    kv.prefetch(0, 0, args.tokens)
    for j in range(args.layers):
        if j + 1 < args.layers:
            kv.prefetch(j + 1, 0, args.tokens)
        got = kv.load(j, 0, args.tokens)
        assert got.k.shape[2] == args.tokens
        del got
        time.sleep(args.decode_compute_ms / 1e3)
    decode = time.perf_counter() - t0
    read = kv.io["read_bytes"]
    kv.close()
    mean, below = reads.stop(args.threads)
    shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({"write_bytes": written, "prefill_s": round(prefill, 3), "store_held_s": round(held, 3),
                      "rows_s": round(rows_s, 3),
                      "compute_s": args.layers * args.compute_ms / 1e3, "write_gbps": round(written / prefill / GB, 3),
                      "read_bytes": read, "decode_s": round(decode, 3), "read_gbps": round(read / decode / GB, 3),
                      "loads": kv.loads, "reads_in_flight_mean": round(mean, 2), "below_threads_s": round(below, 3)}))


if __name__ == "__main__":
    main()
