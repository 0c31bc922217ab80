"""Input sparsity's channel rows served from memory first: a resident hot set and a sliding window (issue 20).

Input sparsity (sparse.py, method "input") reads, per layer call, the kept FFN input channels' gate|up rows and the
kept neurons' down rows from the input-channel files (store/channels.py). `ChannelCache` wraps that reader with the
same interface (`inputs`, `down`, `bytes_read`, `reads`), so `neurons.read_kept` and the sparse FFN use it unchanged:
- the hot set: per layer, the rows most often kept on the calibration text (`hot_rows`: both kinds of row, ranked
  together by keep frequency, that fit a byte budget over all layers), read once at start and held;
- the window: a row read in a decode call stays while it was kept in one of the layer's last `window` calls of its
  kind (LLM in a flash's windowing). Prefill reads what it misses without keeping it.
The hot set may be split in two tiers (`hot_tiers`): its most frequent rows held on the compute device (`device_hot`;
`gather` takes them where they are: no SSD read, no host->device copy; `h2d_bytes` counts what it does copy, and
`held_h2d_bytes` the host memory's held rows among them), the next in host memory.
Only the rows neither holds are read from the SSD; `bytes_read` counts exactly those (the hot set's start-up read is
`resident_bytes`), and `peak_held_bytes` the most memory hot set and window held at once, so a run can be checked
against its budget. The rows are the files' own bytes, so a held row gives the same numbers as a read one.
"""

from __future__ import annotations

import numpy as np


def hot_rows(freq: np.ndarray, *, hidden: int, in_row_bytes: int, down_row_bytes: int,
             budget_bytes: int) -> list[tuple[list[int], list[int]]]:
    """Per layer, (sorted input channel ids, sorted neuron ids) of the hot set: over all layers the rows most often
    kept (`freq` [L, H + I]: input channels first) whose bytes fit `budget_bytes`, the most frequent first."""
    return hot_tiers(freq, hidden=hidden, in_row_bytes=in_row_bytes, down_row_bytes=down_row_bytes,
                     budgets=(budget_bytes,))[0]


def hot_tiers(freq: np.ndarray, *, hidden: int, in_row_bytes: int, down_row_bytes: int,
              budgets: tuple[int, ...]) -> list[list[tuple[list[int], list[int]]]]:
    """The hot set split into tiers (the compute device's, then host memory's): tier k holds, per layer, the rows
    next in keep frequency (over all layers, the most frequent first) after the tiers before it, within
    `budgets[k]` bytes. A tier of budget 0 is empty and leaves the next as hot_rows alone would choose it."""
    layers, width = freq.shape
    size = np.where(np.arange(width) < hidden, in_row_bytes, down_row_bytes)  # [H + I] bytes of each row
    order = np.argsort(-freq.reshape(-1), kind="stable")
    cum = np.cumsum(np.tile(size, layers)[order])  # [L * (H + I)] bytes up to each row, in order
    tiers, used = [], 0
    for budget in budgets:
        fits = (cum > used) & (cum - used <= budget)  # a prefix of the rows left (sizes are positive)
        out: list[tuple[list[int], list[int]]] = [([], []) for _ in range(layers)]
        for f in order[fits].tolist():
            j, r = divmod(f, width)
            (out[j][0].append(r) if r < hidden else out[j][1].append(r - hidden))
        tiers.append([(sorted(a), sorted(b)) for a, b in out])
        used = int(cum[fits][-1]) if fits.any() else used
    return tiers


PRICE_BINS = 32  # hot_pricing: the held rows' keep frequencies in this many equal-width bins


def hot_pricing(freq: np.ndarray, hot: list[tuple[list[int], list[int]]] | None, *, hidden: int, in_row_bytes: int,
                down_row_bytes: int) -> tuple[int, tuple[tuple[float, int], ...], float]:
    """The hot set `hot` (hot_rows of `freq`) as the cost model prices it (costmodel.SparseCost's channel_hot_*):
    (its bytes in host memory; its rows as (keep frequency, bytes over all layers) pairs, the frequencies in
    PRICE_BINS bins, each at its rows' byte-weighted mean (exact for a one-token call); the expected share of a
    decode token's kept-row bytes it serves, from the keep frequencies)."""
    layers, width = freq.shape
    size = np.where(np.arange(width) < hidden, in_row_bytes, down_row_bytes).astype(np.float64)  # [H + I]
    f = np.clip(freq.astype(np.float64), 0, 1)
    held = np.zeros((layers, width), dtype=bool)
    for j, (ins, downs) in enumerate(hot or []):
        held[j, ins] = True
        held[j, [hidden + i for i in downs]] = True
    fh, bh = f[held], np.broadcast_to(size, f.shape)[held]
    bins = np.minimum((fh * PRICE_BINS).astype(np.int64), PRICE_BINS - 1)
    total, weighted = np.bincount(bins, bh, PRICE_BINS), np.bincount(bins, bh * fh, PRICE_BINS)
    pairs = tuple((float(weighted[k] / total[k]), int(total[k])) for k in np.flatnonzero(total))
    need = float((f * size).sum())
    return int(bh.sum()), pairs, float((fh * bh).sum() / need) if need else 0.0


class _Rows:
    """One layer's rows of one kind: an image (row i at i; zeros until read) and which rows it holds."""

    def __init__(self, n: int, elems: int, dtype: np.dtype):
        import mmap

        self.image = np.frombuffer(mmap.mmap(-1, max(1, n * elems * dtype.itemsize)), dtype=dtype)[:n * elems]
        self.image = self.image.reshape(n, elems)  # anonymous memory: pages committed only where written
        self.held, self.hot = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        self.last = np.full(n, -1 << 40, dtype=np.int64)  # decode call the row was last kept in
        self.step = 0


class ChannelCache:
    """A store.channels.ChannelReader whose rows come from a hot set and a window before the SSD."""

    def __init__(self, reader, *, hot: list[tuple[list[int], list[int]]] | None = None, window: int = 0,
                 window_bytes: int | None = None, device_hot: list[tuple[list[int], list[int]]] | None = None,
                 device=None, previous: ChannelCache | None = None):
        # `previous`: the cache this one replaces (same reader): the rows its hot set holds are taken from its memory,
        # not read from the SSD a second time
        self.reader, self.window = reader, window
        # at most this many bytes of window rows (hot set excluded) over all layers, split by the rows' bytes; the
        # least recently kept rows leave first (None: no cap)
        self.window_bytes = window_bytes
        self.hidden, self.intermediate, self.dtype = reader.hidden, reader.intermediate, reader.dtype
        self.in_row_bytes, self.down_row_bytes = reader.in_row_bytes, reader.down_row_bytes
        layers = len(hot) if hot is not None else len(reader.fds)
        self.layers = [(_Rows(self.hidden, 2 * self.intermediate, self.dtype),
                        _Rows(self.intermediate, self.hidden, self.dtype)) for _ in range(layers)]
        self.hits = self.misses = 0  # rows served from memory / read from the SSD
        self.hit_bytes = 0  # bytes of the rows served from memory
        self.peak_held_bytes = 0
        before = reader.bytes_read
        for j, ids in enumerate(hot or []):
            for down, got in enumerate(ids):
                if got:
                    rows = self.layers[j][down]
                    idx = np.asarray(got, dtype=np.int64)
                    rows.image[idx] = self._start_rows(j, got, bool(down), previous)
                    rows.held[idx] = rows.hot[idx] = True
        # the device tier (`device_hot`, rows not in `hot`): per layer and kind, each row's slot in a tensor on the
        # compute device `device` (-1: not there) and that tensor [n, width] in the files' dtype (gather serves them)
        self.device = device
        self.slots = [(np.full(self.hidden, -1, dtype=np.int64), np.full(self.intermediate, -1, dtype=np.int64))
                      for _ in range(layers)]
        self.on_device: list[list] = [[None, None] for _ in range(layers)]
        for j, ids in enumerate(device_hot or []):
            for down, got in enumerate(ids):
                if got:
                    self.slots[j][down][got] = np.arange(len(got))
                    self.on_device[j][down] = _to_device(self._start_rows(j, got, bool(down), previous), device)
        self.device_bytes = sum(len(a) * self.in_row_bytes + len(b) * self.down_row_bytes for a, b in device_hot or [])
        self.device_hit_bytes = 0  # bytes of the rows served from the device tier
        self.h2d_bytes = 0  # bytes of rows gather handed from host memory / the SSD to the compute device
        self.held_h2d_bytes = 0  # of those, the rows host memory held (hot set or window)
        self.resident_bytes = reader.bytes_read - before  # the hot set (both tiers) `previous` lacked, read at start
        self._start = reader.bytes_read  # (a reader handed over from another cache has read before this one)
        self.hot_bytes = self.held_bytes()
        self.peak_held_bytes = self.hot_bytes

    @property
    def bytes_read(self) -> int:
        """Bytes read from the SSD for rows not held (the hot set's start-up read excluded)."""
        return self.reader.bytes_read - self._start

    @property
    def reads(self) -> int:
        return self.reader.reads

    def inputs(self, layer: int, ids: list[int], *, decode: bool = False) -> np.ndarray:
        """[len(ids), 2I] gate column | up column of the sorted input channels `ids`."""
        return self._rows(layer, ids, False, decode)

    def down(self, layer: int, ids: list[int], *, decode: bool = False) -> np.ndarray:
        """[len(ids), H] down columns of the sorted neurons `ids`."""
        return self._rows(layer, ids, True, decode)

    def gather(self, layer: int, ids, gap: int, *, down: bool, decode: bool, device, dtype, timings=None):
        """(rows [len(ids), width] on `device` in `dtype`, SSD bytes read) for the sorted ids (a torch tensor): the
        device tier's rows taken where they are (no SSD read, no host->device copy), the rest as `read_kept` reads
        them (host memory first, then the SSD; runs at most `gap` apart as one) and copied to `device`."""
        import torch

        from .neurons import read_kept

        slot = torch.from_numpy(self.slots[layer][down])[ids.cpu()]  # [N] slot on the device, -1 where not
        on = slot >= 0
        row = self.down_row_bytes if down else self.in_row_bytes
        width = self.hidden if down else 2 * self.intermediate
        out = torch.empty(ids.shape[0], width, device=device, dtype=dtype)
        rest, n = ids[~on.to(ids.device)], 0
        if rest.numel():
            held = int(self.layers[layer][down].held[rest.cpu().numpy()].sum())  # host rows among them
            got, n = read_kept(self, layer, rest, gap, out=down, timings=timings, decode=decode)
            self.h2d_bytes += rest.numel() * row
            self.held_h2d_bytes += held * row
            out[~on.to(device)] = got.to(device, dtype)
        k = int(on.sum())
        if k:
            out[on.to(device)] = self.on_device[layer][down][slot[on].to(device)].to(dtype)
            self.hits += k
            self.hit_bytes += k * row
            self.device_hit_bytes += k * row
        return out, n

    def _start_rows(self, layer: int, ids: list[int], down: bool, previous: ChannelCache | None) -> np.ndarray:
        """[len(ids), width] hot rows at start: those `previous`'s hot set holds from its memory, the rest read."""
        if previous is None:
            return self._fetch(layer, ids, down)
        st = previous.layers[layer][down]
        idx = np.asarray(ids, dtype=np.int64)
        have = st.hot[idx]
        out = st.image[idx]  # a copy (fancy indexing); rows not held are zeros until read below
        if not have.all():
            out[~have] = self._fetch(layer, idx[~have].tolist(), down)
        return out

    def _fetch(self, layer: int, ids: list[int], down: bool) -> np.ndarray:
        return (self.reader.down if down else self.reader.inputs)(layer, ids)

    def _rows(self, layer: int, ids: list[int], down: bool, decode: bool) -> np.ndarray:
        st = self.layers[layer][down]
        idx = np.asarray(ids, dtype=np.int64)
        miss = idx[~st.held[idx]]
        self.hits += idx.shape[0] - miss.shape[0]
        self.misses += miss.shape[0]
        self.hit_bytes += (idx.shape[0] - miss.shape[0]) * (self.down_row_bytes if down else self.in_row_bytes)
        got = self._fetch(layer, miss.tolist(), down) if miss.shape[0] else None
        if not (decode and self.window > 0):  # not kept: what is held and what was read
            out = st.image[idx]
            if got is not None:
                out[~st.held[idx]] = got
            return out
        st.image[miss] = got if got is not None else st.image[miss]
        st.last[idx] = st.step
        st.held[miss] = True
        st.held &= st.hot | (st.last > st.step - self.window)
        if self.window_bytes is not None:
            self._cap(st, down)
        st.step += 1
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes())
        return st.image[idx]

    def _cap(self, st: _Rows, down: bool) -> None:
        """Drop the least recently kept window rows of `st` beyond its share of window_bytes."""
        row = self.down_row_bytes if down else self.in_row_bytes
        layer_bytes = self.hidden * self.in_row_bytes + self.intermediate * self.down_row_bytes
        most = int(self.window_bytes * st.held.shape[0] * row / layer_bytes / len(self.layers)) // row  # rows
        win = np.flatnonzero(st.held & ~st.hot)
        if win.shape[0] > most:
            st.held[win[np.argsort(-st.last[win], kind="stable")[most:]]] = False

    def held_rows(self) -> list[tuple[list[int], list[int]]]:
        """Per layer, (input channel ids, neuron ids) of the hot set in either tier (never read from the SSD)."""
        return [(np.flatnonzero(a.hot | (sa >= 0)).tolist(), np.flatnonzero(b.hot | (sb >= 0)).tolist())
                for (a, b), (sa, sb) in zip(self.layers, self.slots)]

    def held_bytes(self) -> int:
        """Bytes of the rows host memory holds now (hot set and window; the device tier is device_bytes)."""
        return sum(int(a.held.sum()) * self.in_row_bytes + int(b.held.sum()) * self.down_row_bytes
                   for a, b in self.layers)

    def close(self) -> None:
        self.reader.close()


def _to_device(rows: np.ndarray, device):
    """`rows` as a torch tensor on `device`, in the files' dtype (bfloat16 viewed back from its bits)."""
    from .neurons import as_torch

    return as_torch(np.ascontiguousarray(rows)).to(device)
