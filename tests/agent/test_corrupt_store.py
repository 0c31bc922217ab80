"""A staged model corrupted on disk while the agent was down (bytes flipped, same size) is found when the
agent starts again: it is removed, the log names the file, and the model is staged again, whole and verified."""

from __future__ import annotations

from kubeflash_node.store.format import STAMP, verify

from agent_harness import model_id, staging_leftovers


def _flip(path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_model_is_restaged_on_start(tmp_path, tiny_models, agents):
    """Staged and stamped; a layer flipped; the next start drops it (naming the file) and stages it again."""
    uri = str(tiny_models / "tiny-c")
    disk = tmp_path / "ssd0"
    config = {"disks": [{"name": "ssd0", "path": str(disk)}], "allowedSourceRoots": [str(tiny_models)],
              "models": [uri]}
    mid = model_id(uri)
    first = agents(config)
    assert first.run_once() == 0, first.log()
    model = disk / "models" / mid
    assert (model / STAMP).is_file()  # verified at staging, so the pod's first load need not re-read it
    layer = model / "layer_001.bin"
    size, ino = layer.stat().st_size, layer.stat().st_ino
    _flip(layer, size // 2)

    again = agents(config).start()
    row = again.wait_model(mid)
    assert row["state"] == "Ready"
    assert f"{layer}: sha256" in again.log_path.read_text()
    assert layer.stat().st_ino != ino  # a fresh copy, not the corrupt file
    verify(model)
    assert staging_leftovers(disk) == []
