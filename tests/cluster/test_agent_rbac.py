"""The node agent under the Helm chart's own RBAC and admission policies (helm template … agent-rbac.yaml,
admission-policies.yaml), with the node-bound token its pod would hold, not as cluster admin:
everything it does in a pass — its FlashNode (and the job ledger the operator writes there), node labels, job
status, results into the ConfigMap the operator created — is allowed, though it may read no pod and no
InferenceJob: the test plays the operator (ledger and status writes as admin) and the agent finds the job
through the ledger alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

from kubeflash_node.store.ids import model_id  # noqa: E402
from kubeflash_operator.bookkeeping import ledger_annotation  # noqa: E402
from kubeflash_operator.scheduler import Claim  # noqa: E402

from agent_harness import AgentProc, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def agent_kubeconfig(cp, namespace: str, node: str, tmp_path: Path) -> Path:
    """Install the chart's agent ServiceAccount/ClusterRole/Binding and admission policies, and a kubeconfig with
    the token an agent pod on `node` holds (bound to a pod there, so it names the node the policy scopes to)."""
    release = f"kf-{namespace}"
    rendered = cp.helm("template", release, str(REPO / "helm" / "kubeflash"), "--namespace", namespace,
                       "--show-only", "templates/agent-rbac.yaml",
                       "--show-only", "templates/admission-policies.yaml").stdout
    cp.kubectl("apply", "-f", "-", input=rendered)
    sa = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ServiceAccount")["metadata"]["name"]
    cp.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent", "namespace": namespace},
              "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": False,
                       "containers": [{"name": "agent", "image": "agent:fake"}]}})
    token = cp.kubectl("create", "token", sa, "-n", namespace, "--duration=1h", "--bound-object-kind=Pod",
                       "--bound-object-name=agent").stdout.strip()
    config = yaml.safe_load(Path(cp.kubeconfig).read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path = tmp_path / "agent.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def ledger(cp, node: str, claims: dict, ended: dict | None = None) -> None:
    """The job ledger on FlashNode `node`, as the operator writes it (one write of both annotations)."""
    annotations = {"kubeflash.io/claims": ledger_annotation(claims),
                   "kubeflash.io/ended": json.dumps(ended) if ended else None}
    cp.kubectl("patch", "flashnode", node, "--type=merge", "-p", json.dumps({"metadata": {"annotations": annotations}}))


def test_agent_works_with_chart_rbac(control_plane, namespace, tmp_path):
    cp = control_plane
    cp.kubectl("apply", "--validate=false", "-f", str(REPO / "crds"))
    cp.wait_crds_established("inferencejobs.kubeflash.io", "flashnodes.kubeflash.io")
    node = f"{namespace}-rbac"
    cp.create_fake_node(node)
    agent = AgentProc(tmp_path, {
        "nodeName": node, "kube": True, "kubeconfig": str(agent_kubeconfig(cp, namespace, node, tmp_path)),
        "interval": 0.5, "gpus": [{"index": 0, "name": "fake", "memory": "16Gi", "pciRoot": "0000:00"}],
        "disks": [{"name": "nvme0", "path": str(tmp_path / "nvme0"), "pciRoot": "0000:00"}]})
    try:
        agent.start()
        wait_for(lambda: json.loads(cp.kubectl("get", "flashnode", node, "-o", "json", check=False).stdout or "{}")
                 .get("status", {}).get("heartbeat"), 30, what="FlashNode status", log=agent.log)
        labels = json.loads(cp.kubectl("get", "node", node, "-o", "json").stdout)["metadata"]["labels"]
        assert labels["kubeflash.io/agent"] == "ready"

        cp.apply({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
                  "metadata": {"name": "j", "namespace": namespace},
                  "spec": {"model": {"uri": "dummy:opt-125m"}, "input": {"prompts": ["x"]},
                           "output": {"configMap": {"name": "j-out"}}}})
        uid = json.loads(cp.kubectl("get", "inferencejob", "j", "-n", namespace, "-o", "json").stdout)["metadata"]["uid"]
        claim = Claim(f"{namespace}/j", node, (0,), "nvme0", 1 << 30, model_id=model_id("dummy:opt-125m"), uid=uid,
                      output="j-out")
        ledger(cp, node, {claim.job: claim})
        cp.kubectl("patch", "inferencejob", "j", "-n", namespace, "--subresource=status", "--type=merge", "-p",
                   json.dumps({"status": {"phase": "Running", "node": node, "disk": "nvme0",
                                          "modelId": model_id("dummy:opt-125m")}}))
        job_dir = tmp_path / "nvme0" / "jobs" / namespace / "j"
        wait_for(lambda: job_dir.is_dir(), 30, what="job space", log=agent.log)
        (job_dir / "progress.json").write_text(json.dumps({"promptsDone": 1, "promptsTotal": 1, "tokens": 3}))
        wait_for(lambda: json.loads(cp.kubectl("get", "inferencejob", "j", "-n", namespace, "-o", "json").stdout)
                 .get("status", {}).get("progress", {}).get("tokens") == 3, 30, what="progress", log=agent.log)
        cp.apply({"apiVersion": "v1", "kind": "ConfigMap",  # as the operator creates it before the pod
                  "metadata": {"name": "j-out", "namespace": namespace,
                               "labels": {"app.kubernetes.io/managed-by": "kubeflash-operator",
                                          "kubeflash.io/job": "j", "kubeflash.io/node": node},
                               "ownerReferences": [{"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
                                                    "name": "j", "uid": uid, "controller": True}]}})
        (job_dir / "results.jsonl").write_text('{"custom_id": "0"}\n')
        ledger(cp, node, {}, ended={claim.job: {"end": "Succeeded", "disk": "nvme0", "kv": 1 << 30, "uid": uid,
                                                "cm": "j-out"}})
        cp.kubectl("patch", "inferencejob", "j", "-n", namespace, "--subresource=status", "--type=merge", "-p",
                   json.dumps({"status": {"phase": "Succeeded"}}))
        wait_for(lambda: "results.jsonl" in (json.loads(cp.kubectl("get", "configmap", "j-out", "-n", namespace,
                                                                   "-o", "json").stdout).get("data") or {}), 30,
                 what="results in the ConfigMap", log=agent.log)
        cp.kubectl("delete", "inferencejob", "j", "-n", namespace)
        ledger(cp, node, {})
        wait_for(lambda: not job_dir.exists(), 30, what="job space removed", log=agent.log)
        assert "reconcile pass failed" not in agent.log() and "Forbidden" not in agent.log()
    finally:
        agent.stop()
        cp.kubectl("delete", "flashnode", node, "--ignore-not-found", check=False)
        cp.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
        cp.kubectl("delete", "clusterrolebinding,clusterrole", f"kf-{namespace}-kubeflash-agent",
                   "--ignore-not-found", check=False)
        for name in (f"kf-{namespace}-kubeflash-agent-node-scope", f"kf-{namespace}-kubeflash-operator-owned-only"):
            cp.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name,
                       "--ignore-not-found", check=False)
