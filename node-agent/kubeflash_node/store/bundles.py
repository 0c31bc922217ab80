"""Neuron-bundled FFN files (LLM in a flash's row-column bundling): the bytes one active neuron needs, together.

A sparse FFN decides which neurons are active from the gate (fc1) matrix, read whole, and then needs, per active
neuron i, row i of the up matrix and column i of the down matrix (OPT: column i of fc2). In the stage file those
are H scattered runs each; here they sit side by side, one neuron after the other
(`ffn_bundles/layer_NNN.bin`: [I, 2H] for the Llama family, [I, H] for OPT, the store's dtype), so the active
set of a step is one read per run of consecutive active neurons. `BundleReader` does exactly those reads
(os.preadv) and counts their bytes. Written crash-safely next to the model's stage files; the index names the
manifest it was cut from, so bundles of an older model are refused. Beside them, per calibrated target,
`freq_<target>.npy` ([L, I] float32): the share of calibration tokens on which each neuron was active, from which
a run picks its resident hot set. Knows nothing of torch.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .format import StoreError, atomic_write_json, fsync_dir, load_manifest, tensor_view
from .sparsity import manifest_sha256

DIR = "ffn_bundles"
INDEX = "index.json"
FORMAT = "kubeflash-ffn-bundles/1"


def _parts(tensors) -> tuple[str, ...]:
    return ("w_up", "w_down") if "w_up" in tensors else ("fc2_w",)


def write_bundles(model_dir: Path, freq: dict[float, np.ndarray] | None = None) -> Path:
    """Cut every decoder layer's up rows and down columns into neuron bundles under `<model_dir>/ffn_bundles`,
    with the calibration's per-neuron activation frequencies (`freq`: target -> [L, I]) beside them."""
    model_dir = Path(model_dir)
    m, out, layers = start_layer_files(model_dir, DIR, "quantized matrices are not bundled (bundle a "
                                                       "float16/bfloat16/float32 store)")
    for j, stage in enumerate(layers):
        f = m.files[stage]
        buf = np.memmap(model_dir / stage, dtype=np.uint8, mode="r")
        mats = [tensor_view(buf, f.tensors[n]) for n in _parts(f.tensors)]
        cols = [mats[0], mats[1].T] if len(mats) == 2 else [mats[0].T]  # [I, H] each: up rows, down columns
        bundle = np.ascontiguousarray(np.concatenate(cols, axis=1))  # [I, 2H] (OPT: [I, H])
        tmp = out / f".layer_{j:03d}.bin.tmp"
        with open(tmp, "wb") as fh:
            fh.write(bundle.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out / f"layer_{j:03d}.bin")
    freqs = {f"{t:g}": save_npy(out, f"freq_{t:g}.npy", f) for t, f in sorted((freq or {}).items())}
    atomic_write_json(out / INDEX, {"format": FORMAT, "manifest_sha256": manifest_sha256(model_dir),
                                    "layers": len(layers), "neurons": int(bundle.shape[0]),
                                    "row_elems": int(bundle.shape[1]), "dtype": str(bundle.dtype),
                                    "frequency": freqs})
    fsync_dir(out)
    return out


def start_layer_files(model_dir: Path, sub: str, quantized: str):
    """(manifest, the directory `<model_dir>/<sub>`, created, the decoder layers' stage names) for a writer of
    per-layer row files (neuron bundles, input channels), which cuts float matrices only: StoreError
    `<model_dir>: <quantized>` for a quantized store."""
    m = load_manifest(model_dir)
    if m.extra.get("quant"):
        raise StoreError(f"{model_dir}: {quantized}")
    out = Path(model_dir) / sub
    out.mkdir(exist_ok=True)
    return m, out, [s for s in m.stages if s.startswith("layer_")]


def open_layer_files(model_dir: Path, sub: str, fmt: str, what: str, hint: str) -> tuple[dict, list[int]]:
    """(index, open fds of layer_NNN.bin) of the per-layer row files under `<model_dir>/<sub>` (neuron bundles,
    input channels); StoreError naming the file when the index is missing or unreadable, or written for another
    version of the model (its manifest's sha256), with `hint`, the command that writes them."""
    d = Path(model_dir) / sub
    try:
        idx = json.loads((d / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{d / INDEX}: no readable {what} ({e}); write them with `{hint}`") from e
    if idx.get("format") != fmt or idx.get("manifest_sha256") != manifest_sha256(model_dir):
        raise StoreError(f"{d}: {what} of another version of this model (stale); write them again (`{hint}`)")
    return idx, [os.open(d / f"layer_{j:03d}.bin", os.O_RDONLY | os.O_CLOEXEC) for j in range(idx["layers"])]


class _RowFiles:
    """Open files (one per layer) of fixed-size rows (row_elems, unless a region of the file has rows of its own
    width), read a sorted set of rows with one preadv per run of consecutive ones (read_rows), and count the bytes
    and reads."""

    fds: list[int]
    row_elems: int
    dtype: np.dtype

    def _read(self, layer: int, ids: list[int], base: int, where: str, elems: int | None = None) -> np.ndarray:
        """[len(ids), elems (default row_elems)] rows of layer `layer`'s file region starting at byte `base`."""
        out, got, n = read_rows(self.fds[layer], ids, elems or self.row_elems, self.dtype, base, where=where)
        self.bytes_read += got
        self.reads += n
        return out

    def _read_into(self, layer: int, ids: list[int], base: int, out: np.ndarray, where: str) -> None:
        got, n = read_rows_into(self.fds[layer], ids, out, base, where=where)
        self.bytes_read += got
        self.reads += n

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class BundleReader(_RowFiles):
    """Reads the bundles of a set of active neurons, one preadv per run of consecutive ones, and counts them."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir) / DIR
        idx, self.fds = open_layer_files(model_dir, DIR, FORMAT, "neuron bundles",
                                         f"kubeflash calibrate {model_dir} --text FILE --bundle")
        self.neurons, self.row_elems, self.dtype = idx["neurons"], idx["row_elems"], np.dtype(idx["dtype"])
        self.row_bytes = self.row_elems * self.dtype.itemsize
        self.bytes_read, self.reads = 0, 0

    def read(self, layer: int, active: list[int]) -> np.ndarray:
        """[len(active), row_elems] bundles of the sorted neuron ids `active`."""
        return self._read(layer, active, 0, f"{self.dir}/layer_{layer:03d}.bin")

    def read_into(self, layer: int, active: list[int], out: np.ndarray) -> None:
        """Bundle i of the sorted neuron ids `active` into row i of `out` ([neurons, row_elems], this dtype): one
        preadv per run straight into its rows, no copy after (the CPU neuron cache's buffer)."""
        self._read_into(layer, active, 0, out, f"{self.dir}/layer_{layer:03d}.bin")


class GateRows(_RowFiles):
    """Reads rows of each layer's gate matrix (w_gate [I, H]) from the stage files, one preadv per run of
    consecutive rows: what a layer whose activation predictor decides needs of the gate."""

    def __init__(self, model_dir: Path):
        m = load_manifest(model_dir)
        layers = [m.files[s] for s in m.stages if s.startswith("layer_")]
        names = [s for s in m.stages if s.startswith("layer_")]
        self.entries = [f.tensors["w_gate"] for f in layers]
        e = self.entries[0]
        self.dtype = np.dtype({"bfloat16": "uint16"}.get(e.dtype, e.dtype))
        self.row_elems = e.shape[1]
        self.row_bytes = self.row_elems * self.dtype.itemsize
        self.fds = [os.open(Path(model_dir) / n, os.O_RDONLY | os.O_CLOEXEC) for n in names]
        self.bytes_read, self.reads = 0, 0

    def read(self, layer: int, ids: list[int]) -> np.ndarray:
        """[len(ids), H] gate rows of the sorted neuron ids `ids`."""
        return self._read(layer, ids, self.entries[layer].offset, f"layer {layer} gate rows")


def save_npy(out: Path, name: str, a: np.ndarray) -> str:
    """`a` as float32 in out/name (temp + fsync + rename); returns `name`."""
    tmp = out / f".{name}.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(a, dtype=np.float32))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / name)
    return name


def frequency(model_dir: Path, target: float) -> np.ndarray | None:
    """[L, I] activation frequencies of `target` written with the bundles, or None when there are none."""
    return load_frequency(Path(model_dir) / DIR, target, "activation frequencies")


def load_frequency(d: Path, target: float, what: str) -> np.ndarray | None:
    """The frequencies of `target` that directory `d`'s index.json names (freq_<target>.npy), or None where it names
    none; `what` they are, for the error a missing or unreadable file raises (StoreError)."""
    try:
        name = json.loads((d / INDEX).read_text()).get("frequency", {}).get(f"{target:g}")
        if name is None:
            return None
        if name != f"freq_{target:g}.npy":
            raise ValueError(f"{INDEX} names {name!r}, expected freq_{target:g}.npy")
        return np.load(d / name, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"{d}: unreadable {what} for {target:g} ({e}); run kubeflash calibrate again") from e


PARALLEL_RUNS = 64  # a read of more runs than this is split over READ_THREADS threads (preadv releases the GIL)
READ_THREADS = 4
_POOL: ThreadPoolExecutor | None = None


def read_rows(fd: int, ids: list[int], row_elems: int, dtype: np.dtype, base: int, *,
              where: str) -> tuple[np.ndarray, int, int]:
    """(rows [len(ids), row_elems] of a row-major file region starting at byte `base`, bytes read, reads): one
    preadv per run of consecutive ids, the runs of a large set read on a few threads at once."""
    row_bytes = row_elems * dtype.itemsize
    out = np.empty((len(ids), row_elems), dtype=dtype)
    raw = out.view(np.uint8).reshape(len(ids), row_bytes)
    todo, k = [], 0
    for start, n in runs(ids):
        todo.append((raw[k:k + n], base + start * row_bytes, n * row_bytes))
        k += n
    return out, _preadv_all(fd, todo, where), len(todo)


def read_rows_into(fd: int, ids: list[int], out: np.ndarray, base: int, *, where: str) -> tuple[int, int]:
    """(bytes read, reads): rows `ids` (sorted) of a row-major file region starting at byte `base` into the same
    rows of `out` ([rows, row_elems], the file's dtype), one preadv per run of consecutive ids."""
    raw = out.view(np.uint8).reshape(out.shape[0], -1)
    row_bytes = raw.shape[1]
    todo = [(raw[start:start + n], base + start * row_bytes, n * row_bytes) for start, n in runs(ids)]
    return _preadv_all(fd, todo, where), len(todo)


def _preadv_all(fd: int, todo: list, where: str) -> int:
    """Bytes read by the (destination, file offset, length) reads `todo`, those of a large set on a few threads."""
    global _POOL

    def some(part) -> int:
        total = 0
        for dest, offset, want in part:
            got = os.preadv(fd, [dest], offset)
            if got != want:
                raise StoreError(f"{where}: short read ({got} of {want} bytes at {offset})")
            total += got
        return total

    if len(todo) <= PARALLEL_RUNS:
        return some(todo)
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="kf-neurons")
    step = -(-len(todo) // READ_THREADS)
    return sum(_POOL.map(some, [todo[i:i + step] for i in range(0, len(todo), step)]))


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids in the sorted list `ids`."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
