"""CPU decode attention against the host's memory bandwidth (issue 18, item 2: `offload.cpuAttention`).

One decode step of one layer reads every cached K and V byte once, so its floor is (K + V bytes) / read bandwidth.
For each thread count this prints the read bandwidth of a plain reduction over the same bytes (the floor's
bandwidth), the attention step's time and bytes/s through `engine.model.attention` on the cache layout the CPU
tier keeps (float32, [B, Nk, capacity, D], sliced to the tokens so far), and their ratio.

    .venv/bin/python bench/cpu_attention.py [--tokens 8192] [--batch 8] [--threads 1 2 ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "node-agent"))
from kubeflash_node.engine.model import Span, attention  # noqa: E402

SHAPES = {"opt-1.3b": (32, 32, 64), "llama-3-8b": (32, 8, 128)}  # query heads, KV heads, head size


def _best(fn, repeat: int) -> float:
    fn()  # warm-up: thread pool, page faults
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(shape: str, tokens: int, batch: int, threads: int, repeat: int) -> dict:
    nh, nk, d = SHAPES[shape]
    torch.set_num_threads(threads)
    cap = tokens + 32
    k = torch.randn(batch, nk, cap, d)
    v = torch.randn(batch, nk, cap, d)
    q = torch.randn(batch, nh, 1, d)
    span = Span(start=tokens - 1, first=(0,) * batch)
    kv_bytes = 2 * batch * nk * tokens * d * 4
    flat_k, flat_v = k[:, :, :tokens].contiguous(), v[:, :, :tokens].contiguous()
    stream_s = _best(lambda: (flat_k.sum(), flat_v.sum()), repeat)
    attn_s = _best(lambda: attention(q, k[:, :, :tokens], v[:, :, :tokens], span), repeat)
    return {"shape": shape, "tokens": tokens, "batch": batch, "threads": threads, "kv_bytes": kv_bytes,
            "stream_gbps": kv_bytes / stream_s / 1e9, "attention_s": attn_s, "attention_gbps": kv_bytes / attn_s / 1e9,
            "ratio": stream_s / attn_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="cached tokens per sequence (default 8192)")
    ap.add_argument("--batch", type=int, default=8, help="sequences in the micro-batch (default 8)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch thread counts to try (default 1, 2, 4, ... up to the CPU count)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions, the median is kept (default 5)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    n = os.cpu_count() or 1
    threads = args.threads or sorted({min(2 ** i, n) for i in range(8)} | {n})
    rows = []
    print(f"{'shape':<11} {'threads':>7} {'K+V MB':>8} {'read GB/s':>9} {'attn ms':>8} {'attn GB/s':>9} {'ratio':>6}")
    for shape in args.shapes:
        for t in threads:
            r = measure(shape, args.tokens, args.batch, t, args.repeat)
            rows.append(r)
            print(f"{shape:<11} {t:>7} {r['kv_bytes'] / 1e6:>8.0f} {r['stream_gbps']:>9.2f} "
                  f"{r['attention_s'] * 1e3:>8.1f} {r['attention_gbps']:>9.2f} {r['ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
