"""The file-system edge of the CSI driver: read /proc/self/mountinfo, bind and loop mounts, unmounts.

Everything here shells out to mount(8)/umount(8)/mkfs.ext4(8) (util-linux, e2fsprogs) and needs root
(CAP_SYS_ADMIN). Each function either completes or undoes what it did, so a failure leaves nothing mounted.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


class MountError(RuntimeError):
    """A mount command failed; the message carries the command and its stderr."""


@dataclass(frozen=True)
class MountPoint:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    root: str  # the path inside the source file system that is mounted (a bind of a sub-directory)
    target: str
    options: tuple[str, ...]
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountPoint]:
    """Parse the mountinfo format (proc(5)): id parent major:minor root target options [tags] - fstype source super."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        out.append(MountPoint(int(f[0]), _unescape(f[3]), _unescape(f[4]), tuple(f[5].split(",")), r[0],
                              _unescape(r[1])))
    return out


def mounts() -> list[MountPoint]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def mounted_at(target: str | Path) -> MountPoint | None:
    """The topmost mount whose mount point is exactly `target` (None when nothing is mounted there)."""
    t = os.path.normpath(str(target))
    found = [m for m in mounts() if m.target == t]
    return found[-1] if found else None


def _run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise MountError(f"{' '.join(cmd)}: exit {p.returncode}: {(p.stderr or p.stdout).strip()}")


def bind(source: Path, target: Path, *, read_only: bool) -> None:
    """Bind-mount `source` on `target` (nosuid, nodev); read-only by a remount, undone if that fails."""
    _run("mount", "--bind", str(source), str(target))
    opts = "remount,bind,nosuid,nodev" + (",ro" if read_only else "")
    try:
        _run("mount", "-o", opts, str(target))
    except MountError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Unmount `target` if something is mounted there (every stacked mount); no error if nothing is."""
    while mounted_at(target) is not None:
        _run("umount", str(target))


def make_ext4(image: Path, size: int, *, owner: tuple[int, int]) -> None:
    """A sparse file of `size` bytes formatted ext4 (no journal, no reserved blocks, an inode per 64 KiB: the
    engine writes a few large files), its root owned by `owner`."""
    with open(image, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-i", "65536",
         "-E", f"root_owner={owner[0]}:{owner[1]},lazy_itable_init=1,nodiscard", str(image))


def loop_mount(image: Path, target: Path) -> None:
    """Mount an ext4 image through a loop device (autoclear: the device is freed with its last unmount)."""
    _run("mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(image), str(target))
