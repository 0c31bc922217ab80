"""Time page-locked host allocation (engine/pinned.py) the way a KV cache takes it: many equal buffers.

    python3 bench/pinned_probe.py --gb 24 --chunk-mb 250      # with and without transparent huge pages
Prints GB/s for each mode; the cost model's Calibration.host_lock_gbps is this rate."""

from __future__ import annotations

import argparse
import gc
import time

import torch

from kubeflash_node.engine import pinned


def lock(total: int, chunk: int) -> float:
    t0 = time.perf_counter()
    bufs = [pinned.empty(chunk, torch.uint8) for _ in range(total // chunk)]
    dt = time.perf_counter() - t0
    del bufs
    gc.collect()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0, help="total bytes to lock, in GB")
    ap.add_argument("--chunk-mb", type=int, default=256, help="size of each buffer, in MB")
    a = ap.parse_args()
    total, chunk = int(a.gb * 1e9), a.chunk_mb * 1_000_000
    torch.cuda.init()
    huge = pinned.HUGE
    for mode in ("huge pages", "4 KiB pages"):
        pinned.HUGE = huge if mode == "huge pages" else 1 << 62  # above every buffer: the 4 KiB path
        dt = lock(total, chunk)
        print(f"{mode}: {total / 1e9:.1f} GB in {total // chunk} buffers: {dt:.2f} s, {total / dt / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
