"""The cost model's price of MoE expert prefetch (spec.offload.expertPrefetch: auto).

Its guess hit rate for a batch follows from the per-token rate under uniform routing (checked against a simulation of
that routing); auto turns prefetch on where attention leaves the disk idle long enough to read predicted experts, and
keeps it off where mispredicted reads would add more disk time than attention hides, or where reading the layer's
non-expert part already outlasts attention (the disk has no idle window). on / off are taken as the job sets them.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from kubeflash_node.engine.ceilings import Ceilings
from kubeflash_node.engine.costmodel import JobShape, expert_prefetch_cost, guess_hit_rate, stage_sizes
from kubeflash_node.engine.moeplan import expert_prefetch_choice
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset

QWEN = preset("qwen3-30b-a3b")  # 128 experts, top-8


# a CPU run: slow matmuls beside a slow disk (h2d_pinned 0: measured without a GPU)
CPU = Ceilings(disk_read_cold=1.0, disk_read_warm=5.0, disk_write=1.0, h2d_pinned=0.0, matmul_tflops=0.2)
# docs/bench-results/ceilings.json, rounded
GPU = Ceilings(disk_read_cold=1.41, disk_read_warm=14.3, disk_write=2.09, h2d_pinned=55.1, matmul_tflops=759.0)
STORED_F32 = stage_sizes(QWEN, 4, "none")[0]


def _simulated_hit_rate(e: int, k: int, tokens: int, q: float, trials: int, rng: random.Random) -> float:
    """Uniform routing: each token routes to k of e experts; its guess keeps each of them with probability q and
    fills the rest of its k with experts it does not route to. Share of the routed set the guesses cover."""
    hits = routed = 0
    for _ in range(trials):
        want, guessed = set(), set()
        for _ in range(tokens):
            mine = rng.sample(range(e), k)
            kept = [j for j in mine if rng.random() < q]
            others = [j for j in range(e) if j not in mine]
            want.update(mine)
            guessed.update(kept + rng.sample(others, k - len(kept)))
        routed += len(want)
        hits += len(want & guessed)
    return hits / routed


@pytest.mark.parametrize("preset_name, tokens", [("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 4), ("qwen3-30b-a3b", 16),
                                                 ("mixtral-8x7b", 2), ("mixtral-8x7b", 4)],
                         ids=["qwen-1", "qwen-4", "qwen-16", "mixtral-2", "mixtral-4"])
def test_guess_hit_rate_matches_a_simulation_of_uniform_routing(preset_name, tokens):
    c = preset(preset_name)
    sim = _simulated_hit_rate(c.num_experts, c.num_experts_per_tok, tokens, 0.5, 400, random.Random(tokens))
    assert guess_hit_rate(c, tokens, 0.5) == pytest.approx(sim, abs=0.02)


def test_auto_prefetches_a_long_prefill_where_attention_leaves_the_disk_idle():
    """4 prompts of 512 tokens, 2 generated, on a CPU: the prefill's attention outlasts reading a layer's non-expert
    part, and at 2048 tokens a read routes to about every expert, so the guess is about always right: the experts
    read during attention are saved after the router, for little waste."""
    p, job = Policy(gpu_batch_size=4), JobShape(prompts=4, prompt_len=512, gen_len=2)
    cost = expert_prefetch_cost(p, config=QWEN, ceil=CPU, job=job, stored=STORED_F32, itemsize=4)
    assert cost.layers == QWEN.num_layers and cost.attention_s > cost.nonexpert_s
    assert cost.on and cost.on_s < cost.off_s and cost.overlapped > 10 * cost.wasted
    on, lines, d = expert_prefetch_choice("auto", QWEN, p, job, STORED_F32, CPU, itemsize=4)
    assert on and d["on"] and d["overlapped_bytes"] == cost.overlapped
    assert lines[0].startswith("  expert prefetch: on (spec.offload.expertPrefetch: auto): the cost model predicts")
    assert "the disk has room for expert reads while it computes" in lines[1]


def test_auto_stays_off_where_mispredicted_reads_would_waste():
    """A slow CPU beside a fast disk: a decode step's attention outlasts reading a layer's non-expert part, but at
    batch 1 the guess is right for half the experts, so the wrong half read during attention (and the reads started
    at the router, one per reader thread, which cannot be cancelled) add more disk time than the idle window holds:
    off. At batch 4 on the same machine the guess covers more of a larger read and the window is longer: on."""
    slow = replace(CPU, disk_read_cold=4.0, matmul_tflops=0.003)
    p, job = Policy(gpu_batch_size=1), JobShape(prompts=1, prompt_len=4, gen_len=33)
    cost = expert_prefetch_cost(p, config=QWEN, ceil=slow, job=job, stored=STORED_F32, itemsize=4)
    assert cost.attention_s > cost.nonexpert_s
    assert not cost.on and cost.on_s > cost.off_s and cost.wasted > cost.overlapped > 0
    on, lines, d = expert_prefetch_choice("auto", QWEN, p, job, STORED_F32, slow, itemsize=4)
    assert not on and not d["on"] and d["wasted_bytes"] == cost.wasted
    assert lines[0].startswith("  expert prefetch: off (spec.offload.expertPrefetch: auto): the cost model predicts")
    batch4 = expert_prefetch_cost(Policy(gpu_batch_size=4), config=QWEN, ceil=slow, job=JobShape(4, 4, 33),
                                  stored=STORED_F32, itemsize=4)
    assert batch4.on and batch4.overlapped > batch4.wasted


def test_auto_stays_off_where_the_disk_has_no_idle_window():
    """The long prefill again on the GPU machine's ceilings: attention is fast, reading the layers' non-expert parts
    takes longer, so the disk is busy anyway and prefetch cannot be faster, though its guesses are about all right."""
    stored = stage_sizes(QWEN, 2, "int8")[0]
    p, job = Policy(gpu_batch_size=4), JobShape(prompts=4, prompt_len=512, gen_len=2)
    cost = expert_prefetch_cost(p, config=QWEN, ceil=GPU, job=job, stored=stored)
    assert cost.attention_s < cost.nonexpert_s and not cost.on and cost.on_s >= cost.off_s
    on, lines, _ = expert_prefetch_choice("auto", QWEN, p, job, stored, GPU)
    assert not on and "the disk has no idle window for expert reads" in lines[1]


def test_on_and_off_are_taken_as_set_and_auto_needs_something_to_price():
    p, job = Policy(gpu_batch_size=1), JobShape(prompts=1, prompt_len=4, gen_len=33)
    on, lines, d = expert_prefetch_choice("on", QWEN, p, job, STORED_F32, CPU, itemsize=4)
    assert on and d["why"].startswith("as the job sets it; the cost model predicts")  # priced though slower
    assert not expert_prefetch_choice("off", QWEN, Policy(gpu_batch_size=4), JobShape(4, 512, 2), STORED_F32, CPU,
                                      itemsize=4)[0]
    on, _, d = expert_prefetch_choice("auto", QWEN, p, job, STORED_F32, None)
    assert not on and d["why"] == "no measured ceilings to price it against reads after the router"
    resident = Policy(gpu_batch_size=4, weights_gpu_percent=100.0)
    on, _, d = expert_prefetch_choice("auto", QWEN, resident, JobShape(4, 512, 2), STORED_F32, CPU, itemsize=4)
    assert not on and d["why"] == "no MoE layer is streamed from disk"
    on, _, d = expert_prefetch_choice("auto", QWEN, Policy(gpu_batch_size=4, all_experts=True), JobShape(4, 512, 2),
                                      STORED_F32, CPU, itemsize=4)
    assert not on and d["why"] == "every expert is read with its layer"
    dense = preset("llama-2-7b")
    assert expert_prefetch_choice("auto", dense, p, job, stage_sizes(dense, 2)[0], CPU) == (False, [], None)


def test_the_hot_cache_shrinks_what_prefetch_reads():
    """A hot-expert cache holding half of all experts: both the routed bytes and the bytes prefetched shrink by half."""
    p, job = Policy(gpu_batch_size=4), JobShape(prompts=4, prompt_len=512, gen_len=2)
    experts = STORED_F32[1] * QWEN.expert_share() * QWEN.num_layers
    full = expert_prefetch_cost(p, config=QWEN, ceil=CPU, job=job, stored=STORED_F32, itemsize=4)
    half = expert_prefetch_cost(Policy(gpu_batch_size=4, expert_cache_bytes=int(experts / 2)), config=QWEN, ceil=CPU,
                                job=job, stored=STORED_F32, itemsize=4)
    assert half.routed == pytest.approx(full.routed / 2, rel=1e-6)
    assert half.off_s < full.off_s


@pytest.mark.parametrize("batch, prompt, new, routed_mib, unused_mib", [(1, 4, 17, 10764.0, 3420.0),
                                                                       (4, 2, 9, 19350.0, 1386.0)],
                         ids=["batch-1", "batch-4"])
def test_priced_bytes_agree_with_the_cpu_runs_measured(batch, prompt, new, routed_mib, unused_mib):
    """The two CPU runs of bench/moe_prefetch.py in docs/moe.md (Qwen3-30B-A3B's layer shape in float32, its first 4
    layers, a 32000-token vocabulary, every stage streamed cold), priced on this machine's ceilings (`kubeflash bench
    --ceilings-only --device cpu`: 1.14 GB/s cold with 4 reader threads; float32 matmul of 2048 x 2048: 0.084
    TFLOP/s): the routed expert bytes match the measured ones within 10% and the mispredicted bytes read for nothing
    within 35% (how many wrong guesses had started before the router depends on thread timing). At batch 1 the run
    with prefetch was slower in every pair, and auto is off."""
    c = replace(QWEN, num_layers=4, vocab_size=32000)
    cpu = replace(CPU, disk_read_cold=1.14, disk_read_warm=3.2, disk_write=1.42, matmul_tflops=0.084)
    cost = expert_prefetch_cost(Policy(gpu_batch_size=batch, io_threads=4), config=c, ceil=cpu,
                                job=JobShape(batch, prompt, new), stored=stage_sizes(c, 4, "none")[0], itemsize=4)
    print(f"\nbatch {batch}: routed {cost.routed / 2**20:.0f} MiB (measured {routed_mib:.0f}), wasted "
          f"{cost.wasted / 2**20:.0f} MiB (measured unused {unused_mib:.0f}); predicted {cost.on_s:.2f} s with prefetch "
          f"vs {cost.off_s:.2f} s ({cost.on_s / cost.off_s - 1:+.1%}): {'on' if cost.on else 'off'}")
    assert cost.routed / 2**20 == pytest.approx(routed_mib, rel=0.10)
    assert cost.wasted / 2**20 == pytest.approx(unused_mib, rel=0.35)
    if batch == 1:
        assert not cost.on and cost.on_s > cost.off_s
