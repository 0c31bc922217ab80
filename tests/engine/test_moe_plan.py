"""`kubeflash plan` states what it assumed for a mixture-of-experts model (no measured routing profile here): uniform
routing's expected distinct experts per layer read (decode and prefill) for the chosen batch, the hot-expert cache's
assumed hit rate, and the bytes a streamed layer's read is then expected to move; a dense model's plan has no such
lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_jobs import plan_cli

from kubeflash_node.engine.costmodel import JobShape, routed_layer_bytes
from kubeflash_node.engine.moeplan import moe_assumptions
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset


def _plan(tmp_path: Path, uri: str) -> tuple[str, dict]:
    proc, plan = plan_cli(tmp_path, uri)
    return proc.stdout, plan


def test_plan_states_its_moe_assumptions(tmp_path):
    out, plan = _plan(tmp_path, "dummy:qwen3-30b-a3b")
    c = preset("qwen3-30b-a3b")
    p = plan["best"]["policy"]
    block = p["gpu_batch_size"] * p["num_gpu_batches"]
    moe = plan["moe"]
    assert moe["tokens_per_decode_read"] == block
    assert moe["expected_experts_decode"] == pytest.approx(128 * (1 - (1 - 8 / 128) ** block))
    assert moe["expected_experts_prefill"] == pytest.approx(c.expected_experts(block * 64))
    assert moe["assumed_hit_rate"] == 0.0 and moe["expert_cache_bytes"] == 0
    assert "MoE: 128 experts, top-8 per token" in out
    assert (f"assumed uniform routing (no measured profile; measured reads route to fewer experts, docs/moe.md): a "
            f"decode read serves {block} tokens -> {moe['expected_experts_decode']:.1f} of 128 experts expected") in out
    assert "routing: uniform (no measured profile)\n" in out and moe["routing"]["measured"] is False
    assert "random weights route" not in out  # measured random-weight runs route to fewer experts than uniform
    assert "hot-expert cache: 0.0 MiB of" in out and "assumed hit rate 0%" in out
    assert moe["layer_read_bytes_decode"] < moe["layer_bytes"]


def test_dense_plan_has_no_moe_lines(tmp_path):
    out, plan = _plan(tmp_path, "dummy:llama-2-7b")
    assert "MoE" not in out and "moe" not in plan


def test_hit_rate_is_the_caches_share_of_all_experts():
    """A cache holding half of every layer's expert bytes is assumed to hit half the routed experts: the expected
    read is the non-expert bytes plus half the expected experts' bytes."""
    c = preset("mixtral-8x7b")
    layer = 2 * c.layer_params()
    stored = [0] + [layer] * c.num_layers + [0]
    experts = layer * c.expert_share()
    p = Policy(gpu_batch_size=2, expert_cache_bytes=int(experts * c.num_layers / 2))
    lines, d = moe_assumptions(c, p, JobShape(prompts=2, prompt_len=10, gen_len=4), stored)
    assert d["assumed_hit_rate"] == pytest.approx(0.5, rel=1e-6)
    expected = c.expected_experts(2)  # 8 experts, top-2, 2 tokens: 8 * (1 - (6/8)^2) = 3.5
    assert expected == pytest.approx(3.5)
    assert d["layer_read_bytes_decode"] == pytest.approx(layer - experts + experts * 3.5 / 8 * 0.5, rel=1e-6)
    assert d["layer_read_bytes_decode"] == pytest.approx(routed_layer_bytes(c, layer, p, 2))
    assert any("assumed hit rate 50%" in line for line in lines)
