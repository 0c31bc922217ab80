"""Milliseconds a NeuronCache.rows call takes on a store's neuron bundles, for random active sets (no model run).

    .venv/bin/python bench/neuron_cache.py --store /tmp/spx/sd/store --share 0.5 --calls 150

Each call asks one layer (round robin) for a fresh random set of `--share` of its neurons as a decode step
would, with the window and merge gap given; prints the mean over `--calls` calls after one warm-up round.
The bundles come from the page cache when warm: this times the cache's bookkeeping and copies, not the disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kubeflash_node.engine.neurons import NeuronCache
from kubeflash_node.store.bundles import BundleReader


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="a model store with neuron bundles (kubeflash calibrate)")
    p.add_argument("--share", type=float, default=0.5, help="share of a layer's neurons active a call")
    p.add_argument("--calls", type=int, default=150)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--gap", type=int, default=13)
    a = p.parse_args()
    reader = BundleReader(a.store)
    layers = len(reader.fds)
    cache = NeuronCache(reader, num_layers=layers, device=torch.device("cpu"), dtype=torch.float32,
                        window=a.window, gap=a.gap)
    g = torch.Generator().manual_seed(0)

    def calls(n: int) -> None:
        for k in range(n):
            active = (torch.rand(reader.neurons, generator=g) < a.share).nonzero().squeeze(1)
            cache.rows(k % layers, active, decode=True)

    calls(layers)
    t0 = time.perf_counter()
    calls(a.calls)
    print(json.dumps({"ms_per_call": 1e3 * (time.perf_counter() - t0) / a.calls, "share": a.share, "gap": a.gap,
                      "window": a.window, "reads": reader.reads}))
    reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
