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
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from .format import StoreError, atomic_write_json, fsync_dir, load_manifest, tensor_view
from .sparsity import manifest_sha256

DIR = "ffn_bundles"
INDEX = "index.json"
FORMAT = "kubeflash-ffn-bundles/1"
ALIGN = 4096
READ_THREADS = 4  # reads in flight at most, where the engine hands no policy (the streamer's default io_threads)
TASK_BYTES = 16 << 20  # a read task's bytes at most, likewise (the streamer's default io_task_bytes)
MIN_TASK_BYTES = 1 << 20  # a long read is cut into pieces of at least this (tasks_of) ...
SERIAL_READS = 8  # ... and a set of at most this many reads below it is read on the calling thread alone
IOV_MAX = 1024  # buffers one preadv takes at most (Linux)


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
    width), read a sorted set of rows with one preadv per run of consecutive ones (row_reads), and count the bytes
    and reads. A large set's reads are cut into tasks and run `threads` at a time (the caller and threads - 1 pool
    threads), as the weight streamer reads a layer (`io`: the engine hands it the policy's reader threads and task
    size); `read_s` sums the seconds the preadv calls took and `wait_s` the seconds the callers waited for them, so
    read_s / wait_s is the mean number of reads in flight while a caller waits. With `direct` aligned sets bypass
    the page cache, as the streamer's O_DIRECT reads do (off in the engine: on this machine's virtio disk it read
    no faster than buffered with four threads; bench/sparse_decode.py --rows-odirect turns it on)."""

    fds: list[int]
    row_elems: int
    dtype: np.dtype
    threads: int = READ_THREADS  # reads in flight at most (io)
    task_bytes: int = TASK_BYTES  # a task's bytes at most (io)
    direct: bool = False  # O_DIRECT (page cache bypassed) where a read set is 4 KiB-aligned (io)
    read_s: float = 0.0
    wait_s: float = 0.0
    _pool: ThreadPoolExecutor | None = None
    _direct_fds: dict | None = None  # layer -> its O_DIRECT fd, or None where the file system refuses O_DIRECT
    _trash: np.ndarray | None = None  # where rows read through merge gaps land (_discard)

    def io(self, *, threads: int, task_bytes: int, direct: bool = False) -> None:
        """Read with up to `threads` reads in flight, in tasks of at most `task_bytes`, with O_DIRECT where `direct`
        and a set's rows are 4 KiB-aligned (rows of a multiple of 4 KiB: llama-3-8b's in float16): what the weight
        streamer does with its policy's io_threads, io_task_bytes and backend."""
        self._shutdown()
        self.threads, self.task_bytes = max(1, int(threads)), max(ALIGN, int(task_bytes))
        self.direct = bool(direct)

    def _read(self, layer: int, ids: list[int], base: int, where: str, elems: int | None = None) -> np.ndarray:
        """[len(ids), elems (default row_elems)] rows of layer `layer`'s file region starting at byte `base`."""
        shape = (len(ids), elems or self.row_elems)
        fd = self._fd(layer, base, shape[1] * self.dtype.itemsize)
        out = aligned_empty(shape, self.dtype) if fd != self.fds[layer] else np.empty(shape, dtype=self.dtype)
        self._reads(fd, row_reads(out, ids, base, same_rows=False), where)
        return out

    def _read_gapped(self, layer: int, ids: list[int], base: int, where: str, elems: int, gap: int) -> np.ndarray:
        """[len(ids), elems] rows `ids` (sorted) of the region, runs at most `gap` apart read as one preadv, the rows
        between dropped as they are read (gapped_reads)."""
        shape = (len(ids), elems)
        row_bytes = elems * self.dtype.itemsize
        fd = self._fd(layer, base, row_bytes)
        direct = fd != self.fds[layer]
        out = aligned_empty(shape, self.dtype) if direct else np.empty(shape, dtype=self.dtype)
        trash = self._discard(gap * row_bytes)
        self._reads(fd, gapped_reads(out, ids, base, gap, trash), where)
        return out

    def _discard(self, nbytes: int) -> np.ndarray:
        """A buffer of at least `nbytes` the rows read through gaps land in (kept, grown as needed; page-aligned)."""
        if self._trash is None or self._trash.size < nbytes:
            self._trash = aligned_empty((1, max(nbytes, ALIGN)), np.uint8)
        return self._trash

    def _read_into(self, layer: int, ids: list[int], base: int, out: np.ndarray, where: str) -> None:
        """Rows `ids` (sorted) of the region into the same rows of `out`."""
        fd = self._fd(layer, base, out.shape[1] * out.itemsize, out)
        self._reads(fd, row_reads(out, ids, base, same_rows=True), where)

    def _fd(self, layer: int, base: int, row_bytes: int, out: np.ndarray | None = None) -> int:
        """The fd to read layer `layer`'s rows with: its O_DIRECT one where `direct`, the file system allows it, and
        every read is aligned (the region's start, a row, `out`'s buffer); else the buffered one."""
        if not self.direct or base % ALIGN or row_bytes % ALIGN or (out is not None and out.ctypes.data % ALIGN):
            return self.fds[layer]
        if self._direct_fds is None:
            self._direct_fds = {}
        if layer not in self._direct_fds:
            try:  # the same file, reopened
                self._direct_fds[layer] = os.open(f"/proc/self/fd/{self.fds[layer]}", os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self._direct_fds[layer] = None
        fd = self._direct_fds[layer]
        return self.fds[layer] if fd is None else fd

    def _reads(self, fd: int, todo: list, where: str) -> None:
        t0 = time.perf_counter()
        got, n, busy = preadv_all(fd, todo, where, threads=self.threads, task_bytes=self.task_bytes,
                                  pool=self._executor)
        self.bytes_read += got
        self.reads += n
        self.read_s += busy
        self.wait_s += time.perf_counter() - t0

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="kf-rows")
        return self._pool

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        self._shutdown()
        for fd in self.fds + [d for d in (self._direct_fds or {}).values() if d is not None]:
            os.close(fd)
        self.fds, self._direct_fds = [], None


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


def aligned_empty(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array of `shape` in page-aligned anonymous memory (an O_DIRECT read's destination)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(1, n)), dtype=np.uint8)[:n].view(dtype).reshape(shape)


def row_reads(out: np.ndarray, ids: list[int], base: int, *, same_rows: bool) -> list:
    """The (destination, file offset, length) reads, one per run of consecutive ids, that bring rows `ids` (sorted)
    of a row-major file region starting at byte `base` into `out` ([rows, row_elems], the file's dtype): into the
    same rows where `same_rows` (a layer's bundle image), else into rows 0, 1, ... in order."""
    raw = out.view(np.uint8).reshape(out.shape[0], -1)
    row_bytes, todo, k = raw.shape[1], [], 0
    for start, n in runs(ids):
        at = start if same_rows else k
        todo.append((raw[at:at + n], base + start * row_bytes, n * row_bytes))
        k += n
    return todo


def gapped_reads(out: np.ndarray, ids: list[int], base: int, gap: int, discard: np.ndarray) -> list:
    """The reads that bring rows `ids` (sorted) of a row-major file region starting at byte `base` into rows 0, 1, ...
    of `out`, runs at most `gap` rows apart read by one preadv whose destinations are the kept rows and, for the rows
    between, `discard` (at least `gap` rows; every gap lands there): one read per merged run, as neurons.merged
    reads them, without reading the extra rows into `out` and copying the kept ones out after. A merged read's
    destination is a list of buffers (at most IOV_MAX)."""
    raw = out.view(np.uint8).reshape(out.shape[0], -1)
    row_bytes, todo, k = raw.shape[1], [], 0
    trash = discard.view(np.uint8).reshape(-1)
    bufs, start, end = [], -1, -1  # the read being built: buffers, first row, row after its last
    for first, n in runs(ids):
        if bufs and first - end <= gap and len(bufs) + 2 <= IOV_MAX:
            if first > end:
                bufs.append(trash[:(first - end) * row_bytes])
        else:
            if bufs:
                todo.append((bufs, base + start * row_bytes, (end - start) * row_bytes))
            bufs, start = [], first
        bufs.append(raw[k:k + n].reshape(-1))
        k, end = k + n, first + n
    if bufs:
        todo.append((bufs, base + start * row_bytes, (end - start) * row_bytes))
    return todo


def tasks_of(todo: list, *, threads: int, task_bytes: int) -> list[list]:
    """The reads `todo` ((destination, file offset, length), in file order) as tasks for `threads` readers, cut the
    way the weight streamer cuts a layer's reads: consecutive reads share a task up to about total / threads bytes
    (at most `task_bytes`), and a read longer than that (at least MIN_TASK_BYTES) is cut into pieces of it. One task
    where `threads` is 1 or the set is small (at most MIN_TASK_BYTES in at most SERIAL_READS reads: a hand-off to
    another thread costs about what such a read does from the page cache)."""
    total = sum(n for _, _, n in todo)
    if threads <= 1 or (total <= MIN_TASK_BYTES and len(todo) <= SERIAL_READS):
        return [todo] if todo else []
    share = min(task_bytes, -(-total // threads))  # a task's bytes: every reader busy, none past task_bytes
    piece = max(MIN_TASK_BYTES, share) // ALIGN * ALIGN  # a long read's pieces
    out, cur, size = [], [], 0
    for dest, offset, n in todo:
        if isinstance(dest, list):  # a read through gaps (gapped_reads): whole, never cut
            pieces = [(dest, offset, n)]
        else:
            flat = dest.reshape(-1)
            pieces = [(flat[off:off + piece], offset + off, min(piece, n - off)) for off in range(0, n, piece)]
        for read in pieces:
            cur.append(read)
            size += read[2]
            if size >= share:
                out.append(cur)
                cur, size = [], 0
    return out + ([cur] if cur else [])


def preadv_all(fd: int, todo: list, where: str, *, threads: int, task_bytes: int,
               pool: Callable[[], ThreadPoolExecutor]) -> tuple[int, int, float]:
    """(bytes, preadv calls, seconds the calls took summed) of the reads `todo` ((destination, file offset, length)):
    as tasks (tasks_of) that the calling thread and up to threads - 1 of `pool()`'s threads take in file order, one
    after the other, so up to `threads` reads are in flight until the last task is taken."""
    tasks = tasks_of(todo, threads=threads, task_bytes=task_bytes)
    lock, left = threading.Lock(), iter(tasks)

    def drain() -> tuple[int, int, float]:
        total, count, busy = 0, 0, 0.0
        while True:
            with lock:
                part = next(left, None)
            if part is None:
                return total, count, busy
            t0 = time.perf_counter()
            for dest, offset, want in part:
                got = os.preadv(fd, dest if isinstance(dest, list) else [dest], offset)
                if got != want:
                    raise StoreError(f"{where}: short read ({got} of {want} bytes at {offset})")
                total += got
            busy += time.perf_counter() - t0
            count += len(part)

    helpers = [pool().submit(drain) for _ in range(min(threads, len(tasks)) - 1)]
    done = [drain()] + [f.result() for f in helpers]
    return sum(d[0] for d in done), sum(d[1] for d in done), sum(d[2] for d in done)


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids in the sorted list `ids`."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
