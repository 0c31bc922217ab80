"""Bandwidth probes: bounded, O_DIRECT where possible (buffered elsewhere), cached so restarts skip them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kubeflash_node.agent.probe import probe_disk

from agent_harness import ENV, REPO


def test_probe_cached_across_restarts(tmp_path, agents):
    """The first start probes each disk and records it in probe.json; the second start reuses it."""
    disk = tmp_path / "ssd0"
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}],
                    "probe": {"enabled": True, "maxBytes": "16Mi", "maxSeconds": 1}})
    assert agent.run_once() == 0, agent.log()
    assert agent.run_once() == 0, agent.log()
    assert agent.log().count('"msg": "probed disk"') == 1
    cache = json.loads((disk / "probe.json").read_text())["entries"]
    (key, entry), = [(k, v) for k, v in cache.items() if k.startswith("disk:")]  # a GPU machine adds gpu: entries
    assert key.startswith("disk:ssd0:") and entry["method"] in ("direct", "buffered") and entry["read_gbps"] > 0
    row = json.loads((disk / "status.json").read_text())["disks"][0]
    assert row["readGBps"] > 0 and row["writeGBps"] > 0
    assert not list(disk.glob(".probe-*"))


def test_probe_is_bounded_on_tmpfs(small_disk):
    """On a small tmpfs (O_DIRECT only on Linux >= 6.6, else buffered + fsync + page-cache drop) the probe
    stays within its time budget and uses at most a quarter of the free space."""
    disk = small_disk(64)
    t0 = time.monotonic()
    result = probe_disk(disk, max_bytes=1 << 30, max_seconds=1.0)
    assert time.monotonic() - t0 < 3
    assert result.method in ("direct", "buffered") and result.bytes <= 16 << 20
    assert result.read_gbps > 0 and result.write_gbps > 0


def test_probe_skipped_on_a_full_disk(small_disk):
    """Without room for even one 4 MiB block the probe is skipped, not failed."""
    disk = small_disk(8)
    (disk / "fill").write_bytes(b"\0" * (7 << 20))
    assert probe_disk(disk, max_bytes=256 << 20, max_seconds=1).method == "skipped"


def _cuda() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True, env=ENV)
    return r.stdout.strip() == "True"


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")
def test_gpu_probe():
    """The torch subprocess reports host<->device bandwidth for every GPU."""
    r = subprocess.run([sys.executable, "-m", "kubeflash_node.agent.gpuprobe", "--bytes", str(64 << 20)],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300, check=True)
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows and all(row["h2dGBps"] > 1 and row["d2hGBps"] > 1 for row in rows)
