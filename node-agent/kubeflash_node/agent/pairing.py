"""Pairs every GPU with its closest store disk: same PCIe root, else same NUMA node, else any.

Pure. Closeness is (same PCIe root, depth of the shared PCIe path below it (same switch), same NUMA node).
Among equally close disks the one already serving the fewest GPUs wins, then config order, so GPUs spread
over SSDs; one SSD may serve several GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

from .devices import Disk, Gpu, Pair, PciLocation


def closeness(g: PciLocation, d: PciLocation) -> tuple[int, int, int]:
    """(same PCIe root, depth of the shared PCI path, same NUMA node) — larger is closer."""
    same_root = int(bool(g.root) and g.root == d.root)
    shared = 0
    if same_root:
        for a, b in zip(g.path, d.path, strict=False):
            if a != b:
                break
            shared += 1
    same_numa = int(g.numa_node is not None and g.numa_node == d.numa_node)
    return same_root, shared, same_numa


def reason(c: tuple[int, int, int]) -> str:
    return "pcie-root" if c[0] else "numa" if c[2] else "fallback"


def pair(gpus: Sequence[Gpu], disks: Sequence[Disk]) -> list[Pair]:
    """One pair per GPU, in GPU index order; [] when there are no disks."""
    if not disks:
        return []
    load = {d.name: 0 for d in disks}
    order = {d.name: i for i, d in enumerate(disks)}
    pairs = []
    for g in sorted(gpus, key=lambda g: g.index):
        ranked = [(closeness(g.location, d.location), -load[d.name], -order[d.name], d) for d in disks]
        best = max(ranked, key=lambda r: r[:3])[3]
        load[best.name] += 1
        pairs.append(Pair(gpu=g.index, disk=best.name, reason=reason(closeness(g.location, best.location))))
    return pairs
