"""Scratch directories for conversions, downloads and staging: held under a lock, cleaned on the next start.

A scratch directory is `<parent>/.staging-<name>-<random>`. Its creator holds an exclusive flock on the
directory itself while it works in it; the kernel drops that lock when the process dies (kill -9 included).
`clean_stale(parent)` removes every scratch directory whose lock it can take, so a dead run's leftovers go on
the next start while a live conversion running beside it is never touched.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

STAGING = ".staging-"


class Scratch:
    """A fresh `<parent>/<prefix><random>` directory, locked by this process until `remove()` or `release()`."""

    def __init__(self, parent: Path, prefix: str):
        if not prefix.startswith(STAGING):
            raise ValueError(f"scratch prefix {prefix!r} must start with {STAGING!r}, or clean_stale never finds it")
        parent = Path(parent)
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
            fd = _lock(path)
            if fd is not None:
                self.path, self._fd = path, fd
                return
        raise OSError(f"{parent}: could not create a locked scratch directory {prefix}*")

    def release(self) -> None:
        """Drop the lock (the directory was renamed into place, or is about to be removed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on the directory `path`; None if another process holds it, or if the
    name no longer leads to the directory that was locked (a cleaner removed it between creation and lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def clean_stale(parent: Path, prefixes: tuple[str, ...] = (STAGING,)) -> list[str]:
    """Remove the scratch entries of `parent` (names starting with one of `prefixes`) that no live process
    holds; returns their names. A directory is removed while holding its lock, so its owner cannot return."""
    removed: list[str] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        if not entry.name.startswith(prefixes):
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
            continue
        fd = _lock(entry)
        if fd is None:
            continue  # a live conversion or staging: its owner removes or publishes it
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(entry.name)
    return removed
