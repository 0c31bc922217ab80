"""`python -m kubeflash_node.agent.gpuprobe`: host<->device copy bandwidth of each CUDA GPU, as one JSON line.

A subprocess of the agent, so torch is loaded only here and only on nodes with GPUs. Pinned host memory,
CUDA events, the best of a few repetitions.
"""

from __future__ import annotations

import argparse
import json


def measure(index: int, nbytes: int, reps: int = 5) -> dict:
    import torch

    dev = torch.device("cuda", index)
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()  # host: [nbytes]
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    best = {"h2d": 0.0, "d2h": 0.0}
    with torch.cuda.device(dev):
        for _ in range(reps):
            for name, dst, src in (("h2d", gpu, host), ("d2h", host, gpu)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                best[name] = max(best[name], nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return {"index": index, "h2dGBps": round(best["h2d"], 3), "d2hGBps": round(best["d2h"], 3), "bytes": nbytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bytes", type=int, default=256 << 20)
    args = p.parse_args()
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(json.dumps([measure(i, args.bytes) for i in range(n)]))


if __name__ == "__main__":
    main()
