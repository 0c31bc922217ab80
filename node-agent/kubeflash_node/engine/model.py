"""The model math, as pure functions over weight dicts: embed, one decoder layer (Llama or OPT), head.

The functions never know where a weight came from (GPU, pinned host, disk); the schedule hands them
tensors already on the compute device. Shapes: B batch, S new tokens, T cached + new tokens, H hidden,
Nh query heads, Nk kv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..store.modelconfig import ModelConfig
from .rope import apply_rope


@dataclass
class Batch:
    """Per micro-batch tensors that every layer needs for one step."""

    positions: torch.Tensor  # [B, S] position ids of the new tokens
    mask: torch.Tensor  # [B, 1, S, T] additive attention mask (0 or -inf-like)
    start: int  # slot in the KV cache where the new tokens go
    prefix_positions: torch.Tensor | None = None  # [B, start] position ids of the cached tokens (X-cache recompute)
    rope_at: Callable | None = None  # positions [B, T] -> (cos, sin) [B, 1, T, D]; None for learned positions
    windowed: dict = field(default_factory=dict)  # window -> mask with the keys beyond it masked out too

    def mask_for(self, window: int) -> torch.Tensor:
        """The additive mask of a layer whose attention slides over `window` positions (0: the whole context).
        A query at cache slot q sees slots k with q - window < k <= q, as transformers' sliding_window_overlay;
        a row's real tokens sit in consecutive slots, so slots count positions."""
        if not window:
            return self.mask
        if window not in self.windowed:
            s, t = self.mask.shape[-2:]
            q = torch.arange(self.start, self.start + s, device=self.mask.device)[:, None]
            k = torch.arange(t, device=self.mask.device)[None, :]
            self.windowed[window] = self.mask.masked_fill(q - k >= window, torch.finfo(self.mask.dtype).min)
        return self.windowed[window]


# ----------------------------------------------------------------------------------------------- blocks


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# transformers' ACT2FN, formula for formula (config.ACTIVATIONS lists the names); each takes a temporary it may
# overwrite. gelu_new, gelu_python_tanh and gelu_accurate are one formula in transformers too.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_10": lambda x: F.gelu(x).clamp_(-10, 10),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_new": _gelu_tanh,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0)))),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01, inplace=True),
    "linear": lambda x: x,
    "mish": F.mish,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": lambda x: F.relu(x, inplace=True),
    "relu2": lambda x: torch.square(F.relu(x, inplace=True)),
    "relu6": lambda x: F.relu6(x, inplace=True),
    "sigmoid": torch.sigmoid,
    "silu": lambda x: F.silu(x, inplace=True),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "swish": lambda x: F.silu(x, inplace=True),
    "tanh": torch.tanh,
}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


# cuDNN's SDPA re-plans for every new sequence length (~2.4 ms of CPU per call, measured on H100 during
# decode); the memory-efficient kernel takes the padding mask without that cost.
_CUDA_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # q: [B, Nh, S, D]; k, v: [B, Nk, T, D]; mask: [B, 1, S, T] -> [B, Nh, S, D]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # [B, Nk, T, D] -> [B, Nh, T, D]: the efficient kernel has no GQA mode
        b, nk, t, d = k.shape
        k = k[:, :, None].expand(b, nk, rep, t, d).reshape(b, nk * rep, t, d)
        v = v[:, :, None].expand(b, nk, rep, t, d).reshape(b, nk * rep, t, d)
    with sdpa_kernel(_CUDA_SDPA):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def split_heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    # x: [B, S, n*d] -> [B, n, S, d]
    b, s, _ = x.shape
    return x.view(b, s, n, d).transpose(1, 2)


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    return x if rope is None else apply_rope(x, *rope)


def llama_kv(c: ModelConfig, w: dict, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated unless rope is None) and V of a Llama layer from its normalized input h [B, T, H]
    -> [B, Nk, T, D] each."""
    k = split_heads(F.linear(h, w["wk"], w.get("bk")), c.num_kv_heads, c.head_dim)
    v = split_heads(F.linear(h, w["wv"], w.get("bv")), c.num_kv_heads, c.head_dim)
    return _rotate(k, rope), v


def llama_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch: Batch, cache, rope, layer: int = 0) -> torch.Tensor:
    """Decoder layer `layer` of the Llama family; `cache.attend` adds the new K, V and attends over the whole
    cache (an X-cache layer recomputes the cached tokens' K, V from their stored input with `project`).
    Biases are whichever the store holds (the converter reads exactly the ones the config names)."""
    # x: [B, S, H]
    uses_rope = c.layer_rope(layer)
    rope = rope if uses_rope else None
    h = rms_norm(x, w["attn_norm"], c.norm_eps)
    q = _rotate(split_heads(F.linear(h, w["wq"], w.get("bq")), c.num_heads, c.head_dim), rope)
    k, v = llama_kv(c, w, h, rope)
    o = cache.attend(q, k, v, batch.start, batch.mask_for(c.layer_window(layer)), x=h,  # [B, Nh, S, D]
                     project=lambda hp: llama_kv(c, w, hp, batch.rope_at(batch.prefix_positions) if uses_rope else None))
    del q, k, v  # the MLP's temporaries are the peak of a prefill: free what attention no longer needs
    x = x + F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.q_dim), w["wo"], w.get("bo"))
    del o
    h = rms_norm(x, w["mlp_norm"], c.norm_eps)
    gate = ACTIVATIONS[c.hidden_act](F.linear(h, w["w_gate"], w.get("b_gate")))
    return x + F.linear(gate.mul_(F.linear(h, w["w_up"], w.get("b_up"))), w["w_down"], w.get("b_down"))


def _layer_norm(c: ModelConfig, w: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    # name_w / name_b are absent when layer_norm_elementwise_affine is false
    return F.layer_norm(x, (c.hidden_size,), w.get(name + "_w"), w.get(name + "_b"), c.norm_eps)


def opt_kv(c: ModelConfig, w: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of an OPT layer from its attention input h [B, T, H] -> [B, Nh, T, D] each."""
    return (split_heads(F.linear(h, w["wk"], w.get("bk")), c.num_heads, c.head_dim),
            split_heads(F.linear(h, w["wv"], w.get("bv")), c.num_heads, c.head_dim))


def opt_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch: Batch, cache, rope=None, layer: int = 0) -> torch.Tensor:
    """One OPT decoder layer: MHA and an MLP of `activation_function`, LayerNorm before each (pre_norm) or
    after each residual sum (post-LN, opt-350m)."""
    # x: [B, S, H]
    h = _layer_norm(c, w, x, "attn_norm") if c.pre_norm else x
    q = split_heads(F.linear(h, w["wq"], w.get("bq")), c.num_heads, c.head_dim)
    k, v = opt_kv(c, w, h)
    o = cache.attend(q, k, v, batch.start, batch.mask, x=h, project=lambda hp: opt_kv(c, w, hp))
    del q, k, v  # as in llama_layer: the MLP's temporaries are a prefill's peak
    x = x + F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.hidden_size), w["wo"], w.get("bo"))
    del o
    if not c.pre_norm:
        x = _layer_norm(c, w, x, "attn_norm")
    h = _layer_norm(c, w, x, "mlp_norm") if c.pre_norm else x
    x = x + F.linear(ACTIVATIONS[c.hidden_act](F.linear(h, w["fc1_w"], w.get("fc1_b"))), w["fc2_w"], w.get("fc2_b"))
    return x if c.pre_norm else _layer_norm(c, w, x, "mlp_norm")


LAYERS = {"llama": llama_layer, "opt": opt_layer}


def embed(c: ModelConfig, w: dict, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # ids, positions: [B, S] -> [B, S, H]
    x = F.embedding(ids, w["tok_embed"])  # [B, S, E]
    if "project_in" in w:  # OPT's word_embed_proj_dim != hidden_size: [B, S, E] -> [B, S, H]
        x = F.linear(x, w["project_in"])
    if c.architecture == "opt":
        x = x + F.embedding(positions + 2, w["pos_embed"])  # OPT's learned positions are offset by 2
    return x


def head(c: ModelConfig, w: dict, x: torch.Tensor) -> torch.Tensor:
    # x: [B, H] (last position only) -> logits [B, V] in float32 (lm_head: [V, E])
    if c.architecture == "opt":
        if c.final_norm:
            x = _layer_norm(c, w, x, "norm")
        if "project_out" in w:  # [B, H] -> [B, E]
            x = F.linear(x, w["project_out"])
    else:
        x = rms_norm(x, w["norm"], c.norm_eps)
    return F.linear(x, w["lm_head"]).float()


def make_batch(attn_mask: torch.Tensor, start: int, new: int, dtype) -> Batch:
    """Positions and additive mask for `new` tokens written at slot `start` of a left-padded cache.

    attn_mask: [B, T] 1 for real tokens (cache slots 0..start+new-1), 0 for padding.
    """
    t = start + new
    am = attn_mask[:, :t].bool()
    every = (am.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    positions = every[:, start:t]  # [B, S]
    q_idx = torch.arange(start, t, device=am.device)[:, None]
    k_idx = torch.arange(t, device=am.device)[None, :]
    allowed = (k_idx <= q_idx)[None] & am[:, None, :]  # [B, S, T]
    allowed = allowed | (k_idx == q_idx)[None]  # a padding query attends to itself: no all-masked rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=am.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return Batch(positions=positions, mask=mask[:, None], start=start, prefix_positions=every[:, :start])
