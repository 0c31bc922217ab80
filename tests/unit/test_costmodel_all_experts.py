"""The automatic plan weighs, for a mixture-of-experts model streamed from disk, reading only the routed experts
against reading every expert with its layer (one sequential read): routed wins at small batches, where a decode read
serves few tokens and touches a few experts; every expert wins at large ones, where nearly all are routed anyway and
the per-expert reads only cost (measured on the H200: Qwen3-30B-A3B int8 from a cold SSD, batch 1 routed 6.7x the
decode tokens/s of every expert, batch 64 routed 0.84x; docs/benchmarks.md). A dense model never gets the switch."""

from __future__ import annotations

import json
from pathlib import Path

from kubeflash_node.engine.costmodel import Budget, JobShape, describe, plan, stage_sizes
from kubeflash_node.store.modelconfig import preset

ROOT = Path(__file__).resolve().parents[2]


class Ceil:
    """bench.Ceilings as measured on the H200 in session 9 (docs/bench-results/s9/ceilings.json); bench imports
    torch, this test stays pure."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


GPU = Ceil(json.loads((ROOT / "docs/bench-results/s9/ceilings.json").read_text()))


def _best(name: str, prompts: int):
    c = preset(name)
    job = JobShape(prompts=prompts, prompt_len=8, gen_len=3)
    sizes = {"int8": stage_sizes(c, 2, "int8")}
    shape = [(prompts, 1)]  # one micro-batch of every prompt, as the H200 runs
    return plan(config=c, ceil=GPU, job=job, budget=Budget(gpu_bytes=12 << 30, cpu_bytes=8 << 30), sizes=sizes,
                quantizations=("int8",), shapes=shape, step=50).best


def test_routed_experts_at_batch_one_every_expert_at_batch_64():
    small, large = _best("qwen3-30b-a3b", 1), _best("qwen3-30b-a3b", 64)
    assert small.placement["disk"] > 0 and large.placement["disk"] > 0  # 31 GB does not fit 12 + 8 GiB
    assert not small.candidate.policy.all_experts
    assert large.candidate.policy.all_experts
    assert "every expert read with its layer" in describe(large)
    assert "every expert" not in describe(small)


def test_dense_model_never_reads_experts():
    assert not _best("llama-3-8b", 64).candidate.policy.all_experts
