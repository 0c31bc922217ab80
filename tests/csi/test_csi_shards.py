"""Tensor-parallel shard volumes through the real CSI socket with real mounts (docs/multi-gpu.md): a model id with
kubeflash.io/shard <k> and kubeflash.io/tensor-parallel <N> publishes shards/<id>.tp<N>/<k> read-only, pins the
model on that disk while mounted; a shard that is not staged, or a directory holding another rank, is
FAILED_PRECONDITION; bad shard attributes are INVALID_ARGUMENT naming the attribute."""

from __future__ import annotations

import errno
import filecmp
import os

import grpc
import numpy as np
import pytest
from conftest import MODEL
from test_csi_node import _code, _nothing_left

from kubeflash_node.csi import mounts
from kubeflash_node.store import pins
from kubeflash_node.store.format import Manifest, ModelWriter

pytestmark = pytest.mark.csi
MID, SHARD, TP = "kubeflash.io/model-id", "kubeflash.io/shard", "kubeflash.io/tensor-parallel"


def write_shard(disk, rank: int, world: int, *, claims: int | None = None):
    """A shard store as the agent cuts it: a complete store whose manifest names its rank (extra.tensor_parallel)."""
    w = ModelWriter(disk / "shards" / f"{MODEL}.tp{world}" / str(rank))
    rng = np.random.default_rng(rank)
    layer = w.add_stage("layer_000", [("w", rng.standard_normal((64, 32)).astype(np.float16), "float16")])
    return w.publish(Manifest(architecture="llama", config={"num_layers": 1}, dtype="float16",
                              files={"layer_000": layer}, stages=["layer_000"],
                              extra={"tensor_parallel": {"rank": rank if claims is None else claims, "world": world}}))


def test_shard_volumes_are_read_only_binds_pinned_while_mounted(driver):
    src = [write_shard(driver.disk, k, 2) for k in (0, 1)]
    targets = [driver.target(f"shard-{k}") for k in (0, 1)]
    for k in (0, 1):
        ctx = {MID: MODEL, SHARD: str(k), TP: "2", "kubeflash.io/disk": "d0", "csi.storage.k8s.io/ephemeral": "true"}
        driver.publish(f"vol-shard-{k}", targets[k], ctx)
        driver.publish(f"vol-shard-{k}", targets[k], ctx)  # idempotent
    for k in (0, 1):
        assert sorted(os.listdir(targets[k])) == sorted(os.listdir(src[k]))
        assert filecmp.cmp(targets[k] / "layer_000", src[k] / "layer_000", shallow=False)
        m = mounts.mounted_at(targets[k])
        assert m is not None and m.read_only
        with pytest.raises(OSError) as e:
            (targets[k] / "new").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
    assert not filecmp.cmp(targets[0] / "layer_000", targets[1] / "layer_000", shallow=False)  # each its own rank
    assert pins.pinned(driver.disk) == {MODEL}
    code, msg = _code(lambda: driver.publish("vol-shard-0", driver.target("other"), {MID: MODEL, SHARD: "1", TP: "2"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS and f"{SHARD}=0 of 2" in msg
    driver.unpublish("vol-shard-0", targets[0])
    assert pins.pinned(driver.disk) == {MODEL}  # shard 1 still mounted
    driver.unpublish("vol-shard-1", targets[1])
    assert pins.pinned(driver.disk) == set()
    for t in targets:
        _nothing_left(driver, t)


def test_unstaged_or_wrong_shard_is_failed_precondition(driver):
    target = driver.target("s")
    code, msg = _code(lambda: driver.publish("v", target, {MID: MODEL, SHARD: "1", TP: "2"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and SHARD in msg and "not staged" in msg
    write_shard(driver.disk, 0, 2)
    code, msg = _code(lambda: driver.publish("v", target, {MID: MODEL, SHARD: "0", TP: "4"}))  # cut into 2, not 4
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "shard 0 of 4" in msg
    write_shard(driver.disk, 1, 2, claims=0)  # rank 1's directory holding rank 0's shard
    code, msg = _code(lambda: driver.publish("v", target, {MID: MODEL, SHARD: "1", TP: "2"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not shard 1 of 2" in msg
    half = driver.disk / "shards" / f"{MODEL}.tp3" / "2"
    half.mkdir(parents=True)  # a directory without manifest.json is not a staged shard
    code, msg = _code(lambda: driver.publish("v", target, {MID: MODEL, SHARD: "2", TP: "3"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "manifest.json" in msg
    assert pins.pinned(driver.disk) == set()
    _nothing_left(driver, target)


@pytest.mark.parametrize("ctx,named", [
    ({MID: MODEL, SHARD: "0"}, TP),
    ({MID: MODEL, SHARD: "2", TP: "2"}, SHARD),
    ({MID: MODEL, SHARD: "-1", TP: "2"}, SHARD),
    ({MID: MODEL, SHARD: "0", TP: "9"}, TP),
    ({MID: MODEL, SHARD: "0", TP: "1"}, TP),
    ({"kubeflash.io/kv-size": "16Mi", SHARD: "0", TP: "2"}, SHARD),
], ids=["no-tp", "rank-too-big", "negative", "tp-too-big", "tp-one", "with-kv"])
def test_bad_shard_attributes_are_invalid_argument_naming_the_attribute(driver, ctx, named):
    target = driver.target("bad")
    code, msg = _code(lambda: driver.publish("v", target, ctx))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in msg
    _nothing_left(driver, target)
