"""Profile one block of the engine under a pinned policy (default: the plan `bench/peers.sh ourslc` runs: opt-1.3b
with 32K positions, 8 x 8192 tokens, weights 70% GPU / 30% pinned host, KV on the GPU with X-cache on half the
layers, CUDA allocator capped at 16 GiB): wall time, allocator retries and the top GPU kernels.

Usage: python3 bench/engine_profile.py [--store DIR] [--gen-len N] [--no-cap] [--profile]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.memory import cap_gpu_allocator
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.convert import convert


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:opt-1.3b-32k")
    p.add_argument("--store", type=Path, default=Path("/root/kfprof"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--gen-len", type=int, default=4)
    p.add_argument("--no-cap", action="store_true")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    if not (a.store / "manifest.json").exists():
        convert(a.model, a.store, dtype="float16")
    if not a.no_cap:
        cap_gpu_allocator(16 << 30, "cuda")
    pol = Policy(gpu_batch_size=8, num_gpu_batches=1, weights_gpu_percent=70, weights_cpu_percent=30, kv="device",
                 x_cache_percent=50)
    eng = Engine(a.store, policy=pol, device="cuda")
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(a.prompt_len)] for i in range(a.prompts)]
    eng.generate([q[:512] for q in prompts], GenParams(max_new_tokens=2))  # warm-up
    torch.cuda.reset_peak_memory_stats()
    r0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) \
        if a.profile else None
    t0 = time.perf_counter()
    if ctx:
        ctx.__enter__()
    eng.generate(prompts, GenParams(max_new_tokens=a.gen_len))
    torch.cuda.synchronize()
    if ctx:
        ctx.__exit__(None, None, None)
    dt = time.perf_counter() - t0
    st = torch.cuda.memory_stats()
    print(f"wall {dt:.3f} s  prefill {eng.stats['prefill_s']:.3f} s  decode {eng.stats['decode_s']:.3f} s  "
          f"alloc retries {st.get('num_alloc_retries', 0) - r0}  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} "
          f"GiB  reserved peak {st['reserved_bytes.all.peak'] / 2**30:.2f} GiB", flush=True)
    t = eng.timings
    print({k: round(t.mean(k), 5) for k in ("load_weight", "compute_layer_prefill", "compute_layer_decode")
           if t.count[k]})
    if ctx:
        print(ctx.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))
    eng.close()


if __name__ == "__main__":
    main()
