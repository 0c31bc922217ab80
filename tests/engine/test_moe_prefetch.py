"""Expert prefetch during attention: a streamed MoE layer predicts its experts from the hidden state entering the
layer (its own router over the input), starts reading them before attention computes, and after the true router
reads only the mispredicted experts.

What must hold: the predicted experts' reads run while attention computes; the outputs equal the non-prefetch path
exactly (float32 logits bit for bit, greedy tokens equal to transformers') for Qwen3-MoE and Mixtral; every predicted
expert that the router picks is read once, not again (expert reads with prefetch = prefetch reads issued + routed
experts not predicted, and its expert bytes minus the unused prefetched bytes equal the bytes read without prefetch);
the hot-expert cache counts the same routing; the run report carries the hit rate and the bytes prefetched but unused.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hf_random import left_padded

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.report import build_report, format_report
from kubeflash_node.store.convert import convert

VOCAB = 97
PROMPTS = [[3, 14, 15, 92, 65, 35], [27, 18, 28, 18, 28]]


def _model(family: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=8, **common)
        return transformers.MixtralForCausalLM(cfg).eval()
    cfg = transformers.Qwen3MoeConfig(num_experts=16, moe_intermediate_size=16, norm_topk_prob=True, **common)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_store(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model = _model(request.param)
    model.save_pretrained(tmp / "hf", safe_serialization=True)
    convert(str(tmp / "hf"), tmp / "store", dtype="float32")
    return model, tmp / "store"


def _engine(store, prefetch: bool, cache: int = 0) -> Engine:
    return Engine(store, policy=Policy(gpu_batch_size=2, expert_prefetch=prefetch, expert_cache_bytes=cache))


def _generate(store, prefetch: bool, cache: int = 0, new: int = 8):
    engine = _engine(store, prefetch, cache)
    try:
        tokens = [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=new))]
    finally:
        engine.close()  # joins every read: the counters below are final
    return tokens, engine


def test_prefetch_logits_equal_the_non_prefetch_path_exactly(moe_store):
    """Left-padded two-prompt prefill through every streamed MoE layer: the same float32 logits, bit for bit, with and
    without prefetch (the same expert bytes either way), and within float32 tolerance of transformers'."""
    model, store = moe_store
    outs = {}
    for prefetch in (False, True):
        engine = _engine(store, prefetch)
        try:
            with torch.no_grad():
                outs[prefetch] = engine.prefill_logits(PROMPTS)
        finally:
            engine.close()
        stats = engine.streamer.expert_prefetch
        assert (stats is not None and stats.issued > 0) == prefetch
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(outs[True], ref, rtol=1e-4, atol=1e-4)


def test_prefetched_experts_are_used_not_read_again_and_counted(moe_store):
    """Greedy decode (2 prompts, 8 tokens): tokens equal without prefetch and transformers'; each expert read with
    prefetch is a prefetch read or a routed expert that was not predicted; the bytes beyond the non-prefetch run's are
    exactly the prefetched-but-unused bytes; the report states hit rate and unused bytes."""
    model, store = moe_store
    tokens0, e0 = _generate(store, prefetch=False)
    tokens1, e1 = _generate(store, prefetch=True)
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    assert tokens1 == tokens0 == ref
    s = e1.streamer.expert_prefetch
    t0, t1 = e0.timings, e1.timings
    assert t0.count["load_expert"] == s.routed  # no cache: every routed expert is read once per layer use
    assert 0 < s.hits <= s.routed and s.issued >= s.hits
    assert t1.count["load_expert"] == s.issued + (s.routed - s.hits)
    assert t1.bytes["load_expert"] - s.unused_bytes == t0.bytes["load_expert"]
    assert s.unused == s.issued - s.hits and (s.unused_bytes > 0) == (s.unused > 0)
    report = build_report(e1)
    assert report["expert_prefetch"]["hit_rate"] == pytest.approx(s.hits / s.routed)
    assert report["expert_prefetch"]["bytes_unused"] == s.unused_bytes
    assert "expert prefetch (hit rate / unused)" in format_report(report)
    assert "expert_prefetch" not in build_report(e0)
    print(f"prefetch hit rate {s.hits}/{s.routed}, unused reads {s.unused} ({s.unused_bytes} B)")


def test_hot_cache_counts_the_same_routing_with_prefetch(moe_store):
    """With a hot-expert cache: the same tokens, the same per-expert routing counts (what .routing.json keeps) and the
    same cache hits as without prefetch; a predicted expert already in the cache is not read again."""
    _, store = moe_store
    budget = 4 * 3 * 16 * 32 * 4  # room for 4 small experts (float32)
    (store / ".routing.json").unlink(missing_ok=True)
    tokens0, e0 = _generate(store, prefetch=False, cache=budget)
    (store / ".routing.json").unlink()
    tokens1, e1 = _generate(store, prefetch=True, cache=budget)
    (store / ".routing.json").unlink()
    assert tokens0 == tokens1
    c0, c1 = e0.streamer.expert_cache, e1.streamer.expert_cache
    assert c0.counts == c1.counts and c0.hits + c0.misses == c1.hits + c1.misses
    s = e1.streamer.expert_prefetch
    # every expert read from disk is a prefetch read or an on-demand miss; hits of the cache are never read
    assert e1.timings.count["load_expert"] <= s.issued + c1.misses


def test_predicted_reads_run_while_attention_computes(moe_store, monkeypatch):
    """In every streamed MoE layer pass, attention (its first head split) waits until an expert read has started
    after the layer's prediction: with reads only after the router, that wait would time out."""
    from kubeflash_node.engine import model as engine_model

    _, store = moe_store
    engine = _engine(store, prefetch=True)
    started, waited = threading.Event(), []
    fetch, predict, split = engine.streamer._fetch_expert, engine_model.predict_experts, engine_model.split_heads

    def traced_fetch(stage, j):
        started.set()
        return fetch(stage, j)

    def traced_predict(*a):
        started.clear()  # from here on, a read that starts before attention is a predicted one
        waited.append(False)
        return predict(*a)

    def traced_split(*a):
        if not waited[-1]:
            waited[-1] = started.wait(timeout=30)
            assert waited[-1], "no expert read started before attention"
        return split(*a)

    engine.streamer._fetch_expert = traced_fetch
    monkeypatch.setattr(engine_model, "predict_experts", traced_predict)
    monkeypatch.setattr(engine_model, "split_heads", traced_split)
    try:
        engine.generate(PROMPTS, GenParams(max_new_tokens=3))
    finally:
        engine.close()
    layers = engine.config.num_layers
    assert len(waited) == 3 * layers and all(waited)  # prefill + 2 decode steps, every layer
