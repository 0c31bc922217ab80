"""The CPU decode path over a long host cache (K @ q^T scores, model._sdpa) agrees with a float64 softmax
reference, with left padding and grouped-query heads, for the shapes the CPU attention tier runs."""

from __future__ import annotations

import pytest
import torch

from kubeflash_node.engine.model import Span, attention


@pytest.mark.parametrize("nh, nk", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_long_cpu_decode_matches_a_float64_softmax(nh, nk):
    torch.manual_seed(0)
    b, t, d, cap = 3, 4500, 32, 4600
    first = (0, 700, 4400)  # left padding per row: the last row sees only 100 slots
    k = torch.randn(b, nk, cap, d)
    v = torch.randn(b, nk, cap, d)
    q = torch.randn(b, nh, 1, d)
    got = attention(q, k[:, :, :t], v[:, :, :t], Span(start=t - 1, first=first))
    rep = nh // nk
    kk = k[:, :, :t].double().repeat_interleave(rep, dim=1)
    vv = v[:, :, :t].double().repeat_interleave(rep, dim=1)
    scores = q.double() @ kk.transpose(-1, -2) / d ** 0.5  # [B, Nh, 1, T]
    allowed = torch.arange(t)[None, :] >= torch.tensor(first)[:, None]  # [B, T]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    want = torch.softmax(scores, dim=-1) @ vv
    assert got.shape == (b, nh, 1, d)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
