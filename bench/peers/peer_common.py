"""What the peer-benchmark runners share: the --gpu-memory budget, a cold page cache, the JSON result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kubeflash_node.engine.bench import drop_page_cache as _drop_page_cache
from kubeflash_node.engine.cli_plan import parse_size as _parse_size


def parse_size(text: str) -> int:
    """`12GiB`, `12Gi`, `12G`, `500MiB`, `1073741824` -> bytes (kubeflash's own parser); an argparse type."""
    try:
        return _parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 12GiB, 12G or 500MiB") from None


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
    """Flush and drop the page cache as `kubeflash bench --cold` does (root: all of it; otherwise fadvise
    DONTNEED on every file under `folder`), so the next reads come from the disk. Returns "drop_caches" or
    "fadvise"."""
    return _drop_page_cache([p for p in Path(folder).rglob("*") if p.is_file()])


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
