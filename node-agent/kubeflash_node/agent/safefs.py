"""No-follow file access under directories a job pod can write to (its job directory).

A job's pod writes its own directory, so every name in it may have been replaced by a symlink, a FIFO, a
device node or a huge sparse file. Every open here walks the path one component at a time relative to the
parent's directory fd with O_NOFOLLOW (a symlink anywhere fails with ELOOP/ENOTDIR instead of being followed),
checks the type with fstat on the opened fd (so a swap between check and use changes nothing), opens files
O_NONBLOCK (a FIFO cannot stall the agent) and reads at most `cap + 1` bytes. The trusted base (a store disk's
path, from the agent's config) is opened normally; only what lies below it is treated as hostile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)


class Unsafe(OSError):
    """A name under a job directory the agent refuses to use (a symlink, not a regular file, too large).

    str() is a sentence naming the file and what was expected, fit for a status message."""

    def __init__(self, where: str, why: str, *, size: int | None = None):
        super().__init__(errno.EPERM, f"{where}: {why}")
        self.where, self.why = where, why
        self.size = size  # set when the refusal is the file's size

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


def _parts(rel: str | Sequence[str]) -> list[str]:
    parts = [p for p in (rel.split("/") if isinstance(rel, str) else rel) if p not in ("", ".")]
    for p in parts:
        if p == ".." or "/" in p or "\0" in p:
            raise ValueError(f"{rel!r}: not a plain relative path")
    return parts


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "of an unknown type"


def _refusal(dir_fd: int, name: str, shown: str, e: OSError, expected: str) -> OSError:
    """The error for a failed no-follow open of `name`: FileNotFoundError stays, the rest becomes Unsafe."""
    if e.errno == errno.ENOENT:
        return e
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return e
    if stat.S_ISLNK(st.st_mode):
        return Unsafe(shown, f"is a symlink; expected {expected} (links are never followed)")
    if e.errno == errno.EACCES:  # a non-root agent: the pod (same uid) took its owner's permissions away
        return Unsafe(shown, f"is {_kind(st.st_mode)} with mode {stat.S_IMODE(st.st_mode):o} the agent may not "
                             f"open; expected {expected} its owner can read")
    return Unsafe(shown, f"is {_kind(st.st_mode)}; expected {expected}")


def open_dir(base: Path | str, rel: str | Sequence[str] = ()) -> int:
    """An O_DIRECTORY fd of base/rel, reached without following any link below `base`; caller closes it.

    Raises FileNotFoundError when a component is missing, Unsafe when one is a link or not a directory."""
    return _walk(base, rel, create_mode=None)


def _walk(base: Path | str, rel: str | Sequence[str], *, create_mode: int | None) -> int:
    """open_dir and make_dirs: one component at a time, each opened O_NOFOLLOW relative to its parent's fd
    (and made first, with `create_mode`, when that is given)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    shown = str(base)
    try:
        for part in _parts(rel):
            shown = f"{shown}/{part}"
            if create_mode is not None:
                try:
                    os.mkdir(part, create_mode, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(part, _DIR, dir_fd=fd)
            except OSError as e:
                raise _refusal(fd, part, shown, e, "a directory") from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def dir_fd(base: Path | str, rel: str | Sequence[str] = ()) -> Iterator[int]:
    fd = open_dir(base, rel)
    try:
        yield fd
    finally:
        os.close(fd)


def open_file(dfd: int, name: str, *, shown: str = "") -> int:
    """A read-only fd of the regular file `name` in directory `dfd`, never through a link; caller closes it."""
    shown = shown or name
    _parts([name])
    try:
        fd = os.open(name, _FILE, dir_fd=dfd)
    except OSError as e:
        raise _refusal(dfd, name, shown, e, "a regular file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Unsafe(shown, f"is {_kind(st.st_mode)}; expected a regular file")
    return fd


def read_capped(dfd: int, name: str, cap: int, *, shown: str = "") -> bytes:
    """The bytes of regular file `name` in `dfd`, at most `cap`; a larger file raises Unsafe (it is never read
    past cap + 1 bytes, so a sparse 10 GiB file costs one fstat)."""
    shown = shown or name
    fd = open_file(dfd, name, shown=shown)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise Unsafe(shown, f"is {size} bytes, over the {cap} bytes the agent reads", size=size)
        os.set_blocking(fd, True)
        chunks, got = [], 0
        while got <= cap:
            block = os.read(fd, min(1 << 20, cap + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
        if got > cap:
            raise Unsafe(shown, f"grew past the {cap} bytes the agent reads")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_under(base: Path | str, rel: str | Sequence[str], cap: int) -> bytes:
    """read_capped of base/rel, every component below `base` opened without following links."""
    parts = _parts(rel)
    if not parts:
        raise ValueError("read_under needs a file name")
    with dir_fd(base, parts[:-1]) as dfd:
        return read_capped(dfd, parts[-1], cap, shown="/".join([str(base), *parts]))


def check_under(base: Path | str, rel: str | Sequence[str]) -> None:
    """That base/rel is a regular file reached without following links (nothing is read); raises Unsafe, or
    FileNotFoundError when it is missing."""
    parts = _parts(rel)
    if not parts:
        raise ValueError("check_under needs a file name")
    with dir_fd(base, parts[:-1]) as dfd:
        os.close(open_file(dfd, parts[-1], shown="/".join([str(base), *parts])))


def ensure_dir_owned(parent_fd: int, name: str, uid: int | None, gid: int | None, *, mode: int = 0o755,
                     shown: str = "") -> None:
    """Make directory `name` in `parent_fd` (if missing) and give it to uid:gid, through an fd opened with
    O_NOFOLLOW|O_DIRECTORY: a planted symlink (to a file or a directory) is refused, never chowned through."""
    shown = shown or name
    _parts([name])
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, _DIR, dir_fd=parent_fd)
    except OSError as e:
        raise _refusal(parent_fd, name, shown, e, "a directory") from None
    try:
        chown_fd(fd, uid, gid)
    finally:
        os.close(fd)


def chown_fd(fd: int, uid: int | None, gid: int | None) -> None:
    """fchown an already-opened fd to uid:gid (gid defaults to uid) where it differs; no-op for uid None."""
    if uid is None:
        return
    gid = uid if gid is None else gid
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.fchown(fd, uid, gid)


def make_dirs(base: Path | str, rel: str | Sequence[str], *, mode: int = 0o755) -> int:
    """An O_DIRECTORY fd of base/rel, creating missing components, never following a link below `base`."""
    return _walk(base, rel, create_mode=mode)
