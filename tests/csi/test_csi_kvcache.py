"""The prefix KV cache volume (attribute kubeflash.io/kv-cache) through the real CSI socket with real mounts: a
pod gets its namespace's cache of one model read-write, a block written through one pod's mount is a verified
hit through the next pod's mount after the first is gone, another namespace sees none of it, the cache outlives
the pods, a planted symlink is refused, and the published state survives a killed plugin."""

from __future__ import annotations

import signal

import grpc
import pytest

from kubeflash_node.csi import mounts
from kubeflash_node.store.kvblocks import KVBlockStore, scoped_root

MODEL = "tiny-0123456789abcdef"
CACHE = "kubeflash.io/kv-cache"
NS = "csi.storage.k8s.io/pod.namespace"
KEY = "ab" * 32

pytestmark = pytest.mark.csi


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def _store(path) -> KVBlockStore:
    return KVBlockStore(path, budget_bytes=64 << 20)


def test_second_pod_of_a_namespace_hits_the_block_the_first_wrote(driver):
    t1, t2, other = driver.target("c1"), driver.target("c2"), driver.target("c3")
    driver.publish("vol-c1", t1, {CACHE: MODEL, NS: "team-a", "csi.storage.k8s.io/ephemeral": "true"})
    driver.publish("vol-c1", t1, {CACHE: MODEL, NS: "team-a"})  # idempotent
    m = mounts.mounted_at(t1)
    assert m is not None and not m.read_only
    root = scoped_root(driver.disk, "team-a", MODEL)
    st = root.stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)  # the engine's user adds blocks
    payload = bytes(range(256)) * 64
    assert _store(t1).put(KEY, payload, {"shape": [64, 256]})
    driver.unpublish("vol-c1", t1)
    assert not t1.exists() and mounts.mounted_at(t1) is None
    assert (root / "blocks" / KEY[:2] / f"{KEY}.kvb").is_file()  # the cache outlives the pod

    driver.publish("vol-c2", t2, {CACHE: MODEL, NS: "team-a"})
    got = _store(t2).get(KEY)
    assert got is not None and bytes(got[1]) == payload and got[0] == {"shape": [64, 256]}
    driver.publish("vol-c3", other, {CACHE: MODEL, NS: "team-b"})  # another namespace: its own, empty cache
    assert _store(other).get(KEY) is None
    assert not (scoped_root(driver.disk, "team-b", MODEL) / "blocks" / KEY[:2]).exists()
    driver.unpublish("vol-c2", t2)
    driver.unpublish("vol-c3", other)
    assert driver.mounted_under_root() == []


BAD = [
    ("no-namespace", {CACHE: MODEL}, False, grpc.StatusCode.INVALID_ARGUMENT, "pod.namespace"),
    ("bad-model", {CACHE: "../x", NS: "a"}, False, grpc.StatusCode.INVALID_ARGUMENT, CACHE),
    ("read-only", {CACHE: MODEL, NS: "a"}, True, grpc.StatusCode.INVALID_ARGUMENT, "readOnly"),
    ("with-job", {CACHE: MODEL, "kubeflash.io/job": "j", NS: "a"}, False, grpc.StatusCode.INVALID_ARGUMENT,
     "exclude"),
]


@pytest.mark.parametrize("ctx,ro,code,named", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_cache_requests_name_the_attribute(driver, ctx, ro, code, named):
    target = driver.target("bad")
    got, msg = _code(lambda: driver.publish("vol-bad", target, ctx, readonly=ro))
    assert got == code and named in msg, msg
    assert not target.exists() and driver.mounted_under_root() == []


def test_a_symlinked_namespace_directory_is_refused(driver):
    (driver.disk / "kvcache" / "ns").mkdir(parents=True)
    (driver.disk / "kvcache" / "ns" / "team-a").symlink_to(driver.root)  # would lead out of the store
    target = driver.target("c")
    code, msg = _code(lambda: driver.publish("vol-c", target, {CACHE: MODEL, NS: "team-a"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and CACHE in msg and "not a directory" in msg
    assert not (driver.root / MODEL).exists()
    assert not target.exists() and driver.mounted_under_root() == []


def test_cache_volume_survives_a_killed_plugin(driver):
    target = driver.target("c")
    ctx = {CACHE: MODEL, NS: "team-a"}
    driver.publish("vol-c", target, ctx)
    driver.stop(signal.SIGKILL)
    driver.start()
    driver.publish("vol-c", target, ctx)  # the restarted plugin knows the volume: still idempotent
    code, _ = _code(lambda: driver.publish("vol-c", driver.target("d"), {CACHE: MODEL, NS: "team-b"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS  # same id, other namespace
    driver.unpublish("vol-c", target)
    assert driver.mounted_under_root() == [] and not target.exists()
