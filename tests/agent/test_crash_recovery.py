"""kill -9 during staging: no corrupt or half-written model is ever visible, and a restart completes it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from kubeflash_node.store.format import verify

from agent_harness import LOOPBACK_HTTP, FileServer, make_tar, model_id, staging_leftovers, wait_for, worker_pids


def staging_state(agent, mid: str) -> dict:
    return agent.inventory().get("staging", {}).get(mid, {})


def assert_nothing_half_written(disk: Path, mid: str) -> None:
    """Under models/ only the staging area can hold partial data; the model's own name never does."""
    assert not (disk / "models" / mid).exists()


@pytest.fixture
def slow_tar(tmp_path, tiny_models):
    """A throttled HTTP server serving a tar of a tiny model (~1.2 MB at 256 KiB/s: ~5 s to download)."""
    from agent_harness import write_tiny_llama

    www = tmp_path / "www"
    www.mkdir()
    src = write_tiny_llama(tmp_path / "src" / "wide", vocab=2048, hidden=64)
    make_tar(src, www / "wide.tar")
    with FileServer(www, bytes_per_second=256 << 10) as server:
        yield server


def test_kill9_agent_during_download_then_restart(tmp_path, slow_tar, agents):
    """Killed mid-download: the worker dies with the agent, the next start cleans up and stages it whole."""
    disk = tmp_path / "ssd0"
    uri = f"{slow_tar.url}/wide.tar"
    mid = model_id(uri)
    config = {**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "models": [uri]}
    agent = agents(config).start()
    wait_for(lambda: staging_state(agent, mid).get("phase") == "download"
             and staging_state(agent, mid).get("percent", 0) > 5, 60, what="download under way", log=agent.log)
    workers = worker_pids(agent.proc.pid)
    assert workers, "a stage worker should be running"
    agent.kill9()
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 10, what="worker killed with agent")
    assert_nothing_half_written(disk, mid)
    assert staging_leftovers(disk), "the staging area should hold the interrupted download"
    slow_tar.rate = 0  # full speed from now on
    again = agents(config).start()
    again.wait_model(mid)
    verify(disk / "models" / mid)
    assert staging_leftovers(disk) == []


def test_kill9_agent_during_convert_then_restart(tmp_path, agents):
    """Killed while converting (dummy:opt-125m, ~250 MB in float16): the restarted agent publishes a verified
    model."""
    disk = tmp_path / "ssd0"
    uri = "dummy:opt-125m"
    mid = model_id(uri)
    config = {**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "models": [uri]}
    agent = agents(config).start()
    wait_for(lambda: staging_state(agent, mid).get("phase") == "convert"
             and staging_state(agent, mid).get("percent", 0) > 10, 120, what="conversion under way", log=agent.log)
    agent.kill9()
    assert_nothing_half_written(disk, mid)
    again = agents(config).start()
    row = again.wait_model(mid, timeout=300)
    assert row["bytes"] > 230 << 20  # 125M parameters (the head tied to the embedding, as in OPT) x 2 bytes
    verify(disk / "models" / mid)
    assert staging_leftovers(disk) == []


def test_kill9_worker_fails_then_retries(tmp_path, slow_tar, agents):
    """A stage worker killed on its own: the model goes Failed with the reason, then is retried and staged."""
    disk = tmp_path / "ssd0"
    uri = f"{slow_tar.url}/wide.tar"
    mid = model_id(uri)
    agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "models": [uri], "retryInterval": 2}).start()
    wait_for(lambda: staging_state(agent, mid).get("phase") == "download", 60, what="download", log=agent.log)
    for pid in worker_pids(agent.proc.pid):
        os.kill(pid, signal.SIGKILL)
    row = agent.wait_model(mid, states=("Failed",), timeout=30)
    assert "staging worker died (signal 9)" in row["message"]
    assert_nothing_half_written(disk, mid)
    assert staging_leftovers(disk) == []
    slow_tar.rate = 0
    agent.wait_model(mid, timeout=60)
    verify(disk / "models" / mid)


def test_catalog_and_directories_reconciled_at_start(tmp_path, tiny_models, agents):
    """After a crash the directories are the truth: a corrupt catalog is rebuilt from the staged models,
    a model directory that is not whole (its manifest gone) is removed, a whole stray one adopted."""
    import json
    import shutil

    disk = tmp_path / "ssd0"
    a, b = str(tiny_models / "tiny-a"), str(tiny_models / "tiny-b")
    config = {**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "allowedSourceRoots": [str(tiny_models)],
              "models": [a, b]}
    first = agents(config)
    assert first.run_once() == 0, first.log()
    (disk / "catalog.json").write_text("{not json")
    (disk / "models" / model_id(b) / "manifest.json").unlink()
    shutil.copytree(disk / "models" / model_id(a), disk / "models" / "stray-0123456789abcdef")
    second = agents({**config, "models": [a]})
    assert second.run_once() == 0, second.log()
    catalog = json.loads((disk / "catalog.json").read_text())["models"]
    assert set(catalog) == {model_id(a), "stray-0123456789abcdef"}  # a whole model found on disk is adopted
    assert not (disk / "models" / model_id(b)).exists()
    verify(disk / "models" / model_id(a))
