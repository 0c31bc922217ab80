"""The model math, as pure functions over weight dicts: embed, one decoder layer (Llama or OPT), head.

The functions never know where a weight came from (GPU, pinned host, disk); the schedule hands them
tensors already on the compute device. Shapes: B batch, S new tokens, T cached + new tokens, H hidden,
Nh query heads, Nk kv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ModelConfig


@dataclass
class Batch:
    """Per micro-batch tensors that every layer needs for one step."""

    positions: torch.Tensor  # [B, S] position ids of the new tokens
    mask: torch.Tensor  # [B, 1, S, T] additive attention mask (0 or -inf-like)
    start: int  # slot in the KV cache where the new tokens go
    prefix_positions: torch.Tensor | None = None  # [B, start] position ids of the cached tokens (X-cache recompute)
    rope_at: Callable | None = None  # positions [B, T] -> (cos, sin) [B, 1, T, D]; None for learned positions


# ----------------------------------------------------------------------------------------------- rope


def rope_inv_freq(c: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [D/2], with llama3 scaling when the config asks for it."""
    d = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    rs = c.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / lo, old / hi
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(is_mid, mid, scaled)
    elif kind == "linear":
        inv = inv / rs["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported; expected llama3, linear or none")
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: [B, S] -> cos, sin: [B, 1, S, D]
    freqs = positions.float()[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, N, S, D]; rotate the two halves (HF convention)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------- blocks


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


def llama_kv(c: ModelConfig, w: dict, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated) and V of a Llama layer from its normalized input h [B, T, H] -> [B, Nk, T, D] each."""
    k = split_heads(F.linear(h, w["wk"], w.get("bk")), c.num_kv_heads, c.head_dim)
    v = split_heads(F.linear(h, w["wv"], w.get("bv")), c.num_kv_heads, c.head_dim)
    return apply_rope(k, *rope), v


def llama_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch: Batch, cache, rope) -> torch.Tensor:
    """One Llama-family decoder layer; `cache.attend` adds the new K, V and attends over the whole cache
    (an X-cache layer recomputes the cached tokens' K, V from their stored input with `project`)."""
    # x: [B, S, H]
    h = rms_norm(x, w["attn_norm"], c.norm_eps)
    q = apply_rope(split_heads(F.linear(h, w["wq"], w.get("bq")), c.num_heads, c.head_dim), *rope)
    k, v = llama_kv(c, w, h, rope)
    o = cache.attend(q, k, v, batch.start, batch.mask, x=h,  # [B, Nh, S, D], computed where the KV lives
                     project=lambda hp: llama_kv(c, w, hp, batch.rope_at(batch.prefix_positions)))
    del q, k, v  # the MLP's temporaries are the peak of a prefill: free what attention no longer needs
    x = x + F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.q_dim), w["wo"])
    del o
    h = rms_norm(x, w["mlp_norm"], c.norm_eps)
    gate = F.silu(F.linear(h, w["w_gate"]), inplace=True)
    return x + F.linear(gate.mul_(F.linear(h, w["w_up"])), w["w_down"])


def opt_kv(c: ModelConfig, w: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of an OPT layer from its normalized input h [B, T, H] -> [B, Nh, T, D] each."""
    return (split_heads(F.linear(h, w["wk"], w["bk"]), c.num_heads, c.head_dim),
            split_heads(F.linear(h, w["wv"], w["bv"]), c.num_heads, c.head_dim))


def opt_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch: Batch, cache, rope=None) -> torch.Tensor:
    """One OPT decoder layer (pre-LayerNorm, MHA with biases, ReLU MLP)."""
    # x: [B, S, H]
    h = F.layer_norm(x, (c.hidden_size,), w["attn_norm_w"], w["attn_norm_b"], c.norm_eps)
    q = split_heads(F.linear(h, w["wq"], w["bq"]), c.num_heads, c.head_dim)
    k, v = opt_kv(c, w, h)
    o = cache.attend(q, k, v, batch.start, batch.mask, x=h, project=lambda hp: opt_kv(c, w, hp))
    del q, k, v  # as in llama_layer: the MLP's temporaries are a prefill's peak
    x = x + F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.hidden_size), w["wo"], w["bo"])
    del o
    h = F.layer_norm(x, (c.hidden_size,), w["mlp_norm_w"], w["mlp_norm_b"], c.norm_eps)
    return x + F.linear(F.relu(F.linear(h, w["fc1_w"], w["fc1_b"]), inplace=True), w["fc2_w"], w["fc2_b"])


LAYERS = {"llama": llama_layer, "opt": opt_layer}


def embed(c: ModelConfig, w: dict, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # ids, positions: [B, S] -> [B, S, H]
    x = F.embedding(ids, w["tok_embed"])
    if c.architecture == "opt":
        x = x + F.embedding(positions + 2, w["pos_embed"])  # OPT's learned positions are offset by 2
    return x


def head(c: ModelConfig, w: dict, x: torch.Tensor) -> torch.Tensor:
    # x: [B, H] (last position only) -> logits [B, V] in float32
    if c.architecture == "opt":
        x = F.layer_norm(x, (c.hidden_size,), w["norm_w"], w["norm_b"], c.norm_eps)
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
