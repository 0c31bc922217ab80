"""A disk that fills up: a clear Failed status, no partial model, the space given back, the agent healthy.

Uses a real small tmpfs (mount needs root / CAP_SYS_ADMIN; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubeflash_node.agent.fsutil import tree_bytes

from agent_harness import LOOPBACK_HTTP, FileServer, make_tar, model_id, staging_leftovers, write_tiny_llama


@pytest.fixture
def big_model(tmp_path) -> Path:
    """A tiny-architecture llama with a wide vocabulary: ~17 MB of float32 safetensors."""
    return write_tiny_llama(tmp_path / "src" / "wide", vocab=32768, hidden=64)


def test_enospc_mid_download(tmp_path, small_disk, big_model, agents):
    """A download of unknown size (no Content-Length) overflows an 8 MiB disk: Failed 'no space left',
    no model directory, staging area removed, the disk empty again."""
    disk = small_disk(8)
    www = tmp_path / "www"
    www.mkdir()
    make_tar(big_model, www / "wide.tar")
    with FileServer(www, content_length=False) as server:
        uri = f"{server.url}/wide.tar"
        agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "small", "path": str(disk)}], "stateDir": str(tmp_path / "state"),
                        "models": [uri], "retryInterval": 3600}).start()
        row = agent.wait_model(model_id(uri), states=("Failed",), timeout=60)
    assert "no space left on the disk during download" in row["message"]
    assert not (disk / "models" / model_id(uri)).exists() and staging_leftovers(disk) == []
    assert tree_bytes(disk) < 64 << 10
    assert agent.get("/healthz")[0] == 200
    assert 'kubeflash_agent_staging_failures_total{kind="nospace"} 1.0' in agent.get("/metrics")[1]


def test_refused_when_it_cannot_fit(tmp_path, small_disk, big_model, agents):
    """A model larger than the disk's free space (nothing evictable) is refused before any write, saying
    how much it needs and how much there is."""
    disk = small_disk(20)
    (disk / "ballast").write_bytes(os.urandom(8 << 20))
    uri = str(big_model)
    agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "small", "path": str(disk)}], "stateDir": str(tmp_path / "state"),
                    "allowedSourceRoots": [str(big_model.parent)], "models": [{"uri": uri, "dtype": "float32"}],
                    "retryInterval": 3600}).start()
    mid = model_id(uri, "float32")
    row = agent.wait_model(mid, states=("Failed",), timeout=60)
    assert row["message"].startswith("does not fit on disk small: convert needs ~")
    assert "free and 0 B in unused models" in row["message"]
    assert not (disk / "models" / mid).exists() and staging_leftovers(disk) == []
    conditions = {c["type"]: c for c in agent.inventory()["status"]["conditions"]}
    assert conditions["ModelsReady"]["reason"] == "StagingFailed"


def test_fake_capacity_caps_free_space(tmp_path, tiny_models, agents):
    """A declared capacity (a kind node's fake disk) limits staging like a real small disk would."""
    disk = tmp_path / "fake"
    uri = str(tiny_models / "tiny-a")
    agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "fake", "path": str(disk), "capacity": "100Ki"}],
                    "stateDir": str(tmp_path / "state"), "allowedSourceRoots": [str(tiny_models)],
                    "models": [uri], "retryInterval": 3600}).start()
    row = agent.wait_model(model_id(uri), states=("Failed",), timeout=60)
    assert "does not fit on disk fake" in row["message"]
    disks = agent.inventory()["status"]["disks"]
    assert disks[0]["capacityBytes"] == 100 << 10 and disks[0]["freeBytes"] <= 100 << 10
