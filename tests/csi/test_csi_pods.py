"""The driver under a real kubelet: pods on the real-node harness (kind/realnode.py, `make cluster`) in a
namespace that enforces Pod Security "restricted" get their kubeflash.io volumes; a pod writing past its KV
size gets ENOSPC while another pod's KV volume is unaffected; deleting the pods releases their volumes on the
node (no record, image or loop device left); a pod reads a staged model through its read-only volume, byte
for byte as the manifest says. Skipped, with the reason, when no real node with the driver is running here."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.csi
kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

KUBECONFIG = Path(os.environ.get("KUBEFLASH_NODE_RUN", "/run/kubeflash-node")) / "kubeconfig"


@pytest.fixture(scope="module")
def kube():
    if os.geteuid() != 0:
        pytest.skip("needs root (reads the node's store and loop devices)")
    if not KUBECONFIG.exists():
        pytest.skip(f"no real node running ({KUBECONFIG} missing): start one with `make cluster`")
    config.load_kube_config(str(KUBECONFIG))
    v1 = client.CoreV1Api()
    try:
        client.StorageV1Api().read_csi_driver("kubeflash.io")
        (ds,) = client.AppsV1Api().list_namespaced_daemon_set("kubeflash-system").items
    except (ApiException, ValueError, OSError) as e:
        pytest.skip(f"the real node has no kubeflash.io driver installed: {e}")
    csi = next(c for c in ds.spec.template.spec.containers if c.name == "csi")
    disk = next(a.split("=", 2)[2] for a in csi.command if a.startswith("--disk="))
    return v1, csi.image, Path(disk)


@pytest.fixture
def namespace(kube):
    v1 = kube[0]
    name = f"csi-{uuid.uuid4().hex[:8]}"
    labels = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    yield name
    v1.delete_namespace(name)


def _pod(name: str, image: str, script: str, volumes: list[dict], mounts: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never", "command": ["python", "-c", script],
                        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": mounts}],
        "volumes": volumes}}


def _run(v1, namespace: str, pods: list[dict], disk: Path, timeout: float = 240) -> dict[str, dict]:
    """Create the pods, wait until each has finished; name -> {phase, uid, log, records}, where records are the
    driver's records of the pod's volumes seen while it ran (the pods linger a few seconds for that)."""
    for p in pods:
        v1.create_namespaced_pod(namespace, p)
    out: dict[str, dict] = {}
    seen: dict[str, set[Path]] = {p["metadata"]["name"]: set() for p in pods}
    deadline = time.time() + timeout
    while len(out) < len(pods) and time.time() < deadline:
        for p in pods:
            name = p["metadata"]["name"]
            pod = v1.read_namespaced_pod(name, namespace)
            if pod.status.phase == "Running":
                seen[name].update(_records(disk, pod.metadata.uid))
            if pod.status.phase in ("Succeeded", "Failed") and name not in out:
                out[name] = {"phase": pod.status.phase, "uid": pod.metadata.uid, "records": seen[name],
                             "log": v1.read_namespaced_pod_log(name, namespace)}
        time.sleep(0.5)
    if len(out) < len(pods):
        events = [f"{e.involved_object.name}: {e.reason} {e.message}"
                  for e in v1.list_namespaced_event(namespace).items]
        raise AssertionError(f"pods did not finish in {timeout}s; events: {events}")
    return out


def _records(disk: Path, pod_uid: str) -> list[Path]:
    """The driver's records of volumes published into this pod."""
    folder = disk / "csi" / "volumes"
    return [f for f in folder.glob("*.json") if f"/pods/{pod_uid}/" in f.read_text()] if folder.is_dir() else []


FILL = """
import errno, os
n = 0
try:
    with open('/kv/fill', 'wb') as f:
        while n < (1 << 30):
            f.write(b'k' * (1 << 20)); f.flush(); os.fsync(f.fileno()); n += 1 << 20
    print('RESULT none', n)
except OSError as e:
    print('RESULT', errno.errorcode[e.errno], n)
st = os.statvfs('/kv')
print('TOTAL', st.f_blocks * st.f_frsize, flush=True)
import time; time.sleep(8)
"""

SMALL = """
import os
with open('/kv/part', 'wb') as f:
    f.write(b's' * (24 << 20)); f.flush(); os.fsync(f.fileno())
print('RESULT ok', os.path.getsize('/kv/part'), flush=True)
import time; time.sleep(8)
"""


def test_kv_volumes_in_a_restricted_namespace(kube, namespace):
    v1, image, disk = kube
    with pytest.raises(ApiException) as e:  # the namespace really enforces "restricted"
        v1.create_namespaced_pod(namespace, _pod("hostpath", image, "pass", [
            {"name": "h", "hostPath": {"path": "/tmp"}}], [{"name": "h", "mountPath": "/h"}]))
    assert e.value.status == 403
    kv = lambda size: [{"name": "kv", "csi": {"driver": "kubeflash.io",  # noqa: E731
                                              "volumeAttributes": {"kubeflash.io/kv-size": size}}}]
    mount = [{"name": "kv", "mountPath": "/kv"}]
    done = _run(v1, namespace, [_pod("filler", image, FILL, kv("48Mi"), mount),
                                _pod("neighbour", image, SMALL, kv("32Mi"), mount)], disk)
    filler, neighbour = done["filler"], done["neighbour"]
    assert filler["phase"] == "Succeeded", filler["log"]
    result = filler["log"].split("RESULT ", 1)[1].split()
    assert result[0] == "ENOSPC" and 40 << 20 <= int(result[1]) <= 48 << 20, filler["log"]
    assert neighbour["phase"] == "Succeeded" and "RESULT ok 25165824" in neighbour["log"], neighbour["log"]
    records = {n: d["records"] for n, d in done.items()}
    assert all(len(r) == 1 for r in records.values()), records  # one KV volume per pod, seen while it ran
    for name in done:
        v1.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    deadline = time.time() + 120
    while time.time() < deadline and any(r.exists() for rs in records.values() for r in rs):
        time.sleep(2)
    assert not [r for rs in records.values() for r in rs if r.exists()], "volumes not released after pod deletion"
    images = [disk / "csi" / "kv" / (r.stem + ".img") for rs in records.values() for r in rs]
    assert images and not [i for i in images if i.exists()]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not [i for i in images if str(i) in loops]


READ = """
import errno, hashlib, json, os, sys
root = '/model'
m = json.load(open(os.path.join(root, 'manifest.json')))
name = m['stages'][1]
h = hashlib.sha256()
with open(os.path.join(root, name), 'rb') as f:
    while b := f.read(1 << 20):
        h.update(b)
try:
    open(os.path.join(root, 'x'), 'wb')
    ro = 'writable'
except OSError as e:
    ro = errno.errorcode[e.errno]
print('RESULT', json.dumps({'stage': name, 'sha256': h.hexdigest(), 'expected': m['files'][name]['sha256'], 'ro': ro}))
"""


def test_pod_reads_a_staged_model_through_its_volume(kube, namespace):
    v1, image, disk = kube
    staged = sorted(p.name for p in (disk / "models").iterdir() if (p / "manifest.json").is_file()) \
        if (disk / "models").is_dir() else []
    if not staged:
        pytest.skip(f"no staged model in {disk}/models (run `make cluster`: its demo stages smollm2)")
    vol = [{"name": "model", "csi": {"driver": "kubeflash.io", "readOnly": True,
                                     "volumeAttributes": {"kubeflash.io/model-id": staged[0]}}}]
    done = _run(v1, namespace, [_pod("reader", image, READ, vol, [{"name": "model", "mountPath": "/model",
                                                                   "readOnly": True}])], disk)["reader"]
    assert done["phase"] == "Succeeded", done["log"]
    got = json.loads(done["log"].split("RESULT ", 1)[1])
    assert got["sha256"] == got["expected"] and got["ro"] == "EROFS", got
    want = hashlib.sha256((disk / "models" / staged[0] / got["stage"]).read_bytes()).hexdigest()
    assert got["sha256"] == want
