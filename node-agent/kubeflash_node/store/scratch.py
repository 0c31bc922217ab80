"""Scratch directories for conversions, downloads and staging: held under a lock, cleaned on the next start.

A scratch directory is `<parent>/.staging-<name>-<random>`. Its creator holds an exclusive flock on the
directory itself while it works in it; the kernel drops that lock when the process dies (kill -9 included).
`clean_stale(parent)` removes every scratch directory whose lock it can take, so a dead run's leftovers go on
the next start while a live conversion running beside it is never touched.

A store entry being written (`<parent>/<name>`, by `kubeflash convert --out` or a run's store cache) is held with
`entry_lock`: an exclusive flock on `<parent>/.<name>.lock`, so two writers of one entry never both publish it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
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


class EntryBusy(Exception):
    """Another process holds the entry's lock (entry_lock with wait=False); `lock` is the lock file's path."""

    def __init__(self, entry: Path, lock: Path):
        super().__init__(f"{entry}: another process is writing it (it holds {lock})")
        self.entry, self.lock = entry, lock


def entry_lock_path(entry: Path) -> Path:
    return Path(entry).parent / f".{Path(entry).name}.lock"


@contextlib.contextmanager
def entry_lock(entry: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold the exclusive flock on `entry`'s lock file (`<parent>/.<name>.lock`, created; the parent must exist) for
    the duration: waits for another holder, or raises EntryBusy at once where `wait` is False. The kernel drops the
    lock when its holder dies (kill -9 included), so a killed writer never blocks the next one; the file is removed
    as the lock is let go, and a lock taken on a file its holder removed meanwhile is taken again on the new one."""
    path = entry_lock_path(entry)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise EntryBusy(Path(entry), path) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder before us removed it as it let go: lock the file the name leads to now
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held: whoever opened this file meanwhile finds it gone and takes a new one
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def remove_empty(created: list[Path]) -> None:
    """Remove the directories a command created (outermost first in `created`) that are still empty, innermost
    first: a refused or stopped command leaves none behind."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass
