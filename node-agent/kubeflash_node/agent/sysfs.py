"""Reads PCIe topology and block devices from sysfs; the root is a parameter so tests use fake trees.

A device's PCIe root and NUMA node come from the real path its sysfs entry links to, e.g.
/sys/block/nvme0n1 -> ../devices/pci0000:00/0000:00:01.0/0000:01:00.0/nvme/nvme0/nvme0n1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .devices import PciLocation

PCI_ADDR = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_ROOT = re.compile(r"^pci([0-9a-f]{4}:[0-9a-f]{2})$")
_VIRTUAL = ("loop", "ram", "zram", "dm-", "md", "sr", "nbd")


@dataclass(frozen=True)
class BlockDevice:
    name: str
    rotational: bool | None
    size_bytes: int
    location: PciLocation


def normalize_bus_id(bus_id: str) -> str:
    """NVML writes 00000000:17:00.0; sysfs names it 0000:17:00.0."""
    bus_id = bus_id.strip().lower()
    domain, _, rest = bus_id.partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest and re.fullmatch(r"[0-9a-f]+", domain) else bus_id


def location_of(real: Path, sysfs: Path) -> PciLocation:
    """PCIe root, PCI path and NUMA node of the device whose resolved sysfs directory is `real`."""
    try:
        parts = real.relative_to(Path(os.path.realpath(sysfs)) / "devices").parts
    except ValueError:
        return PciLocation()
    root = next((m.group(1) for p in parts if (m := _ROOT.match(p))), "")
    path: list[str] = []
    numa = None
    here = Path(os.path.realpath(sysfs)) / "devices"
    for p in parts:
        here = here / p
        if PCI_ADDR.match(p):
            path.append(p)
            numa = _read_int(here / "numa_node", numa)
    return PciLocation(root=root, path=tuple(path), numa_node=None if numa is None or numa < 0 else numa)


def pci_device(sysfs: Path, bus_id: str) -> PciLocation:
    """Location of a PCI device by bus id (a GPU from NVML or the config)."""
    entry = sysfs / "bus" / "pci" / "devices" / normalize_bus_id(bus_id)
    if not entry.exists():
        return PciLocation()
    return location_of(Path(os.path.realpath(entry)), sysfs)


def block_device(sysfs: Path, name: str) -> BlockDevice | None:
    """A whole block device (a partition is followed to its disk)."""
    entry = sysfs / "class" / "block" / name
    if not entry.exists():
        entry = sysfs / "block" / name
    if not entry.exists():
        return None
    real = Path(os.path.realpath(entry))
    if (real / "partition").exists():
        real = real.parent
    rot = _read_int(real / "queue" / "rotational", None)
    return BlockDevice(name=real.name, rotational=None if rot is None else bool(rot),
                       size_bytes=(_read_int(real / "size", 0) or 0) * 512, location=location_of(real, sysfs))


def device_of_path(sysfs: Path, path: Path) -> str:
    """The block device holding a directory, via its st_dev and /sys/dev/block/MAJ:MIN ("" if none)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return ""
    entry = sysfs / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}"
    if not entry.exists():
        return ""
    real = Path(os.path.realpath(entry))
    if (real / "partition").exists():
        real = real.parent
    return real.name


def list_ssds(sysfs: Path) -> list[BlockDevice]:
    """Non-rotational, non-virtual block devices (NVMe and SATA SSDs), sorted by name."""
    out = []
    base = sysfs / "block"
    names = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
    for name in names:
        if name.startswith(_VIRTUAL):
            continue
        dev = block_device(sysfs, name)
        if dev and dev.rotational is False and dev.location.path:
            out.append(dev)
    return out


def _read_int(path: Path, default):
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default
