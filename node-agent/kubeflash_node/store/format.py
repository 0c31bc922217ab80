"""The on-SSD layer store: one file per stage (embeddings, each decoder layer, head), 4 KiB-aligned tensors.

A stage file is read with one large sequential read into one buffer; tensors are views at recorded offsets.
`manifest.json` holds the architecture config, dtype, tokenizer reference, per-tensor offsets and a sha256
per file. Every write is crash-safe (temp + fsync + rename) and a model directory appears only when whole.
This module knows nothing of torch: tensors arrive as numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

FORMAT = "kubeflash-store/1"
ALIGN = 4096
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}  # bfloat16 is stored as raw uint16


class StoreError(Exception):
    """A store on disk is missing, truncated, corrupt or of an unknown format; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside its stage file."""

    offset: int  # bytes from the start of the file, a multiple of ALIGN
    shape: tuple[int, ...]
    dtype: str  # float16 | bfloat16 | float32 (| uint8 / int8 for packed quantized data)
    nbytes: int


@dataclass(frozen=True)
class FileEntry:
    """One stage file: its size, checksum and tensors."""

    size: int
    sha256: str
    tensors: dict[str, TensorEntry]


@dataclass(frozen=True)
class Manifest:
    """Everything needed to stream a stored model without opening any other file first."""

    architecture: str  # llama | opt
    config: dict  # ModelConfig fields (see kubeflash_node.engine.config)
    dtype: str
    files: dict[str, FileEntry]
    stages: list[str]  # file names in execution order: embed, layer_000.., head
    tokenizer: str | None = None  # sub-directory holding tokenizer.json, or None (dummy weights)
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return sum(1 for s in self.stages if s.startswith("layer_"))

    @property
    def stage_bytes(self) -> list[int]:
        """Stored bytes of each stage file, in execution order."""
        return [self.files[s].size for s in self.stages]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict:
        files = {
            name: {
                "size": f.size,
                "sha256": f.sha256,
                "tensors": {
                    t: {"offset": e.offset, "shape": list(e.shape), "dtype": e.dtype, "nbytes": e.nbytes}
                    for t, e in f.tensors.items()
                },
            }
            for name, f in self.files.items()
        }
        return {
            "format": FORMAT,
            "architecture": self.architecture,
            "config": self.config,
            "dtype": self.dtype,
            "tokenizer": self.tokenizer,
            "source": self.source,
            "stages": self.stages,
            "files": files,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict, *, where: str = MANIFEST) -> "Manifest":
        if data.get("format") != FORMAT:
            raise StoreError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
        try:
            files = {
                name: FileEntry(
                    size=int(f["size"]),
                    sha256=str(f["sha256"]),
                    tensors={
                        t: TensorEntry(int(e["offset"]), tuple(e["shape"]), str(e["dtype"]), int(e["nbytes"]))
                        for t, e in f["tensors"].items()
                    },
                )
                for name, f in data["files"].items()
            }
            return cls(
                architecture=data["architecture"],
                config=data["config"],
                dtype=data["dtype"],
                files=files,
                stages=list(data["stages"]),
                tokenizer=data.get("tokenizer"),
                source=data.get("source", ""),
                extra=data.get("extra", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a small file crash-safely: temp file in the same directory, fsync, rename, fsync the dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).view(np.uint8).tobytes()


HOLE_BYTES = 1 << 20  # all-zero tensors at least this large are written as holes (sparse files)


def write_stage(path: Path, tensors: Iterable[tuple[str, np.ndarray, str]]) -> FileEntry:
    """Write one stage file: each tensor at a 4 KiB-aligned offset; returns its entry (size, sha256, offsets).

    `tensors` yields (name, array, dtype-name); bfloat16 arrives as a uint16 array holding the raw bits.
    The file is fsynced; the caller renames the whole model directory into place when every file is written.
    """
    entries: dict[str, TensorEntry] = {}
    digest = hashlib.sha256()
    offset = 0
    with open(path, "wb") as f:
        for name, arr, dtype in tensors:
            pad = align_up(offset) - offset
            if pad:
                f.write(b"\0" * pad)
                digest.update(b"\0" * pad)
                offset += pad
            raw = _raw(arr)
            if len(raw) >= HOLE_BYTES and not np.frombuffer(raw, np.uint64 if len(raw) % 8 == 0 else np.uint8).any():
                f.seek(len(raw), os.SEEK_CUR)  # an all-zero tensor becomes a hole: reads as zeros, takes no disk
            else:
                f.write(raw)
            digest.update(raw)
            entries[name] = TensorEntry(offset, tuple(int(s) for s in arr.shape), dtype, len(raw))
            offset += len(raw)
        pad = align_up(offset) - offset  # whole file a multiple of ALIGN, so O_DIRECT can read it in one go
        f.write(b"\0" * pad)
        digest.update(b"\0" * pad)
        offset += pad
        f.truncate(offset)  # a file ending in a hole still has its full size
        f.flush()
        os.fsync(f.fileno())
    return FileEntry(size=offset, sha256=digest.hexdigest(), tensors=entries)


class ModelWriter:
    """Builds a model directory under a temporary name and publishes it with one atomic rename."""

    def __init__(self, out_dir: Path, *, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise StoreError(f"{self.out_dir}: already exists (pass --overwrite to replace it)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".staging-{self.out_dir.name}-"))
        self.files: dict[str, FileEntry] = {}

    def add_stage(self, name: str, tensors: Iterable[tuple[str, np.ndarray, str]]) -> FileEntry:
        entry = write_stage(self.tmp / name, tensors)
        self.files[name] = entry
        return entry

    def publish(self, manifest: Manifest) -> Path:
        atomic_write_json(self.tmp / MANIFEST, manifest.to_json())
        fsync_dir(self.tmp)
        if self.out_dir.exists():  # --overwrite: move the old one aside first, then drop it
            old = self.out_dir.with_name(f".old-{self.out_dir.name}-{os.getpid()}")
            os.replace(self.out_dir, old)
            os.replace(self.tmp, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out_dir)
        fsync_dir(self.out_dir.parent)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def load_manifest(model_dir: Path) -> Manifest:
    """Read and check a model directory's manifest and that every file is present with the recorded size."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise StoreError(f"{model_dir}: no such model directory (convert the model first: kubeflash convert)")
    if not path.is_file():
        raise StoreError(f"{path}: missing; {model_dir} is not a complete kubeflash model")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    manifest = Manifest.from_json(data, where=str(path))
    for name, entry in manifest.files.items():
        f = model_dir / name
        if not f.is_file():
            raise StoreError(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != entry.size:
            raise StoreError(f"{f}: {size} bytes, expected {entry.size} (truncated or corrupt)")
    return manifest


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(model_dir: Path, manifest: Manifest | None = None) -> Manifest:
    """Full check: sizes and sha256 of every file; raises StoreError naming the first bad file."""
    model_dir = Path(model_dir)
    manifest = manifest or load_manifest(model_dir)
    for name, entry in manifest.files.items():
        got = sha256_file(model_dir / name)
        if got != entry.sha256:
            raise StoreError(f"{model_dir / name}: sha256 {got[:12]}… does not match the manifest ({entry.sha256[:12]}…)")
    return manifest


def tensor_view(buf: np.ndarray, entry: TensorEntry) -> np.ndarray:
    """A numpy view of one tensor inside a stage buffer (uint8); bfloat16 comes back as uint16 bits."""
    raw = buf[entry.offset : entry.offset + entry.nbytes]
    np_dtype = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16, "int8": np.int8, "uint8": np.uint8}[
        entry.dtype
    ]
    return raw.view(np_dtype).reshape(entry.shape)
