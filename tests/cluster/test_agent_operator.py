"""The node agent and the operator together on a real control plane: one InferenceJob from submission to
deletion, each side reading only what the other wrote (docs/contract.md).

The agent is a real `kubeflash agent` process for a KWOK fake node; the operator runs under KopfRunner; KWOK
runs the pod and the test plays the engine (progress.json, results, the pod's exit).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

kopf_testing = pytest.importorskip("kopf.testing")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

from kubeflash_node.store.ids import model_id  # noqa: E402

from agent_harness import AgentProc, wait_for, write_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OPERATOR_ENV = {
    "KUBEFLASH_OPERATOR_BACKOFF_BASE_S": "0.5",
    "KUBEFLASH_OPERATOR_BACKOFF_CAP_S": "2",
    "KUBEFLASH_OPERATOR_METRICS_PORT": "0",
    "KUBEFLASH_OPERATOR_LIVENESS_PORT": "0",
}


@pytest.fixture(scope="module")
def operator(control_plane, kubeconfig):
    # --validate=false: a re-apply (another module applied them first) must not trip over unknown fields
    control_plane.kubectl("apply", "--validate=false", "-f", str(REPO / "crds"))
    control_plane.wait_crds_established("inferencejobs.kubeflash.io", "flashnodes.kubeflash.io")
    saved = {k: os.environ.get(k) for k in [*OPERATOR_ENV, "KUBECONFIG"]}
    os.environ.update(OPERATOR_ENV, KUBECONFIG=kubeconfig)
    runner = kopf_testing.KopfRunner(["run", "--standalone", "-A", "-m", "kubeflash_operator.handlers"], timeout=60)
    runner.__enter__()
    try:
        yield runner
    finally:
        runner.__exit__(None, None, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def get_json(cp, *args) -> dict:
    r = cp.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def test_job_lifecycle_with_operator(control_plane, namespace, operator, kubeconfig, tmp_path):
    """Submit -> the operator places the job on the agent's pair and asks for the model -> the agent stages
    it -> the pod runs with its job space ready -> progress shows in the job -> the job succeeds -> a link planted
    as its results fails it (ResultsRefused) -> deleting it releases the KV space."""
    cp = control_plane
    node = f"{namespace}-gpu"
    cp.create_fake_node(node)
    sources = tmp_path / "sources"
    uri = str(write_tiny_llama(sources / "tiny"))
    agent = AgentProc(tmp_path, {
        "nodeName": node, "kube": True, "kubeconfig": kubeconfig, "interval": 0.5,
        "gpus": [{"index": 0, "name": "fake-h100", "memory": "80Gi", "pciRoot": "0000:00", "numaNode": 0}],
        "disks": [{"name": "nvme0", "path": str(tmp_path / "nvme0"), "pciRoot": "0000:00", "numaNode": 0}],
        "allowedSourceRoots": [str(sources)],
    })
    try:
        agent.start()
        cp.apply({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
                  "metadata": {"name": "e2e", "namespace": namespace},
                  "spec": {"model": {"uri": uri}, "input": {"prompts": ["hello"]}, "resources": {"kvDisk": "1Gi"}}})

        def job():
            return get_json(cp, "inferencejob", "e2e", "-n", namespace)

        running = wait_for(lambda: (j := job()).get("status", {}).get("phase") == "Running" and j, 120,
                           what="job Running", log=agent.log)
        status = running["status"]
        assert (status["node"], status["disk"], status["modelId"]) == (node, "nvme0", model_id(uri))
        models = {m["id"]: m for m in get_json(cp, "flashnode", node)["status"]["models"]}
        assert models[model_id(uri)]["state"] == "Ready"
        assert (tmp_path / "nvme0" / "models" / model_id(uri) / "manifest.json").is_file()

        # all the agent knows of the job (it reads no pod and no InferenceJob): the operator's ledger entry
        annotations = get_json(cp, "flashnode", node)["metadata"]["annotations"]
        entry = json.loads(annotations["kubeflash.io/claims"])[f"{namespace}/e2e"]
        assert (entry["uid"], entry["model"], entry["disk"], entry["kv"]) == (
            running["metadata"]["uid"], model_id(uri), "nvme0", 1 << 30)
        job_dir = tmp_path / "nvme0" / "jobs" / namespace / "e2e"
        wait_for(lambda: (job_dir / "kv").is_dir(), 30, what="job space", log=agent.log)
        if os.geteuid() == 0:
            wait_for(lambda: job_dir.stat().st_uid == 1000, 10, what="job space owned by the engine's user")
        (job_dir / "progress.json").write_text(json.dumps({"phase": "running", "promptsDone": 0, "promptsTotal": 1,
                                                           "tokens": 7, "tokensPerSecond": 3.5}))
        wait_for(lambda: job().get("status", {}).get("progress", {}).get("tokens") == 7, 30,
                 what="progress relayed", log=agent.log)

        pod = status["pod"]
        cp.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"phase": "Succeeded", "containerStatuses": [
                {"name": "engine", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}}))
        wait_for(lambda: job().get("status", {}).get("phase") == "Succeeded", 60, what="job Succeeded",
                 log=agent.log)
        annotations = get_json(cp, "flashnode", node)["metadata"]["annotations"]  # the claim released, same write:
        assert f"{namespace}/e2e" not in json.loads(annotations["kubeflash.io/claims"])  # the pair is free
        assert json.loads(annotations["kubeflash.io/ended"])[f"{namespace}/e2e"]["end"] == "Succeeded"
        # a results.jsonl replaced by a link after the pod ended: the agent refuses it, the operator fails the job
        (tmp_path / "token").write_text("SECRET")
        (job_dir / "results.jsonl").symlink_to(tmp_path / "token")
        failed = wait_for(lambda: (j := job()).get("status", {}).get("phase") == "Failed" and j, 60,
                          what="job Failed on refused results", log=agent.log)
        assert failed["status"]["reason"] == "ResultsRefused" and "is a symlink" in failed["status"]["message"]

        cp.kubectl("delete", "inferencejob", "e2e", "-n", namespace, "--timeout=60s")
        wait_for(lambda: not job_dir.exists(), 30, what="KV space released", log=agent.log)
        assert "kubeflash.io/ended" not in get_json(cp, "flashnode", node)["metadata"]["annotations"]
        wait_for(lambda: not get_json(cp, "flashnode", node)["status"].get("kvAllocations"), 10,
                 what="allocation gone")
    finally:
        agent.stop()
        cp.kubectl("delete", "flashnode", node, "--ignore-not-found", check=False)
        cp.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
