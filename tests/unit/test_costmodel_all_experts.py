"""The automatic plan weighs, for a mixture-of-experts model streamed from disk, reading only the routed experts
against reading every expert with its layer (one sequential read): routed wins at small batches, where a decode read
serves few tokens and touches a few experts. Where routed reads run slower per byte than a layer's (one read per
expert: `Calibration.expert_read_share` 0.82, measured on the H200: Qwen3-30B-A3B int8 from a cold SSD, batch 1 routed
6.7x the decode tokens/s of every expert, batch 64 routed 0.84x; docs/benchmarks.md) every expert wins at large
batches, where nearly all are routed anyway; read as one batch at the layer's rate (the default share, 1.0: the CPU
measurement in docs/moe.md) routed reads never move more bytes, so they win at batch 64 too. A dense model never gets
the switch."""

from __future__ import annotations

from pathlib import Path

from kubeflash_node.engine.ceilings import Ceilings
from kubeflash_node.engine.costmodel import Budget, Calibration, JobShape, describe, plan, stage_sizes
from kubeflash_node.store.modelconfig import preset

ROOT = Path(__file__).resolve().parents[2]


GPU = Ceilings.load(ROOT / "docs/bench-results/s9/ceilings.json")  # measured on the H200 in session 9


def _best(name: str, prompts: int, cal: Calibration = Calibration()):
    c = preset(name)
    job = JobShape(prompts=prompts, prompt_len=8, gen_len=3)
    sizes = {"int8": stage_sizes(c, 2, "int8")}
    shape = [(prompts, 1)]  # one micro-batch of every prompt, as the H200 runs
    return plan(config=c, ceil=GPU, job=job, budget=Budget(gpu_bytes=12 << 30, cpu_bytes=8 << 30), sizes=sizes,
                quantizations=("int8",), shapes=shape, step=50, cal=cal).best


def test_per_expert_reads_routed_at_batch_one_every_expert_at_batch_64():
    per_expert = Calibration(expert_read_share=0.82)
    small, large = _best("qwen3-30b-a3b", 1, per_expert), _best("qwen3-30b-a3b", 64, per_expert)
    assert small.placement["disk"] > 0 and large.placement["disk"] > 0  # 31 GB does not fit 12 + 8 GiB
    assert not small.candidate.policy.all_experts
    assert large.candidate.policy.all_experts
    assert "every expert read with its layer" in describe(large)
    assert "every expert" not in describe(small)


def test_batched_routed_reads_win_at_every_batch():
    assert Calibration().expert_read_share == 1.0
    for prompts in (1, 4, 16, 64):
        best = _best("qwen3-30b-a3b", prompts)
        assert best.placement["disk"] > 0 and not best.candidate.policy.all_experts, prompts
        assert "every expert" not in describe(best)


def test_dense_model_never_reads_experts():
    assert not _best("llama-3-8b", 64).candidate.policy.all_experts
