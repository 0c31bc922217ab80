"""Eviction by a real agent on a disk with room for two models: the right one goes, in-use ones never."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeflash_node.agent.fsutil import tree_bytes
from kubeflash_node.agent.space import estimate_store_bytes
from kubeflash_node.store.convert import config_from_hf, convert

from agent_harness import model_id, wait_for, write_tiny_llama


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three same-shaped models (~1.2 MB staged each) and a capacity that holds two but not a third's need."""
    root = tmp_path_factory.mktemp("evict-src")
    uris = [str(write_tiny_llama(root / n, vocab=4096, hidden=64, seed=i)) for i, n in enumerate("abc")]
    probe = tmp_path_factory.mktemp("measure") / "m"
    convert(uris[0], probe)
    size = tree_bytes(probe)
    need = estimate_store_bytes(config_from_hf(json.loads(Path(uris[0], "config.json").read_text())), "float16")
    assert need > size  # the estimate is an upper bound
    return root, uris, 2 * size + need // 2 + (96 << 10)


def base_config(tmp_path: Path, root: Path, capacity: int, models: list[str], **more) -> dict:
    return {"disks": [{"name": "ssd0", "path": str(tmp_path / "ssd0"), "capacity": capacity}],
            "stateDir": str(tmp_path / "state"), "allowedSourceRoots": [str(root)], "models": models, **more}


def catalog(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "ssd0" / "catalog.json").read_text())["models"]


def test_in_use_model_is_never_evicted(tmp_path, three, agents):
    """A (oldest) is read by a running job, so staging C evicts B; B is still wanted and shows Evicted
    (it may come back only without pushing out another wanted model).

    B is retried every retryInterval (1 s here) and each retry finds no room: the test waits until one such
    retry has been answered, and B's status must still say why it was evicted. (It once failed under CPU load:
    C took longer than the retry interval, and B's message had become only the retry's "does not fit".)"""
    root, (a, b, c), capacity = three
    agent = agents(base_config(tmp_path, root, capacity, [a, b, c],
                               jobs=[{"namespace": "default", "name": "uses-a", "model": a, "quota": "8Ki"}])).start()
    agent.wait_model(model_id(c))

    def b_retried():
        row = agent.models().get(model_id(b))
        return row if row and row["state"] == "Evicted" and "(last try:" in row.get("message", "") else None

    row_b = wait_for(b_retried, 120, what="B Evicted after a retry that did not fit", log=agent.log)
    assert f"to make room for {model_id(c)}" in row_b["message"]
    assert "does not fit on disk ssd0" in row_b["message"]
    assert set(catalog(tmp_path)) == {model_id(a), model_id(c)}
    assert not (tmp_path / "ssd0" / "models" / model_id(b)).exists()
    assert 'kubeflash_agent_evictions_total{disk="ssd0"} 1.0' in agent.get("/metrics")[1]


def test_unwanted_models_go_before_least_recently_used(tmp_path, three, agents):
    """B is staged before A (older), then only B and C are wanted: C's room comes from A (not wanted any
    more) even though B was used less recently."""
    root, (a, b, c), capacity = three
    first = agents(base_config(tmp_path, root, capacity, [b, a]))
    assert first.run_once() == 0, first.log()
    assert set(catalog(tmp_path)) == {model_id(a), model_id(b)}
    second = agents(base_config(tmp_path, root, capacity, [b, c]))
    assert second.run_once() == 0, second.log()
    assert set(catalog(tmp_path)) == {model_id(b), model_id(c)}
