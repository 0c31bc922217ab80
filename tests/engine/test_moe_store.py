"""Mixture-of-experts checkpoints and the new families' dummy presets in the layer store.

Bad expert weights (a missing expert tensor, a router or expert tensors that disagree with the config's expert
count; GGUF expert layouts: test_gguf_families.py) are refused at convert time, naming the tensor or key, before anything is
written. A good MoE checkpoint is stored expert by expert (each expert one contiguous run of its layer file),
int8 quantization reaches the experts, and the real-size dummy presets have transformers' own parameter counts.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hf_random import greedy
from safetensors.torch import load_file, save_file
from tiny_moe import qwen3_moe

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.store import modelconfig
from kubeflash_node.store.convert import SourceError, convert


def _edit(hf, *, drop: str | None = None, add: dict | None = None, config: dict | None = None) -> None:
    path = hf / "model.safetensors"
    tensors = load_file(path)
    if drop:
        del tensors[drop]
    tensors |= add or {}
    save_file(tensors, path, metadata={"format": "pt"})
    if config:
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps(cfg | config))


def _refused(hf, tmp_path, message: str) -> None:
    with pytest.raises(SourceError) as e:
        convert(str(hf), tmp_path / "store", dtype="float32")
    assert message in str(e.value), str(e.value)
    assert not (tmp_path / "store").exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("hf",)]  # no staging directory left either


def test_missing_expert_tensor_is_named(tmp_path):
    _, hf = qwen3_moe(tmp_path, experts=4)
    _edit(hf, drop="model.layers.1.mlp.experts.2.up_proj.weight")
    _refused(hf, tmp_path, "tensor 'model.layers.1.mlp.experts.2.up_proj.weight' missing")


@pytest.mark.parametrize("count", [3, 5])
def test_expert_count_not_matching_the_router_is_refused(count, tmp_path):
    _, hf = qwen3_moe(tmp_path, experts=4)
    _edit(hf, config={"num_experts": count, "num_local_experts": count})
    if count > 4:
        _refused(hf, tmp_path, "tensor 'model.layers.0.mlp.experts.4.gate_proj.weight' missing")
    else:
        _refused(hf, tmp_path, "tensor 'model.layers.0.mlp.gate.weight' routes to 4 experts but config.json "
                               "num_experts is 3")


def test_expert_past_the_count_is_refused(tmp_path):
    _, hf = qwen3_moe(tmp_path, experts=4)
    extra = torch.zeros(16, 32)
    _edit(hf, add={"model.layers.1.mlp.experts.4.gate_proj.weight": extra})
    _refused(hf, tmp_path, "tensor 'model.layers.1.mlp.experts.4.gate_proj.weight' is an expert past config.json "
                           "num_experts = 4")


def test_experts_are_stored_one_after_another(tmp_path):
    """Each expert's three matrices are adjacent in its layer file, experts in order: one read per expert."""
    _, hf = qwen3_moe(tmp_path, experts=4)
    m = convert(str(hf), tmp_path / "store", dtype="float32")
    entries = m.files["layer_000.bin"].tensors
    order = sorted(entries, key=lambda n: entries[n].offset)
    experts = [n for n in order if n.startswith("e")]
    assert experts == [f"e{j}.{w}" for j in range(4) for w in ("w_gate", "w_up", "w_down")]
    first = order.index("e0.w_gate")
    assert order[first:first + 12] == experts  # nothing else between them


def test_int8_reaches_the_experts_and_decodes(tmp_path):
    """int8 quantizes each expert's matrices (not the router); the quantized store generates."""
    _, hf = qwen3_moe(tmp_path, experts=4)
    m = convert(str(hf), tmp_path / "store", dtype="float32", quantization="int8", group=16)
    names = set(m.files["layer_001.bin"].tensors)
    assert {"e3.w_down.q", "e3.w_down.scale", "router"} <= names and "e3.w_down" not in names
    engine = Engine(tmp_path / "store")
    try:
        [c] = engine.generate([[5, 6, 7, 8]], GenParams(max_new_tokens=4))
    finally:
        engine.close()
    assert len(c.tokens) == 4


NEW_PRESETS = {
    "qwen3-8b": "Qwen3Config", "qwen3-30b-a3b": "Qwen3MoeConfig", "mixtral-8x7b": "MixtralConfig",
    "phi-3-mini-4k": "Phi3Config", "gemma-2-9b": "Gemma2Config", "gemma-3-4b": "Gemma3TextConfig",
}


def _hf_config_of(c: modelconfig.ModelConfig, cls: str):
    """The transformers config of a preset's shape (the keys each family's released config.json sets)."""
    import transformers

    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              tie_word_embeddings=c.tie_word_embeddings, pad_token_id=None)
    if cls != "Phi3Config":
        kw["head_dim"] = c.head_dim
    if c.num_experts:
        kw |= dict(num_experts_per_tok=c.num_experts_per_tok)
        kw |= (dict(num_local_experts=c.num_experts) if cls == "MixtralConfig"
               else dict(num_experts=c.num_experts, moe_intermediate_size=c.intermediate_size))
    return getattr(transformers, cls)(**kw)


@pytest.mark.parametrize("name", list(NEW_PRESETS))
def test_presets_have_the_released_parameter_counts(name):
    """dummy:<preset> has transformers' parameter count for the same shape (built on the meta device), and the
    config read back from that transformers config.json describes the same shape as the preset."""
    from transformers import AutoModelForCausalLM

    from kubeflash_node.store.hf_config import config_from_hf

    c = modelconfig.preset(name)
    hf = _hf_config_of(c, NEW_PRESETS[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    assert c.total_params() == sum(p.numel() for p in model.parameters())
    ours = config_from_hf(json.loads(hf.to_json_string()))
    for key in ("qk_norm", "norm_plus_one", "sandwich_norms", "num_experts", "num_experts_per_tok", "head_dim",
                "intermediate_size", "family"):
        assert getattr(ours, key) == getattr(c, key), key


@pytest.mark.parametrize("name", list(NEW_PRESETS))
def test_dummy_presets_convert_and_generate(name, tmp_path, monkeypatch):
    """The dummy source writes every tensor the engine reads for each new family (the preset shrunk to a few
    MB: same family flags, small dimensions)."""
    c = modelconfig.PRESETS[name]
    small = replace(c, vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, num_experts=min(c.num_experts, 4),
                    num_experts_per_tok=min(c.num_experts_per_tok, 2), sliding_window=min(c.sliding_window, 3),
                    window_layers=[j for j in c.window_layers if j < 2], eos_token_id=[], bos_token_id=None,
                    pad_token_id=None, embed_scale=32 ** 0.5 if c.embed_scale else 0.0)
    monkeypatch.setitem(modelconfig.PRESETS, "tiny", small)
    m = convert("dummy:tiny", tmp_path / "store", dtype="float32")
    assert len(m.files["layer_000.bin"].tensors) == small.layer_tensors()
    assert sum(e.nbytes for e in m.files["layer_000.bin"].tensors.values()) == 4 * small.layer_params()
    engine = Engine(tmp_path / "store")
    try:
        [out] = engine.generate([[1, 2, 3, 4, 5, 6]], GenParams(max_new_tokens=3))
    finally:
        engine.close()
    assert len(out.tokens) == 3


def test_only_routed_experts_are_read_and_tokens_stay_transformers(tmp_path):
    """Streamed from disk, a MoE layer reads its attention and router, then only the experts its tokens route to:
    the greedy tokens equal transformers' with routed reads and with every expert read (Policy.all_experts), and
    the routed run reads fewer weight bytes."""
    from kubeflash_node.engine.policy import Policy

    model, hf = qwen3_moe(tmp_path)
    convert(str(hf), tmp_path / "store", dtype="float32")
    prompt = [3, 14, 15, 92, 65, 35]
    [ref] = greedy(model, [prompt], 5)
    read = {}
    for every in (False, True):
        engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=1, all_experts=every))
        try:
            [c] = engine.generate([prompt], GenParams(max_new_tokens=5))
        finally:
            engine.close()  # joins the streamer's read-ahead, so the counters below are final
        read[every] = engine.timings.bytes["load_weight"] + engine.timings.bytes["load_expert"]
        assert c.tokens == ref, every
    # one token routes to 2 of 16 experts per layer: at most 2 * 6 (prefill) of 16, and 2 per decode step
    assert read[False] < 0.6 * read[True], read


def test_hot_expert_cache_reads_each_kept_expert_once(tmp_path):
    """With room for every expert, each routed expert is read from disk once over a whole generation and then
    served from the cache (tokens unchanged); with room for a few, the most often routed ones stay and later
    steps hit them."""
    from kubeflash_node.engine.policy import Policy

    model, hf = qwen3_moe(tmp_path)
    convert(str(hf), tmp_path / "store", dtype="float32")
    prompt = [3, 14, 15, 92, 65, 35]
    [ref] = greedy(model, [prompt], 8)
    runs = {}
    for budget in (0, 1 << 20, 6 * 3 * 16 * 32 * 4):  # none, all 32 experts (1 MiB > 32 * 6 KiB), 6 experts
        (tmp_path / "store" / ".routing.json").unlink(missing_ok=True)  # each run cold (warm starts: test_moe_routing)
        engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=1, expert_cache_bytes=budget))
        try:
            [c] = engine.generate([prompt], GenParams(max_new_tokens=8))
            t = engine.timings
            runs[budget] = (t.count["load_expert"], t.count["expert_cache_hit"], t.bytes["load_expert"])
        finally:
            engine.close()
        assert c.tokens == ref, budget
    (reads0, hits0, _), (reads_all, hits_all, _), (reads6, hits6, _) = runs.values()
    assert hits0 == 0 and reads_all + hits_all == reads0  # the same requests, served from disk or the cache
    assert reads_all <= 2 * 16 and hits_all > 0  # each of 2 layers' 16 experts read at most once
    assert reads_all < reads6 < reads0 and hits6 > 0


def test_expert_cache_keeps_the_most_requested():
    """The cache admits an expert over a kept one only if it has been requested more often."""
    from kubeflash_node.engine.experts import ExpertCache

    one = {"w": torch.zeros(4)}  # 16 bytes
    cache = ExpertCache(32)
    for key in [(1, 0), (1, 0), (1, 0), (1, 1)]:
        if cache.get(key) is None:
            cache.offer(key, one)
    assert set(cache.kept) == {(1, 0), (1, 1)}
    for _ in range(2):  # (1, 2) requested twice: replaces (1, 1) (once), not (1, 0) (three times)
        if cache.get((1, 2)) is None:
            cache.offer((1, 2), one)
    assert set(cache.kept) == {(1, 0), (1, 2)} and cache.used == 32


def test_int8_size_estimate_counts_every_expert(tmp_path):
    """The planner's stored-size estimate of an int8 MoE store packs every expert (Qwen3-30B-A3B: about half of
    float16, as the int8 codes are), and on a real conversion it is what the layer files hold, padding aside."""
    from kubeflash_node.engine.costmodel import stage_sizes
    from kubeflash_node.store.hf_config import config_from_hf

    c = modelconfig.preset("qwen3-30b-a3b")
    int8, fp16 = sum(stage_sizes(c, 2, "int8")[0]), sum(stage_sizes(c, 2, "none")[0])
    assert 0.5 < int8 / fp16 < 0.56
    # every matrix fits groups of 64
    _, hf = qwen3_moe(tmp_path, experts=4, hidden_size=128, head_dim=32, moe_intermediate_size=64)
    m = convert(str(hf), tmp_path / "store", dtype="float16", quantization="int8")
    small = config_from_hf(json.loads((hf / "config.json").read_text()))
    stored = stage_sizes(small, 2, "int8")[0][1]
    held = sum(e.nbytes for e in m.files["layer_000.bin"].tensors.values())
    assert abs(held - stored) <= 0.02 * held, (held, stored)


def test_cost_model_predicts_the_bytes_a_routed_decode_step_reads(tmp_path):
    """At batch 1 a decode step routes one token to exactly k experts per layer, what the cost model's expected
    distinct experts gives: the bytes it predicts for a streamed MoE layer are the bytes the engine reads."""
    from kubeflash_node.engine.costmodel import routed_layer_bytes
    from kubeflash_node.engine.policy import Policy
    from kubeflash_node.store.modelconfig import ModelConfig

    _, hf = qwen3_moe(tmp_path, hidden_size=256, head_dim=64, moe_intermediate_size=64)
    m = convert(str(hf), tmp_path / "store", dtype="float32")
    c = ModelConfig.from_dict(m.config)
    assert c.expected_experts(1) == pytest.approx(2) and 2 < c.expected_experts(4) < 8
    from kubeflash_node.engine.experts import expert_ranges

    # what one pass reads per stage (a routed layer: the part before its experts), in schedule order
    stage_read = [expert_ranges(m.files[name])[0] for name in m.stages]
    read = {}
    for new in (1, 9):
        engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=1))
        try:
            engine.generate([[3, 14, 15, 92, 65, 35]], GenParams(max_new_tokens=new))
        finally:
            engine.close()
        # the schedule cycles, so the streamer has read 1-2 stages of a next pass when close() stops it (how many
        # depends on thread timing): those reads are the stages after the head, in order, and are taken out
        t = engine.timings
        ahead = t.count["load_weight"] - new * len(m.stages)
        assert 0 <= ahead <= len(m.stages), t.count["load_weight"]
        read[new] = t.bytes["load_weight"] - sum(stage_read[k % len(m.stages)] for k in range(ahead)) \
            + t.bytes["load_expert"]
    embed_head = m.files["embed.bin"].size + m.files["head.bin"].size
    per_layer = (read[9] - read[1] - 8 * embed_head) / 8 / c.num_layers  # 8 decode steps
    predicted = routed_layer_bytes(c, m.files["layer_000.bin"].size, Policy(), 1)
    assert per_layer == pytest.approx(predicted, rel=0.05)
    assert predicted < 0.35 * m.files["layer_000.bin"].size  # 2 of 16 experts, plus attention and router


def test_report_records_the_routing_profile_the_cost_model_takes(tmp_path):
    """The report's routing_profile is the mean distinct experts a routed layer read routed to, by read shape: a batch-1
    decode step routes its one token to exactly k experts a layer, a prefill of several tokens to between k and E, and
    the requests over all shapes are the run's expert reads; costmodel.RoutingProfile reads it back and prices the
    measured shapes as measured."""
    from kubeflash_node.engine.costmodel import RoutingProfile
    from kubeflash_node.engine.policy import Policy
    from kubeflash_node.engine.report import build_report
    from kubeflash_node.store.modelconfig import ModelConfig

    _, hf = qwen3_moe(tmp_path)
    m = convert(str(hf), tmp_path / "store", dtype="float32")
    c = ModelConfig.from_dict(m.config)
    engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=2))
    try:
        engine.generate([[3, 14, 15, 92, 65, 35], [7, 8, 9, 10, 11, 12]], GenParams(max_new_tokens=4))
    finally:
        engine.close()
    report = build_report(engine)
    profile = {(s, t): n for s, t, n in report["routing_profile"]}
    assert set(profile) == {(2, 6), (2, 1)}
    k, e = c.num_experts_per_tok, c.num_experts
    assert k <= profile[(2, 1)] <= 2 * k and k <= profile[(2, 6)] <= min(e, 12 * k)
    layers = c.num_layers
    assert (profile[(2, 6)] + 3 * profile[(2, 1)]) * layers == pytest.approx(report["expert_reads"])
    rp = RoutingProfile.from_report({"report": report})
    assert rp.distinct(c, 2, 6) == pytest.approx(profile[(2, 6)], rel=1e-6)
    every = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=2, all_experts=True))
    try:
        every.generate([[3, 14, 15]], GenParams(max_new_tokens=2))
    finally:
        every.close()
    assert build_report(every)["routing_profile"] == [] and RoutingProfile.from_report(build_report(every)) is None
