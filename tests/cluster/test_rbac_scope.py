"""The chart's RBAC and ValidatingAdmissionPolicies against a real kube-apiserver (issue 17, cluster half).

Attacks, as someone holding the agent's token (stolen from a node) or the operator's would try them:
  * `kubectl auth can-i --as=system:serviceaccount:...` for every verb the agent and the operator must NOT have
    (and the few they need, so a role that grants nothing cannot pass); the agent reads no pod and no
    InferenceJob at all (get/list: RBAC cannot narrow them to its node), only its FlashNode and Node;
  * the agent's pod-bound token of node A writing node B's Node labels, FlashNode and job status, a non-kubeflash
    label of its own Node, job fields only the operator writes, a user's ConfigMap, and writing at all with a
    token that names no node: every one refused by the admission policy, while its own node's writes pass;
  * the operator deleting a pod named like `<job>-<attempt>` that someone else owns: the operator code never
    deletes it (it reports a Conflict and leaves it), and the operator's token could not delete it anyway.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes.client.exceptions import ApiException  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRDS = Path(os.environ.get("KUBEFLASH_TEST_CRDS") or REPO / "crds")  # a fixed copy while crds/ is being regenerated
CHART = REPO / "helm" / "kubeflash"
GROUP, VERSION = "kubeflash.io", "v1alpha1"
TEMPLATES = ("agent-rbac.yaml", "operator-serviceaccount.yaml", "operator-rbac.yaml", "admission-policies.yaml")


class Setup:
    """The chart's RBAC and policies installed for release `kfr` in namespace `ns`, operator serving `ns` only."""

    def __init__(self, cp, ns: str):
        self.cp, self.ns = cp, ns
        self.admin = kubernetes.config.new_client_from_config(config_file=str(cp.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.admin)
        self.custom = kubernetes.client.CustomObjectsApi(self.admin)
        self.node_a, self.node_b = f"{ns}-a", f"{ns}-b"
        self.docs: list[dict] = []

    def install(self) -> None:
        self.cp.kubectl("apply", "--validate=false", "-f", str(CRDS))
        self.cp.wait_crds_established("inferencejobs.kubeflash.io", "flashnodes.kubeflash.io")
        args = ["template", "kfr", str(CHART), "--namespace", self.ns, "--set", f"operator.watchNamespaces={{{self.ns}}}",
                "--set", "operator.watchAllNamespaces=false"]
        for t in TEMPLATES:
            args += ["--show-only", f"templates/{t}"]
        self.docs = [d for d in yaml.safe_load_all(self.cp.helm(*args).stdout) if d]
        self.cp.apply("\n---\n".join(yaml.safe_dump(d) for d in self.docs))
        self.agent_sa = next(d["metadata"]["name"] for d in self.docs
                             if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith("agent"))
        self.operator_sa = next(d["metadata"]["name"] for d in self.docs
                                if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith("operator"))
        for node in (self.node_a, self.node_b):
            self.cp.create_fake_node(node)

    def remove(self) -> None:
        for d in self.docs:
            if "namespace" not in d["metadata"]:
                self.cp.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found",
                                "--wait=false", check=False)
        for node in (self.node_a, self.node_b):
            self.cp.kubectl("delete", "flashnode", node, "--ignore-not-found", check=False)
            self.cp.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
        self.admin.close()

    def pod_bound_token(self, sa: str, node: str) -> str:
        """What the agent pod on `node` holds: a service-account token bound to a pod scheduled there (the API
        server puts the node's name in the token's extra authentication.kubernetes.io/node-name)."""
        name = f"agent-{node}"
        try:
            self.core.create_namespaced_pod(self.ns, {"metadata": {"name": name}, "spec": {
                "nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": False,
                "containers": [{"name": "c", "image": "agent:fake"}]}})
        except ApiException as e:
            if e.status != 409:  # made for an earlier token of this node
                raise
        uid = self.core.read_namespaced_pod(name, self.ns).metadata.uid
        req = {"spec": {"audiences": [], "expirationSeconds": 3600,
                        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}}}
        return self.core.create_namespaced_service_account_token(sa, self.ns, req).status.token

    def unbound_token(self, sa: str) -> str:
        req = {"spec": {"audiences": [], "expirationSeconds": 3600}}
        return self.core.create_namespaced_service_account_token(sa, self.ns, req).status.token

    def client_with(self, token: str) -> kubernetes.client.ApiClient:
        conf = kubernetes.client.Configuration()
        conf.host = self.admin.configuration.host
        conf.ssl_ca_cert = self.admin.configuration.ssl_ca_cert
        conf.api_key = {"authorization": f"Bearer {token}"}
        return kubernetes.client.ApiClient(conf)


@pytest.fixture(scope="module")
def setup(control_plane):
    ns = f"r-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", ns)
    s = Setup(control_plane, ns)
    try:
        s.install()
        yield s
    finally:
        s.remove()
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def can_i(s: Setup, sa: str, verb: str, resource: str, ns: str | None = None) -> bool:
    resource, _, sub = resource.partition("/")  # kubectl reads "nodes/status" as resource/name: say subresource
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{s.ns}:{sa}"]
    args += [f"--subresource={sub}"] if sub else []
    args += ["-n", ns] if ns else ["--all-namespaces"]
    out = s.cp.kubectl(*args, check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


AGENT_MUST_NOT = [
    ("create", "configmaps"), ("delete", "configmaps"), ("get", "configmaps"), ("update", "configmaps"),
    ("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("delete", "pods"), ("patch", "pods"),
    ("get", "pods"), ("watch", "pods"), ("create", "pods/exec"), ("delete", "nodes"), ("update", "nodes"),
    ("patch", "nodes/status"), ("patch", "flashnodes.kubeflash.io"), ("delete", "flashnodes.kubeflash.io"),
    ("update", "flashnodes.kubeflash.io/status"), ("create", "inferencejobs.kubeflash.io"),
    ("patch", "inferencejobs.kubeflash.io"), ("delete", "inferencejobs.kubeflash.io"),
    ("watch", "inferencejobs.kubeflash.io"), ("create", "serviceaccounts/token"), ("create", "events"),
    # reads RBAC cannot narrow to one node: every tenant's pod specs and prompts (the agent learns its jobs from
    # the ledger on its own FlashNode instead)
    ("list", "pods"), ("get", "inferencejobs.kubeflash.io"), ("list", "inferencejobs.kubeflash.io"),
    ("get", "inferencejobs.kubeflash.io/status"), ("list", "flashnodes.kubeflash.io"),
    ("watch", "flashnodes.kubeflash.io"), ("list", "nodes"),
]
AGENT_NEEDS = [("get", "flashnodes.kubeflash.io"), ("create", "flashnodes.kubeflash.io"),
               ("patch", "flashnodes.kubeflash.io/status"), ("get", "nodes"), ("patch", "nodes"),
               ("patch", "inferencejobs.kubeflash.io/status"), ("patch", "configmaps")]


@pytest.mark.parametrize(("verb", "resource"), AGENT_MUST_NOT, ids=[f"{v}-{r}" for v, r in AGENT_MUST_NOT])
def test_agent_cannot(setup, verb, resource):
    """kubectl auth can-i as the agent's service account: no for every verb it must not have, in any namespace."""
    assert not can_i(setup, setup.agent_sa, verb, resource)


def test_agent_can_what_it_needs(setup):
    """...and yes for the writes the policy then narrows to its own node (so the 'no' answers above mean
    something)."""
    assert [can_i(setup, setup.agent_sa, v, r) for v, r in AGENT_NEEDS] == [True] * len(AGENT_NEEDS)


OPERATOR_MUST_NOT = [
    ("create", "pods", "kube-system"), ("delete", "pods", "kube-system"), ("create", "configmaps", "kube-system"),
    ("patch", "configmaps", "kube-system"), ("delete", "configmaps", None), ("update", "configmaps", None),
    ("get", "secrets", None), ("list", "secrets", None), ("patch", "nodes", None), ("delete", "nodes", None),
    ("patch", "pods", None), ("create", "pods/exec", None), ("delete", "flashnodes.kubeflash.io", None),
    ("patch", "flashnodes.kubeflash.io/status", None), ("delete", "inferencejobs.kubeflash.io", None),
    ("create", "inferencejobs.kubeflash.io", None), ("patch", "inferencejobs.kubeflash.io", "kube-system"),
]


@pytest.mark.parametrize(("verb", "resource", "ns"), OPERATOR_MUST_NOT,
                         ids=[f"{v}-{r}-{n or 'all'}" for v, r, n in OPERATOR_MUST_NOT])
def test_operator_cannot(setup, verb, resource, ns):
    """The operator, serving only its listed namespace: nothing outside it, no secrets, no node writes, no deletes
    of ConfigMaps or jobs."""
    assert not can_i(setup, setup.operator_sa, verb, resource, ns)


def test_operator_can_in_its_namespace(setup):
    needs = [("create", "pods"), ("delete", "pods"), ("create", "configmaps"), ("patch", "inferencejobs.kubeflash.io/status")]
    assert [can_i(setup, setup.operator_sa, v, r, setup.ns) for v, r in needs] == [True] * len(needs)


# Escalation paths neither token may have (issue 17, items 3 and 4): widening its own RBAC, acting as someone
# else, turning off the admission policies that scope it, rewriting the CRDs' validation, minting a node
# identity, reaching kubelets, registering a Node that would draw workloads, evicting or reading other pods.
ESCALATIONS = [
    ("create", "clusterroles.rbac.authorization.k8s.io"), ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"), ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("create", "roles.rbac.authorization.k8s.io"), ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("impersonate", "users"), ("impersonate", "serviceaccounts"), ("impersonate", "groups"),
    ("delete", "validatingadmissionpolicies.admissionregistration.k8s.io"),
    ("patch", "validatingadmissionpolicies.admissionregistration.k8s.io"),
    ("delete", "validatingadmissionpolicybindings.admissionregistration.k8s.io"),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("create", "mutatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "certificatesigningrequests.certificates.k8s.io"), ("get", "nodes/proxy"), ("create", "nodes"),
    ("create", "pods/eviction"), ("get", "pods/log"), ("create", "pods/attach"), ("create", "pods/portforward"),
    ("patch", "csidrivers.storage.k8s.io"), ("create", "persistentvolumes"), ("list", "configmaps"),
    ("watch", "configmaps"), ("create", "daemonsets.apps"), ("create", "deployments.apps"), ("create", "jobs.batch"),
    ("patch", "namespaces"), ("delete", "leases.coordination.k8s.io"),
]


@pytest.mark.parametrize("who", ["agent", "operator"])
@pytest.mark.parametrize(("verb", "resource"), ESCALATIONS, ids=[f"{v}-{r.split('.')[0]}" for v, r in ESCALATIONS])
def test_neither_token_can_escalate(setup, who, verb, resource):
    """kubectl auth can-i: no, cluster-wide, in the release's namespace and in the namespace the operator serves."""
    sa = setup.agent_sa if who == "agent" else setup.operator_sa
    for ns in (None, setup.ns, "kube-system"):
        assert not can_i(setup, sa, verb, resource, ns), (who, verb, resource, ns)


def refused(call, *args, **kw) -> str:
    """Run an API call that must be refused by admission; returns the refusal's message."""
    with pytest.raises(ApiException) as e:
        call(*args, **kw)
    assert e.value.status in (403, 422), e.value.body
    return json.loads(e.value.body).get("message", "")


def eventually_enforced(check, timeout=30.0):
    """A new policy is enforced once the API server's admission plugin has loaded it (about a second)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def job_on(s: Setup, name: str, node: str) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceJob", "metadata": {"name": name},
            "spec": {"model": {"uri": "dummy:opt-125m"}, "input": {"prompts": ["x"]},
                     "output": {"configMap": {"name": f"{name}-out"}}}}
    job = s.custom.create_namespaced_custom_object(GROUP, VERSION, s.ns, "inferencejobs", body)
    s.custom.patch_namespaced_custom_object_status(GROUP, VERSION, s.ns, "inferencejobs", name,
                                                   {"status": {"phase": "Running", "node": node, "disk": "nvme0"}})
    return job


def test_agent_token_writes_only_its_own_node(setup):
    """With the token of the agent pod on node A: node A's kubeflash.io labels, FlashNode, its status, and the
    progress of a job placed on A pass; the same writes for node B, other labels, operator-owned job fields and
    ConfigMaps the operator did not create for a job on A are refused by the policy, naming why."""
    s = setup
    agent = s.client_with(s.pod_bound_token(s.agent_sa, s.node_a))
    core, custom = kubernetes.client.CoreV1Api(agent), kubernetes.client.CustomObjectsApi(agent)
    a, b = s.node_a, s.node_b

    def node_b_label_refused():
        msg = refused(core.patch_node, b, {"metadata": {"labels": {"kubeflash.io/agent": "ready"}}})
        assert "only kubeflash.io/* labels of its own Node" in msg, msg
    eventually_enforced(node_b_label_refused)

    core.patch_node(a, {"metadata": {"labels": {"kubeflash.io/agent": "ready"}}})
    assert core.read_node(a).metadata.labels["kubeflash.io/agent"] == "ready"
    refused(core.patch_node, a, {"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}})
    refused(core.patch_node, a, {"metadata": {"labels": {"kubernetes.io/hostname": "elsewhere"}}})
    refused(core.patch_node, a, {"spec": {"unschedulable": True}})
    refused(core.patch_node, a, {"metadata": {"annotations": {"x": "y"}}})

    def flashnode(name):
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FlashNode", "metadata": {"name": name},
                "spec": {"nodeName": name}}
    assert "own FlashNode" in refused(custom.create_cluster_custom_object, GROUP, VERSION, "flashnodes", flashnode(b))
    bad = flashnode(a)
    bad["spec"]["nodeName"] = b
    refused(custom.create_cluster_custom_object, GROUP, VERSION, "flashnodes", bad)
    custom.create_cluster_custom_object(GROUP, VERSION, "flashnodes", flashnode(a))
    s.custom.create_cluster_custom_object(GROUP, VERSION, "flashnodes", flashnode(b))  # node B's, made by admin
    status = {"status": {"heartbeat": "2026-01-01T00:00:00Z"}}
    custom.patch_cluster_custom_object_status(GROUP, VERSION, "flashnodes", a, status)
    assert "own FlashNode" in refused(custom.patch_cluster_custom_object_status, GROUP, VERSION, "flashnodes", b,
                                      status)

    job_on(s, "on-a", a)
    job_on(s, "on-b", b)
    progress = {"status": {"progress": {"promptsDone": 1, "promptsTotal": 2, "tokens": 5}}}
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, s.ns, "inferencejobs", "on-a", progress)
    assert "placed on its node" in refused(custom.patch_namespaced_custom_object_status, GROUP, VERSION, s.ns,
                                           "inferencejobs", "on-b", progress)
    for forged in ({"phase": "Succeeded"}, {"node": b}, {"disk": "../../etc"}, {"message": "all fine"}):
        msg = refused(custom.patch_namespaced_custom_object_status, GROUP, VERSION, s.ns, "inferencejobs", "on-a",
                      {"status": forged})
        assert "only status.progress, status.throughput, status.timings and status.refused" in msg, (forged, msg)

    # ConfigMaps: the agent fills in only one the operator created for a job on its node
    uid = s.custom.get_namespaced_custom_object(GROUP, VERSION, s.ns, "inferencejobs", "on-a")["metadata"]["uid"]
    owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceJob", "name": "on-a", "uid": uid,
             "controller": True}
    labels = {"app.kubernetes.io/managed-by": "kubeflash-operator", "kubeflash.io/job": "on-a"}
    s.core.create_namespaced_config_map(s.ns, {"metadata": {"name": "on-a-out", "ownerReferences": [owner],
                                                            "labels": {**labels, "kubeflash.io/node": a}}})
    s.core.create_namespaced_config_map(s.ns, {"metadata": {"name": "users"}, "data": {"secret": "mine"}})
    s.core.create_namespaced_config_map(s.ns, {"metadata": {"name": "for-b", "ownerReferences": [owner],
                                                            "labels": {**labels, "kubeflash.io/node": b}}})
    results = {"data": {"results.jsonl": '{"custom_id": "0"}\n'}}
    core.patch_namespaced_config_map("on-a-out", s.ns, results)
    for name in ("users", "for-b"):
        assert "output ConfigMap the operator created" in refused(core.patch_namespaced_config_map, name, s.ns,
                                                                  results)
    refused(core.patch_namespaced_config_map, "on-a-out", s.ns, {"metadata": {"labels": {"kubeflash.io/node": b}}})
    refused(core.patch_namespaced_config_map, "on-a-out", s.ns, [{"op": "remove", "path": "/metadata/ownerReferences"}])
    assert s.core.read_namespaced_config_map("users", s.ns).data == {"secret": "mine"}
    agent.close()


def test_agent_token_without_a_node_writes_nothing(setup):
    """A token of the agent's service account not bound to a pod (no node claim) passes RBAC but no write."""
    s = setup
    agent = s.client_with(s.unbound_token(s.agent_sa))
    core = kubernetes.client.CoreV1Api(agent)

    def refused_for_no_node():
        msg = refused(core.patch_node, s.node_a, {"metadata": {"labels": {"kubeflash.io/agent": "ready"}}})
        assert "carries no node" in msg, msg
    eventually_enforced(refused_for_no_node)
    agent.close()


def test_agent_token_reads_no_pod_and_no_job(setup):
    """With the token of the agent pod on node A: listing pods (even with spec.nodeName=A), listing or getting
    InferenceJobs (even one placed on A) is refused by RBAC; reading its own FlashNode and Node works."""
    s = setup
    agent = s.client_with(s.pod_bound_token(s.agent_sa, s.node_a))
    core, custom = kubernetes.client.CoreV1Api(agent), kubernetes.client.CustomObjectsApi(agent)
    job_on(s, "placed-a", s.node_a)
    for call, args, kw in [
        (core.list_pod_for_all_namespaces, (), {"field_selector": f"spec.nodeName={s.node_a}"}),
        (core.list_namespaced_pod, (s.ns,), {}),
        (custom.list_cluster_custom_object, (GROUP, VERSION, "inferencejobs"), {}),
        (custom.list_namespaced_custom_object, (GROUP, VERSION, s.ns, "inferencejobs"), {}),
        (custom.get_namespaced_custom_object, (GROUP, VERSION, s.ns, "inferencejobs", "placed-a"), {}),
    ]:
        with pytest.raises(ApiException) as e:
            call(*args, **kw)
        assert e.value.status == 403, (call.__name__, e.value.body)
    try:
        s.custom.create_cluster_custom_object(GROUP, VERSION, "flashnodes", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "FlashNode", "metadata": {"name": s.node_a},
            "spec": {"nodeName": s.node_a}})
    except ApiException as e:
        assert e.status == 409, e.body  # made by the test above
    assert custom.get_cluster_custom_object(GROUP, VERSION, "flashnodes", s.node_a)["metadata"]["name"] == s.node_a
    assert core.read_node(s.node_a).metadata.name == s.node_a
    agent.close()


def test_foreign_pod_named_like_an_attempt_is_never_deleted(setup):
    """A pod `<job>-1` someone else made (even with the job's labels copied) when the operator creates attempt 1:
    create_pod reports a Conflict and leaves it; delete_pod and delete_job_pods skip it; and the operator's own
    token could not delete it anyway (policy), while it may delete a pod it made."""
    from kubeflash_operator.builder import labels as pod_labels
    from kubeflash_operator.kube import Conflict, Kube

    s = setup
    job = job_on(s, "victim", s.node_a)
    uid = job["metadata"]["uid"]
    s.core.create_namespaced_pod(s.ns, {"metadata": {"name": "victim-1", "labels": pod_labels("victim")}, "spec": {
        "nodeName": s.node_a, "containers": [{"name": "c", "image": "users:own"}]}})
    before = s.core.read_namespaced_pod("victim-1", s.ns).metadata.uid
    ours = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "victim-1", "namespace": s.ns, "labels": pod_labels("victim"),
        "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceJob", "name": "victim",
                             "uid": uid, "controller": True}]},
        "spec": {"nodeName": s.node_a, "containers": [{"name": "engine", "image": "engine:1"}]}}

    kube = Kube(s.admin)  # the operator's code, with rights to delete anything: the code itself must hold back
    with pytest.raises(Conflict, match="not this job's"):
        kube.create_pod(ours, owner_uid=uid)
    assert kube.delete_pod(s.ns, "victim-1", job="victim", owner_uid=uid) is False
    assert kube.delete_job_pods(s.ns, "victim", uid) == []
    assert s.core.read_namespaced_pod("victim-1", s.ns).metadata.uid == before

    operator = s.client_with(s.unbound_token(s.operator_sa))
    op_core = kubernetes.client.CoreV1Api(operator)

    def operator_delete_refused():
        msg = refused(op_core.delete_namespaced_pod, "victim-1", s.ns)
        assert "only pods it created" in msg, msg
    eventually_enforced(operator_delete_refused)
    assert s.core.read_namespaced_pod("victim-1", s.ns).metadata.uid == before

    ours["metadata"]["name"] = "victim-2"
    op_core.create_namespaced_pod(s.ns, ours)  # the operator may create (and so delete) a pod it owns
    assert Kube(operator).delete_pod(s.ns, "victim-2", job="victim", owner_uid=uid) is True
    operator.close()
