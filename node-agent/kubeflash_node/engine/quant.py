"""Dequantization of group-wise 4/8-bit weights and KV rows, in plain torch ops or one fused kernel on CUDA.

The format (codes, scales, zeros, packing) is the store's: kubeflash_node.store.quantformat.
"""

from __future__ import annotations

import torch

from ..store.quantformat import (  # noqa: F401  (re-exported: the engine's one import point for quantization)
    QUANT_NAMES,
    QUANTIZATIONS,
    SUFFIXES,
    QuantSpec,
    _unpack4,
    packed_bytes_per_value,
    quantize,
    quantize_named,
)
from . import kernels


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`, on the tensors' own device: -> [..., K] in `dtype` (one fused kernel on CUDA)."""
    if kernels.available(q):
        return kernels.dequantize_rows(q, scale, zero, bits=spec.bits, group=spec.group, dtype=dtype)
    return dequantize_torch(q, scale, zero, spec, dtype)


def dequantize_torch(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                     dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` in plain torch ops (CPU, or CUDA without Triton): float32 temporaries, then `dtype`."""
    codes = _unpack4(q) if spec.bits == 4 else q  # [..., K]
    k = codes.shape[-1]
    g = codes.reshape(*codes.shape[:-1], k // spec.group, spec.group).float()  # [..., G, g]
    if spec.symmetric:
        w = (g - 2 ** (spec.bits - 1)) * scale.float()[..., None]
    else:
        w = g * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(codes.shape).to(dtype)


def dequantize_named(tensors: dict[str, torch.Tensor], spec: QuantSpec | None, dtype: torch.dtype) -> dict:
    """Fold {w.q, w.scale, w.zero} entries of a stage back into float `w`; other entries pass through."""
    if spec is None:
        return tensors
    out = {}
    for name, t in tensors.items():
        if name.endswith(".q"):
            base = name[:-2]
            out[base] = dequantize(t, tensors[base + ".scale"], tensors.get(base + ".zero"), spec, dtype)
        elif not name.endswith((".scale", ".zero")):
            out[name] = t
    return out


class KVCodec:
    """Packs rows [..., D] of K or V into one uint8 row [..., nbytes] (codes | scale | zero) and back."""

    def __init__(self, bits: int, head_dim: int):
        self.spec = QuantSpec(bits=bits, group=min(64, head_dim))
        if not self.spec.fits((head_dim,)):
            raise ValueError(f"KV compression: head_dim {head_dim} is not a multiple of the group {self.spec.group}")
        self.d = head_dim
        self.nq, self.ng = head_dim * bits // 8, head_dim // self.spec.group
        self.nbytes = self.nq + 2 * 2 * self.ng

    CHUNK = 1 << 22  # values quantized at a time: bounds the float32 temporaries of a prefill's encode

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D] -> [..., nbytes] uint8
        rows = x.reshape(-1, self.d)
        out = torch.empty(rows.shape[0], self.nbytes, dtype=torch.uint8, device=x.device)
        a, b = self.nq, self.nq + 2 * self.ng
        for i in range(0, rows.shape[0], self.CHUNK // self.d):
            part = slice(i, i + self.CHUNK // self.d)
            p = quantize(rows[part], self.spec)
            out[part, :a], out[part, a:b], out[part, b:] = \
                p["q"], p["scale"].view(torch.uint8), p["zero"].view(torch.uint8)
        return out.view(*x.shape[:-1], self.nbytes)

    def decode(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # raw: [..., nbytes] uint8 -> [..., D] in dtype
        a, b = self.nq, self.nq + 2 * self.ng  # scale and zero are read in place, at the row's stride
        return dequantize(raw[..., :a], raw[..., a:b].view(torch.float16), raw[..., b:].view(torch.float16),
                          self.spec, dtype)
