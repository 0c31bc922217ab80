"""GGUF files of the newer families (qwen2, qwen3moe, phi3, gemma2, gemma3, llama-arch Mixtral) convert to the layer
store and compute what transformers computes in float32.

Each test builds a tiny random transformers model, writes it as GGUF with the tensor names and metadata keys that
llama.cpp's converter uses (names from the gguf package's constants; llama-arch q/k rows permuted, Gemma norms
stored as 1 + w, experts stacked per layer, Phi-3's fused projections kept), converts that file with our reader
and compares last-position logits and greedy tokens with the transformers model. GGUF layouts the reader cannot
map are refused by name before anything is written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_random import greedy, left_padded, save_random_model

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.convert import SourceError, convert

VOCAB = 120
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _configs() -> dict:
    import transformers as t

    longrope = {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * j for j in range(8)],
                "long_factor": [1.5 + 0.2 * j for j in range(8)]}
    return {
        "qwen2": t.Qwen2Config(**SMALL, use_sliding_window=False),
        "qwen3": t.Qwen3Config(**SMALL, head_dim=24),
        "qwen3moe": t.Qwen3MoeConfig(**SMALL, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                     norm_topk_prob=True),
        "mixtral": t.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        "phi3": t.Phi3Config(**{**SMALL, "num_key_value_heads": 4}, original_max_position_embeddings=16,
                             rope_scaling=longrope, sliding_window=None, pad_token_id=None),
        "gemma2": t.Gemma2Config(**SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=7,
                                 attn_logit_softcapping=20.0, final_logit_softcapping=15.0, pad_token_id=None),
        "gemma3": t.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 7}, head_dim=16, query_pre_attn_scalar=16,
                                     sliding_window=7, rope_scaling={"rope_type": "linear", "factor": 4.0},
                                     rope_local_base_freq=500.0, pad_token_id=None),
    }


def _norm_shift(arch: str) -> float:
    return 1.0 if arch.startswith("gemma") else 0.0


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for llama-arch files: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(cfg, hf_dir, arch: str, path, q8_layers: bool = False) -> None:
    """The checkpoint in `hf_dir` (config `cfg`) as a float32 GGUF file of architecture `arch`, laid out as
    llama.cpp's converter lays it out (it too reads the checkpoint's tensor names, one tensor per expert); no
    tokenizer (the engine takes token ids). `q8_layers`: the layers' matrices (experts too) as Q8_0."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.torch import load_file

    sd = {k: v.float() for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    w = GGUFWriter(str(path), arch)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma 3: per layer type
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
    if arch.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        else:
            w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_freq_base_swa(cfg.rope_parameters["sliding_attention"]["rope_theta"])
    if arch == "phi3":
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(cfg.original_max_position_embeddings))))
        for k in ("long", "short"):
            name = TENSOR_NAMES[getattr(MODEL_TENSOR, f"ROPE_FACTORS_{k.upper()}")] + ".weight"
            w.add_tensor(name, np.array(cfg.rope_scaling[f"{k}_factor"], dtype=np.float32))

    def put(kind, hf_name, bid=None, shift=0.0, permute=0, stack=None, suffix=".weight"):
        name = TENSOR_NAMES[kind].format(bid=bid) + suffix
        t = torch.stack([sd[stack.format(j=j)] for j in range(experts)]) if stack else sd[hf_name]
        if permute:
            t = _permute(t, permute)
        if q8_layers and bid is not None and t.dim() >= 2:
            w.add_tensor(name, quantize(t.numpy(), GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
            return
        w.add_tensor(name, (t + shift).numpy())

    T, shift = MODEL_TENSOR, _norm_shift(arch)
    put(T.TOKEN_EMBD, "model.embed_tokens.weight")
    put(T.OUTPUT_NORM, "model.norm.weight", shift=shift)
    if not cfg.tie_word_embeddings:
        put(T.OUTPUT, "lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(T.ATTN_NORM, p + "input_layernorm.weight", i, shift)
        if arch == "phi3":
            put(T.ATTN_QKV, p + "self_attn.qkv_proj.weight", i)
        else:
            llama = arch == "llama"
            put(T.ATTN_Q, p + "self_attn.q_proj.weight", i, permute=heads if llama else 0)
            put(T.ATTN_K, p + "self_attn.k_proj.weight", i, permute=kv if llama else 0)
            put(T.ATTN_V, p + "self_attn.v_proj.weight", i)
            if p + "self_attn.q_proj.bias" in sd:  # Qwen2's q/k/v biases
                for kind, n, perm in ((T.ATTN_Q, "q", heads), (T.ATTN_K, "k", kv), (T.ATTN_V, "v", 0)):
                    put(kind, p + f"self_attn.{n}_proj.bias", i, permute=perm if llama else 0, suffix=".bias")
        put(T.ATTN_OUT, p + "self_attn.o_proj.weight", i)
        if p + "self_attn.q_norm.weight" in sd:
            put(T.ATTN_Q_NORM, p + "self_attn.q_norm.weight", i, shift)
            put(T.ATTN_K_NORM, p + "self_attn.k_norm.weight", i, shift)
        if arch.startswith("gemma"):
            put(T.ATTN_POST_NORM, p + "post_attention_layernorm.weight", i, shift)
            put(T.FFN_PRE_NORM, p + "pre_feedforward_layernorm.weight", i, shift)
            put(T.FFN_POST_NORM, p + "post_feedforward_layernorm.weight", i, shift)
        else:
            put(T.FFN_NORM, p + "post_attention_layernorm.weight", i)
        if arch == "phi3":
            put(T.FFN_UP, p + "mlp.gate_up_proj.weight", i)
            put(T.FFN_DOWN, p + "mlp.down_proj.weight", i)
        elif experts:
            moe = p + ("block_sparse_moe." if arch == "llama" else "mlp.")
            names = ("w1", "w3", "w2") if arch == "llama" else ("gate_proj", "up_proj", "down_proj")
            put(T.FFN_GATE_INP, moe + "gate.weight", i)
            for kind, n in zip((T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP), names):
                put(kind, None, i, stack=moe + "experts.{j}." + n + ".weight")
        else:
            put(T.FFN_GATE, p + "mlp.gate_proj.weight", i)
            put(T.FFN_UP, p + "mlp.up_proj.weight", i)
            put(T.FFN_DOWN, p + "mlp.down_proj.weight", i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3moe", "mixtral": "llama", "phi3": "phi3", "gemma2": "gemma2",
        "gemma3": "gemma3"}


def _gguf_model(name, tmp_path):
    model = save_random_model(_configs()[name], tmp_path / "hf")
    path = tmp_path / f"{name}.gguf"
    write_gguf(model.config, tmp_path / "hf", ARCH[name], path)
    return model, path


@pytest.mark.parametrize("name", list(ARCH))
def test_gguf_logits_and_tokens_match_transformers(name, tmp_path):
    """Left-padded prompts of mixed lengths (longer than the sliding windows and Phi-3's original context): the
    last-position logits of the GGUF-converted store are transformers' within float32 tolerance, and greedy
    decoding gives transformers' tokens."""
    model, path = _gguf_model(name, tmp_path)
    m = convert(str(path), tmp_path / "store", dtype="float32")
    assert m.config["family"] == {"mixtral": "mixtral", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}.get(name, name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 30)]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    [want] = greedy(model, [prompts[1]], 6)
    engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=3))
    try:
        ours = engine.prefill_logits(prompts)
        [c] = engine.generate([prompts[1]], GenParams(max_new_tokens=6))
    finally:
        engine.close()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert c.tokens == want


def _rewrite(src, dst, *, arch=None, drop=(), extra_kv=None, rename=None) -> None:
    """A copy of GGUF `src` with its architecture renamed, tensors dropped or renamed, or metadata added."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    old = r.fields["general.architecture"].contents()
    arch = arch or old
    w = GGUFWriter(str(dst), arch)
    fields = {key.replace(f"{old}.", f"{arch}.", 1): (f.contents(), f.types[0]) for key, f in r.fields.items()
              if not key.startswith(("GGUF.", "general.architecture"))}
    for key, (value, kind) in (fields | (extra_kv or {})).items():
        if kind == GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, kind)
    for t in r.tensors:
        if t.name in drop:
            continue
        w.add_tensor((rename or {}).get(t.name, t.name), np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _refused(path, tmp_path, message: str) -> None:
    with pytest.raises(SourceError) as e:
        convert(str(path), tmp_path / "store", dtype="float32")
    assert message in str(e.value), str(e.value)
    assert not (tmp_path / "store").exists()


def test_unmapped_family_is_refused_by_name(tmp_path):
    """An architecture the reader cannot map (here a Qwen3 file relabelled deepseek2) is named in the error."""
    _, path = _gguf_model("qwen3", tmp_path)
    _rewrite(path, tmp_path / "x.gguf", arch="deepseek2")
    _refused(tmp_path / "x.gguf", tmp_path, "GGUF architecture 'deepseek2' is not supported; expected one of llama")


def test_bad_expert_layouts_are_refused_by_tensor_or_key(tmp_path):
    """A missing stacked expert tensor, a per-expert (unknown) layout, an expert count the tensors do not hold and
    shared experts are each refused, naming the tensor or key, before a store exists."""
    from gguf import GGUFValueType

    _, path = _gguf_model("qwen3moe", tmp_path)
    bad = tmp_path / "bad.gguf"
    _rewrite(path, bad, drop={"blk.2.ffn_up_exps.weight"})
    _refused(bad, tmp_path, "GGUF tensor 'blk.2.ffn_up_exps.weight' missing")
    _rewrite(path, bad, rename={"blk.0.ffn_down_exps.weight": "blk.0.ffn_down.3.weight"})
    _refused(bad, tmp_path, "GGUF tensor 'blk.0.ffn_down.3.weight' is one expert of an unknown (per-expert) layout")
    _rewrite(path, bad, drop={"blk.0.ffn_gate_inp.weight"})
    _refused(bad, tmp_path, "GGUF tensor 'blk.0.ffn_gate_inp.weight' missing")
    _rewrite(path, bad, extra_kv={"qwen3moe.expert_shared_count": (1, GGUFValueType.UINT32)})
    _refused(bad, tmp_path, "GGUF qwen3moe.expert_shared_count = 1 is not supported")
    (tmp_path / "m").mkdir()
    _, mixtral = _gguf_model("mixtral", tmp_path / "m")
    _rewrite(mixtral, bad, extra_kv={"llama.expert_count": (5, GGUFValueType.UINT32)})
    _refused(bad, tmp_path, "GGUF tensor 'blk.0.ffn_gate_inp.weight' holds 4 experts but llama.expert_count is 5")


def test_q8_0_experts_dequantize_in_place(tmp_path):
    """A qwen3moe GGUF whose layer matrices (the stacked experts too) are Q8_0: each stored expert matrix is the
    gguf package's own dequantization of its slice of the stacked tensor, and the store generates."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file

    from kubeflash_node.store.convert import StoreSource

    model = save_random_model(_configs()["qwen3moe"], tmp_path / "hf")
    write_gguf(model.config, tmp_path / "hf", "qwen3moe", tmp_path / "q8.gguf", q8_layers=True)
    convert(str(tmp_path / "q8.gguf"), tmp_path / "store", dtype="float32")
    layer = StoreSource(tmp_path / "store").layer(1)
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        stack = torch.stack([sd[f"model.layers.1.mlp.experts.{j}.{theirs}.weight"] for j in range(6)]).numpy()
        want = dequantize(quantize(stack, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        assert not np.array_equal(want, stack)  # Q8_0 did round: the comparison below is of the dequantized values
        for j in range(6):
            assert np.array_equal(layer[f"e{j}.{ours}"].numpy(), want[j]), (ours, j)
    engine = Engine(tmp_path / "store")
    try:
        [c] = engine.generate([[5, 6, 7, 8]], GenParams(max_new_tokens=3))
    finally:
        engine.close()
    assert len(c.tokens) == 3
