"""The Helm chart (helm/kubeflash) against a real control plane: lint, schema, server-side validation of every
rendered object, install / upgrade / uninstall with the CRDs kept, and the chart's RBAC exercised by the real
`kubeflash operator` and `kubeflash agent` running under the chart's service accounts.

KWOK fakes the pods, so the chart's own Deployment and DaemonSet never run code here; the RBAC test runs the
operator and the agent as local processes that authenticate with the chart's service-account tokens.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from polling import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubeflash"
CRD_NAMES = ("inferencejobs.kubeflash.io", "flashnodes.kubeflash.io")
MODEL_URI = "builtin:smollm2-135m"

# Every optional feature on: what the "all features" renders and dry-runs check.
ALL_FEATURES = {
    "operator": {"verbose": True, "config": {"heartbeat_timeout_s": 60, "backoff_base_s": 5}},
    "agent": {
        "extraDisks": [{"name": "nvme1", "path": "/mnt/nvme1/kubeflash", "reserve": "10Gi"}],
        "config": {"interval": "5s", "probe": {"enabled": False},
                   "gpus": [{"index": 0, "name": "Fake GPU", "memory": "16Gi"}]},
        "runtimeClassName": "nvidia",
        "priorityClassName": "system-node-critical",
    },
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "dashboard": {"enabled": True},
        "jobMetrics": {"enabled": True, "serviceAccount": {"name": "kube-state-metrics", "namespace": "monitoring"}},
    },
}

# A stand-in for the Prometheus Operator's CRD, so a rendered ServiceMonitor can be validated server-side.
SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor"},
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
            "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}


# --------------------------------------------------------------------------------------------------- helpers


def wait_for(what: str, get: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    return _wait_for(what, get, ok, timeout=timeout, every=0.5)



def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def render(cp, *args: str) -> list[dict[str, Any]]:
    out = cp.helm("template", "kf", str(CHART), *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def crd_established(cp, name: str) -> bool:
    crd = cp.kubectl_json("get", "crd", name)  # a CRD created a moment ago has status.conditions null
    return any(c["type"] == "Established" and c["status"] == "True"
               for c in (crd.get("status") or {}).get("conditions") or [])


def delete_crds(cp) -> None:
    """Remove the kubeflash CRDs (and so every InferenceJob and FlashNode), so that a test starts and leaves the
    cluster as `kubectl apply -f crds/` expects it (another test's module fixture creates them again). Objects
    left by other tests whose operator is gone keep their finalizers: those are dropped first."""
    for kind in ("inferencejobs", "flashnodes"):
        listed = cp.kubectl("get", kind, "-A", "-o", "json", check=False)
        for item in (json.loads(listed.stdout).get("items", []) if listed.returncode == 0 else []):
            meta = item["metadata"]
            where = ["-n", meta["namespace"]] if meta.get("namespace") else []
            cp.kubectl("patch", kind, meta["name"], *where, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                       check=False)
    cp.kubectl("delete", "crd", *CRD_NAMES, "--ignore-not-found", "--timeout=120s", timeout=180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sa_kubeconfig(cp, namespace: str, sa: str, dest: Path, node: str | None = None) -> str:
    """A kubeconfig that authenticates as a service account (a token from the TokenRequest API); with `node`, the
    token is bound to a pod on that node, as a DaemonSet pod's projected token is (the chart's admission policy
    scopes the agent to the node its token names)."""
    bind: list[str] = []
    if node:
        pod = f"{sa}-on-{node}"[:63]
        cp.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": namespace},
                  "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": False,
                           "containers": [{"name": "c", "image": "token-holder:fake"}]}})
        bind = ["--bound-object-kind=Pod", f"--bound-object-name={pod}"]
    token = cp.kubectl("create", "token", sa, "-n", namespace, "--duration=1h", *bind).stdout.strip()
    admin = yaml.safe_load(Path(cp.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster["name"], "user": sa}}],
        "current-context": sa,
    }
    dest.write_text(yaml.safe_dump(config))
    return str(dest)


@pytest.fixture
def crds_present(control_plane):
    """The CRDs, applied from crds/ if no earlier test made them, and then removed again (other test modules
    apply crds/ themselves and expect to create them)."""
    made = any(control_plane.kubectl("get", "crd", n, check=False).returncode for n in CRD_NAMES)
    if made:
        control_plane.kubectl("apply", "-f", str(REPO / "crds"))
    for name in CRD_NAMES:
        wait_for(f"CRD {name} Established", lambda name=name: crd_established(control_plane, name), bool)
    yield
    if made:
        delete_crds(control_plane)


@pytest.fixture(scope="module")
def servicemonitor_crd(control_plane):
    control_plane.apply(SERVICEMONITOR_CRD)
    wait_for("ServiceMonitor CRD", lambda: crd_established(control_plane, SERVICEMONITOR_CRD["metadata"]["name"]), bool)
    yield
    control_plane.kubectl("delete", "crd", SERVICEMONITOR_CRD["metadata"]["name"], "--wait=false", check=False)


# ---------------------------------------------------------------------------------------- chart, no install


def test_chart_crds_are_the_repository_crds():
    """helm/kubeflash/files/crds/ is a byte-for-byte copy of crds/ (kind/sync-crds.sh makes it)."""
    source = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    copied = {p.name: p.read_bytes() for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    assert source, "no CRDs in crds/"
    assert copied == source, "the chart's CRDs differ from crds/: run kind/sync-crds.sh"


def test_values_schema_knows_every_operator_and_agent_setting():
    """operator.config and agent.config in values.schema.json list exactly the settings the code reads."""
    from dataclasses import fields

    from kubeflash_node.agent import config as agent_config
    from kubeflash_operator.config import OperatorConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["properties"]
    operator_keys = set(props["operator"]["properties"]["config"]["properties"])
    set_by_chart = {"metrics_port", "liveness_port", "engine_image",  # flags of the Deployment
                    "allowed_images",  # operator.allowedImages
                    "engine_cpu_request", "engine_cpu_limit", "engine_memory", "engine_memory_overhead",
                    "engine_ephemeral_storage"}  # operator.enginePod
    assert operator_keys == {f.name for f in fields(OperatorConfig)} - set_by_chart
    agent_keys = set(props["agent"]["properties"]["config"]["properties"])
    chart_owned = {"nodeName", "kube", "kubeconfig", "listen", "disks"}  # env, in-cluster, apiPort, storePath
    local_mode_only = {"models", "jobs"}  # --no-kube mode: in a cluster they come from FlashNode.spec and pods
    assert agent_keys == agent_config._TOP - chart_owned - local_mode_only


def test_dashboard_uses_only_exported_metrics():
    """Every kubeflash_* series in the Grafana dashboard is exported by the operator, the agent, or the
    kube-state-metrics job config the chart ships."""
    defined: set[str] = set()
    for module in (REPO / "operator/kubeflash_operator/metrics.py", REPO / "node-agent/kubeflash_node/agent/metrics.py"):
        text = module.read_text()
        prefix = dict(re.findall(r'^(\w+)\s*=\s*"(kubeflash_\w*)"', text, re.M))
        defined |= set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(kubeflash_\w+)"', text))
        defined |= {prefix[var] + name for var, name in re.findall(r'(?:Counter|Gauge|Histogram)\(\s*(\w+)\s*\+\s*"(\w+)"', text)
                    if var in prefix}
    jobs = yaml.safe_load((CHART / "files" / "job-metrics.yaml").read_text())
    for res in jobs["spec"]["resources"]:
        defined |= {f"{res['metricNamePrefix']}_{m['name']}" for m in res["metrics"]}
    assert "kubeflash_agent_disk_read_bytes_per_second" in defined and "kubeflash_jobs" in defined

    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    series = {m for e in exprs for m in re.findall(r"\bkubeflash_\w+", e)}
    used = {m if m in defined else re.sub(r"_(total|bucket|sum|count)$", "", m) for m in series}
    assert used, "the dashboard queries nothing"
    assert used <= defined, f"dashboard series nobody exports: {sorted(used - defined)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "per-layer", "ssd bandwidth", "cache hit"):
        assert topic in titles, f"no dashboard panel about {topic}"


def variant_args(tmp_path: Path, variant: str) -> list[str]:
    """Values of a variant: chart defaults, every optional feature on, or the kind cluster's (kind/values.yaml)."""
    if variant == "all-features":
        return ["-f", values_file(tmp_path, ALL_FEATURES)]
    if variant == "kind":
        return ["-f", str(REPO / "kind" / "values.yaml")]
    return []


def test_install_doc_lists_every_value():
    """docs/install.md's values table has a row for every leaf key of values.yaml (maps of settings count as one)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    whole = {"resources", "securityContext", "podSecurityContext", "nodeSelector", "labels", "serviceAccount",
             "config", "tolerations", "affinity", "podAnnotations"}

    def leaves(node: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict) and value and key not in whole:
                out += leaves(value, f"{prefix}{key}.")
            else:
                out.append(prefix + key)
        return out

    doc = (REPO / "docs" / "install.md").read_text()
    missing = [k for k in leaves(values) if f"| `{k}` |" not in doc]
    assert not missing, f"docs/install.md has no row for {missing}"


def test_kind_examples_are_valid_inferencejobs(control_plane, namespace, crds_present):
    """The manifests the kind tests submit pass the CRD's validation (server-side dry run)."""
    for name in ("capital-of-france.yaml", "cluster-batch-configmap.yaml", "kind-long-job.yaml"):
        control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(REPO / "examples" / name))


@pytest.mark.parametrize("variant", ["defaults", "all-features", "kind"])
def test_helm_lint(control_plane, tmp_path, variant):
    """helm lint --strict is clean with the defaults, with every optional feature on, and with the kind values."""
    args = variant_args(tmp_path, variant)
    out = control_plane.helm("lint", "--strict", str(CHART), *args)
    assert "0 chart(s) failed" in out.stdout, out.stdout


@pytest.mark.parametrize("bad, complaint", [
    ("operator.confg.x=1", "confg"),
    ("agent.config.disks=x", "disks"),
    ("operator.config.metrics_port=1", "metrics_port"),
    ("agent.storePath=relative", "storePath"),
    ("crds.enabled=maybe", "enabled"),
    ("agent.image.digest=latest", "digest"),
    ("operator.enginePod.memory=lots", "memory"),
    # 0 would fail every attempt at once: every pod is ContainerCreating for a moment
    ("operator.config.container_start_timeout_s=0", "container_start_timeout_s"),
    # the agent refuses two disks of one name (CrashLoopBackOff on every node): refused at render, naming the value
    ("agent.extraDisks[0].name=nvme0,agent.extraDisks[0].path=/mnt/b", 'agent.extraDisks[0].name "nvme0" is already '
                                                                       "the name of agent.storeName"),
    ("agent.extraDisks[0].name=b,agent.extraDisks[0].path=/var/lib/kubeflash/", "agent.extraDisks[0].path"),
    ("agent.extraDisks[0].name=b,agent.extraDisks[0].path=/mnt/b,agent.extraDisks[1].name=b,"
     "agent.extraDisks[1].path=/mnt/c", "agent.extraDisks[1].name"),
], ids=["typo", "disks-come-from-storePath", "port-is-a-flag", "relative-store", "not-a-bool", "digest-not-a-digest",
        "memory-not-a-quantity", "start-timeout-zero", "extra-disk-named-like-the-store", "extra-disk-at-the-store-path",
        "two-extra-disks-one-name"])
def test_values_schema_rejects_mistakes(control_plane, bad, complaint):
    proc = control_plane.helm("template", "kf", str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0, f"--set {bad} was accepted"
    assert complaint in proc.stderr, proc.stderr


def test_rendered_crds_are_the_source_crds(control_plane):
    """The templated CRDs carry the source's spec unchanged, Helm labels, and the keep policy only with crds.keep."""
    sources = {d["metadata"]["name"]: d for p in (REPO / "crds").glob("*.yaml") for d in [yaml.safe_load(p.read_text())]}
    kept = by_kind(render(control_plane), "CustomResourceDefinition")
    assert {d["metadata"]["name"] for d in kept} == set(sources)
    for crd in kept:
        assert crd["spec"] == sources[crd["metadata"]["name"]]["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    dropped = by_kind(render(control_plane, "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert dropped and all("helm.sh/resource-policy" not in (d["metadata"].get("annotations") or {}) for d in dropped)
    assert not by_kind(render(control_plane, "--set", "crds.enabled=false"), "CustomResourceDefinition")


def test_rendered_workloads(control_plane, tmp_path):
    """The operator and agent pods are wired as the components expect (flags, env, mounts, probes, ports)."""
    docs = render(control_plane, "-n", "kubeflash-system", "-f", values_file(tmp_path, ALL_FEATURES),
                  "--set", "engine.image=example.com/engine:1")
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    op = deploy["spec"]["template"]["spec"]["containers"][0]
    assert op["command"] == ["kubeflash", "operator"]
    assert {"--all-namespaces", "--metrics-port=9090", "--liveness-port=8080", "--verbose",
            "--engine-image=example.com/engine:1"} <= set(op["args"])
    assert {"name": "KUBEFLASH_OPERATOR_HEARTBEAT_TIMEOUT_S", "value": "60"} in op["env"]
    assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}

    (ds,) = by_kind(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    agent, proxy = containers["agent"], containers["metrics"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in agent["env"]
    assert pod["nodeSelector"] == {"kubeflash.io/ssd": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    host = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v and v["name"].startswith("store-")}
    mounted = {m["mountPath"] for m in agent["volumeMounts"]}
    assert host == {"/var/lib/kubeflash", "/mnt/nvme1/kubeflash"} and host <= mounted, \
        "store paths must be mounted at the same path: the operator builds hostPath volumes from them"
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-agent")]
    config = yaml.safe_load(cm["data"]["agent.yaml"])
    assert [d["path"] for d in config["disks"]] == ["/var/lib/kubeflash", "/mnt/nvme1/kubeflash"]
    assert config["listen"] == "127.0.0.1:9477" and config["gpus"][0]["name"] == "Fake GPU"
    from kubeflash_node.agent.config import from_mapping

    assert from_mapping(config, node_name="n1").disks[1].name == "nvme1"  # the agent accepts the file
    assert proxy["ports"][0]["containerPort"] == 9478 and proxy["securityContext"]["runAsNonRoot"] is True

    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    (monitor,) = by_kind(docs, "ServiceMonitor")
    selected = [s for s in services.values()
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 2 and all(s["spec"]["ports"][0]["name"] == "metrics" for s in selected)
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubeflash.json"])["uid"] == "kubeflash"


def test_rendered_tenancy_boundaries(control_plane, tmp_path):
    """docs/security.md "Cluster" as rendered: NetworkPolicies that let only metricsFrom reach a /metrics port (no
    one by default), the admission policies, images by digest, the image allowlist and pod limits handed to the
    operator, and no cluster-wide serving without saying so."""
    digest = "sha256:" + "ab" * 32
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    values = {"operator": {"image": {"digest": digest}, "allowedImages": ["reg.example/team/*", "x@" + digest],
                           "enginePod": {"cpuRequest": "500m", "cpuLimit": "4", "memory": "8Gi",
                                         "memoryOverhead": "1Gi", "ephemeralStorage": "1Gi"},
                           "watchNamespaces": ["team-a", "team-b"], "watchAllNamespaces": False},
              "agent": {"image": {"digest": digest}}, "networkPolicy": {"metricsFrom": peers}}
    docs = render(control_plane, "-n", "kubeflash-system", "-f", values_file(tmp_path, values))
    policies = {d["metadata"]["name"]: d for d in by_kind(docs, "NetworkPolicy")}
    assert set(policies) == {"kf-kubeflash-operator", "kf-kubeflash-agent"}
    ports = {name: [p["port"] for rule in d["spec"]["ingress"] for p in rule["ports"]] for name, d in policies.items()}
    assert ports == {"kf-kubeflash-operator": [9090], "kf-kubeflash-agent": [9478]}  # never healthz or the API
    assert all(d["spec"]["ingress"][0]["from"] == peers and d["spec"]["policyTypes"] == ["Ingress"]
               for d in policies.values())
    closed = by_kind(render(control_plane), "NetworkPolicy")
    assert len(closed) == 2 and all(d["spec"]["ingress"] == [] for d in closed)  # default: nobody connects

    (deploy,) = by_kind(docs, "Deployment")
    op = deploy["spec"]["template"]["spec"]["containers"][0]
    assert op["image"] == f"ghcr.io/kubeflash/kubeflash-operator@{digest}"
    assert f"--engine-image=ghcr.io/kubeflash/kubeflash@{digest}" in op["args"]  # the only image jobs run by default
    assert {"--namespace=team-a", "--namespace=team-b"} <= set(op["args"]) and "--all-namespaces" not in op["args"]
    env = {e["name"]: e.get("value") for e in op["env"]}
    assert env["KUBEFLASH_OPERATOR_ALLOWED_IMAGES"] == f"reg.example/team/*,x@{digest}"
    assert (env["KUBEFLASH_OPERATOR_ENGINE_CPU_REQUEST"], env["KUBEFLASH_OPERATOR_ENGINE_MEMORY"],
            env["KUBEFLASH_OPERATOR_ENGINE_EPHEMERAL_STORAGE"]) == ("500m", "8Gi", "1Gi")
    from kubeflash_operator.config import OperatorConfig

    cfg = OperatorConfig.from_env({k: v for k, v in env.items() if k.startswith("KUBEFLASH_OPERATOR_")})
    assert cfg.allowed_images == ("reg.example/team/*", "x@" + digest) and cfg.pod_limits.memory_overhead == "1Gi"
    (ds,) = by_kind(docs, "DaemonSet")
    assert {c["image"] for c in ds["spec"]["template"]["spec"]["containers"]} == {f"ghcr.io/kubeflash/kubeflash@{digest}"}
    assert {d["metadata"]["name"] for d in by_kind(docs, "ValidatingAdmissionPolicy")} == {
        "kf-kubeflash-agent-node-scope", "kf-kubeflash-operator-owned-only"}
    assert len(by_kind(docs, "ValidatingAdmissionPolicyBinding")) == 2
    assert not by_kind(render(control_plane, "--set", "admissionPolicies.enabled=false"), "ValidatingAdmissionPolicy")

    refused = control_plane.helm("template", "kf", str(CHART), "--set", "operator.watchAllNamespaces=false", check=False)
    assert refused.returncode != 0 and "list the namespaces the operator serves" in refused.stderr
    no_crds = ("--dry-run=client", "-n", "x", "--set", "crds.enabled=false")  # earlier tests installed the CRDs
    notes = control_plane.helm("install", "kf", str(CHART), *no_crds).stdout
    assert "WARNING: the operator serves InferenceJobs in EVERY namespace" in notes
    scoped = control_plane.helm("install", "kf", str(CHART), *no_crds, "--set", "operator.watchNamespaces={a}").stdout
    assert "EVERY namespace" not in scoped


def test_rendered_csi_driver_and_plugin(control_plane, tmp_path):
    """The CSIDriver kubeflash.io (no attach, pod info, ephemeral only) and the privileged `csi` container whose
    mounts under the kubelet's pods directory propagate to the host; csi.enabled=false renders neither."""
    docs = render(control_plane, "-n", "kubeflash-system", "-f", values_file(tmp_path, ALL_FEATURES))
    (driver,) = by_kind(docs, "CSIDriver")
    assert driver["metadata"]["name"] == "kubeflash.io"
    assert driver["spec"]["attachRequired"] is False and driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    (ds,) = by_kind(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (csi,) = [c for c in pod["containers"] if c["name"] == "csi"]
    assert csi["command"][:2] == ["kubeflash", "csi"] and csi["securityContext"]["privileged"] is True
    assert {"--disk=nvme0=/var/lib/kubeflash", "--disk=nvme1=/mnt/nvme1/kubeflash",
            "--pods-dir=/var/lib/kubelet/pods", "--registration-dir=/var/lib/kubelet/plugins_registry",
            "--endpoint=unix:///var/lib/kubelet/plugins/kubeflash.io/csi.sock"} <= set(csi["command"])
    mounts = {m["mountPath"]: m for m in csi["volumeMounts"]}
    assert mounts["/var/lib/kubelet/pods"]["mountPropagation"] == "Bidirectional"
    assert {"/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins/kubeflash.io", "/dev"} <= set(mounts)
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {host[m["name"]] for m in csi["volumeMounts"]} == set(mounts), "each path mounted where it is on the host"
    off = render(control_plane, "-n", "kubeflash-system", "--set", "csi.enabled=false")
    assert by_kind(off, "CSIDriver") == []
    assert [c["name"] for c in by_kind(off, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"]] == \
        ["agent", "metrics"]


# ------------------------------------------------------------------------------------- against the server


@pytest.mark.parametrize("variant", ["defaults", "all-features", "kind"])
def test_rendered_manifests_pass_server_side_dry_run(control_plane, namespace, servicemonitor_crd, tmp_path, variant):
    """`helm template | kubectl apply --dry-run=server`: the API server validates every object."""
    values = {} if variant != "all-features" else {
        **ALL_FEATURES,
        "operator": {**ALL_FEATURES["operator"], "watchNamespaces": [namespace]},
        "metrics": {**ALL_FEATURES["metrics"], "jobMetrics": {"enabled": True, "serviceAccount": {
            "name": "kube-state-metrics", "namespace": namespace}}},
    }
    # The CRDs are validated in the install test (a dry-run create of an existing CRD conflicts).
    extra = variant_args(tmp_path, variant) if variant == "kind" else ["-f", values_file(tmp_path, values)]
    manifest = control_plane.helm("template", f"dry-{variant}", str(CHART), "-n", namespace, "--set", "crds.enabled=false",
                                  *extra).stdout
    proc = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=manifest)
    kinds = {line.split("/")[0].split(".")[0] for line in proc.stdout.splitlines()}
    expected = {"deployment", "daemonset", "clusterrole", "clusterrolebinding", "serviceaccount", "configmap", "service"}
    assert expected <= kinds, proc.stdout
    if variant == "all-features":
        assert {"servicemonitor", "rolebinding"} <= kinds, proc.stdout


def test_install_upgrade_uninstall_keeps_crds(control_plane, namespace):
    """helm install creates every object and serving CRDs; upgrade keeps the CRDs (same objects); uninstall with
    crds.keep leaves them while everything else goes."""
    release = f"kubeflash-{namespace}"  # contains the chart name, so objects are <release>-operator etc.
    cp = control_plane
    cp.create_fake_node(f"{namespace}-gpu", labels={"kubeflash.io/ssd": "true"},
                        taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
    cp.create_fake_node(f"{namespace}-cpu")
    delete_crds(cp)  # the release creates them
    try:
        cp.helm("install", release, str(CHART), "-n", namespace, "--wait=false", timeout=180)
        for name in CRD_NAMES:
            wait_for(f"CRD {name} Established", lambda name=name: crd_established(cp, name), bool)
        cp.kubectl("get", "ij", "-n", namespace)  # the short name serves
        cp.kubectl("get", "fn")
        uids = {n: cp.kubectl_json("get", "crd", n)["metadata"]["uid"] for n in CRD_NAMES}

        deploy = cp.kubectl_json("get", "deployment", f"{release}-operator", "-n", namespace)
        assert deploy["spec"]["strategy"]["type"] == "Recreate"
        ds = wait_for("the agent DaemonSet to target the one SSD node",
                      lambda: cp.kubectl_json("get", "daemonset", f"{release}-agent", "-n", namespace),
                      lambda d: d.get("status", {}).get("desiredNumberScheduled") == 1)
        pods = cp.kubectl_json("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=agent")["items"]
        assert [p["spec"].get("nodeName") for p in pods] == [f"{namespace}-gpu"], \
            "the agent runs on kubeflash.io/ssd=true nodes only, despite their GPU taint"
        assert ds["spec"]["template"]["spec"]["serviceAccountName"] == f"{release}-agent"
        for role in (f"{release}-operator", f"{release}-operator-jobs", f"{release}-agent"):
            cp.kubectl("get", "clusterrole", role)
            cp.kubectl("get", "clusterrolebinding", role)

        cp.helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values", "--set", "crds.enabled=true",
                "--set", "operator.verbose=true", "--wait=false", timeout=180)
        assert {n: cp.kubectl_json("get", "crd", n)["metadata"]["uid"] for n in CRD_NAMES} == uids
        args = cp.kubectl_json("get", "deployment", f"{release}-operator", "-n", namespace)[
            "spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--verbose" in args
    finally:
        cp.helm("uninstall", release, "-n", namespace, "--wait", timeout=180, check=False)
        for node in (f"{namespace}-gpu", f"{namespace}-cpu"):
            cp.kubectl("delete", "node", node, "--wait=false", check=False)
    try:
        for name in CRD_NAMES:
            assert crd_established(cp, name), f"crds.keep=true, yet {name} is gone after helm uninstall"
        assert cp.kubectl("get", "deployment", f"{release}-operator", "-n", namespace, check=False).returncode != 0
        assert cp.kubectl("get", "clusterrole", f"{release}-agent", check=False).returncode != 0
    finally:
        delete_crds(cp)


# ------------------------------------------------------------------------------------------------------ RBAC


class Proc:
    """A `kubeflash` subcommand as a local process, its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]):
        self.name, self.log_path = name, log
        self.fh = open(log, "wb")
        self.popen = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", *args], stdout=self.fh,
                                      stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        assert self.popen.poll() is None, f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-4000:]}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.fh.close()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def test_rbac_is_enough_for_the_real_operator_and_agent(control_plane, namespace, crds_present, tmp_path):
    """The operator and the agent, authenticated as the chart's service accounts, take a job from submission to a
    running pod and through deletion, with no request refused (least privilege, but enough)."""
    cp = control_plane
    release = f"kubeflash-rbac-{uuid.uuid4().hex[:6]}"
    node = f"{namespace}-n0"
    cp.helm("install", release, str(CHART), "-n", namespace, "--set", "crds.enabled=false",
            "--set", "agent.nodeSelector.kubeflash\\.io/rbac-test=none", "--wait=false", timeout=180)
    procs: list[Proc] = []
    try:
        cp.create_fake_node(node, labels={"kubeflash.io/ssd": "true"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEFLASH_")}
        env.update(PYTHONPATH=os.pathsep.join([str(REPO / "node-agent"), str(REPO / "operator")]),
                   KUBEFLASH_OPERATOR_HEARTBEAT_TIMEOUT_S="900", KUBEFLASH_OPERATOR_BACKOFF_BASE_S="1")
        store = tmp_path / "store"
        agent_cfg = {"disks": [{"name": "nvme0", "path": str(store)}], "listen": "none", "interval": 1,
                     "probe": {"enabled": False}, "logFormat": "text",
                     "gpus": [{"index": 0, "name": "Fake GPU", "memory": "16Gi"},
                              {"index": 1, "name": "Fake GPU", "memory": "16Gi"}]}
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(agent_cfg))
        agent_kc = sa_kubeconfig(cp, namespace, f"{release}-agent", tmp_path / "agent.kubeconfig", node=node)
        operator_kc = sa_kubeconfig(cp, namespace, f"{release}-operator", tmp_path / "operator.kubeconfig")
        metrics, liveness = free_port(), free_port()
        procs.append(Proc("agent", ["agent", "-c", str(tmp_path / "agent.yaml"), "--node-name", node,
                                    "--kubeconfig", agent_kc], tmp_path / "agent.log", env))
        procs.append(Proc("operator", ["operator", "--all-namespaces", "--kubeconfig", operator_kc,
                                       f"--metrics-port={metrics}", f"--liveness-port={liveness}"],
                          tmp_path / "operator.log", env))

        def check_alive() -> None:
            for p in procs:
                p.alive()

        fn = wait_for("the agent's FlashNode with pairs", lambda: (check_alive(), cp.kubectl_json(
            "get", "flashnode", node) if cp.kubectl("get", "flashnode", node, check=False).returncode == 0 else {})[1],
            lambda f: len((f.get("status") or {}).get("pairs") or []) == 2, timeout=90)
        assert fn["metadata"]["ownerReferences"][0]["kind"] == "Node"
        labels = cp.kubectl_json("get", "node", node)["metadata"]["labels"]
        assert labels.get("kubeflash.io/gpu-ssd-pairs") == "2"
        wait_for("the operator's /healthz (the liveness probe's target)",
                 lambda: (check_alive(), http_ok(f"http://127.0.0.1:{liveness}/healthz"))[1], bool, timeout=60)

        cp.apply({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
                  "metadata": {"name": "rbac", "namespace": namespace},
                  "spec": {"model": {"uri": MODEL_URI}, "input": {"prompts": ["What is the capital of France?"]},
                           "generation": {"maxNewTokens": 4}, "resources": {"kvDisk": "64Mi"}}})
        job = wait_for("the job to be placed, staged and running", lambda: (check_alive(), cp.kubectl_json(
            "get", "ij", "rbac", "-n", namespace))[1],
            lambda j: (j.get("status") or {}).get("phase") in ("Running", "Failed"), timeout=240)
        assert job["status"]["phase"] == "Running", json.dumps(job["status"], indent=1)
        pod = cp.kubectl_json("get", "pod", job["status"]["pod"], "-n", namespace)
        assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        wait_for("the agent to make the job's directory", lambda: (store / "jobs" / namespace / "rbac").is_dir(), bool)
        assert "kubeflash_jobs" in urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        events = cp.kubectl_json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=rbac")
        assert events["items"], "the operator posted no Events"

        cp.kubectl("delete", "ij", "rbac", "-n", namespace, "--wait=false")
        wait_for("the job's pod to be gone", lambda: (check_alive(), cp.kubectl(
            "get", "pods", "-n", namespace, "-l", "kubeflash.io/job=rbac", "-o", "name").stdout)[1],
            lambda out: out.strip() == "", timeout=90)
        wait_for("the job to be gone (the operator's finalizer released)", lambda: (check_alive(), cp.kubectl(
            "get", "ij", "rbac", "-n", namespace, check=False).returncode)[1], lambda rc: rc != 0, timeout=60)
        wait_for("the agent to remove the job's directory",
                 lambda: not (store / "jobs" / namespace / "rbac").exists(), bool, timeout=60)
        for p in procs:
            refused = [line for line in p.log().splitlines() if re.search(r"\b403\b|[Ff]orbidden|RBAC needs", line)]
            assert not refused, f"{p.name} was refused:\n" + "\n".join(refused[:20])
    except AssertionError as e:
        tails = "\n".join(f"--- {p.name} log ---\n{p.log()[-6000:]}" for p in procs)
        raise AssertionError(f"{e}\n{tails}") from None
    finally:
        for p in procs:
            p.stop()
        cp.kubectl("delete", "ij", "--all", "-n", namespace, "--wait=false", check=False)
        cp.kubectl("delete", "flashnode", node, "--ignore-not-found", check=False)
        cp.kubectl("delete", "node", node, "--wait=false", check=False)
        cp.helm("uninstall", release, "-n", namespace, check=False, timeout=180)
