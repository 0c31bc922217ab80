"""A model pinned by the CSI driver (a model volume is mounted) is never evicted by a real agent: with room for
two models and a third to stage, the agent evicts the next least recently used model instead. The same run
without the pin evicts the pinned one, so the pin is what protects it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeflash_node.agent.fsutil import tree_bytes
from kubeflash_node.agent.space import estimate_store_bytes
from kubeflash_node.store import pins
from kubeflash_node.store.convert import config_from_hf, convert

from agent_harness import model_id, write_tiny_llama


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("pin-src")
    uris = [str(write_tiny_llama(root / n, vocab=4096, hidden=64, seed=i)) for i, n in enumerate("abc")]
    probe = tmp_path_factory.mktemp("pin-measure") / "m"
    convert(uris[0], probe)
    need = estimate_store_bytes(config_from_hf(json.loads(Path(uris[0], "config.json").read_text())), "float16")
    return root, uris, 2 * tree_bytes(probe) + need // 2 + (96 << 10)


def _config(tmp_path: Path, root: Path, capacity: int, models: list[str]) -> dict:
    return {"disks": [{"name": "ssd0", "path": str(tmp_path / "ssd0"), "capacity": capacity}],
            "stateDir": str(tmp_path / "state"), "allowedSourceRoots": [str(root)], "models": models}


def _staged(tmp_path: Path) -> set[str]:
    return set(json.loads((tmp_path / "ssd0" / "catalog.json").read_text())["models"])


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "control"])
def test_pinned_model_is_not_evicted(tmp_path, three, agents, pinned):
    root, (a, b, c), capacity = three
    first = agents(_config(tmp_path, root, capacity, [a, b]))  # A is staged first: the least recently used
    assert first.run_once() == 0, first.log()
    assert _staged(tmp_path) == {model_id(a), model_id(b)}
    if pinned:
        pins.pin(tmp_path / "ssd0", model_id(a), pins.holder_name("volume", "csi-test-volume"))
    second = agents(_config(tmp_path, root, capacity, [a, b, c]))
    second.run_once()  # exit 3: the evicted model is still wanted and no longer fits (reported as Failed)
    expected = {model_id(a), model_id(c)} if pinned else {model_id(b), model_id(c)}
    assert _staged(tmp_path) == expected
