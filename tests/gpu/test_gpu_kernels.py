"""The fused dequantization kernel (engine/kernels.py) against the plain-torch path it replaces on CUDA: weight
matrices and KV codec rows (read in place from a packed row, at its stride), 4 and 8 bits, asymmetric and
symmetric, float16 and bfloat16 outputs."""

from __future__ import annotations

import pytest
import torch

from kubeflash_node.engine import kernels
from kubeflash_node.engine.quant import KVCodec, QuantSpec, dequantize, dequantize_torch, quantize

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs Triton (ships with torch's CUDA wheels)")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the output dtype's spacing at b's magnitude."""
    eps = torch.finfo(b.dtype).eps
    return ((a.float() - b.float()).abs() / (b.float().abs().clamp(min=1e-3) * eps)).max().item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_dequant_matches_torch(bits, symmetric, dtype):
    g = torch.Generator(device="cuda").manual_seed(bits + symmetric)
    w = torch.randn(384, 1280, device="cuda", generator=g) * 0.05
    spec = QuantSpec(bits=bits, group=64, symmetric=symmetric)
    p = quantize(w, spec)
    fused = dequantize(p["q"], p["scale"], p.get("zero"), spec, dtype)
    ref = dequantize_torch(p["q"], p["scale"], p.get("zero"), spec, dtype)
    assert fused.shape == ref.shape == w.shape and fused.dtype == dtype
    assert _ulps(fused, ref) <= 1.0  # at most the fused multiply-add's one rounding apart
    assert (fused.float() - w).abs().max().item() < 0.05 * (0.6 if bits == 4 else 0.08)  # and it is w, quantized


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_codec_decode_in_place_matches_torch(bits):
    codec = KVCodec(bits, 128)
    x = torch.randn(37, 3, 5, 128, device="cuda", dtype=torch.float16)  # [T, B, Nk, D]
    raw = codec.encode(x)
    prefix = raw[:21]  # a cache prefix: rows at the packed stride, scale and zero read in place
    got = codec.decode(prefix, torch.float16)
    a, b = codec.nq, codec.nq + 2 * codec.ng
    ref = dequantize_torch(prefix[..., :a], prefix[..., a:b].contiguous().view(torch.float16),
                           prefix[..., b:].contiguous().view(torch.float16), codec.spec, torch.float16)
    assert got.shape == (21, 3, 5, 128)
    assert _ulps(got, ref) <= 1.0
    assert (got.float() - x[:21].float()).abs().max().item() < (0.5 if bits == 4 else 0.05)


def test_empty_and_non_contiguous_inputs():
    spec = QuantSpec(bits=4, group=64)
    w = torch.randn(64, 256, device="cuda")
    p = quantize(w, spec)
    q_t = p["q"].t().contiguous().t()  # same values, column-major: the kernel must copy, not misread
    assert torch.equal(dequantize(q_t, p["scale"], p["zero"], spec, torch.float16),
                       dequantize(p["q"], p["scale"], p["zero"], spec, torch.float16))
    empty = dequantize(p["q"][:0], p["scale"][:0], p["zero"][:0], spec, torch.float16)
    assert empty.shape == (0, 256)
