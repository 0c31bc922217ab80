"""Faults in the middle of a burst, on a real control plane (etcd, kube-apiserver, scheduler, controller-manager,
kwok) with KWOK nodes, FlashNodes and the operator as its own process (bench/operator_scale.py's pieces).

- kill -9 of the operator while a burst is being placed, then a new operator: every job ends Running on its own
  pair, placed exactly once (one attempt, one pod pinned to its status.node, its entry in that node's ledger),
  nothing double-booked, nothing lost, no traceback.
- A FlashNode deleted and another node made NotReady while a burst is being placed: no job is left half-placed.
  Each job is either placed (its ledger entry, and once Running exactly one live pod, on its status.node) on a
  node that still serves it, or Running on the NotReady node with that reason in its Ready condition, or Pending
  with its reason in status; nothing is placed on the lost FlashNode, and no ledger entry belongs to no one.
Sizes are small (tens of jobs) so each test takes well under a minute on a loaded 2-core CI machine.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from operator_scale import (  # noqa: E402
    CLAIMS_ANNOTATION,
    GROUP,
    NS,
    VERSION,
    OperatorProcess,
    apply_crds,
    burst,
    double_booked,
    job_body,
    make_nodes,
    start_cluster,
    wait,
)

from kubeflash_api import parse_job_spec  # noqa: E402

PLACED = ("Scheduled", "Staging", "Running")


@pytest.fixture
def cluster(k8s_bin_dir, tmp_path, monkeypatch):
    """An own control plane (the operator acts on every FlashNode in it); yields (ControlPlane, ApiClient,
    the operator's kubeconfig). Retries after a failed attempt wait 1 s instead of 10 s."""
    monkeypatch.setenv("KUBEFLASH_OPERATOR_BACKOFF_BASE_S", "1")
    cp, op_kubeconfig, _ = start_cluster(Path(k8s_bin_dir), tmp_path)
    try:
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        apply_crds(cp)
        yield cp, api, op_kubeconfig
    finally:
        cp.stop()


def _model() -> str:
    return parse_job_spec(job_body("x")["spec"], name="x", namespace=NS).model.id


def _jobs(api) -> list[dict]:
    return client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs")["items"]


def _placed(api) -> int:
    return sum(1 for j in _jobs(api) if (j.get("status") or {}).get("node"))


def _ledgers(api) -> dict[str, dict]:
    """FlashNode name -> its claims ledger ("ns/job" -> {gpus, disk, kv})."""
    out = {}
    for fn in client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, "flashnodes")["items"]:
        out[fn["metadata"]["name"]] = json.loads((fn["metadata"].get("annotations") or {}).get(CLAIMS_ANNOTATION) or "{}")
    return out


def _live_pods(api) -> dict[str, list]:
    """Job uid -> its pods that are not terminating."""
    out: dict[str, list] = {}
    for p in client.CoreV1Api(api).list_namespaced_pod(NS, label_selector="kubeflash.io/job").items:
        if p.metadata.deletion_timestamp is None:
            for o in p.metadata.owner_references or []:
                out.setdefault(o.uid, []).append(p)
    return out


def _pinned_node(pod) -> str:
    """The node a pod runs on, or the one its required node affinity names while it is not bound yet."""
    if pod.spec.node_name:
        return pod.spec.node_name
    terms = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    return next(v for t in terms for e in (t.match_fields or []) + (t.match_expressions or []) for v in e.values)


def _half_placed(api, *, lost: set[str] = frozenset()) -> list[str]:
    """Every way the cluster disagrees with itself about placements; [] when each job is wholly placed or wholly
    waiting. `lost`: FlashNodes that are gone (no job may be placed there)."""
    problems = []
    ledgers = _ledgers(api)
    pods = _live_pods(api)
    owners = {}
    for job in _jobs(api):
        name, uid, s = job["metadata"]["name"], job["metadata"]["uid"], job.get("status") or {}
        key = f"{NS}/{name}"
        entries = {node: ledger[key] for node, ledger in ledgers.items() if key in ledger}
        owners[key] = s
        mine = pods.get(uid, [])
        if s.get("phase") in PLACED:
            node = s.get("node")
            if node in lost:
                problems.append(f"{name}: placed on the lost FlashNode {node}")
            if list(entries) != [node] or entries[node]["gpus"] != s.get("gpus") or entries[node]["disk"] != s.get("disk"):
                problems.append(f"{name}: status {node} {s.get('gpus')} {s.get('disk')}, ledger entries {entries}")
            if s["phase"] == "Running" and ([p.metadata.name for p in mine] != [s.get("pod")]
                                             or _pinned_node(mine[0]) != node):
                problems.append(f"{name}: Running on {node} as {s.get('pod')}, live pods "
                                f"{[(p.metadata.name, _pinned_node(p)) for p in mine]}")
            if s["phase"] != "Running" and mine:
                problems.append(f"{name}: {s['phase']} with live pods {[p.metadata.name for p in mine]}")
        elif s.get("phase") == "Pending":
            if s.get("node") or entries or mine:
                problems.append(f"{name}: Pending with node {s.get('node')}, ledger {entries}, pods {len(mine)}")
            if not s.get("message"):
                problems.append(f"{name}: Pending without a reason in status")
        else:
            problems.append(f"{name}: phase {s.get('phase')}: {s.get('message')}")
    for node, ledger in ledgers.items():
        problems += [f"ledger of {node} holds {key}, which is {owners[key].get('phase')} on {owners[key].get('node')}"
                     for key in ledger if key not in owners or owners[key].get("node") != node]
    return problems + [f"double-booked {pair}" for pair in double_booked(api)]


def _start(kubeconfig: Path, log: Path) -> OperatorProcess:
    op = OperatorProcess(kubeconfig, log)
    op.wait_ready()
    return op


@pytest.mark.timeout(300)
def test_operator_killed_mid_burst_places_every_job_exactly_once(cluster, tmp_path):
    """32 jobs on 8 nodes x 4 pairs; the operator is killed (SIGKILL) as the first of a burst of 16 is placed, the
    other 16 arrive while none runs, then a new operator finishes: all 32 Running, one attempt each."""
    cp, api, op_kubeconfig = cluster
    jobs, nodes, pairs = 32, 8, 4
    make_nodes(api, cp, nodes, pairs, _model())
    first = _start(op_kubeconfig, tmp_path / "first.log")
    second = None
    try:
        sender = threading.Thread(target=burst, args=(api, jobs // 2))
        sender.start()
        wait("the first job placed", lambda: _placed(api) >= 1, 120, every=0.02)
        first.proc.kill()  # while the first half is being placed (ledger writes, pods, status patches in flight)
        first.proc.wait()
        sender.join()
        custom = client.CustomObjectsApi(api)
        for i in range(jobs // 2, jobs):  # the second half arrives while no operator runs
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs", job_body(f"job-{i:05d}"))
        print(f"when killed: {_placed(api)} of {jobs} jobs placed, "
              f"{sum(len(ledger) for ledger in _ledgers(api).values())} ledger entries")
        second = _start(op_kubeconfig, tmp_path / "second.log")
        wait(f"all {jobs} jobs Running", lambda: sum(
            1 for j in _jobs(api) if (j.get("status") or {}).get("phase") == "Running") == jobs, 120)
        wait("every pod bound", lambda: all(p.spec.node_name for ps in _live_pods(api).values() for p in ps), 60)
        assert _half_placed(api) == []
        assert [j["metadata"]["name"] for j in _jobs(api) if (j.get("status") or {}).get("attempts")] == []
        assert sum(len(ps) for ps in _live_pods(api).values()) == jobs
        assert "Traceback" not in second.text(), second.text()[-3000:]
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _not_ready(api, node: str) -> None:
    """Make a KWOK node NotReady as a dead kubelet's node looks: the Node is deleted (kwok stops heartbeating it; it
    keeps any node it once managed, whatever its annotation says) and at once created again under its name without
    kwok's annotation and with condition Ready False. Its pods stay bound to it (the pod GC only removes pods of a
    node that stays gone), and the node lifecycle controller taints it not-ready."""
    core = client.CoreV1Api(api)
    old = core.read_node(node)
    core.delete_node(node)
    wait(f"Node {node} gone", lambda: node not in {n.metadata.name for n in core.list_node().items}, 30, every=0.1)
    now = _now()
    annotations = {k: v for k, v in (old.metadata.annotations or {}).items() if not k.startswith("kwok.x-k8s.io")}
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node, "labels": old.metadata.labels, "annotations": annotations},
        "status": {"capacity": old.status.capacity, "allocatable": old.status.allocatable, "conditions": [
            {"type": "Ready", "status": "False", "reason": "KubeletDown", "message": "test: the kubelet stopped",
             "lastHeartbeatTime": now, "lastTransitionTime": now}]}})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _settled(api, *, lost: str, unready: str) -> bool:
    """Every job Running on a live node with its pod Running, Running on the NotReady node with that reason, or
    Pending with a reason, and no pod of ours left on the lost node."""
    pods = _live_pods(api)
    for job in _jobs(api):
        s = job.get("status") or {}
        mine = pods.get(job["metadata"]["uid"], [])
        ready = next((c for c in s.get("conditions") or [] if c["type"] == "Ready"), {})
        if s.get("phase") == "Running" and s.get("node") == unready:
            if ready.get("reason") != "NodeNotReady":
                return False
        elif s.get("phase") == "Running":
            if s.get("node") == lost or not mine or any(p.status.phase != "Running" for p in mine):
                return False
        elif s.get("phase") != "Pending" or not s.get("message") or (s.get("retryAt") or "") > _now():
            return False  # a Pending job in its retry delay is not settled yet
    return not any(_pinned_node(p) == lost for ps in pods.values() for p in ps)


@pytest.mark.timeout(300)
def test_flashnode_deleted_and_node_not_ready_mid_burst_leave_no_job_half_placed(cluster, tmp_path):
    """24 jobs on 6 nodes x 4 pairs; once a few are placed, FlashNode gpu-0000 is deleted and Node gpu-0001 goes
    NotReady. The lost FlashNode's jobs are placed again elsewhere (or wait, saying why); nothing new lands on
    either node; jobs already Running on the NotReady node say so; no job is ever half-placed."""
    cp, api, op_kubeconfig = cluster
    jobs, nodes, pairs = 24, 6, 4
    lost, unready = "gpu-0000", "gpu-0001"
    make_nodes(api, cp, nodes, pairs, _model())
    op = _start(op_kubeconfig, tmp_path / "operator.log")
    try:
        sender = threading.Thread(target=burst, args=(api, jobs))
        sender.start()
        # placement fills nodes in name order (equal scores): gpu-0000 is full and gpu-0001 taken from
        wait("a few jobs placed", lambda: _placed(api) >= pairs + 2, 120, every=0.05)
        before = {j["metadata"]["name"]: (j.get("status") or {}).get("node") for j in _jobs(api)}
        client.CustomObjectsApi(api).delete_cluster_custom_object(GROUP, VERSION, "flashnodes", lost)
        _not_ready(api, unready)
        sender.join()
        wait("every job placed on a live node, or waiting with a reason", lambda: _settled(
            api, lost=lost, unready=unready), 120, every=1.0)
        assert _half_placed(api, lost={lost}) == []
        jobs_seen = _jobs(api)
        assert len(jobs_seen) == jobs
        moved = [j["status"] for j in jobs_seen if before.get(j["metadata"]["name"]) == lost]
        assert moved, f"no job was on {lost} when its FlashNode went: {before}"
        for s in moved:  # each went on elsewhere (a pod there: its attempt failed as NodeLost), or waits saying why
            assert s.get("node") != lost and (s["phase"] == "Running" or s.get("reason")), s
            assert {a["reason"] for a in s.get("attempts") or []} <= {"NodeLost"}, s
        running = [j for j in jobs_seen if j["status"]["phase"] == "Running"]
        assert len(running) >= (nodes - 2) * pairs, [j["status"].get("message") for j in jobs_seen]
        waiting = [j for j in jobs_seen if j["status"]["phase"] == "Pending"]
        assert all(j["status"].get("reason") for j in waiting), [j["status"] for j in waiting]
        assert "Traceback" not in op.text(), op.text()[-3000:]
    finally:
        op.stop()
