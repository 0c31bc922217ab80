"""A transformers config.json read into ModelConfig exactly as transformers reads it, or refused by key.

Every option of the supported families is either mapped onto ModelConfig (and computed by engine/model.py the
way transformers computes it) or refused with an error that names the config.json key and its value. Absent
keys take the defaults of the installed transformers' config classes (LlamaConfig, MistralConfig, Qwen2Config,
SmolLM3Config, OPTConfig), which differ by model_type: Mistral slides over 4096 positions unless told
otherwise, Qwen2 always has q/k/v biases and never an o_proj bias, SmolLM3 ties its head and skips RoPE on
every 4th layer.
"""

from __future__ import annotations

from .format import StoreError
from .modelconfig import ACTIVATIONS, ROPE_TYPES, ModelConfig


class SourceError(StoreError):
    """The model source cannot be read: wrong kind, missing files, unsupported architecture."""


class ConfigError(SourceError):
    """config.json asks for something the engine does not compute; the message names the key and value."""


LLAMA_TYPES = ("llama", "mistral", "qwen2", "smollm", "smollm3")
# Defaults of keys the families disagree on (transformers' config classes)
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096 * 32,
                    rope_theta=10000.0, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                  num_key_value_heads=32, sliding_window=4096, max_window_layers=28),
    "smollm3": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
                    rope_theta=2000000.0, num_key_value_heads=4, pad_token_id=128004, no_rope_layer_interval=4),
}
_DEFAULTS["smollm"] = _DEFAULTS["llama"]
# What each rope_type cannot do without (other keys it reads have defaults; keys it does not read are ignored,
# as transformers ignores them)
_ROPE_REQUIRED = {"linear": {"factor"}, "dynamic": {"factor"}, "yarn": {"factor"},
                  "longrope": {"short_factor", "long_factor"}, "llama3": {"factor", "low_freq_factor", "high_freq_factor"}}


def refuse(key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"config.json {key} = {value!r} is not supported; expected {expected}")


def _activation(cfg: dict, key: str, default: str) -> str:
    act = cfg.get(key, default)
    if act not in ACTIVATIONS:
        raise refuse(key, act, "one of " + ", ".join(ACTIVATIONS))
    return act


def _rope(cfg: dict, mt: str, head_dim: int, max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None), with transformers' precedence: rope_scaling over rope_parameters, a
    rope_theta inside the dict over the top-level one, a top-level original_max_position_embeddings over the
    dict's for llama3/yarn/longrope."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = dict(cfg.get(key) or {})
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or _DEFAULTS[mt]["rope_theta"]
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    partial = rope.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise refuse("partial_rotary_factor", partial, "1.0 (the Llama family rotates the whole head)")
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_TYPES:
        raise refuse(f"{key}.rope_type", kind, "default or one of " + ", ".join(ROPE_TYPES))
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
    if mt == "mistral":  # every layer when sliding_window is set (Mistral ignores layer_types)
        return list(range(layers)) if window is not None else []
    if mt not in ("qwen2", "smollm3"):
        return []  # LlamaConfig has no sliding attention
    types = cfg.get("layer_types")
    if types is None:
        if mt == "qwen2":
            start = cfg.get("max_window_layers", _DEFAULTS["qwen2"]["max_window_layers"])
            return [j for j in range(layers) if window is not None and j >= start]
        return [j for j in nope if cfg.get("use_sliding_window", False) and window is not None]
    if len(types) < layers or any(t not in ("full_attention", "sliding_attention") for t in types[:layers]):
        raise refuse("layer_types", types, f"{layers} entries of full_attention or sliding_attention")
    sliding = [j for j in range(layers) if types[j] == "sliding_attention"]
    if sliding and window is None:
        raise refuse("sliding_window", window, "a window size for the sliding_attention layers in layer_types "
                     + ("(Qwen2 drops it unless use_sliding_window is true)" if mt == "qwen2" else ""))
    return sliding


def _window(cfg: dict, mt: str) -> int | None:
    if mt == "mistral":
        window = cfg.get("sliding_window", _DEFAULTS["mistral"]["sliding_window"])
    elif mt == "qwen2":
        window = cfg.get("sliding_window", _DEFAULTS["qwen2"]["sliding_window"]) if cfg.get("use_sliding_window") else None
    elif mt == "smollm3":
        window = cfg.get("sliding_window")
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
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    max_pos = cfg.get("max_position_embeddings", d["max_position_embeddings"])
    theta, rope = _rope(cfg, mt, head_dim, max_pos)
    window = _window(cfg, mt)
    nope = _nope_layers(cfg, mt, layers)
    sliding = _layer_types(cfg, mt, layers, window, nope)
    if mt == "qwen2":  # Qwen2Attention: q/k/v always biased, o_proj never; Qwen2MLP has no biases
        qkv, o, mlp = True, False, False
    elif mt == "mistral":  # MistralAttention / MistralMLP: no biases at all
        qkv = o = mlp = False
    else:
        qkv = o = bool(cfg.get("attention_bias", False))
        mlp = bool(cfg.get("mlp_bias", False))
    return ModelConfig(
        architecture="llama", intermediate_size=cfg["intermediate_size"], num_kv_heads=kv, head_dim=head_dim,
        max_position_embeddings=max_pos, norm_eps=cfg.get("rms_norm_eps", d["rms_norm_eps"]), rope_theta=theta,
        rope_scaling=rope, hidden_act=_activation(cfg, "hidden_act", "silu"), attention_bias=qkv, o_bias=o,
        mlp_bias=mlp, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", d["tie_word_embeddings"])),
        sliding_window=window if sliding else 0, window_layers=sliding, nope_layers=nope, **_common(cfg, d),
    )


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
    """Map a transformers config.json onto ModelConfig (llama, mistral, qwen2, smollm3, opt)."""
    mt = cfg.get("model_type", "")
    if mt in LLAMA_TYPES:
        return _llama(cfg, mt)
    if mt == "opt":
        return _opt(cfg)
    raise ConfigError(f"config.json model_type {mt!r} is not supported; expected llama, mistral, qwen2 or opt")
