"""A transformers config.json read into ModelConfig exactly as transformers reads it, or refused by key.

Every option of the supported families is either mapped onto ModelConfig (and computed by engine/model.py the
way transformers computes it) or refused with an error that names the config.json key and its value. Absent
keys take the defaults of the installed transformers' config classes (LlamaConfig, MistralConfig, Qwen2Config,
Qwen3Config, SmolLM3Config, Phi3Config, Gemma2Config, Gemma3TextConfig, MixtralConfig, Qwen3MoeConfig,
OPTConfig), which differ by model_type: Mistral slides over 4096 positions unless told otherwise, Qwen2 always
has q/k/v biases and never an o_proj bias, SmolLM3 ties its head and skips RoPE on every 4th layer, Qwen3's
head_dim is 128 unless told, Gemma 2 slides on every other layer and Gemma 3 on five of six.
"""

from __future__ import annotations

from .format import StoreError
from .modelconfig import ACTIVATIONS, ROPE_TYPES, ModelConfig


class SourceError(StoreError):
    """The model source cannot be read: wrong kind, missing files, unsupported architecture."""


class ConfigError(SourceError):
    """config.json asks for something the engine does not compute; the message names the key and value."""


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3", "phi3", "gemma2", "gemma3_text", "mixtral",
               "qwen3_moe")
GEMMA = ("gemma2", "gemma3_text")
MOE = ("mixtral", "qwen3_moe")
# Defaults of keys the families disagree on (transformers' config classes)
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096 * 32,
                    rope_theta=10000.0, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                  num_key_value_heads=32, sliding_window=4096, max_window_layers=28),
    "smollm3": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
                    rope_theta=2000000.0, num_key_value_heads=4, pad_token_id=128004, no_rope_layer_interval=4),
    "qwen3": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                  num_key_value_heads=32, sliding_window=4096, max_window_layers=28, head_dim=128),
    "qwen3_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                      num_key_value_heads=4, sliding_window=4096, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768),
    "mixtral": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=4096 * 32,
                    rope_theta=1000000.0, num_key_value_heads=8, num_experts=8, num_experts_per_tok=2),
    "phi3": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0,
                 original_max_position_embeddings=4096, pad_token_id=32000),
    "gemma2": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=10000.0,
                   num_key_value_heads=4, head_dim=256, sliding_window=4096, pad_token_id=0, query_pre_attn_scalar=256,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=131072,
                        rope_theta=1000000.0, rope_local_base_freq=10000.0, num_key_value_heads=4, head_dim=256,
                        sliding_window=4096, pad_token_id=0, query_pre_attn_scalar=256, final_logit_softcapping=None,
                        attn_logit_softcapping=None, sliding_window_pattern=6),
}
_DEFAULTS["smollm"] = _DEFAULTS["llama"]
# What each rope_type cannot do without (other keys it reads have defaults; keys it does not read are ignored,
# as transformers ignores them)
_ROPE_REQUIRED = {"linear": {"factor"}, "dynamic": {"factor"}, "yarn": {"factor"},
                  "longrope": {"short_factor", "long_factor"}, "llama3": {"factor", "low_freq_factor", "high_freq_factor"}}


# Every key each rope_type reads (transformers' RotaryEmbeddingConfigMixin validators), beside rope_type / type,
# rope_theta and partial_rotary_factor; any other key in the dict is an option we do not compute, refused by name.
# dynamic also takes original_max_position_embeddings, which transformers' dynamic RoPE does not read either.
_ROPE_KEYS = {"default": set(), "linear": {"factor"}, "dynamic": {"factor", "original_max_position_embeddings"},
              "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"},
              "longrope": {"short_factor", "long_factor", "original_max_position_embeddings", "attention_factor",
                           "factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}
# (test, what is expected) of each RoPE value that is given (None stays the default)
_ROPE_VALUES = {"factor": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
                "low_freq_factor": (lambda v: _is_number(v) and v > 0, "a positive number"),
                "high_freq_factor": (lambda v: _is_number(v) and v > 0, "a positive number"),
                "original_max_position_embeddings": (lambda v: _is_int(v) and v > 0, "a positive integer"),
                "attention_factor": (lambda v: _is_number(v) and v > 0, "a positive number"),
                "beta_fast": (lambda v: _is_number(v) and v > 0, "a positive number"),
                "beta_slow": (lambda v: _is_number(v) and v > 0, "a positive number"),
                "mscale": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
                "mscale_all_dim": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
                "truncate": (lambda v: isinstance(v, bool), "true or false"),
                "short_factor": (lambda v: isinstance(v, list) and all(_is_number(x) and x > 0 for x in v),
                                 "a list of positive numbers"),
                "long_factor": (lambda v: isinstance(v, list) and all(_is_number(x) and x > 0 for x in v),
                                "a list of positive numbers")}
# Sizes every family's config.json states as positive integers (absent or null: the family's default, if any)
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "moe_intermediate_size", "max_position_embeddings", "ffn_dim",
                  "word_embed_proj_dim")
_REQUIRED = {"llama": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
             "opt": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim")}
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob", "use_sliding_window",
          "do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine", "_remove_final_layer_norm")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), -float("inf"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def refuse(key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"config.json {key} = {value!r} is not supported; expected {expected}")


def _check_types(cfg: dict, arch: str) -> None:
    """Sizes, norms' epsilon, RoPE base and flags of the wrong type or range are refused by key, before they
    reach a shape or a formula (a string "32", a negative epsilon, "yes" for a flag)."""
    for key in _REQUIRED[arch]:
        if cfg.get(key) is None and not (key == "intermediate_size" and cfg.get("model_type") == "qwen3_moe"):
            raise ConfigError(f"config.json {key} is missing; expected a positive integer")
    for key in _POSITIVE_INTS:
        v = cfg.get(key)
        if v is not None and not (_is_int(v) and v > 0):
            raise refuse(key, v, "a positive integer")
    for key in ("rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_local_base_freq"):
        v = cfg.get(key)
        if (v is not None or (key.endswith("_eps") and key in cfg)) and not (_is_number(v) and v > 0):
            raise refuse(key, v, "a positive number")
    for key in _BOOLS:
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            raise refuse(key, v, "true or false")


def _check_rope_values(rope: dict, key: str, kind: str) -> None:
    """The dict's keys are those `kind` reads, each of the type and range transformers expects."""
    unknown = sorted(set(rope) - _ROPE_KEYS[kind], key=str)
    if unknown:
        allowed = sorted(_ROPE_KEYS[kind] | {"rope_type", "rope_theta"})
        raise refuse(f"{key}.{unknown[0]}", rope[unknown[0]],
                     f"only the keys rope_type {kind} reads ({', '.join(allowed)}); this option is not implemented")
    for k, v in rope.items():
        ok, expected = _ROPE_VALUES[k]
        if v is not None and not ok(v):
            raise refuse(f"{key}.{k}", v, expected)
    if kind == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise refuse(f"{key}.high_freq_factor", rope["high_freq_factor"],
                     f"a number greater than low_freq_factor ({rope['low_freq_factor']})")


def _activation(cfg: dict, key: str, default: str) -> str:
    act = cfg.get(key, default)
    if act not in ACTIVATIONS:
        raise refuse(key, act, "one of " + ", ".join(ACTIVATIONS))
    return act


def _rope(cfg: dict, mt: str, head_dim: int, max_pos: int, *, key: str = "", params: dict | None = None
          ) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None), with transformers' precedence: rope_scaling over rope_parameters, a
    rope_theta inside the dict over the top-level one, a top-level original_max_position_embeddings over the
    dict's for llama3/yarn/longrope. `params` under `key`: one layer type's dict (Gemma 3)."""
    if params is None:
        key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise refuse(key, params, "an object of RoPE parameters, e.g. {\"rope_type\": \"linear\", \"factor\": 2.0}")
    rope = dict(params)
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or _DEFAULTS[mt]["rope_theta"]
    if not (_is_number(theta) and theta > 0):
        raise refuse(f"{key}.rope_theta" if "rope_theta" in params else "rope_theta", theta, "a positive number")
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if mt == "phi3":  # Phi3Config: su and yarn are its names for longrope; nothing else is accepted
        kind = "longrope" if kind in ("su", "yarn") else kind
        if kind not in ("default", "longrope"):
            raise refuse(f"{key}.rope_type", kind, "default or longrope (Phi-3 accepts no other)")
    partial = rope.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise refuse("partial_rotary_factor", partial, "1.0 (the Llama family rotates the whole head)")
    if kind not in ROPE_TYPES + ("default",):
        raise refuse(f"{key}.rope_type", kind, "default or one of " + ", ".join(ROPE_TYPES))
    _check_rope_values(rope, key, kind)
    if kind == "default":
        return float(theta), None
    missing = _ROPE_REQUIRED[kind] - {k for k, v in rope.items() if v is not None}
    if missing:
        raise ConfigError(f"config.json {key}.{sorted(missing)[0]} is missing; rope_type {kind} needs it")
    if kind in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in cfg:
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", max_pos)
    if kind == "longrope":
        for k in ("short_factor", "long_factor"):
            if len(rope[k]) != head_dim // 2:
                raise refuse(f"{key}.{k}", f"{len(rope[k])} values", f"head_dim / 2 = {head_dim // 2} values")
    return float(theta), {"rope_type": kind, **rope}


def _layer_types(cfg: dict, mt: str, layers: int, window: int | None, nope: list[int]) -> list[int]:
    """Indices of the layers whose attention slides, as each family's config class decides them."""
    if mt in ("mistral", "mixtral", "phi3", "qwen3_moe"):  # every layer when sliding_window is set (layer_types
        return list(range(layers)) if window is not None else []  # are ignored by these families)
    if mt not in ("qwen2", "qwen3", "smollm3") + GEMMA:
        return []  # LlamaConfig has no sliding attention
    types = cfg.get("layer_types")
    if types is None:
        if mt in ("qwen2", "qwen3"):
            start = cfg.get("max_window_layers", _DEFAULTS[mt]["max_window_layers"])
            return [j for j in range(layers) if window is not None and j >= start]
        if mt in GEMMA:  # Gemma 2: every other layer from the first; Gemma 3: all but every pattern-th
            every = 2 if mt == "gemma2" else cfg.get("sliding_window_pattern", _DEFAULTS[mt]["sliding_window_pattern"])
            if not isinstance(every, int) or every <= 0:
                raise refuse("sliding_window_pattern", every, "a positive integer")
            types = ["sliding_attention" if (j + 1) % every else "full_attention" for j in range(layers)]
        else:
            return [j for j in nope if cfg.get("use_sliding_window", False) and window is not None]
    if len(types) < layers or any(t not in ("full_attention", "sliding_attention") for t in types[:layers]):
        raise refuse("layer_types", types, f"{layers} entries of full_attention or sliding_attention")
    sliding = [j for j in range(layers) if types[j] == "sliding_attention"]
    if sliding and window is None:
        raise refuse("sliding_window", window, "a window size for the sliding_attention layers in layer_types "
                     + ("(Qwen drops it unless use_sliding_window is true)" if mt in ("qwen2", "qwen3") else ""))
    return sliding


def _window(cfg: dict, mt: str) -> int | None:
    if mt == "mistral":
        window = cfg.get("sliding_window", _DEFAULTS["mistral"]["sliding_window"])
    elif mt in ("qwen2", "qwen3", "qwen3_moe"):
        window = cfg.get("sliding_window", _DEFAULTS[mt]["sliding_window"]) if cfg.get("use_sliding_window") else None
    elif mt in ("smollm3", "mixtral", "phi3"):
        window = cfg.get("sliding_window")
    elif mt in GEMMA:
        window = cfg.get("sliding_window", _DEFAULTS[mt]["sliding_window"])
    else:
        return None
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise refuse("sliding_window", window, "a positive number of positions or null")
    return window


def _nope_layers(cfg: dict, mt: str, layers: int) -> list[int]:
    """Layers without RoPE: SmolLM3's no_rope_layers (1 = RoPE) or every no_rope_layer_interval-th layer."""
    if mt != "smollm3":
        return []
    flags = cfg.get("no_rope_layers")
    if flags is None:
        every = cfg.get("no_rope_layer_interval", _DEFAULTS["smollm3"]["no_rope_layer_interval"])
        if not isinstance(every, int) or every <= 0:
            raise refuse("no_rope_layer_interval", every, "a positive integer")
        flags = [int((j + 1) % every != 0) for j in range(layers)]
    if len(flags) < layers or any(f not in (0, 1, True, False) for f in flags[:layers]):
        raise refuse("no_rope_layers", flags, f"{layers} flags of 1 (RoPE) or 0 (no RoPE)")
    return [j for j in range(layers) if not flags[j]]


def _common(cfg: dict, defaults: dict) -> dict:
    eos = cfg.get("eos_token_id")
    pad = cfg.get("pad_token_id", defaults.get("pad_token_id"))
    return dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"], bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos if isinstance(eos, list) else ([eos] if eos is not None else []),
                pad_token_id=pad if isinstance(pad, int) and 0 <= pad < cfg["vocab_size"] else None)


def _llama(cfg: dict, mt: str) -> ModelConfig:
    d = _DEFAULTS[mt]
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    kv = cfg.get("num_key_value_heads", d.get("num_key_value_heads")) or heads
    if heads % kv:
        raise refuse("num_key_value_heads", kv, f"a divisor of num_attention_heads ({heads})")
    head_dim = cfg.get("head_dim", d.get("head_dim")) or cfg["hidden_size"] // heads
    max_pos = cfg.get("max_position_embeddings", d["max_position_embeddings"])
    if mt == "phi3":  # Phi3Config always has one (4096), and it wins over the rope dict's
        cfg = {"original_max_position_embeddings": d["original_max_position_embeddings"], **cfg}
    extra = {}
    if mt == "gemma3_text":
        theta, rope, extra["local_rope_theta"] = _gemma3_rope(cfg, head_dim, max_pos)
    else:
        theta, rope = _rope(cfg, mt, head_dim, max_pos)
    window = _window(cfg, mt)
    nope = _nope_layers(cfg, mt, layers)
    sliding = _layer_types(cfg, mt, layers, window, nope)
    if mt == "qwen2":  # Qwen2Attention: q/k/v always biased, o_proj never; Qwen2MLP has no biases
        qkv, o, mlp = True, False, False
    elif mt in ("mistral", "mixtral", "phi3"):  # no biases at all
        qkv = o = mlp = False
    elif mt in ("qwen3", "qwen3_moe") + GEMMA:  # attention_bias: q/k/v/o; the MLPs have none
        qkv = o = bool(cfg.get("attention_bias", False))
        mlp = False
    else:
        qkv = o = bool(cfg.get("attention_bias", False))
        mlp = bool(cfg.get("mlp_bias", False))
    if mt in GEMMA:
        extra |= _gemma(cfg, mt)
    if mt in MOE:
        extra |= _moe(cfg, mt)
    act = _activation(cfg, "hidden_activation", "gelu_pytorch_tanh") if mt in GEMMA else _activation(cfg, "hidden_act", "silu")
    return ModelConfig(
        architecture="llama", intermediate_size=extra.pop("intermediate_size", None) or cfg["intermediate_size"],
        num_kv_heads=kv, head_dim=head_dim, family=mt, qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"),
        max_position_embeddings=max_pos, norm_eps=cfg.get("rms_norm_eps", d["rms_norm_eps"]), rope_theta=theta,
        rope_scaling=rope, hidden_act=act, attention_bias=qkv, o_bias=o,
        mlp_bias=mlp, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", d["tie_word_embeddings"])),
        sliding_window=window if sliding else 0, window_layers=sliding, nope_layers=nope, **extra, **_common(cfg, d),
    )


def _gemma3_rope(cfg: dict, head_dim: int, max_pos: int) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, local_rope_theta) of Gemma3TextConfig: rope_parameters per layer type, or the
    older rope_theta / rope_scaling (full attention) and rope_local_base_freq (sliding)."""
    d = _DEFAULTS["gemma3_text"]
    params = cfg.get("rope_parameters") or {}
    if params and not set(params) <= {"full_attention", "sliding_attention"}:
        raise refuse("rope_parameters", params, "a dict of full_attention and sliding_attention parameters (Gemma 3)")
    full = {**(params.get("full_attention") or {}), **(cfg.get("rope_scaling") or {})}
    full.setdefault("rope_theta", cfg.get("rope_theta", d["rope_theta"]))
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq", d["rope_local_base_freq"]))
    kind = local.get("rope_type") or local.get("type") or "default"
    unknown = sorted(set(local) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}, key=str)
    if kind == "default" and unknown:
        raise refuse(f"rope_parameters.sliding_attention.{unknown[0]}", local[unknown[0]],
                     "only rope_type and rope_theta (plain RoPE on sliding layers); this option is not implemented")
    if not (_is_number(local["rope_theta"]) and local["rope_theta"] > 0):
        raise refuse("rope_parameters.sliding_attention.rope_theta", local["rope_theta"], "a positive number")
    if kind != "default":
        raise refuse("rope_parameters.sliding_attention.rope_type", kind, "default (plain RoPE on sliding layers)")
    if local.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise refuse("rope_parameters.sliding_attention.partial_rotary_factor", local["partial_rotary_factor"], "1.0")
    theta, rope = _rope(cfg, "gemma3_text", head_dim, max_pos, key="rope_parameters.full_attention", params=full)
    return theta, rope, float(local["rope_theta"])


def _positive_or_none(cfg: dict, key: str, default) -> float:
    value = cfg.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise refuse(key, value, "a positive number or null")
    return float(value or 0.0)


def _gemma(cfg: dict, mt: str) -> dict:
    """Gemma 2/3: (1 + w) RMSNorms around attention and MLP, scaled embeddings, query_pre_attn_scalar, soft caps."""
    d = _DEFAULTS[mt]
    if cfg.get("use_bidirectional_attention"):
        raise refuse("use_bidirectional_attention", cfg["use_bidirectional_attention"], "false (causal attention)")
    scalar = _positive_or_none(cfg, "query_pre_attn_scalar", d["query_pre_attn_scalar"])
    if not scalar:
        raise refuse("query_pre_attn_scalar", cfg.get("query_pre_attn_scalar"), "a positive number")
    if mt == "gemma3_text" and cfg.get("attn_logit_softcapping") is not None:  # Gemma3Attention never applies it
        raise refuse("attn_logit_softcapping", cfg["attn_logit_softcapping"], "null (transformers' Gemma 3 ignores it)")
    return dict(norm_plus_one=True, sandwich_norms=True, embed_scale=cfg["hidden_size"] ** 0.5, attn_scale=scalar ** -0.5,
                attn_softcap=_positive_or_none(cfg, "attn_logit_softcapping", d["attn_logit_softcapping"]),
                final_softcap=_positive_or_none(cfg, "final_logit_softcapping", d["final_logit_softcapping"]))


def _moe(cfg: dict, mt: str) -> dict:
    """Mixtral / Qwen3-MoE: every layer's MLP is the routed experts (Qwen3-MoE's dense layers are refused)."""
    d = _DEFAULTS[mt]
    names = ("num_local_experts", "num_experts") if mt == "mixtral" else ("num_experts", "num_local_experts")
    key = next((k for k in names if cfg.get(k) is not None), names[0])
    experts = cfg.get(key, d["num_experts"])
    if not isinstance(experts, int) or experts <= 0:
        raise refuse(key, experts, "a positive number of experts")
    top = cfg.get("num_experts_per_tok", d["num_experts_per_tok"])
    if not isinstance(top, int) or not 0 < top <= experts:
        raise refuse("num_experts_per_tok", top, f"1..{key} ({experts})")
    out = dict(num_experts=experts, num_experts_per_tok=top, norm_topk_prob=True)
    if mt == "qwen3_moe":
        if cfg.get("mlp_only_layers"):
            raise refuse("mlp_only_layers", cfg["mlp_only_layers"], "[] (dense layers in a MoE model are not implemented)")
        if cfg.get("decoder_sparse_step", 1) != 1:
            raise refuse("decoder_sparse_step", cfg["decoder_sparse_step"], "1 (every layer routed to experts)")
        out |= dict(norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                    intermediate_size=cfg.get("moe_intermediate_size", d["moe_intermediate_size"]))
    return out


def _opt(cfg: dict) -> ModelConfig:
    h = cfg["hidden_size"]
    if h % cfg["num_attention_heads"]:
        raise refuse("num_attention_heads", cfg["num_attention_heads"], f"a divisor of hidden_size ({h})")
    pre = bool(cfg.get("do_layer_norm_before", True))
    bias = bool(cfg.get("enable_bias", True))
    return ModelConfig(
        architecture="opt", intermediate_size=cfg["ffn_dim"], max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        hidden_act=_activation(cfg, "activation_function", "relu"), attention_bias=bias, o_bias=bias, mlp_bias=bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), pre_norm=pre,
        final_norm=pre and not cfg.get("_remove_final_layer_norm", False),
        norm_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
        embed_dim=cfg.get("word_embed_proj_dim") or h, **_common(cfg, {"pad_token_id": 1}),
    )


def config_from_hf(cfg: dict) -> ModelConfig:
    """Map a transformers config.json onto ModelConfig (the LLAMA_TYPES and opt)."""
    mt = cfg.get("model_type", "")
    if mt in LLAMA_TYPES:
        _check_types(cfg, "llama")
        return _llama(cfg, mt)
    if mt == "opt":
        _check_types(cfg, "opt")
        return _opt(cfg)
    raise ConfigError(f"config.json model_type {mt!r} is not supported; expected one of {', '.join(LLAMA_TYPES)}, opt"
                      + (" (for Gemma 3, the text model: model_type gemma3_text)" if mt == "gemma3" else ""))
