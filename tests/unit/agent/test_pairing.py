"""GPU<->SSD pairing: same PCIe root first, then the same switch, then NUMA, then any; SSDs shared evenly."""

from pathlib import Path

import pytest

from kubeflash_node.agent.devices import Disk, Gpu, PciLocation
from kubeflash_node.agent.pairing import pair


def gpu(i, root="", path=(), numa=None):
    return Gpu(index=i, location=PciLocation(root=root, path=tuple(path), numa_node=numa))


def disk(name, root="", path=(), numa=None):
    return Disk(name=name, path=Path("/x") / name, location=PciLocation(root=root, path=tuple(path), numa_node=numa))


def as_map(pairs):
    return {p.gpu: (p.disk, p.reason) for p in pairs}


@pytest.mark.parametrize(
    "gpus,disks,expected",
    [
        pytest.param([gpu(0, "0000:00", numa=0), gpu(1, "0000:80", numa=1)],
                     [disk("a", "0000:80", numa=1), disk("b", "0000:00", numa=0)],
                     {0: ("b", "pcie-root"), 1: ("a", "pcie-root")}, id="same-root-beats-order"),
        pytest.param([gpu(0, "0000:00", numa=1)], [disk("a", "0000:17", numa=0), disk("b", "0000:40", numa=1)],
                     {0: ("b", "numa")}, id="numa-when-no-root-matches"),
        pytest.param([gpu(0, "0000:00")], [disk("a", "0000:17"), disk("b", "0000:40")],
                     {0: ("a", "fallback")}, id="fallback-first-disk"),
        pytest.param([gpu(0, "0000:00", numa=0), gpu(1, "0000:00", numa=0)], [disk("a", "0000:00", numa=0)],
                     {0: ("a", "pcie-root"), 1: ("a", "pcie-root")}, id="one-ssd-serves-two-gpus"),
        pytest.param([gpu(i, "0000:00", numa=0) for i in range(4)],
                     [disk("a", "0000:00", numa=0), disk("b", "0000:00", numa=0)],
                     {0: ("a", "pcie-root"), 1: ("b", "pcie-root"), 2: ("a", "pcie-root"), 3: ("b", "pcie-root")},
                     id="equal-disks-share-the-load"),
        pytest.param([gpu(0, "0000:00", ["0000:00:01.0", "0000:01:00.0", "0000:02:08.0", "0000:04:00.0"])],
                     [disk("far", "0000:00", ["0000:00:03.0", "0000:05:00.0"]),
                      disk("switch", "0000:00", ["0000:00:01.0", "0000:01:00.0", "0000:02:10.0", "0000:06:00.0"])],
                     {0: ("switch", "pcie-root")}, id="same-switch-beats-same-root"),
    ],
)
def test_pairing(gpus, disks, expected):
    """Every GPU gets the closest disk; ties go to the least-loaded disk, then config order."""
    assert as_map(pair(gpus, disks)) == expected


def test_no_disks_no_pairs():
    """Without store disks there is nothing to pair (the node reports 0 pairs)."""
    assert pair([gpu(0, "0000:00")], []) == []


def test_unknown_numa_never_matches():
    """A NUMA node sysfs reports as unknown (-1 -> None) is not a match for another unknown one."""
    pairs = pair([gpu(0, "0000:01")], [disk("a", "0000:02"), disk("b", "0000:03")])
    assert as_map(pairs) == {0: ("a", "fallback")}
