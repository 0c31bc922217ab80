"""The whole system on kind: real images, the chart, two workers with fake GPUs and host directories as SSDs.

A job goes from `kubectl apply` to results on the SSD ("Paris"); results reach a ConfigMap; deleting a job
removes its pod and its directory on the node; draining the node of a running job moves the job to the other
worker. Needs Docker and kind (skipped otherwise); the first test pays for the images and the cluster.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[2]

# Setting up includes building the images (torch CPU wheels): far longer than one test's default timeout.
pytestmark = [pytest.mark.kind, pytest.mark.timeout(5400)]

# A job that runs for minutes on the CPU (random OPT-125M weights, synthetic prompts, long generations).
LONG_JOB = REPO / "examples" / "kind-long-job.yaml"


def wait_for(what: str, get: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 300.0,
             every: float = 2.0) -> Any:
    return _wait_for(what, get, ok, timeout=timeout, every=every)


def job(kind, ns: str, name: str) -> dict:
    proc = kind.kubectl("get", "ij", name, "-n", ns, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def phase(j: dict) -> str:
    return (j.get("status") or {}).get("phase", "")


def wait_phase(kind, ns: str, name: str, wanted: set[str], timeout: float = 900) -> dict:
    j = wait_for(f"job {ns}/{name} to reach {sorted(wanted)}", lambda: job(kind, ns, name),
                 lambda j: phase(j) in wanted | {"Failed"}, timeout=timeout, every=3)
    if phase(j) not in wanted:
        logs = kind.kubectl("logs", "-n", ns, "-l", f"kubeflash.io/job={name}", "--tail=50", check=False).stdout
        raise AssertionError(f"job {name} ended {phase(j)}: {json.dumps(j.get('status'), indent=1)}\n{logs}")
    return j


def job_dir(kind, j: dict) -> tuple[str, str]:
    """(node, the job's directory on that node's SSD) from the job's status and its node's FlashNode."""
    node, disk = j["status"]["node"], j["status"]["disk"]
    disks = kind.json("get", "flashnode", node)["status"]["disks"]
    root = next(d["path"] for d in disks if d["name"] == disk)
    meta = j["metadata"]
    return node, f"{root}/jobs/{meta['namespace']}/{meta['name']}"


def job_pods(kind, ns: str, name: str) -> list[dict]:
    return kind.json("get", "pods", "-n", ns, "-l", f"kubeflash.io/job={name}")["items"]


def test_capital_of_france_answers_paris(kind_cluster, kind_namespace):
    """The README's example, submitted with kubectl: staged, run on a fake-GPU worker, results on its SSD."""
    kind, ns = kind_cluster, kind_namespace
    kind.apply((REPO / "examples" / "capital-of-france.yaml").read_text(), ns)
    j = wait_phase(kind, ns, "capital-of-france", {"Succeeded"})
    node, path = job_dir(kind, j)
    results = [json.loads(line) for line in kind.on_node(node, "cat", f"{path}/results.jsonl").stdout.splitlines()]
    assert len(results) == 1 and "Paris" in json.dumps(results[0]), results
    assert j["status"]["progress"]["promptsDone"] == 1
    assert j["status"].get("timings"), "the agent relayed no per-layer timings"
    table = kind.kubectl("get", "ij", "-n", ns).stdout
    assert "Succeeded" in table and node in table


def test_results_reach_the_output_configmap(kind_cluster, kind_namespace):
    """A batch from a ConfigMap, results copied by the agent into spec.output.configMap when the job ends."""
    kind, ns = kind_cluster, kind_namespace
    kind.apply((REPO / "examples" / "cluster-batch-configmap.yaml").read_text(), ns)
    wait_phase(kind, ns, "capitals", {"Succeeded"})
    cm = wait_for("the results ConfigMap", lambda: kind.kubectl(
        "get", "configmap", "capitals-results", "-n", ns, "-o", "json", check=False),
        lambda p: p.returncode == 0, timeout=60)
    lines = json.loads(cm.stdout)["data"]["results.jsonl"].splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == ["fr", "jp"]


def test_deleting_a_job_removes_its_pod_and_directory(kind_cluster, kind_namespace):
    """Deleting an InferenceJob deletes its pod (finalizer) and the agent removes its directory on the SSD."""
    kind, ns = kind_cluster, kind_namespace
    kind.apply((REPO / "examples" / "capital-of-france.yaml").read_text(), ns)
    j = wait_phase(kind, ns, "capital-of-france", {"Succeeded"})
    node, path = job_dir(kind, j)
    assert kind.on_node(node, "test", "-d", path, check=False).returncode == 0
    assert job_pods(kind, ns, "capital-of-france"), "the finished job's pod should stay until the job is deleted"

    kind.kubectl("delete", "ij", "capital-of-france", "-n", ns, "--wait=false")
    wait_for("the job to be gone", lambda: job(kind, ns, "capital-of-france"), lambda j: not j, timeout=120)
    wait_for("its pod to be gone", lambda: job_pods(kind, ns, "capital-of-france"), lambda pods: not pods, timeout=120)
    wait_for(f"{node}:{path} to be removed by the agent",
             lambda: kind.on_node(node, "test", "-e", path, check=False).returncode, lambda rc: rc != 0, timeout=120)
    kv = kind.json("get", "flashnode", node)["status"].get("kvAllocations") or []
    assert not [a for a in kv if a.get("job") == f"{ns}/capital-of-france"], "the job's KV space is still allocated"


def test_draining_the_node_of_a_running_job_moves_the_job(kind_cluster, kind_namespace):
    """`kubectl drain` evicts the job's pod; the operator records the failed attempt and places the job again,
    on the other worker (the drained one is cordoned)."""
    kind, ns = kind_cluster, kind_namespace
    kind.apply(LONG_JOB.read_text(), ns)
    j = wait_phase(kind, ns, "long", {"Running"})
    first = j["status"]["pod"]
    wait_for(f"pod {first} to run", lambda: kind.json("get", "pod", first, "-n", ns),
             lambda p: p["status"].get("phase") == "Running", timeout=300)
    drained = j["status"]["node"]
    (other,) = [w for w in kind.workers() if w != drained]
    try:
        kind.kubectl("drain", drained, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=180s",
                     timeout=240)
        wait_for(f"pod {first} to be evicted", lambda: [p["metadata"]["name"] for p in job_pods(kind, ns, "long")],
                 lambda names: first not in names, timeout=180)
        j = wait_for("the failed attempt to be recorded", lambda: job(kind, ns, "long"),
                     lambda j: any(a.get("pod") == first and a.get("result") == "Failed"
                                   for a in (j.get("status") or {}).get("attempts") or []), timeout=120)
        j = wait_for(f"the job to run again, on {other}", lambda: job(kind, ns, "long"),
                     lambda j: (j.get("status") or {}).get("node") == other and phase(j) in ("Running", "Succeeded")
                     and j["status"].get("pod") != first, timeout=600, every=3)
        assert j["status"]["attempt"] >= 2
        pods = {p["metadata"]["name"]: p for p in job_pods(kind, ns, "long")}
        if j["status"]["pod"] in pods:
            assert pods[j["status"]["pod"]]["spec"].get("nodeName") in (None, other)
    finally:
        kind.kubectl("uncordon", drained, check=False)
