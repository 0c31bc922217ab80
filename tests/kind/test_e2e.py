"""The whole system on kind: real images, the chart, two workers with fake GPUs and host directories as SSDs.

The shared bodies of tests/e2e_cases.py (the same assertions tests/node makes on a real kubelet + containerd):
a job goes from `kubectl apply` to results on the SSD ("Paris"); results reach a ConfigMap; deleting a job
removes its pod and its directory on the node; plus what needs two workers: draining the node of a running job
moves the job to the other worker. Needs Docker and kind (skipped otherwise); the first test pays for the
images and the cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import e2e_cases as cases
from e2e_cases import job, job_pods, phase, wait_for, wait_phase

REPO = Path(__file__).resolve().parents[2]

# Setting up includes building the images (torch CPU wheels): far longer than one test's default timeout.
pytestmark = [pytest.mark.kind, pytest.mark.timeout(5400)]

# A job that runs for minutes on the CPU (random OPT-125M weights, synthetic prompts, long generations).
LONG_JOB = REPO / "examples" / "kind-long-job.yaml"


def test_capital_of_france_answers_paris(kind_cluster, kind_namespace):
    cases.capital_of_france_answers_paris(kind_cluster, kind_namespace)


def test_cluster_smollm2_example(kind_cluster, kind_namespace):
    cases.cluster_smollm2_two_prompts(kind_cluster, kind_namespace)


def test_results_reach_the_output_configmap(kind_cluster, kind_namespace):
    cases.results_reach_the_output_configmap(kind_cluster, kind_namespace)


def test_deleting_a_job_removes_its_pod_and_directory(kind_cluster, kind_namespace):
    cases.deleting_a_job_removes_its_pod_and_directory(kind_cluster, kind_namespace)


def test_killed_inference_pod_resumes_exactly_once(kind_cluster, kind_namespace):
    cases.killed_inference_pod_resumes_exactly_once(kind_cluster, kind_namespace)


def test_deleting_a_running_job_releases_everything(kind_cluster, kind_namespace):
    cases.deleting_a_running_job_releases_everything(kind_cluster, kind_namespace)


def test_operator_restarted_mid_job_still_completes(kind_cluster, kind_namespace):
    cases.operator_restarted_mid_job_still_completes(kind_cluster, kind_namespace, "kubeflash-system")


def test_malformed_job_is_refused_with_the_field_path(kind_cluster, kind_namespace):
    cases.malformed_job_is_refused_with_the_field_path(kind_cluster, kind_namespace)


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
