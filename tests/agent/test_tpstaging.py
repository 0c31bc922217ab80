"""The node agent stages tensor-parallel shards onto each GPU<->SSD pair's own disk.

A real `kubeflash agent` process (no cluster) with two declared GPUs and two disks (tmp directories standing for
two SSDs, so GPU 0 pairs with ssd0 and GPU 1 with ssd1) is asked for a tiny real Llama with tensorParallel 2: it
stages the model as usual, then cuts shard k onto pair k's disk (`<disk>/shards/<id>.tp2/<k>`), reports each
shard in its status (rank, GPU, disk, path, Ready, bytes), and the shards are verified stores that reassemble to
the staged model's tensors byte for byte. Resumable: after a restart with one shard deleted and the scratch
directory a killed cut leaves, the intact shard is kept (same inode), the missing one is cut again, the scratch
is gone. More shards than pairs is reported naming both numbers. The shard worker killed with SIGKILL in the
middle publishes nothing half-written, and the next run completes the set; a shard cut from an older manifest
is replaced while the other is kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.tpshards import check_shard, merge_shards

from agent_harness import ENV, REPO, model_id, wait_for, write_tiny_llama

GPUS = [{"index": i, "name": "H100", "memory": "80Gi"} for i in range(2)]


def _config(tmp_path: Path, uri: str, tp: int, roots: list[str]) -> dict:
    return {"gpus": GPUS, "disks": [{"name": f"ssd{i}", "path": str(tmp_path / f"ssd{i}")} for i in range(2)],
            "allowedSourceRoots": roots, "models": [{"uri": uri, "dtype": "float32", "tensorParallel": tp}]}


def _wait_shards(agent, mid: str, n: int) -> dict:
    box = {}

    def ready():
        row = agent.models().get(mid)
        box["row"] = row
        return row is not None and len(row.get("shards", [])) == n and all(s["state"] == "Ready" for s in row["shards"])

    wait_for(ready, 180, what=f"{n} shards of {mid} Ready (last: {box})", log=agent.log)
    return box["row"]


def _stage_tensors(model_dir: Path) -> list[dict]:
    from kubeflash_node.store.convert import StoreSource

    src = StoreSource(model_dir)
    n = len(src.m.stages)
    return [src.embed() if i == 0 else src.head() if i == n - 1 else src.layer(i - 1) for i in range(n)]


def test_agent_stages_shards_on_each_pairs_disk(tmp_path, tiny_models, agents):
    uri = str(tiny_models / "tiny-a")
    mid = model_id(uri, "float32")
    agent = agents(_config(tmp_path, uri, 2, [str(tiny_models)])).start()
    row = _wait_shards(agent, mid, 2)
    assert row["tensorParallel"] == 2 and row["state"] == "Ready"
    model_dir = Path(tmp_path / row["disk"] / "models" / mid)
    paths = []
    for k, s in enumerate(row["shards"]):
        want = tmp_path / f"ssd{k}" / "shards" / f"{mid}.tp2" / str(k)
        assert (s["rank"], s["gpu"], s["disk"], Path(s["path"]), s["progress"]) == (k, k, f"ssd{k}", want, 100.0)
        assert s["bytes"] > 0
        check_shard(want, model_dir=model_dir, rank=k, world=2)  # sha256 of every file, cut from this manifest
        paths.append(want)
    merged = merge_shards(paths)
    for got, orig in zip(merged, _stage_tensors(model_dir), strict=True):
        assert got.keys() == orig.keys()
        for name in orig:
            assert torch.equal(got[name], orig[name]), name
    assert not any((tmp_path / f"ssd{k}" / "models" / f"{mid}.tp2").exists() for k in range(2))  # not a model

    # resume: shard 0 kept as is, shard 1 deleted, a killed cut's scratch left beside it
    assert agent.stop() == 0
    keep = (paths[0] / "manifest.json").stat().st_ino
    import shutil

    shutil.rmtree(paths[1])
    scratch = paths[1].parent / ".staging-1-killed"
    scratch.mkdir()
    (scratch / "layer_0000").write_bytes(b"half")
    again = agents(_config(tmp_path, uri, 2, [str(tiny_models)])).start()
    _wait_shards(again, mid, 2)
    assert (paths[0] / "manifest.json").stat().st_ino == keep
    check_shard(paths[1], model_dir=model_dir, rank=1, world=2)
    assert not scratch.exists()



def test_more_shards_than_pairs_is_reported(tmp_path, tiny_models, agents):
    uri = str(tiny_models / "tiny-b")
    mid = model_id(uri, "float32")
    agent = agents(_config(tmp_path, uri, 4, [str(tiny_models)])).start()
    box = {}

    def reported():
        box["row"] = agent.models().get(mid)
        return box["row"] is not None and "message" in box["row"] and box["row"]["state"] == "Ready"

    wait_for(reported, 120, what=f"{mid} Ready with a message (last: {box})", log=agent.log)
    assert box["row"]["message"].startswith("tensorParallel 4: this node has 2 GPU<->SSD pairs")
    assert box["row"]["shards"] == []
    assert not (tmp_path / "ssd0" / "shards" / f"{mid}.tp4").exists()


def test_killed_shard_worker_leaves_nothing_half_written(tmp_path):
    """The worker itself, SIGKILLed after its first progress event: no shard directory under its final name; the
    next run cuts both shards and removes the scratch. (Skipped in the rare case the cut finished first.)"""
    from kubeflash_node.store.convert import convert

    src = write_tiny_llama(tmp_path / "hf", hidden=256, layers=8)
    model_dir = tmp_path / "ssd0" / "models" / "m"
    convert(str(src), model_dir, dtype="float32")
    paths = [tmp_path / f"ssd{k}" / "shards" / "m.tp2" / str(k) for k in range(2)]
    req = json.dumps({"model": str(model_dir), "world": 2,
                      "targets": [{"rank": k, "path": str(p), "disk": f"ssd{k}"} for k, p in enumerate(paths)]})
    cmd = [sys.executable, "-m", "kubeflash_node.agent.tpstaging", req]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    if proc.returncode != -signal.SIGKILL or all(p.exists() for p in paths):
        pytest.skip("the cut finished before the kill landed")
    assert not any(p.exists() for p in paths), "a shard was published by a killed cut"
    assert any(p.parent.exists() and any(p.parent.glob(".staging-*")) for p in paths)  # its scratch
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, check=True).stdout
    events = [json.loads(x) for x in out.splitlines()]
    assert sorted(e["rank"] for e in events if e["event"] == "shard") == [0, 1] and events[-1]["event"] == "done"
    for k, p in enumerate(paths):
        check_shard(p, model_dir=model_dir, rank=k, world=2)
        assert not list(p.parent.glob(".staging-*"))
    assert load_manifest(paths[0]).total_bytes < load_manifest(model_dir).total_bytes

    # a shard cut from another version of the model is replaced; the other is kept
    man = json.loads((paths[0] / "manifest.json").read_text())
    man["extra"]["tensor_parallel"]["source_manifest_sha256"] = "0" * 64
    (paths[0] / "manifest.json").write_text(json.dumps(man))
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, check=True).stdout
    reused = {e["rank"]: e["reused"] for e in map(json.loads, out.splitlines()) if e["event"] == "shard"}
    assert reused == {0: False, 1: True}
    check_shard(paths[0], model_dir=model_dir, rank=0, world=2)
