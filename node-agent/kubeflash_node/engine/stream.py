"""The weight streamer: reads stage files ahead of compute into a bounded ring of buffers.

It follows the schedule's stage order (an iterator given up front), keeps at most `prefetch` stages in
flight beyond the one computing, and hands out weight dicts already on the compute device. On CUDA a stage
goes disk -> pinned host slot (reader threads) -> device slot (copy stream), and the compute stream waits
on a CUDA event, never on the host. Resident stages ('gpu'/'cpu' placement) are read once and kept.
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
from .io import make_reader

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int8": torch.int8, "uint8": torch.uint8}


class Slot:
    """One stage's buffers: a host buffer (pinned on CUDA) and, on CUDA, a device buffer."""

    def __init__(self, nbytes: int, device: torch.device, pinned: bool):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device) if device.type == "cuda" else None
        self.ready: torch.cuda.Event | None = None  # device copy done (CUDA)
        self.free: torch.cuda.Event | None = None  # compute finished with the device buffer (CUDA)


class WeightStreamer:
    """Stage weights on demand, `prefetch` stages ahead, in the order the schedule will ask for them."""

    def __init__(self, model_dir: Path, manifest: Manifest, *, device: torch.device, dtype: torch.dtype,
                 placement: list[str], order: Iterator[int], prefetch: int = 2, threads: int = 4,
                 task_bytes: int = 16 << 20, backend: str = "auto", timings=None):
        self.dir, self.m, self.device, self.dtype = Path(model_dir), manifest, device, dtype
        self.placement, self.order, self.prefetch = placement, order, prefetch
        self.task_bytes, self.timings = task_bytes, timings
        self.cuda = device.type == "cuda"
        self.reader = make_reader(backend, cuda=self.cuda)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kf-read")
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.lock = threading.Lock()
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        max_bytes = max(self.m.files[s].size for i, s in enumerate(self.m.stages) if placement[i] == "disk") \
            if "disk" in placement else 0
        self.slots = [Slot(max_bytes, device, self.cuda) for _ in range(prefetch + 1)] if max_bytes else []
        self.free_slots = deque(self.slots)
        self.inflight: deque[tuple[int, Slot, Future]] = deque()
        self.current: Slot | None = None
        self._load_resident()
        self._fill()

    # ---------------------------------------------------------------- public schedule interface
    def get(self, stage: int) -> dict[str, torch.Tensor]:
        """Weights of `stage` on the compute device; frees the previous streamed stage's slot."""
        self._release_current()
        if self.placement[stage] != "disk":
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
        self.pool.shutdown(wait=True, cancel_futures=True)

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
            if self.placement[stage] != "disk":
                continue
            slot = self.free_slots.popleft()
            self.inflight.append((stage, slot, self.pool.submit(self._read_stage, stage, slot)))

    def _read_stage(self, stage: int, slot: Slot) -> None:
        name = self.m.stages[stage]
        size = self.m.files[name].size
        t0 = time.perf_counter()
        tasks = [(off, min(self.task_bytes, size - off)) for off in range(0, size, self.task_bytes)]
        if len(tasks) == 1:
            self.reader.read_into(self.dir / name, 0, slot.host[:size])
        else:  # split into parallel tasks on the same pool's spare threads
            subs = [self.pool.submit(self.reader.read_into, self.dir / name, off, slot.host[off:off + n])
                    for off, n in tasks[1:]]
            self.reader.read_into(self.dir / name, 0, slot.host[:tasks[0][1]])
            for s in subs:
                s.result()
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if slot.free is not None:
                    self.copy_stream.wait_event(slot.free)
                slot.dev[:size].copy_(slot.host[:size], non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
            slot.ready.synchronize()  # the host slot may be refilled only after the copy drained it
        if self.timings is not None:
            self.timings.add("load_weight", time.perf_counter() - t0, bytes=size)

    def _views(self, stage: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensor views into a stage buffer, cast to the compute dtype where the store differs."""
        out = {}
        for tname, e in self.m.files[self.m.stages[stage]].tensors.items():
            t = buf[e.offset:e.offset + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape)
            out[tname] = t.to(self.dtype) if t.dtype != self.dtype and t.is_floating_point() else t
        return out

    def _load_resident(self) -> None:
        for stage, where in enumerate(self.placement):
            if where == "disk":
                continue
            name = self.m.stages[stage]
            size = self.m.files[name].size
            host = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            t0 = time.perf_counter()
            self.reader.read_into(self.dir / name, 0, host)
            if self.timings is not None:
                self.timings.add("load_weight_resident", time.perf_counter() - t0, bytes=size)
            views = self._views(stage, host)
            if where == "gpu" or not self.cuda:
                views = {k: v.to(self.device) for k, v in views.items()}
                self.resident[stage] = views
            else:  # 'cpu' on CUDA: pinned host copy, moved per use
                self.resident[stage] = _HostResident(views, self.device)


class _HostResident(dict):
    """Weights kept in pinned host memory and copied to the device when the schedule asks for them."""

    def __init__(self, views: dict[str, torch.Tensor], device: torch.device):
        super().__init__({k: v.pin_memory() if not v.is_pinned() else v for k, v in views.items()})
        self.device = device

    def __getitem__(self, k):
        return super().__getitem__(k).to(self.device, non_blocking=True)

    def get(self, k, default=None):
        return self[k] if k in self else default
