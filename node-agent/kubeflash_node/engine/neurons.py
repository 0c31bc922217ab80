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

On the CPU (store dtype = compute dtype) a layer's buffer is instead its bundle file's image in anonymous memory
(row i: neuron i; zeros until read; pages committed only where written): the missing neurons' runs are read
straight into their rows on a reader thread (no copy after the read, no gather), the active set cut into up to
PIECES spans of neuron ids whose reads are issued in order, and the sparse FFN multiplies each span in place
(inactive neurons' activations 0: exactly the masked product) while the next span is still being read
(`pieces`). Copying rows into and out of a slot buffer cost more on the CPU than the products themselves.
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


DIRECT = True  # False: the slot buffer on the CPU too (bench/sparse_decode.py --slots compares the two)
PIECE_BYTES = 1 << 20  # a call's missing bundles are read in pieces of at least this many bytes ...
PIECES = 4  # ... and at most this many, each multiplied while the next one is read (each piece costs a few
# more tensor ops: below a MiB of reads the overlap does not pay for them)


@dataclass
class _Layer:
    slot: torch.Tensor  # [I] long: row of `buf` holding the neuron, -1 none
    last: torch.Tensor  # [I] long: decode call the neuron was last active in
    hot: torch.Tensor  # [I] bool
    buf: torch.Tensor  # [cap, R]
    used: torch.Tensor  # [cap] bool: the row holds a neuron
    step: int = 0
    image: np.ndarray | None = None  # on the CPU: buf's numpy view, the bundle file's image reads land in, ...
    image_held: np.ndarray | None = None  # ... [I] bool: held (hot or in the window)
    image_hot: np.ndarray | None = None  # ... [I] bool
    image_last: np.ndarray | None = None  # ... [I] int64: decode call last active in


class NeuronCache:
    """Bundles of a model's FFN neurons held on `device` (hot set + window), the rest read on demand."""

    def __init__(self, reader, *, num_layers: int, device: torch.device, dtype: torch.dtype,
                 hot: list[list[int]] | None = None, window: int = 0, timings=None, gap: int = 0):
        self.reader, self.device, self.dtype, self.window, self.timings = reader, device, dtype, window, timings
        self.gap = gap  # inactive neurons read through to merge two runs into one read
        self.hits = self.misses = 0  # neuron requests served from the cache / read from the SSD
        self.read_bytes = 0
        n, r = reader.neurons, reader.row_elems
        # on the CPU, with the store's dtype the compute dtype, a layer's buffer is its bundle file's image (row i:
        # neuron i; untouched rows commit no memory) that reads land in directly, on a thread, while the compute
        # multiplies what it has (pieces)
        self.direct = DIRECT and device.type == "cpu" and hasattr(reader, "read_into") and \
            as_torch(np.empty(0, reader.dtype)).dtype == dtype
        if self.direct:
            self._init_direct(num_layers, hot)
            return
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

    def _init_direct(self, num_layers: int, hot: list[list[int]] | None) -> None:
        import mmap

        n, r = self.reader.neurons, self.reader.row_elems
        self.layers = []
        for j in range(num_layers):
            ids = (hot or [[]] * num_layers)[j]
            # anonymous memory: zeros until read (finite, so a row multiplied by a zero activation adds exactly 0),
            # and committed only where written
            image = np.frombuffer(mmap.mmap(-1, max(1, n * self.reader.row_bytes)), dtype=self.reader.dtype)
            st = _Layer(torch.empty(0), torch.empty(0), torch.empty(0), as_torch(image[:n * r].reshape(n, r)),
                        torch.zeros(n, dtype=torch.bool))  # used: rows ever written; the rest in numpy (image_*)
            st.image = image[:n * r].reshape(n, r)
            st.image_held, st.image_hot = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
            st.image_last = np.full(n, -1 << 40, dtype=np.int64)
            if ids:
                idx = np.asarray(ids, dtype=np.int64)
                self._read_direct(j, st, idx, "load_neurons_resident")
                st.image_held[idx] = True
                st.image_hot[idx] = True
            self.layers.append(st)
        self.hot_bytes = sum(len(ids) for ids in (hot or [])) * self.reader.row_bytes

    def pieces(self, layer: int, active: torch.Tensor, *, decode: bool):
        """The bundles of the sorted neuron ids `active` ([A] long, CPU) in pieces: yields (sel, rows). On the CPU sel
        is a slice of neuron ids [lo, hi) and rows the bundle image's rows lo..hi-1 ([hi - lo, R], a view, no copy;
        rows of inactive neurons in it hold zeros or a bundle, the caller gives them activation 0): the active set is
        cut into up to PIECES consecutive pieces whose missing neurons are read on a thread, in order, while the
        caller multiplies the pieces already there. Elsewhere one piece: sel the positions in `active` [A], rows
        their gathered bundles [A, R]. Consume it to the end."""
        if not self.direct:
            yield torch.arange(active.numel()), self.rows(layer, active, decode=decode)
            return
        st = self.layers[layer]
        ids = active.numpy()
        held = st.image_held[ids]  # [A] bool (numpy: this bookkeeping is a few microseconds, torch indexing tens)
        miss = ids[~held]
        self.hits += ids.shape[0] - miss.shape[0]
        self.misses += miss.shape[0]
        todo, k = [], max(1, min(PIECES, miss.shape[0] * self.reader.row_bytes // PIECE_BYTES))
        cuts = _cuts(ids, k)
        for part, gone in zip(np.split(ids, cuts), np.split(held, cuts)):
            need = part[~gone]  # the piece's missing neurons
            fut = _pool().submit(self._read_direct, layer, st, need, "load_neurons") if need.shape[0] else None
            todo.append((slice(int(part[0]), int(part[-1]) + 1), fut))
        if decode and self.window > 0:  # the window keeps what this call reads; what fell out of it is dropped
            last = st.image_last
            last[ids] = st.step
            st.image_held[miss] = True
            st.image_held &= st.image_hot | (last > st.step - self.window)
            st.step += 1
        for sel, fut in todo:
            if fut is not None:
                t0 = time.perf_counter()
                fut.result()
                if self.timings is not None:
                    self.timings.add("load_neurons_stall", time.perf_counter() - t0)
            yield sel, st.buf[sel]

    def _read_direct(self, layer: int, st: _Layer, ids: np.ndarray, what: str) -> None:
        t0, before = time.perf_counter(), self.reader.bytes_read
        span = merged(ids, self.gap)
        self.reader.read_into(layer, span.tolist(), st.image)
        st.used.numpy()[span] = True
        got = self.reader.bytes_read - before
        if what == "load_neurons":
            self.read_bytes += got
        if self.timings is not None:
            self.timings.add(what, time.perf_counter() - t0, bytes=got)

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
        """Bytes of the row buffers (hot set + window, with their free rows; on the CPU the rows ever written)."""
        if self.direct:
            return sum(int(st.used.sum()) for st in self.layers) * self.reader.row_bytes
        return sum(st.buf.numel() * st.buf.element_size() for st in self.layers)


_POOL = None


def _pool():
    """The one thread the CPU neuron caches read on (preadv releases the GIL: the compute goes on meanwhile)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kf-bundles")
    return _POOL


def _cuts(ids: np.ndarray, k: int) -> list[int]:
    """Positions cutting the sorted ids `ids` into about `k` equal pieces, each where a run of consecutive ids
    starts (a run is never read in two)."""
    starts = np.flatnonzero(np.diff(ids) != 1) + 1  # positions where a run starts (the first one excluded)
    if k <= 1 or not starts.shape[0]:
        return []
    want = [ids.shape[0] * i // k for i in range(1, k)]
    at = np.clip(np.searchsorted(starts, want), 0, starts.shape[0] - 1)
    return sorted(set(starts[at].tolist()))


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


def read_kept(reader, layer: int, ids: torch.Tensor, gap: int, *, out: bool, timings=None,
              decode: bool | None = None) -> tuple[torch.Tensor, int]:
    """(rows, bytes read) of a channel file (store/channels.py's readers, or channelcache.ChannelCache, which takes
    `decode`) for the sorted ids: `reader.down` rows where `out`, else `reader.inputs` rows; one read per run, runs
    at most `gap` apart read as one and the extra rows dropped (a channel reader drops them as they are read:
    `gapped`; a cache reads the merged span and the kept rows are gathered after). The read is timed as
    load_neurons in `timings` when given."""
    t0, before = time.perf_counter(), reader.bytes_read
    want = ids.cpu().numpy()
    if gap and hasattr(reader, "gapped"):  # a channel file: the rows between runs dropped as they are read
        got = as_torch(reader.gapped(layer, want.tolist(), gap, out=out))
    else:
        span = merged(want, gap)
        more = {} if decode is None else {"decode": decode}
        got = as_torch((reader.down if out else reader.inputs)(layer, span.tolist(), **more))
        if span.shape[0] != want.shape[0]:
            got = got.index_select(0, torch.from_numpy(np.searchsorted(span, want)))
    n = reader.bytes_read - before
    if timings is not None:
        timings.add("load_neurons", time.perf_counter() - t0, bytes=n)
    return got, n


def as_torch(a: np.ndarray) -> torch.Tensor:
    """A store array as torch: bfloat16 arrives as its uint16 bits (store.format.tensor_view) and is viewed back."""
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
