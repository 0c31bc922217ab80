"""The node agent against a real control plane: FlashNode status kept current, models staged from
FlashNode.spec.models, KV space created for placed jobs and released when they are deleted (also while the
agent was down), engine progress relayed into InferenceJob status, results copied into an output ConfigMap.

The test plays the operator's part: it places jobs by writing InferenceJob status and the job ledger on the
FlashNode, with the operator's own ledger code (the agent reads no pod and no InferenceJob: the ledger is all it
knows of the jobs on its node); the agent is a real `kubeflash agent` process for a KWOK fake node, with its
disks in temporary directories.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

from kubeflash_node.store.ids import model_id  # noqa: E402
from kubeflash_operator.bookkeeping import (  # noqa: E402
    CLAIMS_ANNOTATION,
    ENDED_ANNOTATION,
    Release,
    apply_changes,
    apply_ended,
    ended_annotation,
    ledger_annotation,
    parse_ended,
    parse_ledger,
)
from kubeflash_operator.scheduler import Claim  # noqa: E402

from agent_harness import AgentProc, wait_for, write_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crds(control_plane):
    # --validate=false: a re-apply (another module applied them first) must not trip over unknown fields
    control_plane.kubectl("apply", "--validate=false", "-f", str(REPO / "crds"))
    control_plane.wait_crds_established("inferencejobs.kubeflash.io", "flashnodes.kubeflash.io")


@pytest.fixture
def node(control_plane, namespace, crds):
    name = f"{namespace}-gpu"
    control_plane.create_fake_node(name)
    yield name
    control_plane.kubectl("delete", "flashnode", name, "--ignore-not-found", check=False)
    control_plane.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def agent(tmp_path, node, kubeconfig):
    sources = tmp_path / "sources"
    write_tiny_llama(sources / "tiny")
    a = AgentProc(tmp_path, {
        "nodeName": node, "kube": True, "kubeconfig": kubeconfig, "interval": 0.5,
        "gpus": [{"index": 0, "name": "fake-h100", "memory": "80Gi", "pciRoot": "0000:00", "numaNode": 0},
                 {"index": 1, "name": "fake-h100", "memory": "80Gi", "pciRoot": "0000:80", "numaNode": 1}],
        "disks": [{"name": "ssd0", "path": str(tmp_path / "ssd0"), "pciRoot": "0000:00", "numaNode": 0},
                  {"name": "ssd1", "path": str(tmp_path / "ssd1"), "pciRoot": "0000:80", "numaNode": 1}],
        "allowedSourceRoots": [str(sources)],
    })
    a.sources = sources
    yield a
    a.stop()


def flashnode(cp, name: str) -> dict:
    r = cp.kubectl("get", "flashnode", name, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def get_json(cp, *args) -> dict:
    r = cp.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def ledger_write(cp, node: str, changes: dict) -> None:
    """Change the job ledger on FlashNode `node` the way the operator does: both annotations in one write."""
    fn = wait_for(lambda: flashnode(cp, node), 30, what=f"FlashNode {node}")
    ledger, ended = parse_ledger(node, fn), parse_ended(fn)
    after, accepted = apply_changes(ledger, changes)
    assert all(accepted.values()), accepted
    annotations = {CLAIMS_ANNOTATION: ledger_annotation(after),
                   ENDED_ANNOTATION: ended_annotation(apply_ended(ended, ledger, changes, accepted))}
    cp.kubectl("patch", "flashnode", node, "--type=merge", "-p", json.dumps({"metadata": {"annotations": annotations}}))


def create_job(cp, ns: str, name: str, node: str, disk: str, **spec) -> None:
    """An InferenceJob placed on `node` the way the operator does it: a claim in the node's ledger (with the
    job's uid, model, KV bytes and output ConfigMap), then status.phase/node/disk/modelId."""
    cp.apply({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
              "metadata": {"name": name, "namespace": ns},
              "spec": {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["hello"]},
                       "resources": {"kvDisk": "2Gi"}, **spec}})
    uid = get_json(cp, "inferencejob", name, "-n", ns)["metadata"]["uid"]
    gpu = len(parse_ledger(node, wait_for(lambda: flashnode(cp, node), 30, what=f"FlashNode {node}")))
    ledger_write(cp, node, {f"{ns}/{name}": Claim(
        f"{ns}/{name}", node, (gpu,), disk, 2 << 30, model_id=model_id("builtin:smollm2-135m"), uid=uid,
        output=(spec.get("output") or {}).get("configMap", {}).get("name", ""))})
    set_job_status(cp, ns, name, {"phase": "Running", "node": node, "disk": disk,
                                  "modelId": model_id("builtin:smollm2-135m")})


def end_job(cp, ns: str, name: str, node: str, phase: str) -> None:
    """The job's attempt ended: the operator releases its claim into an ended record, then writes the phase."""
    ledger_write(cp, node, {f"{ns}/{name}": Release(end=phase)})
    set_job_status(cp, ns, name, {"phase": phase})


def delete_job(cp, ns: str, name: str, node: str) -> None:
    """The job is deleted: the operator's finalizer drops it from the node's ledger."""
    cp.kubectl("delete", "inferencejob", name, "-n", ns)
    ledger_write(cp, node, {f"{ns}/{name}": Release()})


def set_job_status(cp, ns: str, name: str, status: dict) -> None:
    cp.kubectl("patch", "inferencejob", name, "-n", ns, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))


def test_flashnode_status_kept_current(control_plane, node, agent):
    """The agent creates its FlashNode (owned by the Node), fills in devices, pairs and conditions, labels the
    node, advances the heartbeat, stages what spec.models asks for, and says so when it stops."""
    cp = control_plane
    agent.start()
    fn = wait_for(lambda: flashnode(cp, node).get("status", {}).get("heartbeat") and flashnode(cp, node), 30,
                  what="FlashNode status", log=agent.log)
    status = fn["status"]
    assert fn["spec"]["nodeName"] == node
    assert fn["metadata"]["ownerReferences"][0]["kind"] == "Node"
    assert {(p["gpu"], p["disk"]) for p in status["pairs"]} == {(0, "ssd0"), (1, "ssd1")}
    assert [g["memoryBytes"] for g in status["gpus"]] == [80 << 30, 80 << 30]
    assert all(d["freeBytes"] > 0 and d["capacityBytes"] > 0 for d in status["disks"])
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    labels = get_json(cp, "node", node)["metadata"]["labels"]
    assert labels["kubeflash.io/gpu-ssd-pairs"] == "2" and labels["kubeflash.io/agent"] == "ready"

    first = status["heartbeat"]
    wait_for(lambda: flashnode(cp, node)["status"]["heartbeat"] > first, 10, what="heartbeat advances",
             log=agent.log)

    uri = str(agent.sources / "tiny")
    good, bad = model_id(uri), "not-the-id-0000000000000000"
    cp.kubectl("patch", "flashnode", node, "--type=merge", "-p", json.dumps(
        {"spec": {"models": [{"id": good, "uri": uri, "disk": "ssd1"}, {"id": bad, "uri": "dummy:opt-125m"}]}}))

    def models():
        return {m["id"]: m for m in flashnode(cp, node)["status"].get("models", [])}

    wait_for(lambda: models().get(good, {}).get("state") == "Ready", 120, what="model Ready", log=agent.log)
    assert models()[good]["disk"] == "ssd1" and models()[good]["bytes"] > 0
    assert models()[bad]["state"] == "Failed" and "id must be" in models()[bad]["message"]

    assert agent.stop() == 0
    assert "kubeflash.io/agent" not in get_json(cp, "node", node)["metadata"]["labels"]
    conditions = {c["type"]: c for c in flashnode(cp, node)["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "AgentStopped"


def test_kv_space_released_on_job_deletion(control_plane, namespace, node, agent, tmp_path):
    """A job placed on the node (its ledger entry) gets <disk>/jobs/<ns>/<name>/ (sized by kvDisk, owned by the
    engine pod's user), its progress.json shows up in InferenceJob status, and deleting the job removes the
    space."""
    cp = control_plane
    agent.start()
    create_job(cp, namespace, "run", node, "ssd1")
    job_dir = tmp_path / "ssd1" / "jobs" / namespace / "run"
    wait_for(lambda: (job_dir / "kv").is_dir(), 30, what="job space", log=agent.log)
    if os.geteuid() == 0:
        wait_for(lambda: job_dir.stat().st_uid == 1000, 10, what="job space owned by the pod's user")
    alloc = wait_for(lambda: flashnode(cp, node)["status"].get("kvAllocations"), 10, what="kvAllocations")
    assert alloc == [{"job": f"{namespace}/run", "disk": "ssd1", "bytes": 2 << 30, "path": str(job_dir)}]

    (job_dir / "progress.json").write_text(json.dumps({
        "phase": "running", "promptsDone": 2, "promptsTotal": 4, "tokens": 64, "tokensPerSecond": 31.5,
        "timings": {"load_weight": 0.75}, "updated": "2025-01-01T00:00:00Z"}))
    job = wait_for(lambda: (j := get_json(cp, "inferencejob", "run", "-n", namespace)).get("status", {})
                   .get("progress") and j, 30, what="progress relayed", log=agent.log)
    assert job["status"]["progress"]["summary"] == "2/4" and job["status"]["progress"]["tokens"] == 64
    assert job["status"]["throughput"]["tokensPerSecond"] == 31.5
    assert job["status"]["timings"] == {"load_weight": 0.75}
    assert job["status"]["phase"] == "Running"  # the operator's fields are left alone

    delete_job(cp, namespace, "run", node)
    wait_for(lambda: not job_dir.exists(), 30, what="job space removed", log=agent.log)
    wait_for(lambda: not flashnode(cp, node)["status"].get("kvAllocations"), 10, what="allocation gone")


def test_kv_space_released_for_job_deleted_while_agent_down(control_plane, namespace, node, agent, tmp_path):
    """A job deleted while the agent is stopped has its space removed when the agent starts again; a job
    that still exists keeps its space."""
    cp = control_plane
    agent.start()
    create_job(cp, namespace, "gone", node, "ssd0")
    create_job(cp, namespace, "stays", node, "ssd0")
    gone, stays = (tmp_path / "ssd0" / "jobs" / namespace / n for n in ("gone", "stays"))
    wait_for(lambda: gone.is_dir() and stays.is_dir(), 30, what="job spaces", log=agent.log)
    assert agent.stop() == 0
    delete_job(cp, namespace, "gone", node)
    time.sleep(0.5)
    assert gone.is_dir()  # nobody removed it while the agent was down
    agent.start()
    wait_for(lambda: not gone.exists(), 30, what="stale job space removed at start", log=agent.log)
    assert stays.is_dir()


def test_results_copied_to_output_configmap(control_plane, namespace, node, agent, tmp_path):
    """spec.output.configMap: when the job has ended the agent copies results.jsonl into that ConfigMap, which the
    operator created before the pod (the agent never creates one; here the test plays the operator)."""
    cp = control_plane
    agent.start()
    create_job(cp, namespace, "batch", node, "ssd0", output={"configMap": {"name": "batch-results"}})
    cp.kubectl("create", "configmap", "batch-results", "-n", namespace)
    job_dir = tmp_path / "ssd0" / "jobs" / namespace / "batch"
    wait_for(lambda: job_dir.is_dir(), 30, what="job space", log=agent.log)
    lines = '{"custom_id": "0", "response": {"body": {"choices": [{"text": "hi"}]}}}\n'
    (job_dir / "results.jsonl").write_text(lines)
    end_job(cp, namespace, "batch", node, "Succeeded")
    data = wait_for(lambda: (get_json(cp, "configmap", "batch-results", "-n", namespace) or {}).get("data"), 30,
                    what="results in the output ConfigMap", log=agent.log)
    assert data == {"results.jsonl": lines}
    assert job_dir.is_dir()  # the space stays until the job is deleted


def test_planted_results_link_is_reported_in_status_and_never_exported(control_plane, namespace, node, agent,
                                                                       tmp_path):
    """A pod that replaces results.jsonl with a link to a secret: the agent never reads through it; it reports the
    refusal in status.refused (so the operator fails the job) and the output ConfigMap holds only an error."""
    cp = control_plane
    agent.start()
    create_job(cp, namespace, "planted", node, "ssd0", output={"configMap": {"name": "planted-results"}})
    cp.kubectl("create", "configmap", "planted-results", "-n", namespace)
    job_dir = tmp_path / "ssd0" / "jobs" / namespace / "planted"
    wait_for(lambda: job_dir.is_dir(), 30, what="job space", log=agent.log)
    secret = tmp_path / "agent-token"
    secret.write_text("SECRET-TOKEN-BYTES")
    (job_dir / "results.jsonl").symlink_to(secret)
    status = wait_for(lambda: (get_json(cp, "inferencejob", "planted", "-n", namespace) or {}).get("status", {})
                      .get("refused"), 30, what="status.refused", log=agent.log)
    assert "results.jsonl" in status and "is a symlink" in status["results.jsonl"]
    end_job(cp, namespace, "planted", node, "Succeeded")
    data = wait_for(lambda: (get_json(cp, "configmap", "planted-results", "-n", namespace) or {}).get("data"), 30,
                    what="the output ConfigMap's error", log=agent.log)
    assert "results.jsonl refused" in data["error"] and "results.jsonl" not in data
    assert "SECRET-TOKEN-BYTES" not in json.dumps(data)
    (job_dir / "results.jsonl").unlink()  # the link gone: the refusal is withdrawn (sent as null)
    wait_for(lambda: not (get_json(cp, "inferencejob", "planted", "-n", namespace) or {}).get("status", {})
             .get("refused"), 30, what="status.refused cleared", log=agent.log)
