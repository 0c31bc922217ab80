"""Builds the node's inventory: GPUs (config or NVML) and store disks (config), located in sysfs.

Declared values win over discovered ones, so a kind node or a test can describe devices that are not there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import nvml, sysfs
from .config import AgentConfig, DiskSpec, GpuSpec
from .devices import Disk, Gpu, PciLocation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    disks: tuple[Disk, ...]
    ssds: tuple[sysfs.BlockDevice, ...] = ()  # every SSD sysfs shows (store disks or not), for the API

    def disk(self, name: str) -> Disk | None:
        return next((d for d in self.disks if d.name == name), None)


def discover(cfg: AgentConfig) -> Inventory:
    specs = cfg.gpus if cfg.gpus is not None else tuple(nvml.list_gpus())
    gpus = tuple(_gpu(cfg, g, fake=cfg.gpus is not None) for g in specs)
    disks = tuple(_disk(cfg, d) for d in cfg.disks)
    ssds = tuple(sysfs.list_ssds(cfg.sysfs_root)) if cfg.sysfs_root.is_dir() else ()
    return Inventory(gpus=gpus, disks=disks, ssds=ssds)


def _merge(found: PciLocation, root: str, numa: int | None) -> PciLocation:
    return PciLocation(root=root or found.root, path=found.path,
                       numa_node=numa if numa is not None else found.numa_node)


def _gpu(cfg: AgentConfig, spec: GpuSpec, *, fake: bool) -> Gpu:
    found = sysfs.pci_device(cfg.sysfs_root, spec.pci_bus_id) if spec.pci_bus_id else PciLocation()
    return Gpu(index=spec.index, name=spec.name, uuid=spec.uuid, memory_bytes=spec.memory,
               pci_bus_id=sysfs.normalize_bus_id(spec.pci_bus_id) if spec.pci_bus_id else "",
               location=_merge(found, spec.pci_root, spec.numa_node), fake=fake)


def _disk(cfg: AgentConfig, spec: DiskSpec) -> Disk:
    spec.path.mkdir(parents=True, exist_ok=True)
    device = spec.device or sysfs.device_of_path(cfg.sysfs_root, spec.path)
    block = sysfs.block_device(cfg.sysfs_root, device) if device else None
    found = block.location if block else PciLocation()
    if block and block.rotational:
        log.warning("store disk is rotational; streaming weights from it will be slow",
                    extra={"disk": spec.name, "device": block.name})
    return Disk(name=spec.name, path=spec.path, device=block.name if block else device,
                location=_merge(found, spec.pci_root, spec.numa_node), capacity=spec.capacity,
                reserve=spec.reserve, rotational=block.rotational if block else None)
