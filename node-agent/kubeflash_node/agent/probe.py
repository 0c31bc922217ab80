"""Short bandwidth probes per SSD (sequential write then read) and per GPU (host<->device), cached on disk.

Bounded in bytes and time (256 MiB / 2 s by default). Disk I/O uses O_DIRECT where the file system allows
it, else buffered writes + fsync and a page-cache drop before reading. GPU numbers come from a torch
subprocess (gpuprobe), so the agent itself never imports torch. Results are cached in
<stateDir>/probe.json keyed by device, so a restart skips the probe.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kubeflash_node.store.format import atomic_write_json

from .devices import Disk, Gpu

log = logging.getLogger(__name__)
BLOCK = 4 << 20
PROBE_PREFIX = ".probe-"


@dataclass(frozen=True)
class DiskProbe:
    read_gbps: float
    write_gbps: float
    method: str  # direct | buffered | skipped
    bytes: int


@dataclass(frozen=True)
class GpuProbe:
    h2d_gbps: float
    d2h_gbps: float
    bytes: int


def disk_key(d: Disk) -> str:
    return f"disk:{d.name}:{d.device or '-'}:{d.path}"


def gpu_key(g: Gpu) -> str:
    return f"gpu:{g.uuid or g.index}:{g.name}"


# ------------------------------------------------------------------------------------------------ disk


def probe_disk(path: Path, *, max_bytes: int, max_seconds: float) -> DiskProbe:
    """Write then read up to `max_bytes` sequentially in 4 MiB blocks, each phase at most max_seconds/2."""
    st = os.statvfs(path)
    size = min(max_bytes, st.f_bavail * st.f_frsize // 4) // BLOCK * BLOCK
    if size < BLOCK:
        return DiskProbe(0.0, 0.0, "skipped", 0)
    f = path / f"{PROBE_PREFIX}{os.getpid()}.tmp"
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(BLOCK))  # incompressible
    try:
        fd, direct = _open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            written, wsec = _write(fd, buf, size, max_seconds / 2)
        finally:
            os.close(fd)
        fd, _ = _open(f, os.O_RDONLY, direct=direct)
        try:
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            read, rsec = _read(fd, buf, written, max_seconds / 2)
        finally:
            os.close(fd)
    finally:
        f.unlink(missing_ok=True)
        buf.close()
    return DiskProbe(read_gbps=_gbps(read, rsec), write_gbps=_gbps(written, wsec),
                     method="direct" if direct else "buffered", bytes=written)


def _open(f: Path, flags: int, *, direct: bool = True) -> tuple[int, bool]:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(f, flags | os.O_DIRECT, 0o600), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system does not do O_DIRECT (tmpfs, overlay)
                raise
    return os.open(f, flags, 0o600), False


def _write(fd: int, buf: mmap.mmap, size: int, budget: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    done = 0
    while done < size and time.perf_counter() - t0 < budget:
        done += os.write(fd, buf)
    os.fsync(fd)
    return done, time.perf_counter() - t0


def _read(fd: int, buf: mmap.mmap, size: int, budget: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    done = 0
    while done < size and time.perf_counter() - t0 < budget:
        n = os.readv(fd, [buf])
        if n <= 0:
            break
        done += n
    return done, time.perf_counter() - t0


def _gbps(n: int, sec: float) -> float:
    return round(n / sec / 1e9, 3) if sec > 0 and n else 0.0


# ------------------------------------------------------------------------------------------------- gpu


def probe_gpus(gpus: list[Gpu], *, max_bytes: int, python: str = "") -> dict[int, GpuProbe]:
    """Host->device and device->host bandwidth per GPU index, measured by a torch subprocess; {} without CUDA."""
    real = [g for g in gpus if not g.fake]
    if not real:
        return {}
    cmd = [python or sys.executable, "-m", "kubeflash_node.agent.gpuprobe", "--bytes", str(max_bytes)]
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID")  # CUDA indices == NVML indices
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=True).stdout
        rows = json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        log.warning("GPU bandwidth probe failed", extra={"error": str(e)[-500:]})
        return {}
    return {int(r["index"]): GpuProbe(r["h2dGBps"], r["d2hGBps"], r["bytes"]) for r in rows}


# ----------------------------------------------------------------------------------------------- cache


class ProbeCache:
    """probe.json: {key: result} for every device probed so far; rewritten crash-safely."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, dict] = json.loads(path.read_text()).get("entries", {})
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, result) -> None:
        self.entries[key] = asdict(result) | {"probedAt": time.time()}
        atomic_write_json(self.path, {"version": 1, "entries": self.entries})


def measure(disks: list[Disk], gpus: list[Gpu], cache: ProbeCache, *, max_bytes: int, max_seconds: float,
            reprobe: bool = False, python: str = "") -> tuple[dict[str, DiskProbe], dict[int, GpuProbe]]:
    """Probe every device the cache does not know (all of them with reprobe); returns results by disk/gpu."""
    disk_out: dict[str, DiskProbe] = {}
    for d in disks:
        hit = None if reprobe else cache.get(disk_key(d))
        if hit is None:
            result = probe_disk(d.path, max_bytes=max_bytes, max_seconds=max_seconds)
            log.info("probed disk", extra={"disk": d.name, **asdict(result)})
            if result.method != "skipped":
                cache.put(disk_key(d), result)
        else:
            result = DiskProbe(hit["read_gbps"], hit["write_gbps"], hit["method"], hit["bytes"])
        disk_out[d.name] = result
    gpu_out: dict[int, GpuProbe] = {}
    todo = [g for g in gpus if reprobe or cache.get(gpu_key(g)) is None]
    fresh = probe_gpus(todo, max_bytes=max_bytes, python=python) if todo else {}
    for g in gpus:
        if g.index in fresh:
            cache.put(gpu_key(g), fresh[g.index])
            gpu_out[g.index] = fresh[g.index]
        elif (hit := cache.get(gpu_key(g))) is not None:
            gpu_out[g.index] = GpuProbe(hit["h2d_gbps"], hit["d2h_gbps"], hit["bytes"])
    return disk_out, gpu_out
