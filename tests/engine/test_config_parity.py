"""Every model-config option of the supported families, on small random configs: kubeflash computes it as
transformers does, or refuses the config.json naming the key and the value.

A seeded generator cycles each option through all its values (every hidden_act ACT2FN names and we compute,
every rope_type, q/k/v/o and MLP biases, head_dim != hidden/heads, sliding windows shorter than the prompts,
SmolLM3's no-RoPE layers, OPT post-LN / project_in-out / untied head / no biases / no LayerNorm affine, absent
or negative pad_token_id; Qwen3's q/k norms, Phi-3's fused projections and longrope (also spelled su), Gemma 2/3's
soft caps, (1 + w) norms, query_pre_attn_scalar and per-layer-type RoPE, Mixtral's and Qwen3-MoE's routers with
and without top-k renormalization), the other options drawn at random. Each config becomes a tiny transformers model in
float32 with random weights, saved as config.json + safetensors, converted by our store converter and run by
our engine: last-position logits of a left-padded batch and greedy tokens must match transformers'.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from hf_random import assert_config_refused, greedy, left_padded

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.convert import convert

VOCAB = 211
PROMPT_LENS = (5, 17, 40)  # longer than every sliding window drawn below
ACTS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python", "gelu_accurate", "gelu_10",
        "quick_gelu", "relu", "relu2", "relu6", "leaky_relu", "swish", "mish", "tanh", "sigmoid", "hardswish",
        "laplace", "linear", "sqrtsoftplus", "gelu_python_tanh")


def _ropes(rng: random.Random, head_dim: int) -> list[dict | None]:
    """One rope_parameters of every rope_type (None: the family's plain default)."""
    short = [round(rng.uniform(1.0, 1.5), 3) for _ in range(head_dim // 2)]
    long = [round(rng.uniform(1.0, 8.0), 3) for _ in range(head_dim // 2)]
    return [
        None,
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": rng.choice([2.0, 3.5])},
        {"rope_type": "dynamic", "factor": rng.choice([2.0, 4.0])},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
         "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
        {"rope_type": "longrope", "short_factor": short, "long_factor": long, "original_max_position_embeddings": 24},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32},
    ]


def _cycle(rng: random.Random, values: list, n: int) -> list:
    """n values that go through every one of `values` (in a random order), then repeat."""
    order = list(values)
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def _shape(rng: random.Random, head_dim_differs: bool) -> dict:
    heads = rng.choice([2, 4])
    hidden = rng.choice([32, 48, 64])
    kv = rng.choice([h for h in (1, 2, 4) if heads % h == 0])
    out = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=rng.choice([48, 80, 96]),
               num_hidden_layers=rng.choice([2, 3]), num_attention_heads=heads, num_key_value_heads=kv,
               max_position_embeddings=64, rms_norm_eps=rng.choice([1e-6, 1e-5, 1e-3]))
    if head_dim_differs:
        out["head_dim"] = rng.choice([8, 24]) if hidden // heads != 8 else 24
    return out


def _llama_family_cases() -> list:
    cases = []
    # Llama: every activation, every rope type, biases on q/k/v/o and the MLP, head_dim, pad ids, tying
    rng = random.Random(14)
    n = len(ACTS)
    ropes = _cycle(rng, _ropes(rng, 16), n)
    acts = _cycle(rng, ACTS, n)
    # the binary options run through all 8 combinations (bits of i), pad ids through their 3 values
    attn_bias, mlp_bias, tie = ([bool(i >> b & 1) for i in range(n)] for b in range(3))
    pads = [(None, -1, 3)[i % 3] for i in range(n)]
    for i in range(n):
        kw = _shape(rng, head_dim_differs=i % 3 == 1)
        if ropes[i] and ropes[i]["rope_type"] == "longrope":
            kw["head_dim"] = 16  # the factors' length
        kw.update(hidden_act=acts[i], attention_bias=attn_bias[i], mlp_bias=mlp_bias[i], pad_token_id=pads[i],
                  tie_word_embeddings=tie[i], rope_parameters=_with_theta(rng, ropes[i]))
        cases.append(pytest.param("llama", kw, i % 4 == 0, id=f"llama-{i:02d}-{acts[i]}-{_rope_id(ropes[i])}"))
    # Mistral: sliding window over every layer (default 4096 when absent, None turns it off)
    for i, window in enumerate([7, 12, None, "absent"]):
        kw = _shape(rng, head_dim_differs=i == 1)
        kw.update(hidden_act=rng.choice(["silu", "gelu"]), rope_parameters=_with_theta(rng, None))
        if window != "absent":
            kw["sliding_window"] = window
        cases.append(pytest.param("mistral", kw, True, id=f"mistral-window-{window}"))
    # Qwen2: q/k/v biases; slides only with use_sliding_window, on layers >= max_window_layers, or per layer_types
    for i, (use, mwl, types) in enumerate([(True, 0, None), (True, 1, None), (False, 0, None), (True, 2, None),
                                           (True, 0, ["sliding_attention", "full_attention", "sliding_attention"])]):
        kw = _shape(rng, head_dim_differs=i == 2)
        kw["num_hidden_layers"] = 3
        kw.update(use_sliding_window=use, sliding_window=rng.choice([5, 9]), max_window_layers=mwl,
                  rope_parameters=_with_theta(rng, _ropes(rng, 16)[2 + i % 3]))
        if types:
            kw["layer_types"] = types
        cases.append(pytest.param("qwen2", kw, i % 2 == 0, id=f"qwen2-use{use}-mwl{mwl}" + ("-types" if types else "")))
    # SmolLM3: no-RoPE layers (explicit list or every interval-th), sliding on the no-RoPE layers, biases
    for i, (nope, every, window) in enumerate([(None, 2, None), ([1, 0, 1], 4, None), (None, 3, 6), ([0, 1, 0], 4, 8)]):
        kw = _shape(rng, head_dim_differs=i == 3)
        kw["num_hidden_layers"] = 3
        kw.update(no_rope_layers=nope, no_rope_layer_interval=every, use_sliding_window=window is not None,
                  sliding_window=window, attention_bias=i % 2 == 1, mlp_bias=i % 2 == 0,
                  hidden_act=rng.choice(["silu", "gelu_pytorch_tanh"]), tie_word_embeddings=i != 2,
                  pad_token_id=[None, 0][i % 2],  # SmolLM3's default (128004) is past this vocabulary
                  rope_parameters=_with_theta(rng, _ropes(rng, 16)[4 + i % 4] if i != 1 else None))
        if kw["rope_parameters"] and kw["rope_parameters"]["rope_type"] == "longrope":
            kw["head_dim"] = 16
        cases.append(pytest.param("smollm3", kw, i % 2 == 1, id=f"smollm3-nope{nope or every}-window{window}"))
    return cases


def _with_theta(rng: random.Random, rope: dict | None) -> dict | None:
    """rope_parameters with a random rope_theta, or None (the config class's default theta)."""
    if rope is None:
        return None
    return {**rope, "rope_theta": rng.choice([10000.0, 500000.0, 1234.5])}


def _rope_id(rope: dict | None) -> str:
    return "rope-none" if rope is None else "rope-" + rope["rope_type"]


# An L8 orthogonal array: any two of its columns hold all four combinations of two binary options
L8 = ["0000000", "0001111", "0110011", "0111100", "1010101", "1011010", "1100110", "1101001"]


def _opt_cases() -> list:
    """Post-LN, project_in/out, untied head, no biases, no LayerNorm affine, no final LayerNorm: every pair of
    them in both states (L8 rows), every activation drawn."""
    rng = random.Random(7)
    cases = []
    acts = _cycle(rng, ["relu", "gelu", "gelu_new", "silu", "quick_gelu", "relu2", "gelu_pytorch_tanh", "tanh"], 8)
    for i, row in enumerate(L8):
        post, proj, untie, nobias, noaffine, remove = (c == "1" for c in row[:6])
        hidden = rng.choice([32, 64])
        kw = dict(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=rng.choice([64, 96]), num_hidden_layers=rng.choice([2, 3]),
                  num_attention_heads=rng.choice([2, 4]), max_position_embeddings=64, activation_function=acts[i],
                  do_layer_norm_before=not post, tie_word_embeddings=not untie,
                  word_embed_proj_dim=hidden // 2 if proj else hidden, enable_bias=not nobias,
                  layer_norm_elementwise_affine=not noaffine, _remove_final_layer_norm=remove,
                  pad_token_id=(1, -1, None)[i % 3])
        name = "-".join(k for k, on in zip(("postLN", "proj", "untied", "nobias", "noaffine", "nofinal"), row, strict=False)
                        if on == "1")
        cases.append(pytest.param("opt", kw, False, id=f"opt-{i}-{acts[i]}-{name or 'plain'}"))
    return cases


def _new_family_cases() -> list:
    """Qwen3, Phi-3, Gemma 2, Gemma 3 (text), Mixtral, Qwen3-MoE: each family's own options in every state."""
    rng = random.Random(21)
    cases = []
    # Qwen3: q/k RMSNorms on every head (head_dim 128 unless told), q/k/v/o biases, sliding layers, rope types
    for i, (bias, use, mwl) in enumerate([(False, False, 0), (True, True, 1), (False, True, 0), (True, False, 0)]):
        kw = _shape(rng, head_dim_differs=i == 2)
        kw["num_hidden_layers"] = 3
        if i == 3:
            kw.pop("head_dim", None)  # Qwen3Config's default head_dim (128), not hidden / heads
        kw.update(attention_bias=bias, use_sliding_window=use, sliding_window=rng.choice([5, 9]), max_window_layers=mwl,
                  tie_word_embeddings=i == 1, rope_parameters=_with_theta(rng, _ropes(rng, 16)[i * 2]))
        if kw["rope_parameters"] and kw["rope_parameters"]["rope_type"] == "longrope":
            kw["head_dim"] = 16
        cases.append(pytest.param("qwen3", kw, i % 2 == 1, id=f"qwen3-{i}-bias{bias}-window{use}-mwl{mwl}"))
    # Phi-3: fused qkv / gate_up, GQA or MHA, longrope (su in older configs) past original_max_position_embeddings
    for i, (longrope, window) in enumerate([(False, None), (True, None), (True, 7), (False, 11)]):
        kw = _shape(rng, head_dim_differs=False)
        kw.pop("head_dim", None)
        kw.update(pad_token_id=None, eos_token_id=2, sliding_window=window, original_max_position_embeddings=24,
                  hidden_act=rng.choice(["silu", "gelu_new"]))
        hd = kw["hidden_size"] // kw["num_attention_heads"]
        if longrope:
            kw["rope_parameters"] = {"rope_type": "longrope", "rope_theta": rng.choice([10000.0, 1234.5]),
                                     "short_factor": [round(rng.uniform(1.0, 1.5), 3) for _ in range(hd // 2)],
                                     "long_factor": [round(rng.uniform(1.0, 8.0), 3) for _ in range(hd // 2)]}
        cases.append(pytest.param("phi3", kw, i % 2 == 1, id=f"phi3-{i}-longrope{longrope}-window{window}"))
    # Gemma 2: soft caps on and off, query_pre_attn_scalar, alternating sliding layers (or layer_types), activations
    for i, (attn_cap, final_cap, types) in enumerate([(50.0, 30.0, None), (None, 5.0, None), (2.0, None, "types"),
                                                      (None, None, None)]):
        kw = _shape(rng, head_dim_differs=i % 2 == 0)
        kw["num_hidden_layers"] = 3
        kw.update(attn_logit_softcapping=attn_cap, final_logit_softcapping=final_cap, sliding_window=rng.choice([5, 9]),
                  query_pre_attn_scalar=rng.choice([8, 24, 64]), attention_bias=i == 1, tie_word_embeddings=i != 3,
                  hidden_activation=rng.choice(["gelu_pytorch_tanh", "silu"]), rope_parameters=_with_theta(rng, None))
        if types:
            kw["layer_types"] = ["full_attention", "sliding_attention", "sliding_attention"]
        cases.append(pytest.param("gemma2", kw, i % 2 == 1, id=f"gemma2-{i}-cap{attn_cap}-final{final_cap}"))
    # Gemma 3 text: q/k norms, sliding layers by pattern with their own RoPE base, a scaled RoPE on full layers
    for i, (pattern, full) in enumerate([(2, None), (3, {"rope_type": "linear", "factor": 4.0}),
                                         (2, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})]):
        kw = _shape(rng, head_dim_differs=i == 1)
        kw["num_hidden_layers"] = 3
        kw.update(sliding_window_pattern=pattern, sliding_window=rng.choice([5, 9]), query_pre_attn_scalar=rng.choice([16, 48]),
                  final_logit_softcapping=[None, None, 15.0][i],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0, **(full or {})},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": rng.choice([10.0, 10000.0])}})
        cases.append(pytest.param("gemma3_text", kw, i != 1, id=f"gemma3-{i}-pattern{pattern}-{_rope_id(full)}"))
    # Mixtral and Qwen3-MoE: experts, top-k (renormalized always / by norm_topk_prob), sliding windows, q/k norms
    for i, (experts, top, window) in enumerate([(4, 2, None), (8, 1, 6), (5, 3, None)]):
        kw = _shape(rng, head_dim_differs=i == 1)
        kw.update(num_local_experts=experts, num_experts_per_tok=top, sliding_window=window,
                  rope_parameters=_with_theta(rng, None))
        cases.append(pytest.param("mixtral", kw, i == 1, id=f"mixtral-{i}-e{experts}-top{top}-window{window}"))
    for i, (experts, top, norm, window) in enumerate([(4, 2, False, None), (8, 3, True, 7), (6, 1, False, None),
                                                      (4, 4, True, None)]):
        kw = _shape(rng, head_dim_differs=i == 2)
        kw.update(num_experts=experts, num_experts_per_tok=top, norm_topk_prob=norm, use_sliding_window=window is not None,
                  sliding_window=window, moe_intermediate_size=rng.choice([16, 40]), attention_bias=i == 1,
                  rope_parameters=_with_theta(rng, _ropes(rng, 16)[2 + i]))
        cases.append(pytest.param("qwen3_moe", kw, i % 2 == 0, id=f"qwen3moe-{i}-e{experts}-top{top}-norm{norm}"))
    return cases


CASES = _llama_family_cases() + _opt_cases() + _new_family_cases()


def _config(family: str, kw: dict):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "smollm3": transformers.SmolLM3Config, "opt": transformers.OPTConfig, "qwen3": transformers.Qwen3Config,
           "phi3": transformers.Phi3Config, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig, "mixtral": transformers.MixtralConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig}[family]
    keep = ("pad_token_id", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping")
    kw = {k: v for k, v in kw.items() if v is not None or k in keep}
    return cls(**kw)


def _random_model(family: str, kw: dict, tmp_path):
    """A transformers model with random weights, saved as safetensors. Weights are drawn large enough that every
    option shows in the logits: unit-variance embeddings, matrices of variance 1/fan-in, q and k larger still so
    attention is far from uniform (transformers' 0.02 init makes it nearly uniform, and RoPE nearly invisible);
    norms and biases perturbed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, kw), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, (3.0 if any(k in name for k in ("q_proj", "k_proj")) else 1.0) / p.shape[1] ** 0.5)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    return model, hf_dir


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("family,kw,legacy", CASES)
def test_logits_and_greedy_match_transformers(family, kw, legacy, tmp_path):
    """Left-padded batch: last-position logits within float32 tolerance; one prompt: 6 greedy tokens equal."""
    model, hf_dir = _random_model(family, kw, tmp_path)
    if legacy:  # the pre-v5 spelling of the same config: rope_scaling {"type"} + a top-level rope_theta
        _legacy_rope(hf_dir / "config.json")
    convert(str(hf_dir), tmp_path / "store", dtype="float32")
    prompts = _prompts()
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        pos = {} if family == "opt" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        ref = model(input_ids=ids, attention_mask=mask, **pos).logits[:, -1]
    [ref_tokens] = greedy(model, [prompts[1]], 6)
    engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=3))
    try:
        ours = engine.prefill_logits(prompts)
        [c] = engine.generate([prompts[1]], GenParams(max_new_tokens=6))
    finally:
        engine.close()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)
    assert c.tokens == ref_tokens


def _legacy_rope(path) -> None:
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None)
    if rope and "full_attention" in rope:  # Gemma 3: rope_theta + rope_scaling (full layers), rope_local_base_freq
        full, local = rope["full_attention"], rope["sliding_attention"]
        cfg["rope_theta"], cfg["rope_local_base_freq"] = full.pop("rope_theta"), local["rope_theta"]
        kind = full.pop("rope_type", "default")
        if kind != "default":
            cfg["rope_scaling"] = {"type": kind, **full}
    elif rope:
        if cfg.get("model_type") == "phi3" and rope.get("rope_type") == "longrope":
            rope["rope_type"] = "su"  # Phi-3's first name for it
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type", "default")
        if kind != "default":
            cfg["rope_scaling"] = {"type": kind, **rope}
    path.write_text(json.dumps(cfg))


def test_window_and_nope_layers_are_what_transformers_builds(tmp_path):
    """The per-layer choices the engine makes (which layers slide, which skip RoPE) are transformers' own."""
    from kubeflash_node.store.hf_config import config_from_hf

    for param in CASES:
        family, kw, _ = param.values
        if family == "opt":
            continue
        hf = _config(family, kw)
        ours = config_from_hf(json.loads(hf.to_json_string(use_diff=True)))
        if family in ("mistral", "mixtral", "phi3", "qwen3_moe"):  # no layer_types: the window is every layer's
            slides = list(range(hf.num_hidden_layers)) if hf.sliding_window is not None else []
        else:
            slides = [j for j, t in enumerate(getattr(hf, "layer_types", [])) if t == "sliding_attention"]
        assert ours.window_layers == slides, param.id
        nope = [j for j, f in enumerate(getattr(hf, "no_rope_layers", None) or [1] * hf.num_hidden_layers) if not f]
        assert ours.nope_layers == nope[: hf.num_hidden_layers], param.id
    assert any(p.values[0] != "opt" and config_from_hf(json.loads(_config(*p.values[:2]).to_json_string())).window_layers
               for p in CASES)


@pytest.mark.parametrize("rope", _ropes(random.Random(3), 16)[2:], ids=lambda r: r["rope_type"])
def test_rope_beyond_trained_length_matches_transformers(rope):
    """cos/sin of every rope_type for calls past the trained length (dynamic and longrope switch frequencies
    there; the engine's context check keeps end-to-end runs below max_position_embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubeflash_node.engine.rope import Rope
    from kubeflash_node.store.hf_config import config_from_hf

    hf_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32, rope_parameters={**rope, "rope_theta": 5000.0})
    rotary = LlamaForCausalLM(hf_cfg).model.rotary_emb
    ours = Rope(config_from_hf(json.loads(hf_cfg.to_json_string())))
    x = torch.zeros(1, dtype=torch.float32)
    for n in (10, 40, 90, 20):  # grows past the trained lengths, then comes back
        positions = torch.arange(n)[None]
        ref_cos, ref_sin = rotary(x, positions)
        cos, sin = ours(positions, torch.float32)
        torch.testing.assert_close(cos[:, 0], ref_cos, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sin[:, 0], ref_sin, atol=1e-5, rtol=1e-5)


def test_every_transformers_activation_is_computed_or_refused():
    """ACT2FN's names: the engine computes all but the two with learned parameters of their own."""
    from transformers.activations import ACT2FN

    from kubeflash_node.engine import model
    from kubeflash_node.store import modelconfig as config

    assert set(config.ACTIVATIONS) == set(model.ACTIVATIONS) == set(ACTS)
    assert set(ACT2FN) - set(config.ACTIVATIONS) == {"prelu", "xielu"}
    x = torch.linspace(-6, 6, 301)
    for name in config.ACTIVATIONS:
        torch.testing.assert_close(model.ACTIVATIONS[name](x.clone()), ACT2FN[name](x), atol=1e-6, rtol=1e-6, msg=name)


def test_every_transformers_rope_type_is_computed_or_refused():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kubeflash_node.store.modelconfig import ROPE_TYPES

    assert set(ROPE_INIT_FUNCTIONS) - set(ROPE_TYPES) == {"proportional"}


LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4)
OPT = dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4)
REFUSED = [
    pytest.param({**LLAMA, "hidden_act": "xielu"}, "hidden_act = 'xielu'", id="llama-hidden_act-xielu"),
    pytest.param({**LLAMA, "hidden_act": "prelu"}, "hidden_act = 'prelu'", id="llama-hidden_act-prelu"),
    pytest.param({**OPT, "activation_function": "xielu"}, "activation_function = 'xielu'", id="opt-activation-xielu"),
    pytest.param({**LLAMA, "rope_parameters": {"rope_type": "proportional", "factor": 2.0}},
                 "rope_parameters.rope_type = 'proportional'", id="rope-proportional"),
    pytest.param({**LLAMA, "rope_scaling": {"type": "su", "factor": 2.0}}, "rope_scaling.rope_type = 'su'",
                 id="rope-scaling-unknown"),
    pytest.param({**LLAMA, "rope_scaling": {"type": "linear"}}, "rope_scaling.factor is missing", id="rope-no-factor"),
    pytest.param({**LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5", id="partial-rotary"),
    pytest.param({**LLAMA, "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
                 "rope_parameters.short_factor = '1 values'", id="longrope-length"),
    pytest.param({**LLAMA, "num_key_value_heads": 3}, "num_key_value_heads = 3", id="kv-heads"),
    pytest.param({**LLAMA, "model_type": "mistral", "sliding_window": -4}, "sliding_window = -4", id="mistral-window"),
    pytest.param({**LLAMA, "model_type": "qwen2", "layer_types": ["sliding_attention", "full_attention"]},
                 "sliding_window = None", id="qwen2-types-without-window"),
    pytest.param({**LLAMA, "model_type": "qwen2", "layer_types": ["full_attention"]}, "layer_types = ['full_attention']",
                 id="qwen2-types-short"),
    pytest.param({**LLAMA, "model_type": "smollm3", "no_rope_layers": [1]}, "no_rope_layers = [1]", id="smollm3-nope"),
    pytest.param({**LLAMA, "model_type": "smollm3", "no_rope_layer_interval": 0}, "no_rope_layer_interval = 0",
                 id="smollm3-interval"),
    pytest.param({**LLAMA, "model_type": "phi3", "rope_scaling": {"type": "dynamic", "factor": 2.0}},
                 "rope_scaling.rope_type = 'dynamic'", id="phi3-rope-dynamic"),
    pytest.param({**LLAMA, "model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor = 0.75",
                 id="phi3-partial-rotary"),
    pytest.param({**LLAMA, "model_type": "gemma2", "use_bidirectional_attention": True},
                 "use_bidirectional_attention = True", id="gemma2-bidirectional"),
    pytest.param({**LLAMA, "model_type": "gemma2", "attn_logit_softcapping": -1.0}, "attn_logit_softcapping = -1.0",
                 id="gemma2-negative-cap"),
    pytest.param({**LLAMA, "model_type": "gemma2", "query_pre_attn_scalar": 0}, "query_pre_attn_scalar = 0",
                 id="gemma2-scalar"),
    pytest.param({**LLAMA, "model_type": "gemma2", "sliding_window": None}, "sliding_window = None",
                 id="gemma2-sliding-layers-without-window"),
    pytest.param({**LLAMA, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0},
                 "attn_logit_softcapping = 50.0", id="gemma3-attn-cap"),
    pytest.param({**LLAMA, "model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
                 "rope_parameters.sliding_attention.rope_type = 'linear'", id="gemma3-local-rope-scaled"),
    pytest.param({**LLAMA, "model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "su", "factor": 2.0}, "sliding_attention": {}}},
                 "rope_parameters.full_attention.rope_type = 'su'", id="gemma3-full-rope-unknown"),
    pytest.param({**LLAMA, "model_type": "gemma3", "text_config": {}}, "model_type 'gemma3'", id="gemma3-multimodal"),
    pytest.param({**LLAMA, "model_type": "qwen3_moe", "mlp_only_layers": [0]}, "mlp_only_layers = [0]",
                 id="qwen3moe-dense-layers"),
    pytest.param({**LLAMA, "model_type": "qwen3_moe", "decoder_sparse_step": 2}, "decoder_sparse_step = 2",
                 id="qwen3moe-sparse-step"),
    pytest.param({**LLAMA, "model_type": "qwen3_moe", "num_experts": 0}, "num_experts = 0", id="qwen3moe-no-experts"),
    pytest.param({**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 5},
                 "num_experts_per_tok = 5", id="mixtral-top-k-past-experts"),
]


@pytest.mark.parametrize("cfg,names", REFUSED)
def test_unsupported_options_are_refused_by_key(cfg, names, tmp_path):
    """convert refuses at load time, before any weight is read, with the config.json key and value."""
    assert_config_refused(cfg, names, tmp_path)


SIZED = [c for c in CASES if c.id.startswith(("llama-0", "qwen2-useTrue-mwl0", "smollm3", "opt"))]


@pytest.mark.parametrize("family,kw,legacy", SIZED)
def test_sizes_count_what_the_store_holds(family, kw, legacy, tmp_path):
    """ModelConfig's tensor and parameter counts (the planner's and the agent's space estimates) equal what the
    converter writes for the option, and transformers' own parameter count."""
    from kubeflash_node.store.modelconfig import ModelConfig

    model, hf_dir = _random_model(family, kw, tmp_path)
    m = convert(str(hf_dir), tmp_path / "store", dtype="float32")
    c = ModelConfig.from_dict(m.config)
    counts = {name: sum(e.nbytes for e in f.tensors.values()) // 4 for name, f in m.files.items()}  # float32
    assert len(m.files["layer_000.bin"].tensors) == c.layer_tensors()
    assert counts["layer_000.bin"] == c.layer_params()
    assert counts["embed.bin"] == c.embed_params() and counts["head.bin"] == c.head_params()
    assert c.total_params() == sum(p.numel() for p in model.parameters())  # tied weights counted once


RICH = [c for c in CASES if c.id in ("mistral-window-7", "qwen2-useTrue-mwl0-types", "smollm3-nope[0, 1, 0]-window8",
                                     "opt-6-gelu-postLN-proj-noaffine-nofinal", "gemma2-2-cap2.0-finalNone",
                                     "gemma3-1-pattern3-rope-linear", "qwen3moe-1-e8-top3-normTrue",
                                     "phi3-2-longropeTrue-window7")]
KV_POLICIES = {
    "cpu-attention": dict(kv="cpu", cpu_attention=True),
    "x-cache": dict(kv="disk", x_cache_percent=100),
    "write-back": dict(kv="disk", kv_write_back=True, kv_write_back_bytes=4096),
}


@pytest.mark.parametrize("family,kw,legacy", RICH)
def test_kv_techniques_keep_the_options(family, kw, legacy, tmp_path):
    """Sliding windows, no-RoPE layers, biases, post-LN, soft caps, Gemma 3's local RoPE (recomputed by the X-cache),
    routed experts and longrope hold through every KV path (CPU attention, X-cache recompute, delayed write-back)
    and micro-batches: each prompt's greedy tokens are transformers' own."""
    model, hf_dir = _random_model(family, kw, tmp_path)
    convert(str(hf_dir), tmp_path / "store", dtype="float32")
    prompts = _prompts()
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert len(RICH) == 8
    for name, kv in KV_POLICIES.items():
        engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=2, num_gpu_batches=2, **kv),
                        job_dir=tmp_path / name)
        try:
            out = [c.tokens for c in engine.generate(prompts, GenParams(max_new_tokens=5))]
        finally:
            engine.close()
        assert out == ref, name
