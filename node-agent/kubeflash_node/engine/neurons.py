"""Active neurons' FFN bundles on the compute device: a resident hot set and a sliding window (LLM in a flash).

The sparse FFN (sparse.py) asks, per layer call, for the bundles (up row + down column) of its active neurons.
`NeuronCache` serves them from two places before reading the rest from the SSD (store/bundles.BundleReader, one
read per run of consecutive missing neurons):
- the hot set: per layer, the neurons most often active on the calibration text, read once at start and kept
  (sized by a byte budget across all layers: the globally most frequent neurons win);
- the window: every neuron active in one of the last `window` decode calls of the layer stays (the paper's
  windowing: consecutive tokens share most of their active neurons, so a step reads only the newly active ones).
A prefill call reads what it misses without keeping it (its union is close to every neuron). Runs of missing
neurons at most `gap` inactive ones apart are read as one (costmodel.merge_gap: a read's fixed cost buys that
many extra bundles); the extra rows are dropped. Vectorized per layer (tensor ops, no Python loop per neuron): a
slot index per neuron ([I], -1 when not held), the step it was last active, which buffer rows are in use, and a
row buffer that grows by doubling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch


def hot_sets(freq: np.ndarray, *, row_bytes: int, budget_bytes: int) -> list[list[int]]:
    """Per layer, the sorted neuron ids of the hot set: the most frequently active neurons over all layers
    (`freq` [L, I], share of calibration tokens each neuron was active on) that fit `budget_bytes`."""
    layers, neurons = freq.shape
    k = min(budget_bytes // row_bytes, layers * neurons) if row_bytes else 0
    if k <= 0:
        return [[] for _ in range(layers)]
    flat = np.argsort(-freq.reshape(-1), kind="stable")[:k]
    out: list[list[int]] = [[] for _ in range(layers)]
    for f in flat.tolist():
        out[f // neurons].append(f % neurons)
    return [sorted(ids) for ids in out]


@dataclass
class _Layer:
    slot: torch.Tensor  # [I] long: row of `buf` holding the neuron, -1 none
    last: torch.Tensor  # [I] long: decode call the neuron was last active in
    hot: torch.Tensor  # [I] bool
    buf: torch.Tensor  # [cap, R]
    used: torch.Tensor  # [cap] bool: the row holds a neuron
    step: int = 0


class NeuronCache:
    """Bundles of a model's FFN neurons held on `device` (hot set + window), the rest read on demand."""

    def __init__(self, reader, *, num_layers: int, device: torch.device, dtype: torch.dtype,
                 hot: list[list[int]] | None = None, window: int = 0, timings=None, gap: int = 0):
        self.reader, self.device, self.dtype, self.window, self.timings = reader, device, dtype, window, timings
        self.gap = gap  # inactive neurons read through to merge two runs into one read
        self.hits = self.misses = 0  # neuron requests served from the cache / read from the SSD
        self.read_bytes = 0
        n, r = reader.neurons, reader.row_elems
        self.layers = []
        for j in range(num_layers):
            ids = (hot or [[]] * num_layers)[j]
            st = _Layer(torch.full((n,), -1, dtype=torch.long), torch.full((n,), -1 << 40, dtype=torch.long),
                        torch.zeros(n, dtype=torch.bool), torch.empty(0, r, dtype=dtype, device=device),
                        torch.zeros(0, dtype=torch.bool))
            if ids:
                idx = torch.tensor(ids, dtype=torch.long)
                st.buf = self._read(j, idx, "load_neurons_resident")
                st.slot[idx] = torch.arange(len(ids))
                st.hot[idx] = True
                st.used = torch.ones(len(ids), dtype=torch.bool)
            self.layers.append(st)
        self.hot_bytes = sum(len(ids) for ids in (hot or [])) * reader.row_bytes

    def rows(self, layer: int, active: torch.Tensor, *, decode: bool) -> torch.Tensor:
        """[A, R] bundles of the sorted neuron ids `active` ([A] long, CPU) on the device."""
        st = self.layers[layer]
        have = st.slot[active]  # [A]
        miss = active[have < 0]
        self.hits += active.numel() - miss.numel()
        self.misses += miss.numel()
        new = self._read(layer, miss, "load_neurons") if miss.numel() else None
        if not (decode and self.window > 0):  # not kept: assemble from what is held and what was read
            out = torch.empty(active.numel(), st.buf.shape[1], dtype=self.dtype, device=self.device)
            held = (have >= 0).nonzero().squeeze(1)
            out.index_copy_(0, held.to(self.device), st.buf.index_select(0, have[held].to(self.device)))
            if new is not None:
                out.index_copy_(0, (have < 0).nonzero().squeeze(1).to(self.device), new)
            return out
        st.last[active] = st.step
        self._evict(st)
        if new is not None:
            st.slot[miss] = self._place(st, new)
        st.step += 1
        return st.buf.index_select(0, st.slot[active].to(self.device))  # index_select: far cheaper than buf[idx]

    def _evict(self, st: _Layer) -> None:
        """Free the rows of windowed neurons not active in the last `window` calls (this one included)."""
        old = (st.slot >= 0) & ~st.hot & (st.last <= st.step - self.window)
        if old.any():
            st.used[st.slot[old]] = False
            st.slot[old] = -1

    def _place(self, st: _Layer, rows: torch.Tensor) -> torch.Tensor:
        """Rows of `buf` for new bundles: free ones first, then the buffer grows."""
        k = rows.shape[0]
        free = (~st.used).nonzero().squeeze(1)
        if free.numel() < k:
            base, grow = st.buf.shape[0], k - free.numel()
            more = min(max(grow, base), self.reader.neurons - base)  # doubling; a neuron holds one row at most
            st.buf = torch.cat([st.buf, torch.empty(more, st.buf.shape[1], dtype=self.dtype, device=self.device)])
            st.used = torch.cat([st.used, torch.zeros(more, dtype=torch.bool)])
            free = torch.cat([free, torch.arange(base, base + more)])
        idx = free[:k]
        st.used[idx] = True
        st.buf.index_copy_(0, idx.to(self.device), rows)
        return idx

    def _read(self, layer: int, ids: torch.Tensor, what: str) -> torch.Tensor:
        t0, before = time.perf_counter(), self.reader.bytes_read
        want = ids.numpy()
        span = merged(want, self.gap)
        got_rows = as_torch(self.reader.read(layer, span.tolist()))
        if span.shape[0] != want.shape[0]:  # drop the inactive neurons read through
            got_rows = got_rows.index_select(0, torch.from_numpy(np.searchsorted(span, want)))
        rows = got_rows.to(self.device, self.dtype)
        got = self.reader.bytes_read - before
        if what == "load_neurons":
            self.read_bytes += got
        if self.timings is not None:
            self.timings.add(what, time.perf_counter() - t0, bytes=got)
        return rows

    def held_bytes(self) -> int:
        """Bytes of the row buffers (hot set + window, with their free rows)."""
        return sum(st.buf.numel() * st.buf.element_size() for st in self.layers)


def merged(ids: np.ndarray, gap: int) -> np.ndarray:
    """The sorted ids `ids` with every gap of at most `gap` missing ids between two of them filled in: what a
    reader issuing one read per run of consecutive ids reads to serve `ids` in fewer, larger reads."""
    if gap <= 0 or ids.shape[0] < 2:
        return ids
    d = np.diff(ids)
    fill = (d > 1) & (d <= gap + 1)
    if not fill.any():
        return ids
    # each id i is followed by d[i] - 1 filled ids where fill[i]: repeat the id, add 0, 1, ... within its group
    n = np.where(fill, d, 1)
    rep = np.repeat(ids[:-1], n)
    start = np.repeat(np.cumsum(n) - n, n)
    return np.concatenate([rep + (np.arange(rep.shape[0]) - start), ids[-1:]])


def as_torch(a: np.ndarray) -> torch.Tensor:
    """A store array as torch: bfloat16 arrives as its uint16 bits (store.format.tensor_view) and is viewed back."""
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
