"""An outsider's check: a tensor-parallel rank (TPEngine) with X-cache layers and the KV on the device.

Since the device-tier X-cache projects every slot in one call (issue 18, kvnear._XLayer: the new rows are written
first, then K, V of slots 0..start+S-1 come from one projection), the layer's `project` must rotate as many
positions as it is handed. tensorparallel.tp_llama_layer rotated the cached prefix's positions only, so the first
decode step failed with a size mismatch. Two gloo ranks (forked) must give the single-process engine's greedy tokens.
(`kubeflash run` still refuses xCache with tensorParallel > 1; this is the engine API under it.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
from test_tensorparallel import PROMPTS, _random_store

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.tensorparallel import TPEngine, gloo_reduce, init_gloo
from kubeflash_node.engine.tpshards import shard_store

POLICY = dict(gpu_batch_size=2, x_cache_percent=100)  # KV (here X) on the device tier, written in place


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # forked: the parent's OpenMP pool hangs a child that enters it
    tmp = Path(tmp)
    init_gloo(rank, world, f"file://{tmp}/pg", timeout_s=60)
    eng = TPEngine(tmp / f"shard{rank}", rank=rank, world=world, reduce=gloo_reduce, policy=Policy(**POLICY))
    try:
        tokens = [c.tokens for c in eng.generate(PROMPTS, GenParams(max_new_tokens=4))]
    finally:
        eng.close()
    torch.save(tokens, tmp / f"out{rank}.pt")
    torch.distributed.destroy_process_group()


def test_tp_ranks_with_device_x_cache_match_single_process(tmp_path):
    """Both ranks' greedy tokens (Llama GQA, X-cache on every layer, device tier) equal the single-process Engine's."""
    store = _random_store("llama-gqa", tmp_path)
    shard_store(store, [tmp_path / "shard0", tmp_path / "shard1"])
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    eng = Engine(store, policy=Policy(**POLICY))
    try:
        want = [c.tokens for c in eng.generate(PROMPTS, GenParams(max_new_tokens=4))]
    finally:
        eng.close()
    for r in range(2):
        assert torch.load(tmp_path / f"out{r}.pt") == want
