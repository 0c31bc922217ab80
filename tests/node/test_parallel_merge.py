"""spec.parallelism with spec.output.pvc on the session's real node (kubelet + containerd, kind/realnode.py): a
4-prompt SmolLM2 job split into 2 shard jobs (the node pairs its 2 advertised GPU slots with the store disk, so
both shards can hold a pair at once), each shard's pod writes its part file onto a claim bound to a hostPath
PersistentVolume, then the operator's merge pod (`kubeflash merge`, run by the real kubelet) writes the merged
file. Checked on this machine's disk: every prompt's result exactly once, in input order, byte for byte the line its
shard wrote; the shard jobs and the merge pod Succeeded and owned by the job; deleting the job deletes them, and
the merged file stays on the claim.
"""

from __future__ import annotations

import json
import os
import shutil

import podkit as kit
import pytest

from kubeflash_api.sharding import part_path, shard_of

import e2e_cases as cases
from e2e_cases import job, job_pods, wait_for, wait_phase

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

PROMPTS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Name a river."]
IDS = [f"prompt-{i}" for i in range(len(PROMPTS))]
OUTPUT = "merged/results.jsonl"
JOB = """
apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {{name: split}}
spec:
  model: {{uri: builtin:smollm2-135m}}
  input: {{prompts: {prompts}}}
  generation: {{maxNewTokens: 24, temperature: 0}}
  resources: {{gpus: 1, kvDisk: 1Gi}}
  parallelism: 2
  output: {{pvc: {{claimName: results}}, path: {path}}}
"""


@pytest.fixture
def claim(node_cluster, node_namespace):
    """The claim `results` in the test's namespace, bound to a static hostPath PersistentVolume (one node) whose
    directory here is owned by the engine's user; removed afterwards. Yields the directory."""
    c, ns = node_cluster, node_namespace
    pv = f"kubeflash-test-{ns}"
    root = kit.realnode.DATA / "test-claims" / ns
    root.mkdir(parents=True)
    os.chown(root, kit.UID, kit.UID)
    c.apply(json.dumps({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
        "hostPath": {"path": str(root), "type": "Directory"}, "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": "", "claimRef": {"namespace": ns, "name": "results"}}}), ns)
    c.apply(json.dumps({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "results"},
                        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                                 "resources": {"requests": {"storage": "1Gi"}}}}), ns)
    try:
        wait_for("the claim to be Bound", lambda: c.json("get", "pvc", "results", "-n", ns),
                 lambda p: p["status"].get("phase") == "Bound", timeout=60, every=1)
        yield root
    finally:
        c.kubectl("delete", "ij", "--all", "-n", ns, "--timeout=120s", check=False, timeout=180)
        c.kubectl("delete", "pvc", "results", "-n", ns, "--timeout=60s", check=False, timeout=90)
        c.kubectl("delete", "pv", pv, "--timeout=60s", check=False, timeout=90)
        shutil.rmtree(root, ignore_errors=True)


def _owned_by(obj: dict, uid: str) -> bool:
    return any(r.get("uid") == uid and r.get("controller") for r in obj["metadata"].get("ownerReferences") or [])


def test_parallel_job_merges_shard_parts_onto_the_claim_in_input_order(node_cluster, node_namespace, claim):
    c, ns = node_cluster, node_namespace
    assert sorted({shard_of(i, 2) for i in IDS}) == [0, 1] and [shard_of(i, 2) for i in IDS] != sorted(
        shard_of(i, 2) for i in IDS), "the prompts must interleave over both shards for the order to be tested"
    c.apply(JOB.format(prompts=json.dumps(PROMPTS), path=OUTPUT), ns)
    parent = wait_phase(c, ns, "split", {"Succeeded"})
    uid = parent["metadata"]["uid"]
    assert parent["status"]["shards"] == {"total": 2, "pending": 0, "running": 0, "succeeded": 2, "failed": 0}
    assert parent["status"]["progress"]["promptsDone"] == len(PROMPTS), parent["status"]

    # Each shard's part file holds its own prompts' results; the merged file holds them all once, in input order.
    parts = {}
    for k in range(2):
        lines = (claim / part_path(OUTPUT, k, 2)).read_bytes().splitlines(keepends=True)
        assert [json.loads(line)["custom_id"] for line in lines] == [i for i in IDS if shard_of(i, 2) == k]
        parts.update({json.loads(line)["custom_id"]: line for line in lines})
    merged = (claim / OUTPUT).read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["custom_id"] for line in merged] == IDS, merged
    assert merged == [parts[i] for i in IDS], "the merged lines are not the shards' lines byte for byte"
    answers = [json.loads(line)["response"]["body"]["choices"][0]["message"]["content"] for line in merged]
    assert all(a.strip() for a in answers) and "Paris" in answers[0], answers
    assert not [p for p in claim.rglob("*") if p.name.startswith(".")], "a temp file was left on the claim"

    # The shard jobs and the merge pod ran to completion and belong to the job.
    shards = c.json("get", "ij", "-n", ns, "-l", "kubeflash.io/parent=split")["items"]
    assert sorted(s["metadata"]["name"] for s in shards) == ["split-s0", "split-s1"]
    assert all(cases.phase(s) == "Succeeded" and _owned_by(s, uid) for s in shards), [s["status"] for s in shards]
    merge = c.json("get", "pod", "split-merge", "-n", ns)
    assert merge["status"]["phase"] == "Succeeded" and _owned_by(merge, uid), merge["status"]
    assert "4 results from 2 parts" in kit.log(c, ns, "split-merge")

    # Deleting the job deletes its shards, their pods and the merge pod; the merged file stays on the claim.
    before = (claim / OUTPUT).read_bytes()
    c.kubectl("delete", "ij", "split", "-n", ns, "--wait=false")
    wait_for("the job and its shards to be gone", lambda: [j for j in ("split", "split-s0", "split-s1")
                                                            if job(c, ns, j)], lambda left: not left, timeout=180)
    wait_for("their pods to be gone", lambda: c.json("get", "pods", "-n", ns)["items"], lambda p: not p, timeout=180)
    assert not job_pods(c, ns, "split") and (claim / OUTPUT).read_bytes() == before
