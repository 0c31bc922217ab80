"""What the peer-benchmark runners share: the --gpu-memory budget, a cold page cache, the JSON result."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """`12GiB`, `12Gi`, `12G`, `500MiB`, `1073741824` -> bytes (the sizes `kubeflash` accepts); an argparse type."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 12GiB, 12G or 500MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def cap_gpu_memory(cap_bytes: int | None) -> int | None:
    """Limit this process's CUDA caching allocator on GPU 0 to `cap_bytes` (None: no cap). Call it before
    anything is allocated on the GPU. Returns the cap in bytes, or None."""
    import torch

    if cap_bytes is None:
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    if cap_bytes > total:
        raise SystemExit(f"--gpu-memory {cap_bytes / 2**30:.2f} GiB exceeds the GPU's {total / 2**30:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, 0)
    return cap_bytes


def drop_page_cache(folder: Path) -> str:
    """Flush dirty pages, then drop the page cache (root: all of it through /proc/sys/vm/drop_caches; otherwise
    POSIX_FADV_DONTNEED on every file under `folder`), so the next reads come from the disk, as in
    `kubeflash bench --cold`. Returns how: "drop_caches" or "fadvise"."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in (p for p in Path(folder).rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def write_result(path: Path, result: dict) -> None:
    """Write `result` as indented JSON (parent folders created) and print its one-line summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    peak = result["gpu_peak_bytes"]
    projected = " (projected)" if result.get("projected") else ""
    print(f"{result['system']} {result['model']}: {result['prompts']} prompts x {result['prompt_len']} tokens, "
          f"{result['gen_len']} generated each: {result['total_s']:.2f} s{projected}, "
          f"{result['tokens_per_s']:.3f} generated tokens/s, GPU peak "
          f"{'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'} -> {path}")
