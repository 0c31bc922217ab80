"""Input-channel-major FFN files for input sparsity (TEAL): the bytes one kept input channel needs, together.

A TEAL-style sparse FFN (engine/sparse.py, method "input") drops the FFN input's small entries before gate and up,
so it needs, per kept input channel c, column c of the gate matrix and column c of the up matrix; then it drops
the small entries of the intermediate activation before down and needs, per kept intermediate neuron i, column i
of the down matrix. In the stage file a column is I (or H) scattered elements; here each sits as one row:
`ffn_channels/layer_NNN.bin` holds H rows of [gate column | up column] (2I elements each: one bundle per input
channel) and then I rows of down columns (H elements each), the store's dtype. A step's kept channels are one
read per run of consecutive channels, each read at least 2I elements (57 KiB in llama-3-8b at float16).
`ChannelReader` does exactly those reads (os.preadv, store/bundles.row_reads; several in flight, as the weight
streamer reads: bundles.preadv_all) and counts bytes and reads. Written
crash-safely; the index names the manifest it was cut from, so files of an older model are refused. Knows nothing
of torch.

Attention input sparsity (engine/sparse.py, `SparseAttention`) does the same for q/k/v and o: `attn_channels/
layer_NNN.bin` holds H rows of [q column | k column | v column] (q_dim + 2 kv_dim elements: one bundle per channel
of the attention input) and then q_dim rows of o columns (H elements each: one per channel of the attention
output). `kubeflash calibrate --attention` writes them; `AttnChannelReader` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundles import _RowFiles, load_frequency, open_layer_files, save_npy, start_layer_files
from .format import StoreError, atomic_write_json, fsync_dir, tensor_view
from .sparsity import manifest_sha256

DIR = "ffn_channels"
INDEX = "index.json"
FORMAT = "kubeflash-ffn-channels/1"
ATTN_DIR = "attn_channels"
ATTN_FORMAT = "kubeflash-attn-channels/1"
QUANTIZED = "quantized matrices are not cut into channels (use a float store)"


def write_channels(model_dir: Path, freq: dict[float, np.ndarray] | None = None) -> Path:
    """Cut every decoder layer's gate/up columns (one bundle per input channel) and down columns into
    `<model_dir>/ffn_channels` (Llama family: gate, up and down matrices), with the calibration's per-row keep
    frequencies (`freq`: target -> [L, H + I], input channels then neurons) beside them, for the hot set."""
    model_dir = Path(model_dir)
    m, out, layers = start_layer_files(model_dir, DIR, QUANTIZED)
    shape = None
    for j, stage in enumerate(layers):
        t = m.files[stage].tensors
        if "w_gate" not in t:
            raise StoreError(f"{model_dir}: {stage} has no gate matrix; input-channel files are for gated (Llama "
                             "family) FFNs")
        buf = np.memmap(model_dir / stage, dtype=np.uint8, mode="r")
        gate, up, down = (tensor_view(buf, t[n]) for n in ("w_gate", "w_up", "w_down"))  # [I, H], [I, H], [H, I]
        shape = gate.shape
        tmp = out / f".layer_{j:03d}.bin.tmp"
        with open(tmp, "wb") as fh:
            fh.write(np.ascontiguousarray(np.concatenate([gate.T, up.T], axis=1)).tobytes())  # [H, 2I]
            fh.write(np.ascontiguousarray(down.T).tobytes())  # [I, H]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out / f"layer_{j:03d}.bin")
    freqs = {f"{t:g}": save_npy(out, f"freq_{t:g}.npy", f) for t, f in sorted((freq or {}).items())}
    atomic_write_json(out / INDEX, {"format": FORMAT, "manifest_sha256": manifest_sha256(model_dir),
                                    "layers": len(layers), "intermediate": int(shape[0]), "hidden": int(shape[1]),
                                    "dtype": str(gate.dtype), "frequency": freqs})
    fsync_dir(out)
    return out


def write_attn_channels(model_dir: Path) -> Path:
    """Cut every decoder layer's q/k/v columns (one bundle per attention input channel) and o columns into
    `<model_dir>/attn_channels` (Llama family: separate wq, wk, wv, wo matrices)."""
    model_dir = Path(model_dir)
    m, out, layers = start_layer_files(model_dir, ATTN_DIR, QUANTIZED)
    dims = None
    for j, stage in enumerate(layers):
        t = m.files[stage].tensors
        if not all(n in t for n in ("wq", "wk", "wv", "wo")):
            raise StoreError(f"{model_dir}: {stage} lacks one of wq, wk, wv, wo; attention channel files are for the "
                             "Llama family's separate projections")
        buf = np.memmap(model_dir / stage, dtype=np.uint8, mode="r")
        q, k, v, o = (tensor_view(buf, t[n]) for n in ("wq", "wk", "wv", "wo"))  # [Q, H], [K, H], [K, H], [H, Q]
        dims = (int(q.shape[1]), int(q.shape[0]), int(k.shape[0]))
        tmp = out / f".layer_{j:03d}.bin.tmp"
        with open(tmp, "wb") as fh:
            fh.write(np.ascontiguousarray(np.concatenate([q.T, k.T, v.T], axis=1)).tobytes())  # [H, Q + 2K]
            fh.write(np.ascontiguousarray(o.T).tobytes())  # [Q, H]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out / f"layer_{j:03d}.bin")
    atomic_write_json(out / INDEX, {"format": ATTN_FORMAT, "manifest_sha256": manifest_sha256(model_dir),
                                    "layers": len(layers), "hidden": dims[0], "q_dim": dims[1], "kv_dim": dims[2],
                                    "dtype": str(q.dtype)})
    fsync_dir(out)
    return out


def frequency(model_dir: Path, target: float) -> np.ndarray | None:
    """[L, H + I] keep frequencies of `target` written with the input-channel files, or None where there are none
    (channel files cut before the hot set existed, or the target not calibrated with them)."""
    return load_frequency(Path(model_dir) / DIR, target, "keep frequencies")


def present(model_dir: Path) -> bool:
    return (Path(model_dir) / DIR / INDEX).is_file()


def attn_present(model_dir: Path) -> bool:
    return (Path(model_dir) / ATTN_DIR / INDEX).is_file()


class ChannelReader(_RowFiles):
    """Reads kept input channels' gate/up columns and kept neurons' down columns, one preadv per run."""

    _what = ("input channels", "down columns")  # the file's two regions, for errors

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir) / DIR
        idx, self.fds = open_layer_files(model_dir, DIR, FORMAT, "input-channel files",
                                         f"kubeflash calibrate {model_dir} --text FILE")
        self.hidden, self.intermediate = idx["hidden"], idx["intermediate"]
        self.dtype = np.dtype(idx["dtype"])
        self.in_row_bytes = 2 * self.intermediate * self.dtype.itemsize  # one input channel: gate + up column
        self.down_row_bytes = self.hidden * self.dtype.itemsize  # one neuron: down column
        self.bytes_read, self.reads = 0, 0

    def inputs(self, layer: int, ids: list[int]) -> np.ndarray:
        """[len(ids), 2I] gate column | up column of the sorted input channels `ids`."""
        return self._columns(layer, ids, 2 * self.intermediate, 0, self._what[0])

    def down(self, layer: int, ids: list[int]) -> np.ndarray:
        """[len(ids), H] down columns of the sorted intermediate neurons `ids`."""
        return self._columns(layer, ids, self.hidden, self.hidden * self.in_row_bytes, self._what[1])

    def _columns(self, layer: int, ids: list[int], elems: int, base: int, what: str, gap: int = 0) -> np.ndarray:
        """[len(ids), elems] rows of layer `layer`'s file region starting at byte `base`, counted; runs at most `gap`
        apart read as one, the rows between dropped as they are read."""
        where = f"{self.dir}/layer_{layer:03d}.bin {what}"
        if gap:
            return self._read_gapped(layer, ids, base, where, elems, gap)
        return self._read(layer, ids, base, where, elems)

    def gapped(self, layer: int, ids: list[int], gap: int, *, out: bool) -> np.ndarray:
        """`down(layer, ids)` where `out`, else `inputs(layer, ids)`, runs at most `gap` apart read as one preadv
        (the rows between dropped as they are read, never copied): what neurons.read_kept asks for."""
        if out:
            return self._columns(layer, ids, self.hidden, self.hidden * self.in_row_bytes, self._what[1], gap)
        return self._columns(layer, ids, self.in_row_bytes // self.dtype.itemsize, 0, self._what[0], gap)


class AttnChannelReader(ChannelReader):
    """Reads kept attention input channels' q|k|v columns and kept attention output channels' o columns."""

    _what = ("q/k/v columns", "o columns")

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir) / ATTN_DIR
        idx, self.fds = open_layer_files(model_dir, ATTN_DIR, ATTN_FORMAT, "attention channel files",
                                         f"kubeflash calibrate {model_dir} --text FILE --attention")
        self.hidden, self.q_dim, self.kv_dim = idx["hidden"], idx["q_dim"], idx["kv_dim"]
        self.dtype = np.dtype(idx["dtype"])
        self.in_row_bytes = (self.q_dim + 2 * self.kv_dim) * self.dtype.itemsize  # one input channel: q|k|v column
        self.down_row_bytes = self.hidden * self.dtype.itemsize  # one output channel: o column
        self.bytes_read, self.reads = 0, 0

    def inputs(self, layer: int, ids: list[int]) -> np.ndarray:
        """[len(ids), Q + 2K] q column | k column | v column of the sorted attention input channels `ids`."""
        return self._columns(layer, ids, self.q_dim + 2 * self.kv_dim, 0, self._what[0])

    def down(self, layer: int, ids: list[int]) -> np.ndarray:
        """[len(ids), H] o columns of the sorted attention output channels `ids`."""
        return self._columns(layer, ids, self.hidden, self.hidden * self.in_row_bytes, self._what[1])
