"""Discovery and pairing from fake sysfs trees laid out like the kernel's (symlinks to PCI device paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeflash_node.agent.config import from_mapping
from kubeflash_node.agent.discovery import discover
from kubeflash_node.agent.pairing import pair

from agent_harness import fake_sysfs

# Two sockets. Socket 0: root 0000:16, a PCIe switch with GPU 0 and nvme0 behind it. Socket 1: root 0000:b6 with
# GPU 1 on one root port and nvme1 on another; root 0000:d0 (socket 1 too) holds GPU 2 and no SSD; GPU 3 sits
# where sysfs knows no NUMA node. nvme2 is rotational (a hybrid drive) and is not an SSD.
GPUS = {
    "0000:18:00.0": {"parents": ["0000:16:02.0", "0000:17:00.0"], "numa": 0},
    "0000:b8:00.0": {"parents": ["0000:b6:02.0"], "numa": 1},
    "0000:d1:00.0": {"parents": ["0000:d0:01.0"], "numa": 1},
    "0000:e1:00.0": {"parents": ["0000:e0:01.0"], "numa": -1},
}
NVME = {
    "nvme0n1": {"bus": "0000:19:00.0", "parents": ["0000:16:02.0", "0000:17:00.0"], "numa": 0, "size": 4 << 40},
    "nvme1n1": {"bus": "0000:ba:00.0", "parents": ["0000:b6:04.0"], "numa": 1, "size": 8 << 40},
    "nvme2n1": {"bus": "0000:c1:00.0", "parents": ["0000:c0:01.0"], "numa": 1, "rotational": 1},
}


@pytest.fixture
def sysroot(tmp_path) -> Path:
    return fake_sysfs(tmp_path / "sys", gpus=GPUS, nvme=NVME)


def config(tmp_path: Path, sysroot: Path) -> dict:
    return {
        "nodeName": "gpu-node",
        "sysfsRoot": str(sysroot),
        "gpus": [{"index": i, "name": "H100", "memory": "80Gi", "pciBusId": bus} for i, bus in enumerate(GPUS)],
        # config order puts the far disk first: topology must win over order
        "disks": [{"name": "ssd-b", "path": str(tmp_path / "b"), "device": "nvme1n1"},
                  {"name": "ssd-a", "path": str(tmp_path / "a"), "device": "nvme0n1"}],
    }


def test_locations_read_from_sysfs(tmp_path, sysroot):
    """PCIe root, PCI path and NUMA node come from where each device's sysfs link resolves."""
    inv = discover(from_mapping(config(tmp_path, sysroot)))
    g0 = inv.gpus[0].location
    assert (g0.root, g0.path, g0.numa_node) == ("0000:16", ("0000:16:02.0", "0000:17:00.0", "0000:18:00.0"), 0)
    assert inv.gpus[3].location.numa_node is None  # sysfs says -1
    a = inv.disk("ssd-a")
    assert (a.device, a.location.root, a.location.numa_node, a.rotational) == ("nvme0n1", "0000:16", 0, False)
    assert [s.name for s in inv.ssds] == ["nvme0n1", "nvme1n1"]  # the rotational nvme2n1 is not an SSD
    assert inv.ssds[1].size_bytes == 8 << 40


def test_pairs_from_topology(tmp_path, sysroot):
    """GPU0 -> the SSD behind its switch; GPU1 -> same root; GPU2 -> same NUMA node; GPU3 -> any (fallback)."""
    inv = discover(from_mapping(config(tmp_path, sysroot)))
    got = {p.gpu: (p.disk, p.reason) for p in pair(inv.gpus, inv.disks)}
    assert got == {0: ("ssd-a", "pcie-root"), 1: ("ssd-b", "pcie-root"), 2: ("ssd-b", "numa"),
                   3: ("ssd-a", "fallback")}


def test_agent_publishes_pairs(tmp_path, sysroot, agents):
    """A real agent run (--once, no cluster) writes the pairs, disk topology and labels into its status."""
    agent = agents(config(tmp_path, sysroot))
    assert agent.run_once() == 0, agent.log()
    status = json.loads((tmp_path / "b" / "status.json").read_text())
    assert {(p["gpu"], p["disk"]) for p in status["pairs"]} == {(0, "ssd-a"), (1, "ssd-b"), (2, "ssd-b"), (3, "ssd-a")}
    disks = {d["name"]: d for d in status["disks"]}
    assert (disks["ssd-a"]["pciRoot"], disks["ssd-a"]["numaNode"]) == ("0000:16", 0)
    gpus = {g["index"]: g for g in status["gpus"]}
    assert gpus[0]["memoryBytes"] == 80 << 30 and "numaNode" not in gpus[3]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Paired"] == "True"


def test_declared_values_override_sysfs(tmp_path, sysroot):
    """A kind node declares topology the machine doesn't have: declared pciRoot/numaNode win."""
    raw = config(tmp_path, sysroot)
    raw["gpus"][3] |= {"pciRoot": "0000:b6", "numaNode": 1}
    inv = discover(from_mapping(raw))
    assert {p.gpu: p.disk for p in pair(inv.gpus, inv.disks)}[3] == "ssd-b"


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has an NVIDIA GPU")
def test_no_nvml_means_no_gpus(tmp_path, sysroot):
    """Without NVML (no driver here) and no declared GPUs the node reports no GPUs and no pairs."""
    raw = config(tmp_path, sysroot)
    del raw["gpus"]
    inv = discover(from_mapping(raw))
    assert inv.gpus == () and pair(inv.gpus, inv.disks) == []
