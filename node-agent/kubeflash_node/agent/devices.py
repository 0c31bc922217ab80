"""The agent's inventory value types: a GPU, a store disk, a pairing; plain frozen data, no I/O.

Shared by discovery (which builds them), pairing (which reads them) and the status builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PciLocation:
    """Where a device sits on the PCIe tree."""

    root: str = ""  # host bridge / root complex, "0000:17" (from /sys/devices/pci0000:17)
    path: tuple[str, ...] = ()  # PCI addresses from the root port down to the device
    numa_node: int | None = None  # None where unknown (sysfs says -1)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str = ""
    uuid: str = ""
    memory_bytes: int = 0
    pci_bus_id: str = ""
    location: PciLocation = field(default_factory=PciLocation)
    fake: bool = False  # declared in the config file, not found on the machine


@dataclass(frozen=True)
class Disk:
    """A store directory and the block device under it."""

    name: str
    path: Path
    device: str = ""  # nvme0n1 ("" where not found)
    location: PciLocation = field(default_factory=PciLocation)
    capacity: int = 0  # configured capacity (0: the file system's)
    reserve: int = 0
    rotational: bool | None = None


@dataclass(frozen=True)
class Pair:
    gpu: int
    disk: str
    reason: str  # pcie-root | numa | fallback
