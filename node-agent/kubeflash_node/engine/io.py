"""I/O backends behind one interface: `read_into(path, offset, dest_uint8_tensor)` fills dest from the file.

posix: buffered pread (uses the page cache). odirect: O_DIRECT reads into 4 KiB-aligned host memory (page
cache bypassed). kvikio: cuFile reads (GDS where the platform has it, kvikio's compat mode otherwise).
`make_reader('auto')` picks the fastest that works here and reports its name.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

ALIGN = 4096


class PosixReader:
    """Buffered positional reads through the page cache."""

    name = "posix"

    def read_into(self, path: Path, offset: int, dest: torch.Tensor) -> None:
        view = memoryview(dest.numpy()).cast("B")
        fd = os.open(path, os.O_RDONLY)
        try:
            _pread_all(fd, view, offset, path)
        finally:
            os.close(fd)


class ODirectReader:
    """O_DIRECT reads (page cache bypassed) through a per-thread aligned bounce buffer when dest is unaligned."""

    name = "odirect"

    def __init__(self):
        import threading

        self.local = threading.local()

    def _bounce(self, n: int) -> mmap.mmap:
        b = getattr(self.local, "buf", None)
        if b is None or len(b) < n:
            b = mmap.mmap(-1, max(n, 16 << 20))  # anonymous mmap: page aligned
            self.local.buf = b
        return b

    def read_into(self, path: Path, offset: int, dest: torch.Tensor) -> None:
        n = dest.numel()
        if offset % ALIGN:
            raise ValueError(f"{path}: O_DIRECT offset {offset} not {ALIGN}-aligned")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            aligned = dest.data_ptr() % ALIGN == 0 and n % ALIGN == 0
            if aligned:
                _pread_all(fd, memoryview(dest.numpy()).cast("B"), offset, path)
            else:
                want = (n + ALIGN - 1) // ALIGN * ALIGN
                buf = self._bounce(want)
                mv = memoryview(buf)[:want]
                got = _pread_all(fd, mv, offset, path, allow_short=True)
                if got < n:
                    raise OSError(f"{path}: short read at offset {offset} ({got} of {n} bytes): truncated file?")
                dest.numpy()[:] = torch.frombuffer(mv[:n], dtype=torch.uint8).numpy()
        finally:
            os.close(fd)


class KvikioReader:
    """kvikio CuFile reads into host or device tensors (GDS, or compat mode via POSIX inside kvikio)."""

    name = "kvikio"
    device_capable = True  # reads straight into GPU memory (GDS, or kvikio's own bounce buffers in compat mode)

    def __init__(self):
        import kvikio  # noqa: F401  (import error = backend unavailable)

        self.kvikio = kvikio

    @staticmethod
    def gds_available() -> bool:
        """True when kvikio does real GPUDirect Storage (not its POSIX compatibility mode)."""
        try:
            import kvikio.defaults as d

            for probe in ("is_compat_mode_preferred", "compat_mode"):
                if hasattr(d, probe):
                    return not bool(getattr(d, probe)())
            return str(d.get("compat_mode")).upper() not in ("ON", "TRUE", "1", "COMPATMODE.ON")
        except Exception:  # any failure to tell means: assume compat mode
            return False

    def read_into(self, path: Path, offset: int, dest: torch.Tensor) -> None:
        buf = dest if dest.is_cuda else dest.numpy()  # kvikio takes host memory through the buffer protocol
        with self.kvikio.CuFile(str(path), "r") as f:
            got = f.pread(buf, size=dest.numel(), file_offset=offset).get()
        if got != dest.numel():
            raise OSError(f"{path}: short read at offset {offset} ({got} of {dest.numel()} bytes)")


def _pread_all(fd: int, view: memoryview, offset: int, path: Path, allow_short: bool = False) -> int:
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            if allow_short:
                return done
            raise OSError(f"{path}: short read at offset {offset + done} ({done} of {n} bytes): truncated file?")
        done += got
    return done


BACKENDS = {"posix": PosixReader, "odirect": ODirectReader, "kvikio": KvikioReader}


def odirect_supported(path: Path) -> bool:
    """Whether files under `path` can be opened with O_DIRECT (tmpfs and some overlays refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def make_reader(name: str = "auto", *, cuda: bool = False, probe: Path | None = None):
    """The named backend, or for 'auto': kvikio on CUDA when it has real GDS, else O_DIRECT on CUDA when the
    file system allows it (streams from the SSD without evicting the page cache), else buffered posix."""
    if name == "auto":
        if cuda:
            try:
                if KvikioReader.gds_available():  # in compat mode kvikio is POSIX + bounce: O_DIRECT is better
                    return KvikioReader()
            except ImportError:
                pass
            if probe is None or odirect_supported(probe):
                return ODirectReader()
        return PosixReader()
    if name not in BACKENDS:
        raise ValueError(f"io backend {name!r} is unknown; expected auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]()
