"""Machine ceilings (disk, PCIe, GPU matmul) and the roofline floor of a workload.

The floor is max(disk bytes / disk bandwidth, PCIe bytes / H2D bandwidth, FLOPs / GPU rate); efficiency is
floor / measured time. Ceilings are measured here, on this machine, never assumed.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..store.modelconfig import ModelConfig
from .ceilings import Ceilings  # measured here; the class lives torch-free in ceilings.py

GB = 1e9


def drop_file_pages(paths) -> None:
    """fadvise DONTNEED on each file of `paths`: its clean pages leave the page cache, the next reads come from
    the disk (dirty pages stay: sync first where the files were just written)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache(paths: list[Path] = ()) -> str:
    """Drop the page cache (root: all of it; otherwise fadvise DONTNEED on `paths`). Returns what was done."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        drop_file_pages(paths)
        return "fadvise"


def _write_probe(path: Path, size: int) -> float:
    """Write `size` bytes with O_DIRECT (falling back to buffered) and fsync; returns GB/s."""
    import mmap

    block = 16 << 20
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(1 << 20) * 16)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError:
        fd = os.open(path, flags, 0o600)
    t0 = time.perf_counter()
    try:
        for off in range(0, size, block):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / (time.perf_counter() - t0) / GB


def aligned_buffer(n: int) -> torch.Tensor:
    """n bytes of page-aligned host memory (an anonymous mmap), as the engine's pinned slots are: O_DIRECT reads land
    in it directly, where a torch.empty buffer (64-byte aligned) goes through io's bounce buffer and a copy that
    the engine's reads never make."""
    import mmap

    return torch.frombuffer(mmap.mmap(-1, n), dtype=torch.uint8)


def _read_probe(path: Path, size: int, threads: int, backend: str) -> float:
    from .io import make_reader

    reader = make_reader(backend)
    task = 16 << 20
    bufs = [aligned_buffer(task) for _ in range(threads)]
    offsets = list(range(0, size, task))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: reader.read_into(path, offsets[i], bufs[i % threads][:min(task, size - offsets[i])]),
                      range(len(offsets))))
    return size / (time.perf_counter() - t0) / GB


def measure_disk(directory: Path, size: int = 2 << 30, thread_options=(1, 4, 8, 16)) -> dict:
    """Sequential write, cold read (O_DIRECT, best thread count) and warm read (page cache) of a probe file."""
    from .io import odirect_supported

    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".kubeflash-disk-probe"
    out = {"disk_write": _write_probe(probe, size)}
    direct = odirect_supported(probe)
    best, best_t = 0.0, 0
    for t in thread_options:
        drop_page_cache([probe])
        bw = _read_probe(probe, size, t, "odirect" if direct else "posix")
        if bw > best:
            best, best_t = bw, t
    out |= {"disk_read_cold": best, "disk_read_threads": best_t}
    out["disk_read_op_s"] = measure_read_op(probe)
    _read_probe(probe, size, 4, "posix")  # bring it into the page cache
    out["disk_read_warm"] = _read_probe(probe, size, 4, "posix")
    probe.unlink(missing_ok=True)
    return out


def measure_read_op(path: Path, *, sizes: tuple[int, int] = (4096, 65536), reads: int = 256) -> float:
    """Seconds one read adds on top of its bytes, as the neuron bundle reader reads (buffered preadv, ascending
    offsets spread over the file, its pages dropped from the page cache first): the intercept of the time a read takes against its
    size, from `reads` reads of each of two sizes. What costmodel prices a read of a run of neurons at."""
    import random

    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    per = []
    try:
        for n in sizes:
            slots = max(1, (size - n) // 4096)
            offs = sorted(random.Random(n).sample(range(slots), min(reads, slots)))
            buf = bytearray(n)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages only
            t0 = time.perf_counter()
            for o in offs:
                os.preadv(fd, [buf], o * 4096)
            per.append((time.perf_counter() - t0) / len(offs))
    finally:
        os.close(fd)
    (s0, s1), (t0, t1) = sizes, per
    return max(1e-7, (t0 * s1 - t1 * s0) / (s1 - s0))  # t = op + bytes / rate, solved at the two sizes


def measure_disk_files(files: list[Path], *, max_bytes: int = 16 << 30, thread_options=(8, 16),
                       task_options=(64 << 20,)) -> dict:
    """Cold O_DIRECT read rate of existing files (e.g. the model's own layer files), into page-aligned buffers as
    the engine's slots are: the best over thread counts (reads in flight) and task sizes. `kubeflash bench --cold`
    passes the run's own pattern (its reader threads + prefetched stages, its task size), so the rate that prices
    the run is the one its reads can reach (docs/benchmarks.md, "Cost model against the GPU runs").
    16 GB by default: on the H100 machine's virtio disk a 4 GB probe read 1.27-1.41 GB/s where a 16 GB one and
    the 10-minute runs themselves read 1.6-1.7 GB/s (docs/benchmarks.md)."""
    from .io import make_reader, odirect_supported

    chunks, total = [], 0
    for f in files:
        size = f.stat().st_size
        chunks += [(f, off, min(64 << 20, size - off)) for off in range(0, size, 64 << 20)]
        total += size
        if total >= max_bytes:
            break
    direct = odirect_supported(files[0])
    reader = make_reader("odirect" if direct else "posix")
    best = (0.0, 0, 0)
    for threads in thread_options:
        for task in task_options:
            drop_page_cache(files)
            tasks = [(f, off + o, min(task, n - o)) for f, off, n in chunks for o in range(0, n, task)]
            bufs = [aligned_buffer(task) for _ in range(threads)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda t: reader.read_into(t[0][0], t[0][1], t[1][:t[0][2]]),
                              ((t, bufs[i % threads]) for i, t in enumerate(tasks))))
            bw = sum(t[2] for t in tasks) / (time.perf_counter() - t0) / GB
            if bw > best[0]:
                best = (bw, threads, task)
    return {"disk_read_cold": best[0], "disk_read_threads": best[1], "disk_read_task_bytes": best[2],
            "disk_probe_bytes": sum(c[2] for c in chunks)}


def measure_pcie(nbytes: int = 1 << 30) -> dict:
    if not torch.cuda.is_available():
        return {}
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)

    def rate(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return 3 * nbytes / (time.perf_counter() - t0) / GB

    return {"h2d_pinned": rate(lambda: dev.copy_(pinned, non_blocking=True)),
            "h2d_pageable": rate(lambda: dev.copy_(pageable)),
            "d2h_pinned": rate(lambda: pinned.copy_(dev, non_blocking=True))}


def measure_matmul(n: int = 8192, dtype=torch.float16) -> dict:
    if not torch.cuda.is_available():
        return {}
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return {"matmul_tflops": 10 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e12}


def measure_ceilings(directory: Path, *, disk_bytes: int = 2 << 30) -> Ceilings:
    c = Ceilings()
    for part in (measure_disk(directory, disk_bytes), measure_pcie(), measure_matmul()):
        for k, v in part.items():
            setattr(c, k, v)
    return c


@dataclass
class Workload:
    """What one benchmark run does."""

    prompts: int
    prompt_len: int
    gen_len: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.prompts // self.block_size)

    @property
    def passes(self) -> int:
        """Passes over every stage's weights: one per generated token per block (the first is prefill)."""
        return self.blocks * self.gen_len


def workload_flops(c: ModelConfig, w: Workload) -> float:
    """Matmul FLOPs of the whole run (prefill over every prompt token, then each decode token)."""
    per_seq = sum(c.layer_flops_per_token(t + 1) for t in range(w.prompt_len)) * c.num_layers
    per_seq += sum(c.layer_flops_per_token(w.prompt_len + s + 1) for s in range(w.gen_len - 1)) * c.num_layers
    per_seq += w.gen_len * 2 * c.hidden_size * c.vocab_size  # lm head on the last position of each step
    return per_seq * w.prompts


def roofline(*, stage_bytes: list[int], placement: list[str], w: Workload, c: ModelConfig, ceil: Ceilings,
             policy, itemsize: int, phase_s: tuple[float, float] | None = None, routing=None) -> dict:
    """Bytes and FLOPs the run must move and do under `policy`'s placement and KV techniques, and the time floor
    each implies. The disk term's rate is the faster of the probe's and, given the run's measured (prefill,
    decode) seconds `phase_s`, the rate its own reads reached in either phase (that phase's disk bytes over its
    time, a lower bound of the disk's rate): the disk term then never exceeds prefill + decode time, where the
    probe alone (another access pattern, another minute) has read up to 1.35x slower than the runs. A streamed MoE
    layer's routed experts: under `routing` (costmodel.RoutingProfile, measured) where given, else uniform routing."""
    from .costmodel import kv_link_bytes, routed_layer_bytes

    sizes = [min(w.block_size, w.prompts - k) for k in range(0, w.prompts, w.block_size)]

    def moved(i: int, b: int) -> tuple[float, float]:
        """(prefill, decode) bytes stage i moves over the run: every pass reads it whole, except a streamed MoE
        layer, which reads its non-expert part and the experts a uniform router sends the pass's tokens to (the
        hot cache's share not read again)."""
        layer = len(stage_bytes) == c.num_layers + 2 and 0 < i <= c.num_layers  # embed, layers, head
        if not (layer and c.num_experts and not policy.all_experts):
            return b * w.blocks, b * w.blocks * (w.gen_len - 1)
        return (sum(routed_layer_bytes(c, b, policy, n * w.prompt_len, sequences=n, routing=routing) for n in sizes),
                sum((w.gen_len - 1) * routed_layer_bytes(c, b, policy, n, sequences=n, routing=routing) for n in sizes))

    streamed = [(moved(i, b), p) for i, (b, p) in enumerate(zip(stage_bytes, placement)) if p in ("disk", "cpu")]
    # the streamer reads its first prefetch + 1 stages while the engine is built, before the run (a routed MoE
    # layer's slot: its non-expert part), as costmodel._read_at_setup prices them
    first = [(i, b, p) for i, (b, p) in enumerate(zip(stage_bytes, placement)) if p in ("disk", "cpu")]
    early = [(b * (1 - c.expert_share()) if c.num_experts and not policy.all_experts and 0 < i <= c.num_layers else b, p)
             for i, b, p in first[:policy.prefetch + 1]] if w.prompts else []
    disk_w = [sum(m[k] for m, p in streamed if p == "disk") - (0 if k else sum(b for b, p in early if p == "disk"))
              for k in (0, 1)]
    pcie_w = round(sum(sum(m) for m, _ in streamed) - sum(b for b, _ in early))
    read_token, write_token = kv_link_bytes(c, policy, itemsize)
    # decode step s reads the prefix back (prompt_len + s tokens) and writes one token, per sequence
    kv_read = sum((w.prompt_len + s) for s in range(1, w.gen_len)) * read_token * w.prompts
    kv_prefill = w.prompt_len * write_token * w.prompts if w.gen_len > 1 else 0
    kv_decode = (kv_read + (w.gen_len - 1) * write_token * w.prompts) if w.gen_len > 1 else 0
    on_disk = policy.kv == "disk"
    disk_phase = [round(disk_w[0] + (kv_prefill if on_disk else 0)), round(disk_w[1] + (kv_decode if on_disk else 0))]
    disk_b = sum(disk_phase)
    pcie_b = pcie_w + (kv_prefill + kv_decode if policy.kv in ("cpu", "disk") else 0)
    flops = workload_flops(c, w)
    timed = phase_s is not None and all(t > 0 for b, t in zip(disk_phase, phase_s) if b)  # else no bound holds
    run_gbps = max((b / t / GB for b, t in zip(disk_phase, phase_s) if b), default=0.0) if timed else 0.0
    disk_gbps = max(ceil.disk_read_cold, run_gbps)
    t_disk = disk_b / (disk_gbps * GB) if disk_b and disk_gbps else 0.0
    t_pcie = pcie_b / (ceil.h2d_pinned * GB) if pcie_b and ceil.h2d_pinned else 0.0
    t_flops = flops / (ceil.matmul_tflops * 1e12) if ceil.matmul_tflops else 0.0
    floor = max(t_disk, t_pcie, t_flops)
    bound = {t_disk: "disk", t_pcie: "pcie", t_flops: "compute"}[floor] if floor else "unknown"
    return {"disk_bytes": disk_b, "disk_bytes_prefill": disk_phase[0], "disk_bytes_decode": disk_phase[1],
            "pcie_bytes": pcie_b, "flops": flops, "disk_read_probe_gbps": ceil.disk_read_cold,
            "disk_read_run_gbps": run_gbps, "disk_read_gbps": disk_gbps, "t_disk_s": t_disk, "t_pcie_s": t_pcie,
            "t_compute_s": t_flops, "floor_s": floor, "bound": bound}
