"""Routing counts that outlive a run, and routed expert reads issued together.

The engine counts how often each expert of each layer is routed and, when it closes, keeps the counts in the model's
store directory (.routing.json, written crash-safely); the next engine on that store seeds its hot-expert cache from
them, so a second run of the same work reads fewer expert bytes from disk and gives the same tokens (transformers').
A MoE layer issues the reads of all its routed experts at once, before any expert computes, computes each expert as
soon as its own read is done, and computes exactly what it computes with every expert in memory.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from hf_random import greedy
from tiny_moe import qwen3_moe, qwen3_moe_store

from kubeflash_node.engine.experts import ROUTING_FILE, RoutedWeights
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.convert import convert


def _run(store, budget: int, prompt, new: int):
    engine = Engine(store, policy=Policy(gpu_batch_size=1, expert_cache_bytes=budget))
    try:
        [c] = engine.generate([prompt], GenParams(max_new_tokens=new))
    finally:
        engine.close()  # joins the read-ahead and saves the routing counts; the counters below are final
    t = engine.timings
    return c.tokens, t.bytes["load_expert"], t.count["expert_cache_hit"]


def test_second_run_starts_warm_reads_fewer_expert_bytes_same_tokens(tmp_path):
    """Run 1 (no counts yet) saves per-layer routing counts; run 2 reads the most routed experts into its cache
    first and then misses less: fewer expert bytes in all, tokens equal to run 1's and to transformers'."""
    model, hf = qwen3_moe(tmp_path)
    store = tmp_path / "store"
    m = convert(str(hf), store, dtype="float32")
    prompt, new = [3, 14, 15, 92, 65, 35], 12
    [ref] = greedy(model, [prompt], new)
    budget = 6 * 3 * 16 * 32 * 4  # room for 6 of the 2 x 16 experts (float32)
    assert not (store / ROUTING_FILE).exists()
    tokens1, bytes1, hits1 = _run(store, budget, prompt, new)
    saved = json.loads((store / ROUTING_FILE).read_text())
    assert set(saved["layers"]) == {"layer_000.bin", "layer_001.bin"}
    # every prefill and decode pass routes each layer to >= 2 experts; the counts are per pass and expert
    assert all(sum(v.values()) >= 2 * (1 + new - 1) for v in saved["layers"].values())
    assert not [p for p in store.iterdir() if p.name.endswith(".tmp")]
    tokens2, bytes2, hits2 = _run(store, budget, prompt, new)
    assert tokens1 == tokens2 == ref
    assert bytes2 < bytes1 and hits2 > hits1, (bytes1, bytes2, hits1, hits2)
    print(f"expert bytes read: cold {bytes1}, warm {bytes2}; cache hits: cold {hits1}, warm {hits2}")
    again = json.loads((store / ROUTING_FILE).read_text())  # counts accumulate over runs
    for layer, experts in saved["layers"].items():
        assert all(again["layers"][layer][j] == 2 * n for j, n in experts.items())
    assert m.files["layer_000.bin"].size > 0


def test_bad_routing_file_is_ignored(tmp_path, capsys):
    """A corrupt .routing.json does not stop a run: it is named in a warning and the run starts cold."""
    _, store = qwen3_moe_store(tmp_path, experts=4)
    (store / ROUTING_FILE).write_text("{not json")
    tokens, _, hits = _run(store, 1 << 20, [5, 6, 7], 2)
    assert len(tokens) == 2
    assert f"{store / ROUTING_FILE}: ignored" in capsys.readouterr().err
    assert json.loads((store / ROUTING_FILE).read_text())["format"] == "kubeflash-routing/1"  # replaced whole


def test_routed_experts_are_read_together_before_any_expert_computes(tmp_path):
    """model.moe over RoutedWeights: every routed expert's read is issued (all in flight at once on the pool)
    before the first expert's weights are used, the first routed expert computes while the last one's read is still
    in flight (that read waits for a use), and the output equals model.moe over plain in-memory weights."""
    from kubeflash_node.engine import model as engine_model
    from kubeflash_node.store.modelconfig import ModelConfig

    c = ModelConfig(architecture="llama", vocab_size=10, hidden_size=16, intermediate_size=8, num_layers=1,
                    num_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    g = torch.Generator().manual_seed(0)
    weights = {"router": torch.randn(8, 16, generator=g)}
    for j in range(8):
        weights |= {f"e{j}.w_gate": torch.randn(8, 16, generator=g), f"e{j}.w_up": torch.randn(8, 16, generator=g),
                    f"e{j}.w_down": torch.randn(16, 8, generator=g)}
    h = torch.randn(1, 5, 16, generator=g)
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    probs = torch.softmax(torch.nn.functional.linear(h.reshape(-1, 16), weights["router"]), -1)
    routed_set = set(torch.topk(probs, 2, dim=-1).indices.unique().tolist())
    n_routed = len(routed_set)
    in_flight = threading.Barrier(n_routed, timeout=60)  # every routed read in flight at once, or it breaks

    first_used = threading.Event()

    def load(j: int) -> dict:
        with lock:
            events.append(("read", j))
        in_flight.wait()
        if j == max(routed_set) and not first_used.wait(timeout=60):  # the last read ends only after a use
            raise TimeoutError("no expert computed while this read was in flight")
        return {k: v for k, v in weights.items() if k.startswith(f"e{j}.")}

    class Traced(RoutedWeights):
        def __getitem__(self, name):
            t = super().__getitem__(name)
            if name.startswith("e"):
                with lock:
                    events.append(("use", int(name[1:name.index(".")])))
                first_used.set()
            return t

    with ThreadPoolExecutor(max_workers=8) as pool:
        routed = Traced({"router": weights["router"]}, load, pool)
        with torch.no_grad():
            out = engine_model.moe(c, routed, h)
    with torch.no_grad():
        want = engine_model.moe(c, dict(weights), h)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    reads = [j for kind, j in events if kind == "read"]
    first_use = next(i for i, (kind, _) in enumerate(events) if kind == "use")
    assert len(reads) == n_routed > 2 and all(kind == "read" for kind, _ in events[:first_use])
    assert {j for kind, j in events if kind == "use"} == set(reads)
