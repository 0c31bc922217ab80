"""Memory sizes the engine plans and runs within: the size parser for CLI flags, this machine's GPU total and
available host memory, and the cap on the CUDA caching allocator.

Not a CLI module: `job.py` (the engine's core) and every `cli_*` module read these from here. Torch is imported
only inside the functions that need a GPU.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from kubeflash_api.quantity import MAX_BYTES

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(s: str) -> int:
    """`5GiB`, `5Gi`, `64G`, `500MiB`, `1073741824` -> bytes (at most 1 EiB)."""
    m = re.fullmatch(r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*([kmgt]i?)?b?\s*", str(s).lower())
    if not m:
        raise ValueError(f"{s!r} is not a size; expected something like 5GiB, 64G or 500MiB")
    n = int(Fraction(m.group(1)) * _UNITS[m.group(2) or ""])  # exact: no float overflow for 400 digits
    if n > MAX_BYTES:
        raise ValueError(f"{s!r} is past 1 EiB; expected something like 5GiB, 64G or 500MiB")
    return n


def gpu_total() -> int:
    """Total memory of CUDA device 0 in bytes; a ValueError naming --gpu-memory where there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("no GPU here: pass --gpu-memory (the GPU the job will run on, e.g. 80GiB)")
    return torch.cuda.get_device_properties(0).total_memory


def mem_available() -> int:
    """Host memory available to new allocations (/proc/meminfo MemAvailable), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("cannot read MemAvailable: pass --cpu-memory")


def cap_gpu_allocator(nbytes: int, device: str = "cuda") -> None:
    """Cap this process's CUDA caching allocator on `device` at `nbytes`: an allocation beyond it fails as out of
    memory (what `--gpu-memory` and spec.resources.gpuMemory promise)."""
    import torch

    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), idx)
