"""Per layer, sparse or dense FFN reads for input sparsity: priced from the calibration's per-row keep frequencies.

An input-sparse (TEAL) streamed layer reads, on the compute thread, one gate|up row per kept input channel and one
down row per kept neuron (store/channels.py); a dense one reads its whole FFN with the layer, ahead of compute. A
call of `tokens` tokens needs the union of their kept rows: row r (kept on a share f_r of the calibration's tokens,
ffn_channels/freq_<target>.npy) is needed with probability 1 - (1 - f_r)^tokens (tokens taken as independent),
unless the hot set holds it. A layer reads sparsely where

    expected bytes of needed rows not held / rate + expected runs x per-read cost / reads in flight  <  FFN bytes / rate,

less SPARSE_MARGIN, the margin costmodel.reads_choice gives dense reads (fewer, larger, read ahead). Expected runs:
a row needed whose predecessor is not, summed over the rows of each kind. Layers differ where their keep rates do
(the calibration's thresholds give each layer its target on average, not per row), and at a larger micro-batch
the union of kept rows approaches all of them, so dense wins there. Reads in flight: the policy's io_threads, at
most one a run, per kind of row (a call reads its gate|up rows, then its down rows: costmodel.row_reads_s). Pure
(numpy only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPARSE_MARGIN = 0.01  # as costmodel.SPARSE_MARGIN: sparse must be predicted this much faster


@dataclass(frozen=True)
class LayerReads:
    """The per-layer choice and what decided it (seconds of FFN reads per layer call at `tokens` tokens)."""

    sparse: tuple[bool, ...]  # per layer: True reads the kept rows, False the whole FFN with the layer
    sparse_s: tuple[float, ...]
    dense_s: float
    tokens: int

    @property
    def dense_layers(self) -> frozenset[int]:
        return frozenset(j for j, s in enumerate(self.sparse) if not s)

    def line(self) -> str:
        n, d = len(self.sparse), len(self.dense_layers)
        ratio = [s / self.dense_s for s in self.sparse_s]
        return (f"per layer at micro-batch {self.tokens}: {n - d} of {n} layers read sparse, {d} dense (sparse reads "
                f"predicted {100 * min(ratio):.0f}-{100 * max(ratio):.0f}% of a dense layer's FFN read time)")


def choose_layers(freq: np.ndarray, *, hidden: int, in_row_bytes: int, down_row_bytes: int, tokens: int,
                  op_s: float, gbps: float, held: list[tuple[list[int], list[int]]] | None = None,
                  threads: int = 1) -> LayerReads:
    """Sparse or dense reads per layer for calls of `tokens` tokens (`freq` [L, H + I]: input channels' keep
    frequencies, then the neurons'; `held` per layer (input channel ids, neuron ids) the hot set holds; `op_s` the
    per-read cost, `gbps` the disk's read rate, `threads` the reads in flight at most: the policy's io_threads)."""
    layers, width = freq.shape
    rate = gbps * 1e9
    need = 1 - (1 - np.clip(freq.astype(np.float64), 0, 1)) ** max(1, tokens)  # [L, H + I]
    if held is not None:
        for j, (ins, downs) in enumerate(held):
            need[j, ins] = 0.0
            need[j, [hidden + i for i in downs]] = 0.0
    size = np.where(np.arange(width) < hidden, in_row_bytes, down_row_bytes)
    dense_s = float((hidden * in_row_bytes + (width - hidden) * down_row_bytes) / rate)
    out = []
    for kind in (slice(0, hidden), slice(hidden, width)):
        p = need[:, kind]
        prev = np.concatenate([np.zeros((layers, 1)), p[:, :-1]], axis=1)
        runs = (p * (1 - prev)).sum(1)  # [L] expected reads
        out.append(((p * size[kind]).sum(1) / rate, runs * op_s / np.maximum(1.0, np.minimum(float(threads), runs))))
    sparse_s = out[0][0] + out[0][1] + out[1][0] + out[1][1]  # [L]
    return LayerReads(tuple(bool(s < dense_s * (1 - SPARSE_MARGIN)) for s in sparse_s),
                      tuple(float(s) for s in sparse_s), dense_s, max(1, tokens))
