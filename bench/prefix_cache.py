"""Prefix KV cache on a GPU: a shared-prefix batch (N prompts = one D-token document + Q-token questions) run with
no prefix reuse, with the in-job shared tier and a cold node cache (first job), and with a warm node cache
(a second job, new engine, same SSD cache). Prints one JSON line per run: prefill seconds and tokens, total
seconds, the prefix-cache counters, and whether the tokens equal the no-cache run's.

Usage: python3 bench/prefix_cache.py --model dummy:llama-3-8b --store /tmp/pc/store --cache /tmp/pc/kv [--batch 64]
       [--drop-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--store", type=Path, default=Path("/tmp/pc/store"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pc/kv"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--doc", type=int, default=2048)
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="gpu_batch_size (num_gpu_batches covers all prompts)")
    ap.add_argument("--drop-cache", action="store_true",
                    help="drop the node cache's files from the page cache before the warm run (reads from the disk)")
    a = ap.parse_args()

    import torch

    from kubeflash_node.engine.bench import drop_file_pages
    from kubeflash_node.engine.generate import Engine, GenParams
    from kubeflash_node.engine.policy import Policy
    from kubeflash_node.engine.prefixcache import PrefixCache
    from kubeflash_node.store.convert import convert
    from kubeflash_node.store.kvblocks import KVBlockStore

    model_dir = a.store / "model"
    if not (model_dir / "manifest.json").exists():
        t0 = time.perf_counter()
        convert(a.model, model_dir, dtype="float16")
        print(json.dumps({"convert_s": time.perf_counter() - t0}), flush=True)
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(100, 30000, (a.doc,), generator=g).tolist()
    prompts = [doc + torch.randint(100, 30000, (a.question,), generator=g).tolist() for _ in range(a.prompts)]
    policy = Policy(gpu_batch_size=a.batch, num_gpu_batches=-(-a.prompts // a.batch), weights_gpu_percent=100)
    shutil.rmtree(a.cache, ignore_errors=True)
    base = None
    for label, store in (("no-cache", None), ("in-job+cold-node", True), ("warm-node", True)):
        if label == "warm-node" and a.drop_cache:
            os.sync()  # the blocks written are clean pages now, so DONTNEED drops them
            drop_file_pages(p for p in a.cache.rglob("*") if p.is_file())
        cache = None if store is None else PrefixCache(store=KVBlockStore(a.cache, budget_bytes=64 << 30))
        engine = Engine(model_dir, policy=policy, device="cuda", prefix_cache=cache)
        engine.generate([[7] * 64] * 2, GenParams(max_new_tokens=2))  # warm-up (no full block: nothing cached)
        engine.stats.update(prefill_s=0.0, decode_s=0.0, prefill_tokens=0, decode_tokens=0, block_setup_s=0.0)
        if cache is not None:
            cache.stats.update(hits=0, misses=0, prefill_tokens_saved=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = [c.tokens for c in engine.generate(prompts, GenParams(max_new_tokens=a.new))]
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        if cache is not None:
            cache.close()
        base = out if base is None else base
        s = engine.stats
        row = {"run": label, "total_s": round(total, 3), "prefill_s": round(s["prefill_s"], 3),
               "prefill_tokens": s["prefill_tokens"], "decode_s": round(s["decode_s"], 3),
               "block_setup_s": round(s["block_setup_s"], 3), "same_tokens": out == base}
        if cache is not None:
            r = cache.report()
            row |= {k: r[k] for k in ("hits", "misses", "prefill_tokens_saved", "shared_prefill_tokens",
                                      "shared_prefill_s")}
            row["node"] = {k: r["node"][k] for k in ("hits", "blocks_read", "bytes_read", "blocks_written",
                                                     "bytes_written")}
        print(json.dumps(row), flush=True)
        engine.close()
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
