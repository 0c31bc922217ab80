"""Does the disk probe's read pattern read slower than the engine's? Cold O_DIRECT reads of one file.

    .venv/bin/python bench/disk_pattern.py FILE [--reps 3]   (a few GB of existing data; its pages dropped each time)

Patterns: 64 MiB tasks into torch.empty buffers (64-byte aligned, so io.ODirectReader reads through its bounce
buffer and copies: what `measure_disk_files` did until session 11) against page-aligned buffers (what the engine's
pinned slots are and the probe now uses), at 16 reads in flight, and 16 MiB tasks at 10 in flight (the engine: 8
reader threads + 2 prefetched stages). Prints GB/s per pattern and repetition.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kubeflash_node.engine.bench import aligned_buffer, drop_page_cache
from kubeflash_node.engine.io import make_reader

PATTERNS = [(16, 64 << 20, False), (16, 64 << 20, True), (10, 16 << 20, False), (10, 16 << 20, True),
            (16, 16 << 20, True)]  # (reads in flight, task bytes, page-aligned)


def read_rate(path: str, threads: int, task: int, aligned: bool) -> float:
    size, reader = os.path.getsize(path), make_reader("odirect")
    drop_page_cache([path])
    bufs = [aligned_buffer(task) if aligned else torch.empty(task, dtype=torch.uint8) for _ in range(threads)]
    offs = list(range(0, size, task))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: reader.read_into(path, offs[i], bufs[i % threads][:min(task, size - offs[i])]),
                      range(len(offs))))
    return size / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    for rep in range(args.reps):
        for threads, task, aligned in PATTERNS:
            rate = read_rate(args.file, threads, task, aligned)
            print(f"rep {rep}: {threads} in flight, {task >> 20} MiB tasks, {'page-aligned' if aligned else 'torch.empty'}"
                  f": {rate:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
