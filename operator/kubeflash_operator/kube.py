"""The few Kubernetes API calls the operator makes besides kopf's own: pods and FlashNode desired models.

Every call is idempotent: creating a pod that exists adopts it (when it belongs to the same job), deleting a
missing pod is a no-op, adding a model that is already desired changes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubeflash_operator.bookkeeping import CLAIMS_ANNOTATION
from kubeflash_operator.builder import JOB_LABEL

GROUP, VERSION = "kubeflash.io", "v1alpha1"
POOL_SIZE = 32  # HTTP connections kept to the API server (the operator's API threads share them)
log = logging.getLogger(__name__)


def load_config() -> None:
    """In-cluster service account if there is one, else $KUBECONFIG / ~/.kube/config (as the client defaults).

    The client library reads $KUBECONFIG once, when imported; it is read again here, because the CLI's
    --kubeconfig (and a test harness) set it later.
    """
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)


def connection_info() -> dict[str, Any]:
    """kopf.ConnectionInfo arguments from the client library's configuration (exec/auth plugins included)."""
    load_config()
    c = client.Configuration.get_default_copy()
    header = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return {
        "server": c.host, "ca_path": c.ssl_ca_cert, "insecure": not c.verify_ssl,
        "username": c.username or None, "password": c.password or None,
        "scheme": scheme or None, "token": token or None,
        "certificate_path": c.cert_file, "private_key_path": c.key_file,
    }


class Conflict(Exception):
    """A transient clash (a pod of an older job with the same name, a concurrent FlashNode write)."""


class Gone(Exception):
    """The object to write no longer exists."""


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    def connect(cls, pool_size: int = POOL_SIZE) -> Kube:
        load_config()
        conf = client.Configuration.get_default_copy()
        conf.connection_pool_maxsize = pool_size  # one kept-alive connection per API thread, no TLS per call
        return cls(client.ApiClient(conf))

    # -------------------------------------------------------------------------------------------- pods

    def create_pod(self, manifest: Mapping[str, Any], *, owner_uid: str) -> dict[str, Any]:
        """Create the pod, or adopt the one of that name if it is ours; raises Conflict if it is another job's."""
        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            return self._dict(self.core.create_namespaced_pod(ns, manifest))
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self.read_pod(ns, name)
        if existing is None:
            raise Conflict(f"pod {ns}/{name} exists and vanished; will retry")
        owners = [o.get("uid") for o in existing["metadata"].get("ownerReferences") or []]
        if owner_uid not in owners:
            self.delete_pod(ns, name)
            raise Conflict(f"pod {ns}/{name} belongs to an older job of the same name; deleting it first")
        if existing["spec"].get("affinity") != manifest["spec"].get("affinity"):  # another decision's pod
            raise Conflict(f"pod {ns}/{name} exists, pinned elsewhere than this decision; deciding again")
        return existing

    def patch_job_status(self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]) -> None:
        """Merge `status` into the job's status only if the job is still at `resource_version` (Conflict if not:
        something newer happened, e.g. another replica's decision, and this one is void)."""
        patch = {"metadata": {"resourceVersion": resource_version}, "status": dict(status)}
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "inferencejobs", name, patch)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"InferenceJob {namespace}/{name} changed since resourceVersion {resource_version}") from e
            if e.status == 404:
                raise Gone(f"InferenceJob {namespace}/{name} is gone") from e
            raise

    def unchanged_version(self, namespace: str, name: str, status: Mapping[str, Any], generation: int | None
                          ) -> str | None:
        """The job's current resourceVersion if its status and generation are still `status`/`generation` (only
        metadata such as finalizers changed since), else None."""
        try:
            body = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferencejobs", name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        meta = body.get("metadata") or {}
        if (body.get("status") or {}) != dict(status) or meta.get("generation") != generation:
            return None
        return meta.get("resourceVersion")

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(self.core.read_namespaced_pod(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_job_pods(self, namespace: str, job: str) -> list[str]:
        """Delete every pod of the job (one list, one delete per pod not already terminating); returns the names
        that were there (the caller waits for the watch to show them gone)."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={job}").items
        for pod in pods:
            if pod.metadata.deletion_timestamp is None:
                self.delete_pod(namespace, pod.metadata.name)
        return [p.metadata.name for p in pods]

    # -------------------------------------------------------------------------------------- FlashNodes

    def request_model(self, node: str, entry: Mapping[str, str]) -> bool:
        """Add `entry` to FlashNode(node).spec.models unless its id is there; True if it was added."""
        body = self.custom.get_cluster_custom_object(GROUP, VERSION, "flashnodes", node)
        models = list((body.get("spec") or {}).get("models") or [])
        if any(m.get("id") == entry["id"] for m in models):
            return False
        models.append({k: v for k, v in entry.items() if v})
        patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "spec": {"models": models}}
        try:
            self.custom.patch_cluster_custom_object(GROUP, VERSION, "flashnodes", node, patch)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"FlashNode {node} changed while adding model {entry['id']}; will retry") from e
            raise
        log.info("requested model %s on FlashNode %s", entry["id"], node)
        return True

    def read_flashnode(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_cluster_custom_object(GROUP, VERSION, "flashnodes", name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def write_ledger(self, name: str, resource_version: str, annotation: str) -> dict[str, Any]:
        """Set FlashNode(name)'s claims ledger only if the object is still at `resource_version`.

        Raises Conflict (409: someone wrote the FlashNode since; read it again and re-decide) or Gone (404).
        Returns the FlashNode as written (its new resourceVersion is the next write's precondition).
        """
        patch = {"metadata": {"resourceVersion": resource_version, "annotations": {CLAIMS_ANNOTATION: annotation}}}
        try:
            return self.custom.patch_cluster_custom_object(GROUP, VERSION, "flashnodes", name, patch)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"FlashNode {name} changed since resourceVersion {resource_version}") from e
            if e.status == 404:
                raise Gone(f"FlashNode {name} is gone") from e
            raise

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)
