"""File-system measurements and removals the agent needs: space, tree sizes, crash-safe deletes.

A directory is deleted by first renaming it to a dot-prefixed trash name in the same directory, so a crash
halfway through a delete never leaves something that looks like a live model or job directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

TRASH = ".trash-"


@dataclass(frozen=True)
class Space:
    capacity: int  # bytes
    free: int  # bytes available to the agent (non-root reserve excluded)


def fs_space(path: Path) -> Space:
    st = os.statvfs(path)
    return Space(capacity=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def tree_bytes(path: Path) -> int:
    """Bytes allocated under `path` (sparse files count what they use); 0 where it vanished meanwhile.

    Links are never followed. A directory this process owns but cannot read (a job pod, which runs as the
    non-root agent's user, may take its own access away) is given its owner's rwx back and counted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return _bytes_under(fd)
    finally:
        os.close(fd)


def _bytes_under(dfd: int) -> int:
    total = 0
    try:
        names = os.listdir(dfd)
    except OSError:
        return 0
    for name in names:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            continue
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = open_dir_as_owner(dfd, name)
            except OSError:
                continue
            try:
                total += _bytes_under(sub)
            finally:
                os.close(sub)
    return total


def open_dir_as_owner(dfd: int, name: str) -> int:
    """An O_RDONLY fd of the directory `name` under `dfd`, never through a link; when this process owns it and
    its owner bits lack r, w or x (a pod of the agent's user chmod-ed it), they are added first, on that very
    inode (through the O_PATH fd's /proc/self/fd link). Raises OSError (ELOOP/ENOTDIR for a link or a file)."""
    pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st = os.fstat(pfd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o700 != 0o700:
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(st.st_mode) | 0o700)
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(pfd)


def remove_tree(path: Path) -> None:
    """Remove `path` and everything under it without following links (relative to directory fds); directories
    this process owns whose owner bits were taken away are opened up first, so a non-root agent removes what a
    pod of its user locked. Raises OSError for what it could not remove."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_at(parent, path.name)
    finally:
        os.close(parent)


def _remove_at(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
        return
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError) as e:  # Linux: EISDIR for a directory (EPERM on some systems)
        if not stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
            raise e
    sub = open_dir_as_owner(dfd, name)
    try:
        for entry in os.listdir(sub):
            _remove_at(sub, entry)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dfd)


def trash(path: Path) -> None:
    """Delete a directory crash-safely: rename aside (atomic), then remove (what is left over, e.g. after a
    crash, is a `.trash-*` entry that clean_leftovers removes on the next start)."""
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TRASH}{path.name}-"))
    os.replace(path, aside / "x")
    _remove_quietly(aside)


def _remove_quietly(path: Path) -> None:
    try:
        remove_tree(path)
    except (OSError, RecursionError):
        shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(directory: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Remove entries of `directory` whose names start with one of `prefixes`; returns their names."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(prefixes):
            if entry.is_dir() and not entry.is_symlink():
                _remove_quietly(entry)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
