"""Profile a few generation steps of a stored model on the GPU (where the time goes, kernel by kernel)."""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy

model, weights = Path(sys.argv[1]), sys.argv[2]
if len(sys.argv) > 3:
    sys.setswitchinterval(float(sys.argv[3]))
pol = {"gpu": Policy(gpu_batch_size=8, weights_gpu_percent=100), "cpu": Policy(gpu_batch_size=8, weights_cpu_percent=100),
       "disk": Policy(gpu_batch_size=8)}[weights]
eng = Engine(model, policy=pol, device="cuda")
prompts = [[(7 * i + j) % 1000 + 3 for j in range(512)] for i in range(8)]
eng.generate(prompts, GenParams(max_new_tokens=2))
torch.cuda.synchronize()
t0 = time.perf_counter()
eng.generate(prompts, GenParams(max_new_tokens=6))
torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(f"{weights}: 6 steps {dt:.3f} s; prefill {eng.stats['prefill_s']:.3f} decode {eng.stats['decode_s']:.3f}")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    eng.generate(prompts, GenParams(max_new_tokens=3))
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
eng.close()
