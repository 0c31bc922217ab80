"""The on-disk format of group-wise 4/8-bit quantized matrices: how the converter writes them (engine/quant.py
reads them back, on the GPU).

A tensor [..., K] is cut into groups of `group` values along its last (input) dim; each group keeps an
unsigned code per value and a float16 scale (+ a float16 zero, the group minimum, when asymmetric):
    asymmetric: w ~ q * scale + zero,      q in 0 .. 2^bits - 1
    symmetric:  w ~ (q - mid) * scale,     q in mid - (mid - 1) .. mid + (mid - 1), mid = 2^(bits-1)
4-bit codes are packed two to a byte (even index in the low nibble). The store keeps a quantized matrix `w`
as `w.q` (uint8 [N, K*bits/8]), `w.scale` and `w.zero` (float16 [N, K/group]); the manifest's
extra["quant"] says which bits, group and scheme.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

QUANTIZATIONS = {"none": 16, "int8": 8, "int4": 4}
# The big matrices of a decoder layer; norms, biases, embeddings and the lm head stay in float.
QUANT_NAMES = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "fc1_w", "fc2_w"})
SUFFIXES = (".q", ".scale", ".zero")


@dataclass(frozen=True)
class QuantSpec:
    """How a store's matrices (or a KV cache's rows) are quantized."""

    bits: int = 8  # 8 | 4
    group: int = 64  # values per scale along the input dim
    symmetric: bool = False  # True: no zero tensor, codes centred on 2^(bits-1)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group < 2 or self.group % 2:
            raise ValueError(f"quantization group must be an even number >= 2, got {self.group}")

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of `shape` can be quantized (its last dim a whole number of groups)."""
        return len(shape) >= 1 and shape[-1] % self.group == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "QuantSpec | None":
        return cls(bits=int(d["bits"]), group=int(d.get("group", 64)), symmetric=bool(d.get("symmetric", False))) \
            if d else None

    @classmethod
    def named(cls, name: str, *, symmetric: bool = False) -> "QuantSpec | None":
        """none -> None, int8 / int4 -> a spec with group 64."""
        if name not in QUANTIZATIONS:
            raise ValueError(f"quantization {name!r} is not one of {', '.join(QUANTIZATIONS)}")
        return None if name == "none" else cls(bits=QUANTIZATIONS[name], symmetric=symmetric)


def _pack4(q: torch.Tensor) -> torch.Tensor:
    # q: [..., K] codes 0..15 (uint8) -> [..., K/2]
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack4(p: torch.Tensor) -> torch.Tensor:
    # p: [..., K/2] -> [..., K]
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


def quantize(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """w: [..., K] -> {"q": uint8 [..., K*bits/8], "scale": f16 [..., K/g] (, "zero": f16 [..., K/g])}."""
    if not spec.fits(tuple(w.shape)):
        raise ValueError(f"last dim {w.shape[-1]} is not a multiple of the group size {spec.group}")
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // spec.group, spec.group)  # [..., G, g]
    top = 2 ** spec.bits - 1
    if spec.symmetric:
        mid = 2 ** (spec.bits - 1)
        scale = (g.abs().amax(-1) / (mid - 1)).clamp(min=2 ** -24).half()  # [..., G]; >= fp16's least subnormal
        q = (g / scale.float()[..., None]).round().clamp(-(mid - 1), mid - 1) + mid
        out = {"scale": scale}
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        zero = lo.half()
        scale = ((hi - zero.float()) / top).clamp(min=2 ** -24).half()
        q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, top)
        out = {"scale": scale, "zero": zero}
    q = q.to(torch.uint8).reshape(w.shape)
    out["q"] = _pack4(q) if spec.bits == 4 else q
    return out


def quantize_named(tensors: dict[str, torch.Tensor], spec: QuantSpec | None,
                   names=QUANT_NAMES) -> dict[str, torch.Tensor]:
    """Replace each matrix in `names` (whose input dim fits the groups) by its w.q / w.scale / w.zero."""
    if spec is None:
        return tensors
    out = {}
    for name, t in tensors.items():
        if name.rpartition(".")[2] in names and t.dim() == 2 and spec.fits(tuple(t.shape)):  # e{j}.w_up: an expert's
            out |= {f"{name}.{k}": v for k, v in quantize(t, spec).items()}
        else:
            out[name] = t
    return out


def packed_bytes_per_value(spec: QuantSpec) -> float:
    """Stored bytes per quantized value, scales and zeros included (int8/g64 asym: 1.0625)."""
    return spec.bits / 8 + (2 if spec.symmetric else 4) / spec.group
