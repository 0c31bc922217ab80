"""Fixtures for the CSI tests: a real `kubeflash csi` process serving a unix socket over a temp store disk and
a temp "kubelet pods" directory, a tiny staged model written by the store's own ModelWriter, and gRPC stubs.

Everything mounts for real (bind and loop mounts), so these tests need root; they skip with the reason
otherwise. Each test leaves nothing mounted: the teardown checks /proc/self/mountinfo.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed (pip install -e '.[engine]')")

from kubeflash_node.csi import mounts  # noqa: E402
from kubeflash_node.csi.pb import csi_pb2 as pb  # noqa: E402
from kubeflash_node.csi.pb import csi_pb2_grpc as pb_grpc  # noqa: E402
from kubeflash_node.store.format import Manifest, ModelWriter  # noqa: E402

MODEL = "tiny-0123456789abcdef"


def _can_mount(tmp: Path) -> str:
    if os.geteuid() != 0:
        return "needs root (bind and loop mounts)"
    for tool in ("mount", "umount", "mkfs.ext4"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    a, b = tmp / "a", tmp / "b"
    a.mkdir(), b.mkdir()
    p = subprocess.run(["mount", "--bind", str(a), str(b)], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot mount here: {p.stderr.strip()}"
    subprocess.run(["umount", str(b)], check=True)
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control missing)"
    return ""


@pytest.fixture(scope="session")
def mount_ok(tmp_path_factory):
    why = _can_mount(tmp_path_factory.mktemp("mountcheck"))
    if why:
        pytest.skip(why)


def write_model(disk: Path, model_id: str = MODEL) -> Path:
    """A small but real store model: two stage files with tensors, checksums and manifest."""
    w = ModelWriter(disk / "models" / model_id)
    rng = np.random.default_rng(0)
    embed = w.add_stage("embed", [("embed.weight", rng.standard_normal((64, 32)).astype(np.float16), "float16")])
    layer = w.add_stage("layer_000", [("w", rng.standard_normal((256, 256)).astype(np.float16), "float16")])
    return w.publish(Manifest(architecture="llama", config={"num_layers": 1}, dtype="float16",
                              files={"embed": embed, "layer_000": layer}, stages=["embed", "layer_000"]))


@dataclass
class Driver:
    """A running `kubeflash csi` and the paths it was started with."""

    root: Path
    disk: Path
    pods: Path
    socket: Path
    registry: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> None:
        self.log = self.root / "csi.log"
        cmd = [sys.executable, "-m", "kubeflash_node.cli", "csi", f"--endpoint=unix://{self.socket}",
               f"--disk=d0={self.disk}", f"--pods-dir={self.pods}", f"--registration-dir={self.registry}",
               "--node-id=node-a", "--log-level=DEBUG"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kubeflash csi exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self.socket.exists():
                try:
                    self.identity().Probe(pb.ProbeRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"kubeflash csi did not serve {self.socket}: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def channel(self):
        return grpc.insecure_channel(f"unix://{self.socket}")

    def identity(self):
        return pb_grpc.IdentityStub(self.channel())

    def node(self):
        return pb_grpc.NodeStub(self.channel())

    def publish(self, volume_id: str, target: Path, context: dict[str, str], *, readonly: bool = False,
                block: bool = False):
        mode = pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
        cap = (pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode) if block else
               pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=mode))
        return self.node().NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=str(target), volume_capability=cap, readonly=readonly,
            volume_context=context), timeout=60)

    def unpublish(self, volume_id: str, target: Path):
        return self.node().NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(target)), timeout=60)

    def target(self, name: str) -> Path:
        """A target path like the kubelet's: pods/<uid>/volumes/kubernetes.io~csi/<name>/mount (parent exists)."""
        parent = self.pods / "uid-1" / "volumes" / "kubernetes.io~csi" / name
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def mounted_under_root(self) -> list[str]:
        return [m.target for m in mounts.mounts() if m.target.startswith(str(self.root) + "/")]


@pytest.fixture
def driver(mount_ok, tmp_path):
    d = Driver(root=tmp_path, disk=tmp_path / "store", pods=tmp_path / "pods", socket=tmp_path / "csi.sock",
               registry=tmp_path / "registry")
    d.disk.mkdir(), d.pods.mkdir()
    write_model(d.disk)
    d.start()
    yield d
    d.stop()
    left = d.mounted_under_root()
    for t in reversed(left):  # never leave a mount behind, even when the test failed
        subprocess.run(["umount", "-l", t], check=False)
    assert not left, f"mounts left behind: {left}"
