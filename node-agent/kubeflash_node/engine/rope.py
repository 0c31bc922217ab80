"""Rotary position embeddings of the Llama family: every rope_type transformers computes (default, linear,
dynamic, yarn, longrope, llama3; modeling_rope_utils), in float32 as it does.

Shapes: B batch, S positions, D head dim.
"""

from __future__ import annotations

import math

import torch

from ..store.modelconfig import ModelConfig


def _default_inv_freq(c: ModelConfig, base: float, device=None) -> torch.Tensor:
    # [D/2]
    d = c.head_dim
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))


def _llama3_inv_freq(c: ModelConfig, rs: dict, device=None) -> torch.Tensor:
    inv = _default_inv_freq(c, c.rope_theta, device)
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old / lo, old / hi
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    return torch.where(is_mid, mid, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(c: ModelConfig, rs: dict, device=None) -> tuple[torch.Tensor, float]:
    d, base, old = c.head_dim, c.rope_theta, rs["original_max_position_embeddings"]
    factor = rs.get("factor") or c.max_position_embeddings / old
    scale = rs.get("attention_factor")
    if scale is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        scale = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
    fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `old` positions
        return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos = base ** (torch.arange(0, d, 2, device=device).float() / d)
    extra = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra, float(scale)


def _longrope(c: ModelConfig, rs: dict, long: bool, device=None) -> tuple[torch.Tensor, float]:
    d, old = c.head_dim, rs["original_max_position_embeddings"]
    factor = rs.get("factor") or c.max_position_embeddings / old
    scale = rs.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
    ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
    shape = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    return 1.0 / (ext * c.rope_theta ** shape), float(scale)


def _dynamic_inv_freq(c: ModelConfig, rs: dict, seq_len: int, device=None) -> torch.Tensor:
    d, limit, factor = c.head_dim, c.max_position_embeddings, rs["factor"]
    n = torch.tensor(max(seq_len, limit), dtype=torch.float32)
    base = c.rope_theta * ((factor * n / limit) - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base.to(device) ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))


class Rope:
    """The rotary embedding of a Llama-family config: (cos, sin) [B, 1, S, D] for positions [B, S].

    dynamic and longrope choose their frequencies from the longest position of each call (one micro-batch's
    forward), as transformers does per forward: past the trained length (max_position_embeddings for dynamic,
    original_max_position_embeddings for longrope) they switch to the scaled set. yarn and longrope scale cos
    and sin by their attention factor.
    """

    def __init__(self, c: ModelConfig, device=None):
        self.c, self.device = c, device
        self.rs = dict(c.rope_scaling or {})
        self.kind = self.rs.get("rope_type", "default")
        self.scale = 1.0
        if self.kind == "llama3":
            self.inv_freq = _llama3_inv_freq(c, self.rs, device)
        elif self.kind == "linear":
            self.inv_freq = _default_inv_freq(c, c.rope_theta, device) / self.rs["factor"]
        elif self.kind == "yarn":
            self.inv_freq, self.scale = _yarn(c, self.rs, device)
        elif self.kind == "longrope":
            self.inv_freq, self.scale = _longrope(c, self.rs, False, device)
            self.long_inv_freq = _longrope(c, self.rs, True, device)[0]
        elif self.kind in ("default", "dynamic"):
            self.inv_freq = _default_inv_freq(c, c.rope_theta, device)
        else:
            raise ValueError(f"rope_scaling type {self.kind!r} is not supported")

    def freqs_for(self, seq_len: int) -> torch.Tensor:
        """Inverse frequencies [D/2] for a call whose longest position is seq_len - 1."""
        if self.kind == "dynamic" and seq_len > self.c.max_position_embeddings:
            return _dynamic_inv_freq(self.c, self.rs, seq_len, self.device)
        if self.kind == "longrope" and seq_len > self.rs["original_max_position_embeddings"]:
            return self.long_inv_freq
        return self.inv_freq

    def __call__(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, S] -> cos, sin: [B, 1, S, D]
        dynamic = self.kind in ("dynamic", "longrope") and positions.numel()
        inv = self.freqs_for(int(positions.max()) + 1) if dynamic else self.inv_freq
        freqs = positions.float()[..., None] * inv  # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, N, S, D]; rotate the two halves (HF convention)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
