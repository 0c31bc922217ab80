"""A job whose namespace objects cannot serve it waits with a reason, instead of a pod that never starts or a
status that stays empty (an outsider's pass over the Kubernetes path).

spec.input.configMap names a ConfigMap (and key) the pod mounts: missing, the real kubelet would leave the pod in
ContainerCreating forever (FailedMount only in Events) while the job said Running. spec.output.configMap names a
ConfigMap someone else already owns: the operator refused to write it, but only in its log, every 0.5 s, leaving
the job's status empty. A missing spec.input.pvc / spec.output.pvc claim left the pod unschedulable, failing
attempt after attempt on a held pair. All now keep the job Pending within a second, its Scheduled condition and status.message
naming the field, with no pod and no pair held, and the job starts once the user fixes the ConfigMap.
The operator runs in-process (test_operator's fixtures); KWOK runs the pods.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("kopf.testing")
kubernetes = pytest.importorskip("kubernetes")

from test_operator import MODEL, condition, crds, kube, ns, operator, wait_for  # noqa: E402,F401  (fixtures)

WITHIN_S = 1.0  # a bad input's reason shows this soon after the create (the first step runs at once)


def _blocked(k8s, name: str, reason: str) -> dict:
    t0 = time.monotonic()
    s = wait_for(f"{name} Pending/{reason}", lambda: k8s.status(name),
                 lambda s: condition(s, "Scheduled").get("reason") == reason, timeout=10)
    took = time.monotonic() - t0
    assert took < WITHIN_S + 0.5, f"{reason} took {took:.2f} s"  # the poll's own latency on top
    return s


def test_missing_input_configmap_or_key_waits_naming_the_field(ns, kube, control_plane):  # noqa: F811
    """No ConfigMap, then one without the key: Pending, Scheduled=False/InputNotFound naming
    spec.input.configMap, a Warning event, no pod; once the key is there the job runs."""
    node = kube.gpu_node(control_plane, "n", models=(MODEL,))
    kube.settle()
    kube.submit("j", input={"configMap": {"name": "prompts", "key": "batch.jsonl"}})
    s = _blocked(kube, "j", "InputNotFound")
    assert s["phase"] == "Pending" and s["message"].startswith("spec.input.configMap"), s["message"]
    assert f"ConfigMap {ns}/prompts not found" in s["message"], s["message"]
    time.sleep(2.5)  # a tick later: still waiting, still no pod
    assert kube.status("j")["phase"] == "Pending" and kube.pod_names("j") == []
    wait_for("InputNotFound event", lambda: kube.events("j"), lambda ev: any(r == "InputNotFound" for r, _ in ev))

    kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "prompts"}, "data": {"other.jsonl": "{}"}})
    s = wait_for("missing key named", lambda: kube.status("j"),
                 lambda s: "has no key 'batch.jsonl'" in (s.get("message") or ""))
    assert s["phase"] == "Pending" and kube.pod_names("j") == []

    line = '{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}'
    kube.core.patch_namespaced_config_map("prompts", ns, {"data": {"batch.jsonl": line}})
    s = kube.wait_phase("j", "Running")
    assert s["node"] == node and kube.pod_names("j") == ["j-1"]


def test_output_configmap_owned_by_someone_else_waits_naming_the_field(ns, kube, control_plane):  # noqa: F811
    """spec.output.configMap names an existing ConfigMap kubeflash did not create: Pending with
    Scheduled=False/OutputConflict naming spec.output.configMap, no pod, and its pair left to a second job; once
    that ConfigMap is deleted the job runs and its own output ConfigMap is created."""
    node = kube.gpu_node(control_plane, "n", models=(MODEL,))
    kube.settle()
    kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "taken"}, "data": {"mine": "yes"}})
    kube.submit("j", output={"configMap": {"name": "taken"}})
    s = _blocked(kube, "j", "OutputConflict")
    assert s["phase"] == "Pending" and s["message"].startswith("spec.output.configMap"), s["message"]
    assert f"ConfigMap {ns}/taken exists and was not created by kubeflash" in s["message"], s["message"]
    kube.submit("other")  # the node's only pair is free: the blocked job holds none
    assert kube.wait_phase("other", "Running")["node"] == node
    assert kube.core.read_namespaced_config_map("taken", ns).data == {"mine": "yes"}  # never written
    kube.end_pod("other-1", "Succeeded")
    kube.wait_phase("other", "Succeeded")
    kube.core.delete_namespaced_config_map("taken", ns)
    kube.wait_phase("j", "Running")
    cm = kube.core.read_namespaced_config_map("taken", ns)
    assert cm.metadata.labels["kubeflash.io/job"] == "j" and kube.pod_names("j") == ["j-1"]


def test_missing_claims_wait_naming_the_field(ns, kube, control_plane):  # noqa: F811
    """spec.input.pvc or spec.output.pvc naming a claim that does not exist: Pending with InputNotFound /
    OutputNotFound naming the field, no pod and no pair held (was: a pod the scheduler left unschedulable, failed
    after the timeout, retried backoffLimit times on the pair); once the claim exists the job runs."""
    node = kube.gpu_node(control_plane, "n", models=(MODEL,))
    kube.settle()
    kube.submit("in", input={"file": "batch.jsonl", "pvc": {"claimName": "prompts"}})
    s = _blocked(kube, "in", "InputNotFound")
    assert s["message"] == (f"spec.input.pvc.claimName: PersistentVolumeClaim {ns}/prompts not found; the job "
                            "waits for it")
    kube.submit("out", output={"pvc": {"claimName": "results"}})
    s = _blocked(kube, "out", "OutputNotFound")
    assert s["message"].startswith(f"spec.output.pvc.claimName: PersistentVolumeClaim {ns}/results not found")
    assert kube.pod_names("in") == [] and kube.pod_names("out") == []
    kube.submit("other")  # the node's only pair is free
    assert kube.wait_phase("other", "Running")["node"] == node
    kube.end_pod("other-1", "Succeeded")
    kube.wait_phase("other", "Succeeded")
    kube.core.create_namespaced_persistent_volume_claim(ns, {"metadata": {"name": "prompts"}, "spec": {
        "accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    s = kube.wait_phase("in", "Running")
    assert s["node"] == node and kube.pod_names("in") == ["in-1"]
    assert kube.status("out")["phase"] == "Pending"
