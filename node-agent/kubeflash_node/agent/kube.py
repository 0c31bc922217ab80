"""The cluster side: FlashNode spec/status, node labels, job pods and InferenceJob status, via the
kubernetes client (status subresource, JSON merge patches). Thin: every decision is made elsewhere."""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import AgentConfig, ConfigError, JobWant, ModelWant, parse_model
from .devices import Disk
from .models import Problem
from .pods import JOB_LABEL, job_from_pod, quota_of
from .sides import JobState

log = logging.getLogger(__name__)
GROUP, VERSION = "kubeflash.io", "v1alpha1"
MERGE = "application/merge-patch+json"
TIMEOUT = 15


class KubeSide:
    def __init__(self, cfg: AgentConfig, disks: tuple[Disk, ...]):
        from kubernetes import client, config as kconfig

        self.cfg, self.disks, self.node = cfg, disks, cfg.node_name
        if cfg.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            api = kconfig.new_client_from_config(config_file=cfg.kubeconfig or None)
        else:
            conf = client.Configuration()
            kconfig.load_incluster_config(client_configuration=conf)
            api = client.ApiClient(conf)
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.ApiException = client.exceptions.ApiException
        self._job_cache: dict[str, dict | None] = {}

    # -------------------------------------------------------------------------------------- FlashNode

    def start(self) -> None:
        self.ensure_flashnode()

    def ensure_flashnode(self) -> dict:
        try:
            return self.custom.get_cluster_custom_object(GROUP, VERSION, "flashnodes", self.node, _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status != 404:
                raise
        body: dict[str, Any] = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FlashNode",
                                "metadata": {"name": self.node, "labels": {"app.kubernetes.io/name": "kubeflash"}},
                                "spec": {"nodeName": self.node}}
        owner = self._node_owner()
        if owner:
            body["metadata"]["ownerReferences"] = [owner]
        log.info("creating FlashNode", extra={"node": self.node})
        try:
            return self.custom.create_cluster_custom_object(GROUP, VERSION, "flashnodes", body, _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status != 409:  # created meanwhile (by the operator)
                raise
            return self.custom.get_cluster_custom_object(GROUP, VERSION, "flashnodes", self.node, _request_timeout=TIMEOUT)

    def _node_owner(self) -> dict | None:
        """The Node owns its FlashNode, so deleting the node garbage-collects it."""
        try:
            node = self.core.read_node(self.node, _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status == 404:
                log.warning("no Node object with this agent's node name", extra={"node": self.node})
                return None
            raise
        return {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node.metadata.uid}

    def desired_models(self) -> tuple[list[ModelWant], list[Problem]]:
        fn = self.ensure_flashnode()
        wanted, problems = [], []
        for i, raw in enumerate((fn.get("spec") or {}).get("models") or []):
            try:
                wanted.append(parse_model(raw, f"spec.models[{i}]"))
            except ConfigError as e:
                raw = raw if isinstance(raw, dict) else {}
                problems.append(Problem(str(raw.get("id") or f"spec.models[{i}]"), str(raw.get("uri", "")), str(e)))
        return wanted, problems

    def publish(self, status: dict[str, Any]) -> None:
        body = {"status": status}
        try:
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, "flashnodes", self.node, body,
                                                           _content_type=MERGE, _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status != 404:
                raise
            self.ensure_flashnode()  # deleted under us: make it again
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, "flashnodes", self.node, body,
                                                           _content_type=MERGE, _request_timeout=TIMEOUT)

    def set_labels(self, labels: dict[str, str | None]) -> None:
        try:
            self.core.patch_node(self.node, {"metadata": {"labels": labels}}, _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status != 404:
                raise
            log.warning("cannot label the node: no Node object", extra={"node": self.node})

    # ------------------------------------------------------------------------------------------- jobs

    def job_pods(self) -> list[JobWant]:
        self._job_cache = {}
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}",
                                                     label_selector=JOB_LABEL, _request_timeout=TIMEOUT)
        out = []
        for pod in pods.items:
            job = job_from_pod(self.api.sanitize_for_serialization(pod), self.disks)
            if job is not None:
                out.append(job)
        return out

    def job_state(self, key: str) -> JobState:
        ns, name = key.split("/", 1)
        if key not in self._job_cache:
            try:
                self._job_cache[key] = self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, ns, "inferencejobs", name, _request_timeout=TIMEOUT)
            except self.ApiException as e:
                if e.status != 404:
                    log.warning("cannot read InferenceJob", extra={"job": key, "status": e.status})
                    return JobState(None)
                self._job_cache[key] = None
        job = self._job_cache[key]
        if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
            return JobState(False)
        return JobState(True, quota_of(job, self.cfg.default_job_quota))

    def relay(self, key: str, patch: dict[str, Any]) -> None:
        ns, name = key.split("/", 1)
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "inferencejobs", name,
                                                              {"status": patch}, _content_type=MERGE,
                                                              _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status != 404:
                raise
