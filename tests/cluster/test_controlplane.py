"""The test control plane itself works: every component does its job.

These are the ground the operator's cluster tests stand on: if one of them fails,
look at the component logs under ControlPlane.workdir/logs first.
"""

from __future__ import annotations

import json
import time

import pytest


def _poll(fn, timeout: float = 60, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def test_apiserver_answers_kubectl(control_plane):
    """kubectl, using only the written kubeconfig (token + CA data), reaches a ready API server
    of the version we built."""
    out = control_plane.kubectl("version", "-o", "json").stdout
    server = json.loads(out)["serverVersion"]
    assert server["major"] == "1" and server["gitVersion"].startswith("v1.34.")
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    # The token really is the admin (system:masters) identity.
    assert control_plane.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"


def test_deployment_gets_scheduled_and_running_on_fake_node(control_plane, namespace):
    """A Deployment created with kubectl gets a ReplicaSet and a Pod (controller-manager), the
    Pod is bound to a KWOK fake GPU node (scheduler) and reaches phase Running (kwok)."""
    node = "kwok-gpu-0"
    created = control_plane.create_fake_node(node, labels={"kubeflash.io/test": namespace})
    assert created["status"]["allocatable"]["nvidia.com/gpu"] == "4"

    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "nodeSelector": {"kubeflash.io/test": namespace},
                    "containers": [{
                        "name": "web",
                        "image": "registry.k8s.io/pause:3.10",
                        "resources": {"limits": {"nvidia.com/gpu": "1"}},
                    }],
                },
            },
        },
    }
    control_plane.apply(deployment)

    rs = _poll(lambda: control_plane.kubectl_json("get", "replicasets", "-n", namespace, "-l", "app=web")["items"],
               what="a ReplicaSet for the Deployment")
    assert rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"

    def running_pod():
        pods = control_plane.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"]
        return [p for p in pods if p["status"].get("phase") == "Running"]

    pods = _poll(running_pod, timeout=90, what="a Running pod")
    pod = pods[0]
    assert pod["spec"]["nodeName"] == node
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    assert pod["status"].get("podIP")
    _poll(lambda: control_plane.kubectl_json("get", "deployment", "web", "-n", namespace)["status"]
          .get("availableReplicas") == 1, what="the Deployment to become available")


def test_python_client_lists_nodes(control_plane, k8s_api):
    """The official Python client accepts the kubeconfig (verifies TLS with the embedded CA)."""
    from kubernetes import client

    control_plane.create_fake_node("kwok-list-0")
    names = [n.metadata.name for n in client.CoreV1Api(k8s_api).list_node().items]
    assert "kwok-list-0" in names


def test_kopf_accepts_kubeconfig(control_plane, monkeypatch):
    """Both of kopf's out-of-cluster logins (its own kubeconfig reader and the one via the
    kubernetes client library) get the server, the token and the CA from the kubeconfig."""
    import logging

    kopf = pytest.importorskip("kopf")
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    settings = kopf.OperatorSettings()
    info = kopf.login_with_kubeconfig(settings=settings)
    assert info.server == control_plane.server
    assert info.token == control_plane.token
    assert info.ca_data and not info.insecure

    # The client library reads $KUBECONFIG once, at import time; point it at ours and
    # restore its process-wide default Configuration afterwards.
    kube_config = pytest.importorskip("kubernetes.config.kube_config")
    from kubernetes import client

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(control_plane.kubeconfig))
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)
    info = kopf.login_via_client(settings=settings, logger=logging.getLogger("kopf-test"))
    assert info.server == control_plane.server
    assert info.token == control_plane.token
    assert (info.ca_path or info.ca_data) and not info.insecure


def test_helm_runs_against_cluster(control_plane):
    """The cached helm binary runs and can talk to the cluster with the kubeconfig."""
    version = control_plane.helm("version", "--short").stdout.strip()
    assert version.startswith("v3.")
    assert control_plane.helm("list", "--all-namespaces", "-o", "json").stdout.strip() == "[]"
