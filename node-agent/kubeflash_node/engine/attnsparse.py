"""Attention input sparsity (TEAL on q/k/v and o): read and multiply only the attention's kept input channels.

The FFN's input sparsity (sparse.py, method "input") leaves the attention's four matrices read whole, a third of a
Llama layer's bytes. TEAL thresholds their inputs too: an entry of the normalized attention input h with
|h_c| <= tin_l is dropped before q, k and v, so only column c of wq, wk and wv is needed per kept channel; an entry
of the attention output (the heads concatenated, before o) with |o_j| <= tout_l is dropped before o, so only
column j of wo is needed per kept channel. Both thresholds come from `kubeflash calibrate` (quantiles of |h| and
|o| on the calibration text, store/sparsity.py's `attention`). Streamed from disk, the columns come from the
attention channel files (store/channels.py, `attn_channels/`): one q|k|v bundle per input channel, then the o
columns, one read per run of kept channels.

The model calls in through one weight-dict key, `sparse_attn` (model.llama_layer): `qkv` hands back the q/k/v
weights narrowed to the step's kept channels (the union over its tokens) with the input narrowed alike, each
token's own drops zeroed, so the layer's own projection code runs unchanged and equals the dense projection of the
masked input; `out` is the o projection of the masked attention output. An X-cache layer stores the masked input
and recomputes K, V from it through `qkv` again, so its K, V are those of the sparse run.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..store.modelconfig import ModelConfig
from .sparse import ColumnNorms, norms_of, over, paired_quantiles, scaled

HOOK = "sparse_attn"  # the weight-dict key llama_layer looks for
QKV = ("wq", "wk", "wv")
QKV_BIAS = ("bq", "bk", "bv")


class SparseAttention:
    """Attention input sparsity of one model: per layer (threshold on |attention input|, on |attention output|);
    None: record both magnitudes for calibration (`sampler(kept, tensor, most)` keeps a sample) instead."""

    def __init__(self, thresholds: Sequence[tuple[float, float]] | None, *, num_layers: int, channels=None,
                 gaps: tuple[int, int] = (0, 0), sampler: Callable | None = None, scales: dict | None = None):
        self.th = None if thresholds is None else [(float(a), float(b)) for a, b in thresholds]
        # criterion wina: the attention input's (q|k|v columns) and output's (o columns) norms, masks on |x| * c
        self.scales = None if scales is None else ColumnNorms(scales["attn_in"], scales["attn_out"])
        self.channels = channels  # store.channels.AttnChannelReader: q|k|v columns and o columns, per run
        self.gaps = gaps  # runs of kept input / output channels this many apart are read as one
        self.sampler = sampler
        self.timings = None  # the engine's Timings: column reads are counted there (load_neurons)
        self.in_samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # |attention input| samples
        self.out_samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # |attention output| samples
        # per phase: tokens, layer calls, dense matrix bytes, bytes needed, runs, bytes read from the files
        self.count = {p: {"tokens": 0, "steps": 0, "dense": 0, "read": 0, "runs": 0, "file": 0}
                      for p in ("prefill", "decode")}
        self.entries, self.dropped = 0, 0  # channel-token pairs seen, and dropped
        self.layers = [_Layer(self, j) for j in range(num_layers)]

    def summary(self) -> dict:
        """Share of attention input entries dropped and, per phase, attention matrix bytes per layer and token."""
        out: dict = {"token_sparsity": round(self.dropped / self.entries, 4) if self.entries else 0.0}
        for p, n in self.count.items():
            if n["tokens"]:
                out[p] = {"attn_bytes_per_layer_token_dense": n["dense"] / n["tokens"],
                          "attn_bytes_per_layer_token_sparse": n["read"] / n["tokens"],
                          "attn_read_fraction": round(n["read"] / n["dense"], 4),
                          "runs_per_layer_call": round(n["runs"] / n["steps"], 1)}
                if n["file"]:
                    out[p]["channel_bytes_per_layer_token"] = n["file"] / n["tokens"]
        return out

    def thresholds_at(self, targets: Sequence[float]) -> dict[float, tuple[tuple[float, float], ...]]:
        """Per target: each layer's (|attention input| quantile, |attention output| quantile) at that target (0:
        keep every entry that is not exactly zero). Empty when nothing was recorded."""
        return paired_quantiles(self.in_samples, self.out_samples, targets)

    def close(self) -> None:
        if self.channels is not None:
            self.channels.close()
            self.channels = None

    def rows(self, layer: int, ids: torch.Tensor, like: torch.Tensor, *, out: bool) -> torch.Tensor:
        """Rows of the attention channel files for the sorted ids: q|k|v bundles [K, Q + 2KV] or o columns [K, H],
        one read per run (runs at most `gaps` apart read as one, the extra rows dropped)."""
        from .neurons import read_kept

        got, n = read_kept(self.channels, layer, ids, self.gaps[1 if out else 0], out=out, timings=self.timings)
        self.count["decode" if like.shape[1] == 1 else "prefill"]["file"] += n
        return got.to(like.device, like.dtype)

    def add(self, phase: str, *, tokens: int, dense: int, read: int, ids: torch.Tensor, keep: torch.Tensor) -> None:
        n = self.count[phase]
        n["tokens"] += tokens
        n["steps"] += 1 if tokens else 0
        n["dense"] += dense
        n["read"] += read
        n["runs"] += int((ids.diff() != 1).sum()) + 1 if ids.numel() else 0
        self.entries += keep.numel()
        self.dropped += keep.numel() - int(keep.sum())


class _Layer:
    """The `sparse_attn` hook of one decoder layer."""

    def __init__(self, owner: SparseAttention, layer: int):
        self.s, self.j = owner, layer

    def qkv(self, c: ModelConfig, w: dict, h: torch.Tensor, *, count: bool = True):
        """(weights with wq/wk/wv (and fused_qkv, biases) narrowed to the kept input channels [*, K], the input
        narrowed alike [B, S, K], the masked input [B, S, H]) for the attention input h [B, S, H]."""
        s = self.s
        norms = norms_of(s.scales, 0, self.j, h.device)  # wina: |h| * norms
        if s.th is None:  # calibrating: record, run dense
            s.sampler(s.in_samples[self.j], h if norms is None else scaled(h, norms))
            return w, h, h
        keep = over(h, s.th[self.j][0], norms)  # [B, S, H]
        ch = keep.reshape(-1, h.shape[-1]).any(0).nonzero().squeeze(1)  # [K] kept channels, union over tokens
        hx = h * keep  # [B, S, H] what the dense projection of the masked input sees (an X-cache stores it)
        if "fused_qkv" in w:
            fused = w["fused_qkv"].index_select(1, ch)  # [Q + 2KV, K]
        elif "wq" in w:
            fused = torch.cat([w[n].index_select(1, ch) for n in QKV])
        else:  # streamed without the attention matrices: the kept channels' q|k|v bundles
            fused = s.rows(self.j, ch, h, out=False).T
        q, kv = c.q_dim, c.num_kv_heads * c.head_dim
        wa = {**w, "fused_qkv": fused, "wq": fused[:q], "wk": fused[q:q + kv], "wv": fused[q + kv:]}
        bias = w.get("fused_qkv_b")
        if bias is None and any(b in w for b in QKV_BIAS):  # a missing one adds nothing
            bias = torch.cat([w[b] if b in w else h.new_zeros(n) for b, n in zip(QKV_BIAS, (q, kv, kv))])
        if bias is not None:
            wa.update({"fused_qkv_b": bias, "bq": bias[:q], "bk": bias[q:q + kv], "bv": bias[q + kv:]})
        if count:
            size = h.element_size()
            s.add("decode" if h.shape[1] == 1 else "prefill", tokens=h.shape[0] * h.shape[1],
                  dense=(q + 2 * kv) * h.shape[-1] * size, read=(q + 2 * kv) * ch.numel() * size, ids=ch, keep=keep)
        return wa, hx.index_select(-1, ch), hx

    def out(self, c: ModelConfig, w: dict, o: torch.Tensor) -> torch.Tensor:
        """The o projection [B, S, H] of the attention output o [B, S, Q] with its small entries dropped."""
        s = self.s
        norms = norms_of(s.scales, 1, self.j, o.device)
        if s.th is None:
            s.sampler(s.out_samples[self.j], o if norms is None else scaled(o, norms))
            return F.linear(o, w["wo"], w.get("bo"))
        keep = over(o, s.th[self.j][1], norms)  # [B, S, Q]
        ch = keep.reshape(-1, o.shape[-1]).any(0).nonzero().squeeze(1)  # [K]
        ok = o.index_select(-1, ch) * keep.index_select(-1, ch)  # [B, S, K]
        wo = w["wo"].index_select(1, ch) if "wo" in w else s.rows(self.j, ch, o, out=True).T  # [H, K]
        size = o.element_size()
        s.add("decode" if o.shape[1] == 1 else "prefill", tokens=0, dense=c.hidden_size * o.shape[-1] * size,
              read=c.hidden_size * ch.numel() * size, ids=ch, keep=keep)
        return F.linear(ok, wo, w.get("bo"))
