"""The CSI node plugin through its real gRPC socket with real mounts: Identity, NodeGetInfo, model volumes
(read-only bind of a staged model, pinned while mounted), KV volumes (a sized loop-mounted ext4: writing past
the size gives ENOSPC), job volumes, the error codes the CSI spec prescribes for bad input with messages that
name the attribute, idempotency, and recovery of the published state after the plugin is killed."""

from __future__ import annotations

import errno
import filecmp
import os
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from kubeflash_node.csi import mounts
from kubeflash_node.csi.pb import csi_pb2 as pb
from kubeflash_node.csi.pb import registration_pb2 as rpb
from kubeflash_node.csi.pb import registration_pb2_grpc as rpb_grpc
from kubeflash_node.store import pins

MODEL = "tiny-0123456789abcdef"  # the model conftest.write_model stages

pytestmark = pytest.mark.csi
KV = "kubeflash.io/kv-size"
MID = "kubeflash.io/model-id"


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def _nothing_left(driver, target: Path) -> None:
    assert not target.exists(), f"{target} left behind"
    assert driver.mounted_under_root() == []
    assert list((driver.disk / "csi" / "volumes").glob("*.json")) == [] if (driver.disk / "csi" / "volumes").exists() \
        else True
    kv = driver.disk / "csi" / "kv"
    assert not kv.exists() or list(kv.iterdir()) == []


def test_identity_and_node_info(driver):
    ident = driver.identity()
    assert ident.GetPluginInfo(pb.GetPluginInfoRequest()).name == "kubeflash.io"
    assert ident.Probe(pb.ProbeRequest()).ready.value is True
    info = driver.node().NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-a"
    assert dict(info.accessible_topology.segments) == {"topology.kubeflash.io/node": "node-a"}
    caps = driver.node().NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [pb.NodeServiceCapability.RPC.GET_VOLUME_STATS]
    # the probe reflects the store: a store disk that is gone makes the plugin not ready
    os.rename(driver.disk, driver.root / "away")
    try:
        assert ident.Probe(pb.ProbeRequest()).ready.value is False
    finally:
        os.rename(driver.root / "away", driver.disk)
    assert ident.Probe(pb.ProbeRequest()).ready.value is True


def test_registration_socket_tells_the_kubelet_the_endpoint(driver):
    stub = rpb_grpc.RegistrationStub(grpc.insecure_channel(f"unix://{driver.registry}/kubeflash.io-reg.sock"))
    info = stub.GetInfo(rpb.InfoRequest())
    assert (info.type, info.name, info.endpoint) == ("CSIPlugin", "kubeflash.io", str(driver.socket))
    assert "1.0.0" in info.supported_versions
    stub.NotifyRegistrationStatus(rpb.RegistrationStatus(plugin_registered=True))


def test_model_volume_is_a_read_only_bind_pinned_while_mounted(driver):
    target = driver.target("model")
    driver.publish("vol-model", target, {MID: MODEL, "csi.storage.k8s.io/ephemeral": "true"})
    driver.publish("vol-model", target, {MID: MODEL})  # idempotent
    src = driver.disk / "models" / MODEL
    assert sorted(os.listdir(target)) == sorted(os.listdir(src))
    assert filecmp.cmp(target / "layer_000", src / "layer_000", shallow=False)
    m = mounts.mounted_at(target)
    assert m is not None and m.read_only
    with pytest.raises(OSError) as e:
        (target / "new").write_bytes(b"x")
    assert e.value.errno == errno.EROFS
    assert pins.pinned(driver.disk) == {MODEL}
    st = driver.node().NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="vol-model", volume_path=str(target)))
    assert st.usage[0].unit == pb.VolumeUsage.BYTES and st.usage[0].total > 0
    driver.unpublish("vol-model", target)
    driver.unpublish("vol-model", target)  # idempotent
    assert pins.pinned(driver.disk) == set()
    _nothing_left(driver, target)


def test_model_not_staged_or_incomplete_is_failed_precondition(driver):
    target = driver.target("m2")
    code, msg = _code(lambda: driver.publish("v", target, {MID: "other-0123456789abcdef"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and MID in msg and "not staged" in msg
    broken = driver.disk / "models" / "broken-0123456789abcdef"
    broken.mkdir()
    (broken / "embed").write_bytes(b"x")  # a directory without manifest.json is not a staged model
    code, msg = _code(lambda: driver.publish("v", target, {MID: broken.name}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "manifest.json" in msg
    assert pins.pinned(driver.disk) == set()
    _nothing_left(driver, target)


BAD = [
    ("dotdot", {MID: "../models"}, grpc.StatusCode.INVALID_ARGUMENT, MID),
    ("slash", {MID: "a/b"}, grpc.StatusCode.INVALID_ARGUMENT, MID),
    ("absolute", {MID: "/etc"}, grpc.StatusCode.INVALID_ARGUMENT, MID),
    ("upper", {MID: "Tiny"}, grpc.StatusCode.INVALID_ARGUMENT, MID),
    ("empty-id", {MID: ""}, grpc.StatusCode.INVALID_ARGUMENT, MID),
    ("unknown-attr", {MID: MODEL, "kubeflash.io/modle": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "kubeflash.io/modle"),
    ("two-kinds", {MID: MODEL, KV: "1Gi"}, grpc.StatusCode.INVALID_ARGUMENT, KV),
    ("size-word", {KV: "lots"}, grpc.StatusCode.INVALID_ARGUMENT, KV),
    ("size-tiny", {KV: "1Ki"}, grpc.StatusCode.INVALID_ARGUMENT, KV),
    ("size-huge", {KV: "1Pi"}, grpc.StatusCode.RESOURCE_EXHAUSTED, KV),
    ("bad-disk", {KV: "32Mi", "kubeflash.io/disk": "nvme9"}, grpc.StatusCode.INVALID_ARGUMENT, "kubeflash.io/disk"),
    ("job-no-ns", {"kubeflash.io/job": "j1"}, grpc.StatusCode.INVALID_ARGUMENT, "pod.namespace"),
    ("no-attributes", {}, grpc.StatusCode.NOT_FOUND, MID),
]


@pytest.mark.parametrize("context,code,names", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_attributes_get_the_spec_code_and_name_the_attribute(driver, context, code, names):
    target = driver.target("bad")
    got, msg = _code(lambda: driver.publish("vol-bad", target, context))
    assert got == code, msg
    assert names in msg
    _nothing_left(driver, target)


def test_bad_requests(driver):
    outside = driver.root / "elsewhere" / "mount"
    outside.parent.mkdir()
    code, msg = _code(lambda: driver.publish("v", outside, {MID: MODEL}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside the kubelet pods directory" in msg
    sneaky = driver.pods / ".." / "elsewhere" / "mount"
    assert _code(lambda: driver.publish("v", sneaky, {MID: MODEL}))[0] == grpc.StatusCode.INVALID_ARGUMENT
    target = driver.target("b")
    code, msg = _code(lambda: driver.publish("v", target, {MID: MODEL}, block=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "block" in msg
    code, msg = _code(lambda: driver.publish("v", target, {KV: "32Mi"}, readonly=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and KV in msg
    assert not outside.exists()
    _nothing_left(driver, target)


def test_same_volume_with_other_arguments_is_already_exists(driver):
    t1, t2 = driver.target("a1"), driver.target("a2")
    driver.publish("vol-a", t1, {KV: "32Mi"})
    code, msg = _code(lambda: driver.publish("vol-a", t2, {KV: "64Mi"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS and KV in msg
    assert not t2.exists()
    code, _ = _code(lambda: driver.publish("vol-b", t1, {KV: "32Mi"}))  # t1 holds another volume
    assert code == grpc.StatusCode.ALREADY_EXISTS
    driver.unpublish("vol-a", t1)
    _nothing_left(driver, t1)


def _fill(path: Path, chunk: int = 1 << 20) -> int:
    """Write 1 MiB blocks until the file system says ENOSPC; returns the bytes written."""
    written = 0
    with pytest.raises(OSError) as e:
        with open(path, "wb") as f:
            block = os.urandom(chunk)
            while True:
                f.write(block)
                f.flush()
                os.fsync(f.fileno())
                written += chunk
                if written > 1 << 30:
                    raise AssertionError("no ENOSPC after 1 GiB")
    assert e.value.errno == errno.ENOSPC
    return written


def test_kv_volume_is_sized_enospc_past_it_and_freed_on_unpublish(driver):
    target = driver.target("kv")
    driver.publish("vol-kv", target, {KV: "64Mi"})
    m = mounts.mounted_at(target)
    assert m is not None and m.fstype == "ext4" and not m.read_only
    st = os.stat(target)
    assert (st.st_uid, st.st_gid) == (1000, 1000)  # the engine's user owns the KV root
    written = _fill(target / "kv.bin")
    assert 56 << 20 <= written <= 64 << 20, written  # ext4 keeps a few MiB of the image for itself
    images = list((driver.disk / "csi" / "kv").glob("*.img"))
    assert len(images) == 1
    assert images[0].stat().st_blocks * 512 <= 64 << 20, "the image grew past its size on the store disk"
    stats = driver.node().NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="vol-kv", volume_path=str(target)))
    b = stats.usage[0]
    assert b.total <= 64 << 20 and b.used >= written - (1 << 20) and b.available < 1 << 20
    driver.unpublish("vol-kv", target)
    assert subprocess.run(["losetup", "-j", str(images[0])], capture_output=True, text=True).stdout == ""
    _nothing_left(driver, target)


def test_kv_volumes_commit_space_so_sparse_images_cannot_overbook_the_disk(driver):
    from kubeflash_node.csi.volumes import DriverConfig, Volumes

    free = Volumes(DriverConfig("n", (("d0", driver.disk),))).kv_free("d0")
    t1, t2 = driver.target("k1"), driver.target("k2")
    half = free // 2 // (1 << 20)
    driver.publish("k1", t1, {KV: f"{half + 16}Mi"})
    code, msg = _code(lambda: driver.publish("k2", t2, {KV: f"{half + 16}Mi"}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and KV in msg
    driver.unpublish("k1", t1)
    _nothing_left(driver, t1)


def test_job_volume_binds_the_job_directory_of_the_pods_namespace(driver):
    """The job's directory in the pod's own namespace (created for the engine's user when the agent has not yet)."""
    job_dir = driver.disk / "jobs" / "team-a" / "j1"
    target = driver.target("job")
    ctx = {"kubeflash.io/job": "j1", "csi.storage.k8s.io/pod.namespace": "team-a"}
    (driver.disk / "jobs").mkdir()
    (driver.disk / "jobs" / "team-a").symlink_to(driver.root)  # a namespace directory that leads elsewhere
    assert _code(lambda: driver.publish("vol-job", target, ctx))[0] == grpc.StatusCode.FAILED_PRECONDITION
    (driver.disk / "jobs" / "team-a").unlink()
    _nothing_left(driver, target)
    driver.publish("vol-job", target, ctx)
    assert (job_dir.stat().st_uid, job_dir.stat().st_gid) == (1000, 1000)
    (target / "progress.json").write_text("{}")
    assert (job_dir / "progress.json").read_text() == "{}"
    driver.unpublish("vol-job", target)
    assert job_dir.is_dir()  # the job's directory outlives the pod; the agent removes it with the job
    _nothing_left(driver, target)


def test_stats_of_unknown_volume_or_wrong_path_is_not_found(driver):
    node = driver.node()
    code, _ = _code(lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="nope", volume_path="/x")))
    assert code == grpc.StatusCode.NOT_FOUND
    target = driver.target("s")
    driver.publish("vol-s", target, {MID: MODEL})
    code, _ = _code(lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="vol-s",
                                                                                  volume_path="some/path")))
    assert code == grpc.StatusCode.NOT_FOUND
    driver.unpublish("vol-s", target)
    _nothing_left(driver, target)


def test_state_survives_a_killed_plugin(driver):
    kv, model = driver.target("kv"), driver.target("model")
    driver.publish("vol-kv", kv, {KV: "32Mi"})
    driver.publish("vol-m", model, {MID: MODEL})
    (kv / "block").write_bytes(b"kv" * 1000)
    driver.stop(signal.SIGKILL)
    driver.start()
    # the mounts stayed; the restarted plugin knows them: publish is still idempotent, stats work
    driver.publish("vol-kv", kv, {KV: "32Mi"})
    driver.publish("vol-m", model, {MID: MODEL})
    assert (kv / "block").read_bytes() == b"kv" * 1000
    assert pins.pinned(driver.disk) == {MODEL}
    driver.node().NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="vol-kv", volume_path=str(kv)))
    code, _ = _code(lambda: driver.publish("vol-kv", kv, {KV: "64Mi"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # a target unmounted while the plugin was down is released on the next start
    driver.stop(signal.SIGKILL)
    subprocess.run(["umount", str(model)], check=True)
    driver.start()
    assert pins.pinned(driver.disk) == set()
    driver.unpublish("vol-kv", kv)
    driver.unpublish("vol-m", model)
    _nothing_left(driver, kv)
    assert not model.exists() or not os.listdir(model)
