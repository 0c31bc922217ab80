"""Model shape: one frozen dataclass for every supported architecture, plus the dummy-weight presets.

Torch-free, so the store, the planner and the operator-side size estimates can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

ARCHITECTURES = ("llama", "opt")
# Activation names the engine computes (model.ACTIVATIONS), spelled as transformers' ACT2FN spells them.
# ACT2FN's prelu and xielu carry learned parameters of their own and are refused.
ACTIVATIONS = ("gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh",
               "gelu_accurate", "hardswish", "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu", "relu2",
               "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh")
# RoPE variants (transformers' rope_type); "default" is stored as rope_scaling None.
ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Llama family or OPT)."""

    architecture: str  # llama (Llama 2/3, Mistral, Qwen2/3, SmolLM2/3, Phi-3, Gemma 2/3, Mixtral, Qwen3-MoE) | opt
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int = 0  # 0: same as num_heads (MHA)
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": one of ROPE_TYPES, + that type's keys as transformers names them, with
    #  original_max_position_embeddings resolved}; None: plain RoPE
    rope_scaling: dict | None = None
    hidden_act: str = ""  # one of ACTIVATIONS; "": silu (llama) or relu (opt)
    attention_bias: bool = False  # q/k/v biases (Llama attention_bias, Qwen2 always, OPT enable_bias)
    o_bias: bool = False  # output projection bias (Llama attention_bias, OPT enable_bias; not Qwen2)
    mlp_bias: bool = False  # gate/up/down (Llama mlp_bias) or fc1/fc2 (OPT enable_bias) biases
    tie_word_embeddings: bool = False
    sliding_window: int = 0  # attention window of the layers in window_layers (0: none)
    window_layers: list[int] = field(default_factory=list)  # layers whose attention slides (Mistral, Qwen2, SmolLM3)
    nope_layers: list[int] = field(default_factory=list)  # layers without RoPE (SmolLM3 no_rope_layers)
    # Qwen3, Gemma 2/3, Phi-3 (Llama family, architecture "llama"); Phi-3's fused projections are split on convert
    family: str = ""  # the config.json model_type it came from, for reports ("" for presets of the Llama family)
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3, Gemma 3): q_norm, k_norm [D]
    norm_plus_one: bool = False  # Gemma's RMSNorm: x * (1 + w), computed in float32 before the cast back
    sandwich_norms: bool = False  # Gemma 2/3: post_attn_norm on the attention output, post_mlp_norm on the MLP's
    embed_scale: float = 0.0  # token embeddings times this, rounded to the compute dtype (Gemma: sqrt(hidden)); 0: 1
    attn_scale: float = 0.0  # softmax scale of q.k (Gemma: query_pre_attn_scalar ** -0.5); 0: head_dim ** -0.5
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) before the mask (Gemma attn_logit_softcapping)
    final_softcap: float = 0.0  # the same on the logits (Gemma final_logit_softcapping); 0: none
    local_rope_theta: float = 0.0  # Gemma 3: sliding layers' own plain RoPE base; 0: every layer uses rope_theta
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is num_experts SwiGLU experts of
    # intermediate_size, a router picks num_experts_per_tok per token by softmax then top-k
    num_experts: int = 0  # 0: a dense MLP
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k probabilities to sum to 1 (Mixtral always, Qwen3-MoE by key)
    # OPT only
    pre_norm: bool = True  # do_layer_norm_before: False is post-LayerNorm (opt-350m)
    final_norm: bool = True  # the decoder's final LayerNorm (absent when post-LN or _remove_final_layer_norm)
    norm_affine: bool = True  # layer_norm_elementwise_affine: LayerNorms with weight and bias
    embed_dim: int = 0  # word_embed_proj_dim (0: hidden_size); otherwise project_in / project_out
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; expected one of {ARCHITECTURES}")
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", [self.eos_token_id])
        if not self.hidden_act:
            object.__setattr__(self, "hidden_act", "relu" if self.architecture == "opt" else "silu")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {', '.join(ACTIVATIONS)}")
        if not self.embed_dim:
            object.__setattr__(self, "embed_dim", self.hidden_size)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            object.__setattr__(self, "pad_token_id", None)  # absent or negative in config.json: no real token
        kind = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling is not None and kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported; expected one of {', '.join(ROPE_TYPES)}")
        for name in ("window_layers", "nope_layers"):
            layers = sorted(set(getattr(self, name)))
            if any(not 0 <= j < self.num_layers for j in layers):
                raise ValueError(f"{name} {layers} name layers outside 0..{self.num_layers - 1}")
            object.__setattr__(self, name, layers)
        if self.window_layers and self.sliding_window <= 0:
            raise ValueError(f"window_layers {self.window_layers} need a positive sliding_window")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}")

    # ---- per layer ----
    def layer_window(self, j: int) -> int:
        """Attention window of layer j (0: the whole context)."""
        return self.sliding_window if j in self.window_layers else 0

    def layer_rope(self, j: int) -> bool:
        """Whether layer j rotates q and k."""
        return self.architecture == "llama" and j not in self.nope_layers

    # ---- derived sizes (elements) ----
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_tensors(self) -> int:
        """How many tensors a layer's stage holds (canonical names in store/convert.py)."""
        if self.architecture == "opt":
            return 6 + (6 if self.attention_bias else 0) + (4 if self.norm_affine else 0)
        mlp = 1 + 3 * self.num_experts if self.num_experts else 3 + (3 if self.mlp_bias else 0)
        extra = (2 if self.qk_norm else 0) + (2 if self.sandwich_norms else 0)
        return 6 + mlp + extra + (3 if self.attention_bias else 0) + (1 if self.o_bias else 0)

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        bias = (self.q_dim + 2 * self.kv_dim if self.attention_bias else 0) + (h if self.o_bias else 0)
        if self.architecture == "opt":
            norms = 2 * 2 * h if self.norm_affine else 0
            return attn + bias + 2 * h * i + (i + h if self.mlp_bias else 0) + norms
        extra = (2 * self.head_dim if self.qk_norm else 0) + (2 * h if self.sandwich_norms else 0)
        if self.num_experts:  # router [E, H] + E experts
            return attn + bias + self.num_experts * (h + 3 * h * i) + 2 * h + extra
        return attn + bias + 3 * h * i + (2 * i + h if self.mlp_bias else 0) + 2 * h + extra

    def embed_params(self) -> int:
        pos = (self.max_position_embeddings + 2) * self.hidden_size if self.architecture == "opt" else 0
        proj = self.embed_dim * self.hidden_size if self.embed_dim != self.hidden_size else 0
        return self.vocab_size * self.embed_dim + pos + proj

    def head_params(self) -> int:
        if self.architecture == "opt":
            norm = 2 * self.hidden_size if self.final_norm and self.norm_affine else 0
        else:
            norm = self.hidden_size
        proj = self.embed_dim * self.hidden_size if self.embed_dim != self.hidden_size else 0
        return norm + proj + (0 if self.tie_word_embeddings else self.vocab_size * self.embed_dim)

    def total_params(self) -> int:
        return self.embed_params() + self.num_layers * self.layer_params() + self.head_params()

    def layer_flops_per_token(self, context: int) -> float:
        """Matmul FLOPs of one decoder layer for one token attending to `context` positions."""
        h, i = self.hidden_size, self.intermediate_size
        proj = 2 * (h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h)
        mlp = 2 * (2 if self.architecture == "opt" else 3) * h * i
        if self.num_experts:  # the routed experts and the router
            mlp = mlp * self.num_experts_per_tok + 2 * h * self.num_experts
        attn = 2 * 2 * self.q_dim * context
        return proj + mlp + attn

    def expert_share(self) -> float:
        """Share of a layer's parameters in its experts (0: dense)."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * 3 * self.hidden_size * self.intermediate_size / self.layer_params()

    def expected_experts(self, tokens: int) -> float:
        """Distinct experts a layer routes `tokens` tokens to, expected under uniform routing (each token picks
        num_experts_per_tok of num_experts): E * (1 - (1 - k/E) ** tokens). Measured reads route to fewer, random
        weights too (a prompt's tokens share experts): costmodel.RoutingProfile prices a model's measured routing."""
        e, k = self.num_experts, self.num_experts_per_tok
        return e * (1 - (1 - k / e) ** tokens) if e else 0.0

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.num_layers * self.kv_dim * itemsize

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _llama(**kw) -> ModelConfig:
    return ModelConfig(architecture="llama", **kw)


def _opt(h: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        architecture="opt", vocab_size=50272, hidden_size=h, intermediate_size=4 * h, num_layers=layers,
        num_heads=heads, max_position_embeddings=2048, bos_token_id=2, eos_token_id=[2], pad_token_id=1,
        attention_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=True,  # as every released OPT: the head reads the token embedding
    )


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2], pad_token_id=2),
    "llama-3-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=LLAMA3_ROPE, bos_token_id=128000, eos_token_id=[128001, 128009]),
    "llama-2-7b": _llama(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=[2]),
    "llama-2-13b": _llama(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=[2]),
    "opt-125m": _opt(768, 12, 12),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
}


# Long-context shapes: OPT's learned positions extended to 32K (dummy weights only; no released OPT has them), so a
# prompt of 8K-32K tokens fits, as FlexGen runs them with its max_seq_len raised (bench/peers/flexgen_opt.py).
for _name in ("opt-1.3b", "opt-6.7b", "opt-13b"):
    PRESETS[f"{_name}-32k"] = replace(PRESETS[_name], max_position_embeddings=32768)
# Llama-3-8B (GQA: 32 query heads over 8 K/V heads, Llama-3 RoPE) with its positions capped at 32K: the long-context
# shape InstInfer reports, 128 KiB of fp16 KV a token (4 GiB for one 32K sequence).
PRESETS["llama-3-8b-32k"] = replace(PRESETS["llama-3-8b"], max_position_embeddings=32768)
# The newer families at the sizes of their released config.json files (Qwen/Qwen3-8B, Qwen/Qwen3-30B-A3B,
# mistralai/Mixtral-8x7B-v0.1, microsoft/Phi-3-mini-4k-instruct, google/gemma-2-9b, google/gemma-3-4b text).
_QWEN3 = dict(vocab_size=151936, num_heads=32, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
              norm_eps=1e-6, qk_norm=True, bos_token_id=151643, eos_token_id=[151645])
PRESETS["qwen3-8b"] = _llama(family="qwen3", hidden_size=4096, intermediate_size=12288, num_layers=36, num_kv_heads=8,
                             **_QWEN3)
PRESETS["qwen3-30b-a3b"] = _llama(family="qwen3_moe", hidden_size=2048, intermediate_size=768, num_layers=48,
                                  num_kv_heads=4, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, **_QWEN3)
PRESETS["mixtral-8x7b"] = _llama(family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                 num_layers=32, num_heads=32, num_kv_heads=8, max_position_embeddings=32768,
                                 rope_theta=1000000.0, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                 bos_token_id=1, eos_token_id=[2])
PRESETS["phi-3-mini-4k"] = _llama(family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                                  num_layers=32, num_heads=32, max_position_embeddings=4096, sliding_window=2047,
                                  window_layers=list(range(32)), bos_token_id=1, eos_token_id=[32000], pad_token_id=32000)
_GEMMA = dict(num_kv_heads=8, head_dim=256, norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
              norm_plus_one=True, sandwich_norms=True, attn_scale=256 ** -0.5, bos_token_id=2, eos_token_id=[1],
              pad_token_id=0)
PRESETS["gemma-2-9b"] = _llama(family="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                               num_layers=42, num_heads=16, max_position_embeddings=8192, embed_scale=3584 ** 0.5,
                               attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                               window_layers=list(range(0, 42, 2)), **_GEMMA)
PRESETS["gemma-3-4b"] = _llama(family="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                               num_layers=34, num_heads=8, max_position_embeddings=131072, embed_scale=2560 ** 0.5,
                               qk_norm=True, rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                               local_rope_theta=10000.0, sliding_window=1024,
                               window_layers=[j for j in range(34) if (j + 1) % 6], **{**_GEMMA, "num_kv_heads": 4})


def preset(name: str) -> ModelConfig:
    """The shape of `dummy:NAME` (a fill after @, as in opt-30b@zeros, does not change it)."""
    name = name.partition("@")[0]
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown dummy preset {name!r}; expected one of: {', '.join(PRESETS)}") from None
