"""The weight streamer: reads stage files ahead of compute into a bounded ring of buffers.

It follows the schedule's stage order (an iterator given up front), keeps at most `prefetch` stages in
flight beyond the one computing, and hands out weight dicts already on the compute device. On CUDA a stage
goes disk -> pinned host slot (reader threads) -> device slot (copy stream), and the compute stream waits
on a CUDA event, never on the host. Resident stages ('gpu'/'cpu' placement) are read once and kept.
Quantized matrices (w.q/w.scale/w.zero, see quant.py) travel packed and are dequantized to the compute dtype
where the views are built, on the compute device: on CUDA the decompression runs on the GPU, after the copy.
A streamed mixture-of-experts layer is read without its experts, which are read when routed (experts.py), unless
`routed_experts` is off (every expert read with its layer, as dense streaming does). With activation sparsity
(sparse.py) a streamed layer is read without the tensors named in `skip_tensors` (the FFN's up/down matrices,
which the sparse FFN reads per active neuron from the neuron bundles): the rest of the file in a few runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from ..store.format import Manifest
from .experts import (
    EarlyReads,
    ExpertCache,
    PrefetchStats,
    RoutedWeights,
    RoutingFiles,
    StagedExpert,
    expert_of,
    expert_ranges,
    expert_runs,
)
from .io import ALIGN, make_reader
from .pinned import empty as pinned_empty
from .quant import QuantSpec, dequantize_named

# routed experts apart by less than this in a layer file share one read: only the alignment padding between tensors
# (4 KiB-aligned), never another expert's bytes
EXPERT_GAP = ALIGN - 1
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int8": torch.int8, "uint8": torch.uint8}


class Slot:
    """One stage's buffers: a host buffer (pinned on CUDA) and, on CUDA, a device buffer."""

    def __init__(self, nbytes: int, device: torch.device, pinned: bool, host: bool = True):
        self.host = pinned_empty(nbytes if host else 0, torch.uint8, pinned=pinned)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device) if device.type == "cuda" else None
        self.ready: torch.cuda.Event | None = None  # device copy done (CUDA)
        self.free: torch.cuda.Event | None = None  # compute finished with the device buffer (CUDA)


class WeightStreamer:
    """Stage weights on demand, `prefetch` stages ahead, in the order the schedule will ask for them."""

    def __init__(self, model_dir: Path, manifest: Manifest, *, device: torch.device, dtype: torch.dtype,
                 placement: list[str], order: Iterator[int], prefetch: int = 2, threads: int = 4,
                 task_bytes: int = 16 << 20, backend: str = "auto", timings=None, routed_experts: bool = True,
                 expert_cache_bytes: int = 0, skip_tensors=None, routing: RoutingFiles | None = None,
                 expert_prefetch: bool = False):
        self.dir, self.m, self.device, self.dtype = Path(model_dir), manifest, device, dtype
        self.placement, self.order, self.prefetch = placement, order, prefetch
        self.task_bytes, self.timings, self.threads = task_bytes, timings, max(1, threads)
        self.cuda = device.type == "cuda"
        self.quant = QuantSpec.from_dict(self.m.extra.get("quant"))
        self.reader = make_reader(backend, cuda=self.cuda, probe=self.dir / self.m.stages[0])
        self.direct_to_device = self.cuda and getattr(self.reader, "device_capable", False)
        self.reader_host = make_reader("posix") if self.direct_to_device else self.reader
        self.pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="kf-stage")
        self.task_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kf-read")
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.lock = threading.Lock()
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        self.host_resident: dict[int, torch.Tensor] = {}  # 'cpu' stages on CUDA: whole stage file, pinned
        self.streamed = {i for i, p in enumerate(placement) if p == "disk" or (p == "cpu" and self.cuda)}
        # MoE layers read from disk without their experts: stage -> (bytes before the experts, expert byte ranges)
        self.routed = {i: r for i in sorted(self.streamed) if routed_experts and placement[i] == "disk"
                       for r in [expert_ranges(self.m.files[self.m.stages[i]])] if r[1]}
        self.expert_cache = ExpertCache(expert_cache_bytes) if self.routed else None  # budget 0: counts only
        self.expert_prefetch = PrefetchStats() if expert_prefetch and self.routed else None  # experts.py
        self.live: RoutedWeights | None = None  # the routed stage computing now (its unused prefetches counted later)
        self.expert_staging: torch.Tensor | None = None  # host buffer of routed expert reads, reused (pinned on CUDA)
        self.expert_staged = 0  # CPU: bytes of it the live stage's experts use
        self.expert_entries: dict[int, dict[int, dict]] = {}  # stage -> expert -> tensor entries (_expert_entries)
        self.expert_copied: torch.cuda.Event | None = None  # CUDA: the last copy out of it queued
        self.expert_unmade: list[StagedExpert] = []  # the experts read into it (see _expert_staging)
        self.routing = routing or RoutingFiles(self.dir)  # where the counts come from and go (experts.py)
        if self.expert_cache:  # an earlier run's routing counts: the hot experts are read before the first step
            self.expert_cache.warm_start(self.routing.load(self.m, self.routed), lambda k: self._read_expert(*k))
        # streamed layers read without `skip_tensors`: stage -> (byte runs to read, bytes skipped)
        # (skip_tensors: stage -> tensor names, or None)
        self.skip_tensors = {i: frozenset(skip_tensors(i)) if skip_tensors else frozenset() for i in self.streamed}
        self.partial = {i: r for i in sorted(self.streamed) if self.skip_tensors[i] and placement[i] == "disk"
                        for r in [kept_runs(self.m.files[self.m.stages[i]], self.skip_tensors[i])] if r[1]}
        max_bytes = max((self.routed[i][0] if i in self.routed else self.m.files[self.m.stages[i]].size
                         for i in self.streamed), default=0)  # a routed MoE layer's ring slot holds no experts
        host_ring = any(placement[i] == "disk" for i in self.streamed) and not self.direct_to_device
        self.slots = [Slot(max_bytes, device, pinned=self.cuda, host=host_ring) for _ in range(prefetch + 1)] \
            if max_bytes else []
        self.free_slots = deque(self.slots)
        self.inflight: deque[tuple[int, Slot, Future]] = deque()
        self.current: Slot | None = None
        self._load_resident()
        self._fill()

    # ---------------------------------------------------------------- public schedule interface
    def get(self, stage: int) -> dict[str, torch.Tensor]:
        """Weights of `stage` on the compute device; frees the previous streamed stage's slot."""
        self._release_current()
        if self.live is not None:
            self.live, live = None, self.live
            live.finish()
        if stage not in self.streamed:
            self._fill()
            return self.resident[stage]
        if not self.inflight or self.inflight[0][0] != stage:
            raise RuntimeError(f"stage {stage} requested out of schedule order (expected "
                               f"{self.inflight[0][0] if self.inflight else 'none'})")
        _, slot, fut = self.inflight.popleft()
        t0 = time.perf_counter()
        fut.result()  # host read (and async device copy issue) done
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        if self.timings is not None:
            self.timings.add("load_weight_stall", time.perf_counter() - t0)
        self.current = slot
        self._fill()
        return self._views(stage, slot.dev if self.cuda else slot.host)

    def close(self) -> None:
        if self.live is not None:
            self.live, live = None, self.live
            live.finish()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.task_pool.shutdown(wait=True, cancel_futures=True)
        if self.expert_cache and self.expert_cache.hits + self.expert_cache.misses:
            self.routing.save(self.m, self.expert_cache.counts)  # the next run's cache starts warm

    # ---------------------------------------------------------------- internals
    def _release_current(self) -> None:
        if self.current is None:
            return
        if self.cuda:
            self.current.free = torch.cuda.Event()
            self.current.free.record(torch.cuda.current_stream(self.device))
        self.free_slots.append(self.current)
        self.current = None

    def _fill(self) -> None:
        """Submit reads for upcoming streamed stages while a slot is free."""
        while self.free_slots:
            stage = next(self.order, None)
            if stage is None:
                return
            if stage not in self.streamed:
                continue
            slot = self.free_slots.popleft()
            self.inflight.append((stage, slot, self.pool.submit(self._read_stage, stage, slot)))

    def _read_stage(self, stage: int, slot: Slot) -> None:
        """Bring one stage into `slot`: disk -> pinned host -> device (CUDA), or disk -> host (CPU)."""
        name = self.m.stages[stage]
        size = self.routed[stage][0] if stage in self.routed else self.m.files[name].size
        t0 = time.perf_counter()
        if self.cuda and slot.free is not None:
            slot.free.synchronize()  # compute has finished with this slot's previous stage
        src = self.host_resident.get(stage)
        if src is None:
            dest = slot.dev if self.direct_to_device else slot.host
            if stage in self.partial:
                for start, end in self.partial[stage][0]:
                    self._read_parallel(self.dir / name, dest[start:end], start)
            else:
                self._read_parallel(self.dir / name, dest[:size])
            src = slot.host
        if self.cuda and not (self.direct_to_device and stage not in self.host_resident):
            with torch.cuda.stream(self.copy_stream):
                slot.dev[:size].copy_(src[:size], non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
            slot.ready.synchronize()  # the host slot may be refilled only after the copy drained it
        elif self.cuda:
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.copy_stream)
        if self.timings is not None:
            read = sum(b - a for a, b in self.partial[stage][0]) if stage in self.partial else size
            skipped = size - read  # a dense read's bytes = read + skipped
            self.timings.add("load_weight", time.perf_counter() - t0, bytes=read)
            if skipped:
                self.timings.add("load_weight_skipped", 0.0, bytes=skipped)

    def _read_parallel(self, path: Path, dest: torch.Tensor, base: int = 0) -> None:
        """Split one read (file bytes from `base`) into `task_bytes` tasks run on the reader pool's spare threads."""
        size = dest.numel()
        tasks = [(off, min(self.task_bytes, size - off)) for off in range(0, size, self.task_bytes)]
        if not tasks:  # an empty stage: OPT's head without final LayerNorm, projection or own lm_head
            return
        subs = [self.task_pool.submit(self.reader.read_into, path, base + off, dest[off:off + n])
                for off, n in tasks[1:]]
        self.reader.read_into(path, base, dest[:tasks[0][1]])
        for sub in subs:
            sub.result()

    def _views(self, stage: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensor views into a stage buffer, cast to the compute dtype where the store differs;
        quantized matrices are dequantized here, on `buf`'s device."""
        routed, skip = stage in self.routed, self.skip_tensors[stage] if stage in self.partial else ()
        out = self._typed(buf, {n: e for n, e in self.m.files[self.m.stages[stage]].tensors.items()
                                if not (routed and expert_of(n) is not None) and n not in skip})
        if not routed:
            return out
        early = EarlyReads(lambda j: self._fetch_expert(stage, j), lambda j: self._kept(stage, j),
                           lambda j, t: self._confirm_expert(stage, j, t),
                           lambda j: self.routed[stage][1][j][1] - self.routed[stage][1][j][0],
                           self.expert_prefetch) if self.expert_prefetch else None
        if not self.cuda:  # the previous stage's experts are done with: the staging buffer is reused once the
            for staged in self.expert_unmade:  # reads of any it never used have landed
                staged.wait()
            self.expert_unmade, self.expert_staged = [], 0
        self.live = RoutedWeights(out, lambda j: self._read_expert(stage, j), self.task_pool, early,
                                  lambda js: self._read_experts(stage, js))
        return self.live

    def _typed(self, buf: torch.Tensor, entries: dict, base: int = 0) -> dict[str, torch.Tensor]:
        """Views of `entries` in `buf` (which holds the file from byte `base`), dequantized / cast as stored."""
        out = {}
        for tname, e in entries.items():
            t = buf[e.offset - base:e.offset - base + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape)
            packed = tname.endswith((".scale", ".zero"))
            out[tname] = t.to(self.dtype) if t.dtype != self.dtype and t.is_floating_point() and not packed else t
        if self.quant is None or not any(k.endswith(".q") for k in out):
            return out
        t0 = time.perf_counter()
        out = dequantize_named(out, self.quant, self.dtype)
        if self.timings is not None:
            self.timings.add("dequant_weight_issue", time.perf_counter() - t0)
        return out

    def _read_expert(self, stage: int, j: int) -> dict[str, torch.Tensor]:
        """Expert j of a routed MoE stage: one read of its contiguous bytes, then onto the compute device."""
        cache = self.expert_cache
        with self.lock:
            kept = cache.get((stage, j)) if cache else None
        if kept is not None:
            if self.timings is not None:
                self.timings.add("expert_cache_hit", 0.0)
            return kept
        return self._keep(stage, j, self._fetch_expert(stage, j))

    def _read_experts(self, stage: int, experts: list[int]) -> dict[int, StagedExpert]:
        """Experts `experts` of a routed MoE stage, read together: hot-cache hits come back as they are; the rest
        are coalesced into runs (experts adjacent in the file, apart only by alignment padding, share one run), the
        runs land back to back in one reused page-aligned host buffer (pinned on CUDA), cut into reads of up to
        `task_bytes` (smaller where that keeps every reader thread busy), and every read is submitted at once on the
        reader pool, as a whole layer's are. Each expert's tensors are made on the computing thread at its first use
        (`StagedExpert`), once the reads covering its bytes are done."""
        out: dict[int, StagedExpert] = {}
        todo = []
        for j in experts:
            with self.lock:
                kept = self.expert_cache.get((stage, j)) if self.expert_cache else None
            if kept is None:
                todo.append(j)
                continue
            if self.timings is not None:
                self.timings.add("expert_cache_hit", 0.0)
            out[j] = StagedExpert([], lambda kept=kept: kept)
        if not todo:
            return out
        name = self.m.stages[stage]
        path, size, ranges = self.dir / name, self.m.files[name].size, self.routed[stage][1]
        runs = [(start, min(_up(end), size) - start, js)  # whole 4 KiB blocks where the file has them
                for start, end, js in expert_runs(ranges, todo, EXPERT_GAP)]
        total = sum(_up(n) for _, n, _ in runs)
        task = max(ALIGN, min(self.task_bytes, max(1 << 20, -(-total // self.threads))) // ALIGN * ALIGN)
        staging = self._expert_staging(total)
        t0 = time.perf_counter()
        nbytes = sum(ranges[j][1] - ranges[j][0] for j in todo)
        left = [sum(-(-n // task) for _, n, _ in runs)]
        done_lock = threading.Lock()

        def read(off: int, dest: torch.Tensor) -> None:
            self.reader_host.read_into(path, off, dest)
            with done_lock:
                left[0] -= 1
                last = left[0] == 0
            if last and self.timings is not None:  # the set's read time, shared out over its experts by bytes
                wall = time.perf_counter() - t0
                for j in todo:
                    self.timings.add("load_expert", wall * (ranges[j][1] - ranges[j][0]) / nbytes,
                                     bytes=ranges[j][1] - ranges[j][0])  # not a layer's read

        at = 0  # where the run lands in the staging buffer
        for start, n, js in runs:
            reads = [(off, self.task_pool.submit(read, start + off, staging[at + off:at + min(n, off + task)]))
                     for off in range(0, n, task)]
            for j in js:
                a, b = ranges[j][0] - start, ranges[j][1] - start
                out[j] = StagedExpert([f for off, f in reads if off < b and off + task > a],
                                      lambda j=j, host=staging[at + a:at + b]: self._make_expert(stage, j, host))
            at += _up(n)
        self.expert_unmade += [out[j] for j in todo]
        return out

    def _expert_staging(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of the page-aligned host buffer routed expert reads land in (O_DIRECT reads without a bounce),
        kept and reused, grown as needed. On CUDA (pinned) it is reused by every batch once the experts read into it
        before have been copied to the device. On a CPU the experts' tensors are views of it: a stage's batches take
        successive parts, and it is reused from the start when the next stage is handed out (its experts are done
        with; the hot cache keeps copies)."""
        if self.cuda:
            for staged in self.expert_unmade:
                staged.result()  # an expert of the previous batch never used yet: made (copied out) before reuse
            self.expert_unmade = []
            if self.expert_copied is not None:
                self.expert_copied.synchronize()  # the previous batch's copies to the device have drained it
            if self.expert_staging is None or self.expert_staging.numel() < nbytes:
                size = self._staging_size(nbytes)
                self.expert_staging = None  # the old registration goes before the new one is made
                self.expert_staging = pinned_empty(size, torch.uint8, pinned=True)
            return self.expert_staging[:nbytes]
        if self.expert_staging is None or self.expert_staging.numel() < self.expert_staged + nbytes:
            # the stage's earlier batches keep the old buffer alive through their views; the next stage reuses this
            self.expert_staging, self.expert_staged = _aligned(self._staging_size(self.expert_staged + nbytes)), 0
        at, self.expert_staged = self.expert_staged, self.expert_staged + nbytes
        return self.expert_staging[at:at + nbytes]

    def _staging_size(self, nbytes: int) -> int:
        """The staging buffer's new size for `nbytes`: at least twice the old one (few regrowths, each a new page
        registration on CUDA), at most the largest routed layer file (what any stage's experts can take)."""
        old = self.expert_staging.numel() if self.expert_staging is not None else 0
        cap = max(self.m.files[self.m.stages[i]].size for i in self.routed)
        return max(nbytes, min(2 * old, _up(cap)))

    def _make_expert(self, stage: int, j: int, host: torch.Tensor) -> dict[str, torch.Tensor]:
        """Expert j's tensors from its bytes in the staging buffer: onto the compute device (on CUDA a copy queued on
        the compute stream; on a CPU views, copied where the hot cache keeps them), typed, offered to the hot cache."""
        start = self.routed[stage][1][j][0]
        if self.cuda:
            buf = host.to(self.device, non_blocking=True)
            self.expert_copied = torch.cuda.Event()
            self.expert_copied.record()
        else:
            buf = host.clone() if self.expert_cache and self.expert_cache.budget else host
        return self._keep(stage, j, self._typed(buf, self._expert_entries(stage)[j], start))

    def _kept(self, stage: int, j: int) -> bool:
        with self.lock:
            return bool(self.expert_cache) and (stage, j) in self.expert_cache.kept

    def _confirm_expert(self, stage: int, j: int, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A prefetched expert the router picked: counted and kept by the hot cache as an on-demand read is."""
        with self.lock:
            kept = self.expert_cache.get((stage, j)) if self.expert_cache else None
        if kept is not None and self.timings is not None:
            self.timings.add("expert_cache_hit", 0.0)
        return kept if kept is not None else self._keep(stage, j, out)

    def _keep(self, stage: int, j: int, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.expert_cache:
            with self.lock:
                self.expert_cache.offer((stage, j), out)
        return out

    def _fetch_expert(self, stage: int, j: int) -> dict[str, torch.Tensor]:
        """Expert j's contiguous bytes read from disk, typed on the compute device (no hot-cache bookkeeping)."""
        name = self.m.stages[stage]
        start, end = self.routed[stage][1][j]
        t0 = time.perf_counter()
        host = torch.empty(end - start, dtype=torch.uint8)  # O_DIRECT reads reach it through their bounce buffer
        self.reader_host.read_into(self.dir / name, start, host)
        buf = host.to(self.device) if self.cuda else host  # synchronous: the host buffer is dropped after
        if self.timings is not None:
            self.timings.add("load_expert", time.perf_counter() - t0, bytes=end - start)  # not a layer's read
        return self._typed(buf, self._expert_entries(stage)[j], start)

    def _expert_entries(self, stage: int) -> dict[int, dict]:
        """Expert -> its tensors' manifest entries by name, for a routed stage (grouped once per stage)."""
        got = self.expert_entries.get(stage)
        if got is None:
            got = {}
            for n, e in self.m.files[self.m.stages[stage]].tensors.items():
                j = expert_of(n)
                if j is not None:
                    got.setdefault(j, {})[n] = e
            self.expert_entries[stage] = got
        return got

    def _load_resident(self) -> None:
        """Read resident stages once: 'gpu' ones onto the device, 'cpu' ones into host memory (pinned on CUDA)."""
        for stage, where in enumerate(self.placement):
            if where == "disk":
                continue
            name = self.m.stages[stage]
            size = self.m.files[name].size
            host = pinned_empty(size, torch.uint8, pinned=self.cuda)
            t0 = time.perf_counter()
            self.reader_host.read_into(self.dir / name, 0, host)
            if self.timings is not None:
                self.timings.add("load_weight_resident", time.perf_counter() - t0, bytes=size)
            if where == "cpu" and self.cuda:
                self.host_resident[stage] = host
            elif self.cuda:  # copy packed, dequantize on the GPU; own copies, so the raw buffer is freed
                dev = host.to(self.device)
                raw = dev.untyped_storage().data_ptr()
                self.resident[stage] = {k: v.clone() if v.untyped_storage().data_ptr() == raw else v
                                        for k, v in self._views(stage, dev).items()}
            else:
                self.resident[stage] = self._views(stage, host)


def _up(n: int) -> int:
    """n rounded up to whole 4 KiB blocks."""
    return -(-n // ALIGN) * ALIGN


def _aligned(nbytes: int) -> torch.Tensor:
    """Uninitialized host bytes starting on a 4 KiB boundary (O_DIRECT reads land in them without a bounce)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    at = -raw.data_ptr() % ALIGN
    return raw[at:at + nbytes]


def kept_runs(entry, skip: frozenset[str]) -> tuple[list[tuple[int, int]], int]:
    """([start, end) byte runs of a stage file holding every tensor not in `skip`, bytes skipped); ([], 0) when
    the stage has none of `skip`. Neighbouring kept tensors share a run (the alignment padding between them too)."""
    tensors = sorted(entry.tensors.items(), key=lambda kv: kv[1].offset)
    skipped = sum(e.nbytes for n, e in tensors if n in skip)
    if not skipped:
        return [], 0
    out: list[list[int]] = []
    gap = True  # a skipped tensor since the last kept one
    for name, e in tensors:
        if name in skip:
            gap = True
        elif gap or not out:
            out.append([e.offset, e.offset + e.nbytes])
            gap = False
        else:
            out[-1][1] = e.offset + e.nbytes
    return [(a, b) for a, b in out], skipped
