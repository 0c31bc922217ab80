"""The storage plugin (the kubeflash.io CSI driver in the agent DaemonSet) under the real kubelet, on the session's
node, with pods that pass Pod Security "restricted" in a namespace that enforces it:
- a pod reads a staged model through its read-only model volume, byte for byte as the manifest says, and the
  model is pinned against eviction while mounted;
- a pod writing past its KV size gets ENOSPC (its image never grows past the size) while a neighbour's KV volume
  still takes its writes;
- deleting the pods unmounts and frees everything their volumes held (records, images, loop devices, pins);
- the agent pod (and with it the plugin) restarted while a pod runs: the pod's model and KV volumes keep working,
  and the new plugin releases them when the pod is deleted.
"""

from __future__ import annotations

import json

import podkit as kit
import pytest

from kubeflash_node.store.format import sha256_file

import e2e_cases as cases
from e2e_cases import wait_for

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

MiB = 1 << 20


@pytest.fixture
def restricted_namespace(node_cluster):
    with cases.namespace(node_cluster, "csi", kit.RESTRICTED) as name:
        yield name


def ready_model(c, ns: str) -> str:
    """The smallest model Ready on the node; the README's example stages SmolLM2-135M when none is (a test run
    alone)."""
    def ready():
        rows = c.json("get", "flashnode", kit.realnode.NODE_NAME)["status"].get("models") or []
        return sorted((m.get("bytes", 0), m["id"]) for m in rows if m.get("state") == "Ready")
    if not ready():
        c.apply((cases.EXAMPLES / "capital-of-france.yaml").read_text(), ns)
        cases.wait_phase(c, ns, "capital-of-france", {"Succeeded"})
    return ready()[0][1]  # the smallest


# A stage file's sha256 through the volume, and what a write to the volume gets.
READ = """
import errno, hashlib, json, os, time
root = '/model'
m = json.load(open(os.path.join(root, 'manifest.json')))
name = m['stages'][1]
h = hashlib.sha256(open(os.path.join(root, name), 'rb').read()).hexdigest()
try:
    open(os.path.join(root, 'x'), 'wb')
    ro = 'writable'
except OSError as e:
    ro = errno.errorcode[e.errno]
print('RESULT', json.dumps({'stage': name, 'sha256': h, 'expected': m['files'][name]['sha256'], 'ro': ro}), flush=True)
time.sleep(600)
"""


def test_pod_reads_a_staged_model_through_its_volume(node_cluster, restricted_namespace):
    c, ns = node_cluster, restricted_namespace
    model, disk = ready_model(c, ns), kit.store(c)
    kit.create(c, ns, kit.pod("reader", kit.node_image(c), READ, {"model": kit.csi(model_id=model)}, {"model": "/model"},
                          read_only=("model",)))
    p = kit.wait_log(c, ns, "reader", "RESULT")
    got = json.loads(kit.log(c, ns, "reader").split("RESULT ", 1)[1])
    assert got["sha256"] == got["expected"] and got["ro"] == "EROFS", got
    assert got["sha256"] == sha256_file(disk / "models" / model / got["stage"])
    (rec,) = kit.records(disk, p["metadata"]["uid"])
    assert (disk / "pins" / model / rec.stem).exists(), "the mounted model is not pinned against eviction"
    kit.delete_and_wait_released(c, ns, {"reader": p}, disk, {"reader": [rec.stem]})
    assert (disk / "models" / model / "manifest.json").is_file(), "releasing the volume touched the model"


FILL = """
import errno, os, time
n = 0
try:
    with open('/kv/fill', 'wb') as f:
        while n < (1 << 30):
            f.write(b'k' * (1 << 20)); f.flush(); os.fsync(f.fileno()); n += 1 << 20
    print('RESULT none', n, flush=True)
except OSError as e:
    print('RESULT', errno.errorcode[e.errno], n, flush=True)
time.sleep(600)
"""

# Waits for the test to say go (a file it writes into this pod's KV volume), then writes 24 MiB there.
NEIGHBOUR = """
import os, time
print('WAITING', flush=True)
while not os.path.exists('/kv/go'):
    time.sleep(0.2)
with open('/kv/part', 'wb') as f:
    f.write(b's' * (24 << 20)); f.flush(); os.fsync(f.fileno())
print('RESULT ok', os.path.getsize('/kv/part'), flush=True)
time.sleep(600)
"""


def test_kv_volume_full_is_enospc_for_its_pod_only_and_freed_on_delete(node_cluster, restricted_namespace):
    c, ns = node_cluster, restricted_namespace
    image, disk = kit.node_image(c), kit.store(c)
    hostpath = kit.pod("hostpath", image, "pass", {}, {})
    hostpath["spec"]["volumes"] = [{"name": "h", "hostPath": {"path": "/"}}]
    refused = c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(hostpath), check=False)
    assert refused.returncode != 0 and "PodSecurity" in refused.stderr, refused.stderr  # "restricted" is enforced
    kit.create(c, ns, kit.pod("filler", image, FILL, {"kv": kit.csi(kv_size="48Mi")}, {"kv": "/kv"}),
           kit.pod("neighbour", image, NEIGHBOUR, {"kv": kit.csi(kv_size="32Mi")}, {"kv": "/kv"}))
    filler = kit.wait_log(c, ns, "filler", "RESULT")
    neighbour = kit.wait_log(c, ns, "neighbour", "WAITING")
    errno_name, written = kit.result(c, ns, "filler")[:2]
    assert errno_name == "ENOSPC" and 40 * MiB <= int(written) <= 48 * MiB, kit.log(c, ns, "filler")
    pods = {"filler": filler, "neighbour": neighbour}
    recs = {n: kit.records(disk, p["metadata"]["uid"]) for n, p in pods.items()}
    assert all(len(r) == 1 for r in recs.values()), recs  # one KV volume per pod
    image_of = {n: disk / "csi" / "kv" / f"{r[0].stem}.img" for n, r in recs.items()}
    assert image_of["filler"].stat().st_blocks * 512 <= 49 * MiB, "the full KV image grew past its size"
    (kit.target(neighbour["metadata"]["uid"], "kv") / "go").touch()  # the filler's volume is full now
    wait_for("the neighbour to write", lambda: kit.log(c, ns, "neighbour"), lambda t: "RESULT" in t, timeout=60)
    assert kit.result(c, ns, "neighbour") == ["ok", str(24 * MiB)], kit.log(c, ns, "neighbour")
    kit.delete_and_wait_released(c, ns, pods, disk, {n: [r[0].stem] for n, r in recs.items()})
    assert not [i for i in image_of.values() if i.exists()]


# Reads a model stage and writes 1 MiB to its KV volume every half second until told to stop (a file the test
# writes into the KV volume); any error ends the pod Failed.
STEADY = """
import hashlib, json, os, time
m = json.load(open('/model/manifest.json'))
name = m['stages'][1]
want = m['files'][name]['sha256']
rounds = 0
def step():
    global rounds
    assert hashlib.sha256(open('/model/' + name, 'rb').read()).hexdigest() == want, 'model bytes changed'
    with open(f'/kv/block-{rounds % 8}', 'wb') as f:
        f.write(os.urandom(1 << 20)); f.flush(); os.fsync(f.fileno())
    rounds += 1
step()
print('RUNNING', flush=True)
while not os.path.exists('/kv/stop'):
    step()
    time.sleep(0.5)
step()
blocks = [f for f in os.listdir('/kv') if f.startswith('block-') and os.path.getsize('/kv/' + f) == 1 << 20]
print('RESULT', rounds, len(blocks), flush=True)
time.sleep(600)
"""


def test_agent_restart_keeps_a_running_pods_volumes(node_cluster, restricted_namespace):
    c, ns = node_cluster, restricted_namespace
    model, disk = ready_model(c, ns), kit.store(c)
    kit.create(c, ns, kit.pod("steady", kit.node_image(c), STEADY, {"model": kit.csi(model_id=model),
                                                                "kv": kit.csi(kv_size="16Mi")},
                          {"model": "/model", "kv": "/kv"}, read_only=("model",)))
    p = kit.wait_log(c, ns, "steady", "RUNNING")
    uid = p["metadata"]["uid"]
    stems = sorted(r.stem for r in kit.records(disk, uid))
    assert len(stems) == 2, stems
    kit.restart_agent(c)
    before = kit.log(c, ns, "steady")
    assert "RESULT" not in before and c.json("get", "pod", "steady", "-n", ns)["status"]["phase"] == "Running"
    assert sorted(r.stem for r in kit.records(disk, uid)) == stems, "the new plugin lost the pod's volumes"
    (kit.target(uid, "kv") / "stop").touch()
    wait_for("the pod to finish its rounds", lambda: kit.log(c, ns, "steady"), lambda t: "RESULT" in t, timeout=60)
    rounds, blocks = map(int, kit.result(c, ns, "steady")[:2])
    assert rounds >= 4 and blocks == min(rounds, 8), kit.log(c, ns, "steady")
    kit.delete_and_wait_released(c, ns, {"steady": p}, disk, {"steady": stems})

