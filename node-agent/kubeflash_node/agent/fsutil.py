"""File-system measurements and removals the agent needs: space, tree sizes, crash-safe deletes.

A directory is deleted by first renaming it to a dot-prefixed trash name in the same directory, so a crash
halfway through a delete never leaves something that looks like a live model or job directory.
"""

from __future__ import annotations

import errno
import os
import shutil
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
    """Bytes allocated under `path` (sparse files count what they use); 0 where it vanished meanwhile."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: None):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_blocks * 512
    return total


def trash(path: Path) -> None:
    """Delete a directory crash-safely: rename aside (atomic), then remove."""
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TRASH}{path.name}-"))
    os.replace(path, aside / "x")
    shutil.rmtree(aside, ignore_errors=True)


def clean_leftovers(directory: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Remove entries of `directory` whose names start with one of `prefixes`; returns their names."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(prefixes):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
