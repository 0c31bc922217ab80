"""The on-SSD layer store: one file per stage (embeddings, each decoder layer, head), 4 KiB-aligned tensors.

A stage file is read with one large sequential read into one buffer; tensors are views at recorded offsets.
`manifest.json` holds the architecture config, dtype, tokenizer reference, per-tensor offsets and a sha256
per file (stage files in `files`, the others, such as the tokenizer's, in `extra.other_files`); verify_model
checks them all on a model's first load and caches the verdict. Every write is crash-safe (temp + fsync +
rename) and a model directory appears only when whole; its scratch dir is locked (store.scratch), so a killed
conversion's is removed by the next one.
This module knows nothing of torch: tensors arrive as numpy arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .scratch import STAGING, Scratch, clean_stale

FORMAT = "kubeflash-store/1"
ALIGN = 4096
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}  # bfloat16 is stored as raw uint16


class StoreError(Exception):
    """A store on disk is missing, truncated, corrupt or of an unknown format; the message names the file."""


class NoSpaceError(StoreError):
    """The file system a model would be written to has less room than the model needs (said before any write)."""


def check_room(folder: Path, need: int, what: str) -> None:
    """NoSpaceError unless the file system of `folder` (or of its nearest existing parent) has `need` bytes free;
    `what` says what needs them ("dummy:opt-125m needs about 0.234 GiB in float16")."""
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if st.f_blocks and free < need:  # /proc, /sys count no blocks: their writes fail on their own
        raise NoSpaceError(f"{what}, but {where} has {free / 2**30:.3f} GiB free; expected room for the converted "
                           "model (free some space or choose another folder)")


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
    config: dict  # ModelConfig fields (see kubeflash_node.store.modelconfig)
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


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write a small file crash-safely: temp file in the same directory, fsync, rename, fsync the dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with _named(path), os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _named(path: Path):
    """An OSError of a write (ENOSPC on flush, EIO) carries no file name: give it `path`'s."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


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
    try:
        with _named(path), open(path, "wb") as f:
            offset = _write_tensors(f, tensors, entries, digest)
    except OSError:
        Path(path).unlink(missing_ok=True)
        raise
    return FileEntry(size=offset, sha256=digest.hexdigest(), tensors=entries)


def _write_tensors(f, tensors: Iterable[tuple[str, np.ndarray, str]], entries: dict, digest) -> int:
    """write_stage's body: the tensors at aligned offsets, the file padded to ALIGN and fsynced; its size."""
    offset = 0
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
    return offset


class ModelWriter:
    """Builds a model directory under a temporary name and publishes it with one atomic rename."""

    def __init__(self, out_dir: Path, *, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.check_out(self.out_dir, overwrite=overwrite)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        prefix = f"{STAGING}{self.out_dir.name}-"
        clean_stale(self.out_dir.parent, (prefix,))  # what an earlier, killed conversion of this model left
        self.scratch = Scratch(self.out_dir.parent, prefix)
        self.tmp = self.scratch.path
        self.files: dict[str, FileEntry] = {}

    @staticmethod
    def check_out(out_dir: Path, *, overwrite: bool) -> None:
        """StoreError if `out_dir` may not be written: it exists (without overwrite), or is not a model."""
        if out_dir.exists() and not overwrite:
            raise StoreError(f"{out_dir}: already exists (pass --overwrite to replace it)")
        if out_dir.exists() and not (out_dir.is_dir() and (out_dir / MANIFEST).is_file()):
            raise StoreError(f"{out_dir}: exists and is not a kubeflash model (no {MANIFEST}); --overwrite "
                             "replaces only a model directory kubeflash convert wrote, never other files")

    def add_stage(self, name: str, tensors: Iterable[tuple[str, np.ndarray, str]]) -> FileEntry:
        entry = write_stage(self.tmp / name, tensors)
        self.files[name] = entry
        return entry

    def publish(self, manifest: Manifest) -> Path:
        """Write the manifest (recording the sha256 of the files that are not stages, such as the tokenizer's,
        in manifest.extra["other_files"]) and rename the directory into place."""
        manifest.extra["other_files"] = checksum_other_files(self.tmp, skip=set(manifest.files))
        atomic_write_json(self.tmp / MANIFEST, manifest.to_json())
        fsync_dir(self.tmp)
        if self.out_dir.exists() and exchange(self.tmp, self.out_dir):  # --overwrite: the entries swapped at once,
            fsync_dir(self.out_dir.parent)  # the name never without a whole entry; the scratch now holds the old
            self.scratch.remove()
            return self.out_dir
        if self.out_dir.exists():  # no RENAME_EXCHANGE here: the old one into a scratch dir, the new into place
            with Scratch(self.out_dir.parent, f"{STAGING}{self.out_dir.name}-old-") as old:
                os.replace(self.out_dir, old.path / "old")  # a kill from here to the next line leaves no entry
                os.replace(self.tmp, self.out_dir)
        else:
            os.replace(self.tmp, self.out_dir)
        self.scratch.release()
        fsync_dir(self.out_dir.parent)
        return self.out_dir

    def abort(self) -> None:
        self.scratch.remove()


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two names
_AT_FDCWD = -100


def _renameat2():
    """libc's renameat2 (glibc 2.28+, Linux 3.15+), or None."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def can_exchange() -> bool:
    """Whether this libc has renameat2 (the file system may still refuse RENAME_EXCHANGE: exchange says)."""
    return _renameat2() is not None


def exchange(a: Path, b: Path) -> bool:
    """Swap the existing entries `a` and `b` (same file system) in one step with renameat2(RENAME_EXCHANGE): each name
    leads to one whole entry at every moment, a kill -9 included. False, nothing changed, where the libc, kernel or
    file system lacks it (ModelWriter.publish then falls back to two renames, with a window between them)."""
    import ctypes
    import errno

    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # no such call, or not on this file system
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a} and {b}: {os.strerror(err)}")


def checksum_other_files(model_dir: Path, *, skip: set[str]) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every regular file under `model_dir` but the manifest, its
    verified stamp and the names in `skip` (the stage files, which the manifest records with their tensors)."""
    out = {}
    for path in sorted(Path(model_dir).rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_file() and not path.is_symlink() and rel not in skip | {MANIFEST, STAMP}:
            out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def load_manifest(model_dir: Path) -> Manifest:
    """Read and check a model directory's manifest and that every file is present with the recorded size."""
    return _read_manifest(Path(model_dir))[0]


def _read_manifest(model_dir: Path) -> tuple[Manifest, bytes]:
    """(manifest, its raw bytes), after the cheap checks of load_manifest."""
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise StoreError(f"{model_dir}: no such model directory (convert the model first: kubeflash convert)")
    if not path.is_file():
        raise StoreError(f"{path}: missing; {model_dir} is not a complete kubeflash model")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    manifest = Manifest.from_json(data, where=str(path))
    _check_structure(manifest, where=str(path))
    for name, (size, _) in checked_files(manifest, where=str(path)).items():
        f = model_dir / name
        if not f.is_file():
            raise StoreError(f"{f}: missing (listed in {MANIFEST})")
        got = f.stat().st_size
        if got != size:
            raise StoreError(f"{f}: {got} bytes, expected {size} (truncated or corrupt)")
    return manifest, raw


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1, "uint8": 1}  # what tensor_view can read


def _check_structure(m: Manifest, *, where: str) -> None:
    """What the sha256 of the stage files cannot vouch for, since the manifest itself holds them: every stage is a
    listed file, the dtype is a store dtype, the config's sizes and flags have their types, and each tensor's shape,
    dtype and bytes agree and lie inside its file. A manifest edited by hand or damaged in place is refused naming
    the field, instead of a traceback or weights read from the wrong place."""
    from dataclasses import fields

    from .modelconfig import ModelConfig

    def bad(what: str) -> StoreError:
        return StoreError(f"{where}: {what}")

    if m.dtype not in ("float16", "bfloat16", "float32"):
        raise bad(f"dtype {m.dtype!r} is not one of float16, bfloat16, float32")
    if not isinstance(m.config, dict):
        raise bad(f"config is {type(m.config).__name__}, expected an object of model options")
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    for f in fields(ModelConfig):
        v, kind = m.config.get(f.name), str(f.type)  # the annotation as written (from __future__ import annotations)
        if v is None or kind not in kinds:
            continue
        if not isinstance(v, kinds[kind]) or (isinstance(v, bool) and kind != "bool"):
            raise bad(f"config.{f.name} = {v!r} is not of type {kind}")
    for i, name in enumerate(m.stages):
        if not isinstance(name, str) or name not in m.files:
            raise bad(f"stages[{i}] = {name!r} is not one of its files")
    layers = m.config.get("num_layers")
    if isinstance(layers, int) and m.stages and m.num_layers != layers:
        raise bad(f"{m.num_layers} layer stages, but config.num_layers is {layers}")
    for name, entry in m.files.items():
        for t, e in entry.tensors.items():
            size = _ITEMSIZE.get(e.dtype)
            if size is None:
                raise bad(f"files.{name}.tensors.{t}.dtype {e.dtype!r} is not one of {', '.join(_ITEMSIZE)}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e.shape):
                raise bad(f"files.{name}.tensors.{t}.shape {list(e.shape)} is not a list of sizes")
            if e.nbytes != math.prod(e.shape) * size:
                raise bad(f"files.{name}.tensors.{t}: shape {list(e.shape)} of {e.dtype} is "
                          f"{math.prod(e.shape) * size} bytes, but nbytes is {e.nbytes}")
            if e.offset < 0 or e.offset + e.nbytes > entry.size:
                raise bad(f"files.{name}.tensors.{t}: bytes {e.offset}..{e.offset + e.nbytes} lie outside the "
                          f"file's {entry.size}")


def checked_files(manifest: Manifest, *, where: str = MANIFEST) -> dict[str, tuple[int, str]]:
    """Every file the manifest vouches for: {relative path: (size, sha256)}, stage files first."""
    out = {name: (f.size, f.sha256) for name, f in manifest.files.items()}
    try:
        out |= {str(rel): (int(f["size"]), str(f["sha256"]))
                for rel, f in (manifest.extra.get("other_files") or {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{where}: malformed extra.other_files ({type(e).__name__}: {e})") from e
    for rel in out:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise StoreError(f"{where}: file {rel!r} leaves the model directory")
    return out


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
    for name, (_, want) in checked_files(manifest).items():
        got = sha256_file(model_dir / name)
        if got != want:
            raise StoreError(f"{model_dir / name}: sha256 {got[:12]}… does not match the manifest ({want[:12]}…); "
                             "the file is corrupt: convert or stage the model again")
    return manifest


# ------------------------------------------------------------------------------- verified on first load

STAMP = ".verified"  # in the model directory: the verdict of the last full check, and what it was keyed on
STAMP_FORMAT = "kubeflash-verified/1"


def verify_model(model_dir: Path) -> Manifest:
    """The manifest of a model whose every file matched its sha256, checked in full on first load.

    The verdict is cached in `<model_dir>/.verified`, keyed by the manifest's sha256 and each file's size,
    mtime_ns, ctime_ns and inode: while none of those change the check is not repeated; any write to a file
    (even one that keeps its size) changes them, and the next load hashes everything again. Where the
    directory is read-only (a pod's model volume) the stamp written at staging is used, or the check runs
    every time. Raises StoreError naming the first missing, truncated or corrupt file.
    """
    model_dir = Path(model_dir)
    manifest, raw = _read_manifest(model_dir)
    key = _stamp_key(model_dir, manifest, raw)
    if _read_stamp(model_dir) == key:
        return manifest
    verify(model_dir, manifest)
    if _stamp_key(model_dir, manifest, raw) == key:  # nothing changed while hashing
        _write_stamp(model_dir, key)
    return manifest


def _stamp_key(model_dir: Path, manifest: Manifest, raw: bytes) -> dict:
    files = {}
    for name in checked_files(manifest):
        st = os.stat(model_dir / name)
        files[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return {"format": STAMP_FORMAT, "manifest_sha256": hashlib.sha256(raw).hexdigest(), "files": files}


def _read_stamp(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / STAMP).read_bytes())
    except (OSError, ValueError):
        return None


def _write_stamp(model_dir: Path, key: dict) -> None:
    """Best effort: a directory we may not write (read-only volume, another owner) just goes unstamped."""
    for old in model_dir.glob(f".{STAMP}.*.tmp"):  # a writer killed before its rename; writes take ms
        try:
            if time.time() - old.stat().st_mtime > 60:
                old.unlink()
        except OSError:
            pass
    try:
        atomic_write_bytes(model_dir / STAMP, (json.dumps(key) + "\n").encode(), mode=0o644)
    except OSError:
        pass


def tensor_view(buf: np.ndarray, entry: TensorEntry) -> np.ndarray:
    """A numpy view of one tensor inside a stage buffer (uint8); bfloat16 comes back as uint16 bits."""
    raw = buf[entry.offset : entry.offset + entry.nbytes]
    np_dtype = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16, "int8": np.int8, "uint8": np.uint8}[
        entry.dtype
    ]
    return raw.view(np_dtype).reshape(entry.shape)
