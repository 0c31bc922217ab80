"""The cluster side: FlashNode spec/status and its job ledger, node labels, InferenceJob status relay, results
copied into the output ConfigMap the operator created for the job, via the kubernetes client (status
subresource, JSON merge patches). Thin: every decision is made elsewhere.

What this agent may read is its own FlashNode and its Node: it learns the jobs on its node from the ledger the
operator keeps on the FlashNode (kubeflash_api/ledger.py), never by reading pods or InferenceJobs (the chart's
ClusterRole grants neither). What it may write is bounded by the chart (ClusterRole + ValidatingAdmissionPolicy
on its token's node claim): its own Node's kubeflash.io/* labels, its own FlashNode, the status of jobs placed
on its node, and the data of an output ConfigMap the operator created for such a job. It creates no ConfigMap."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from kubeflash_api.ledger import PlacedJob, placed_jobs

from .config import AgentConfig, ConfigError, JobWant, ModelWant, parse_model
from .devices import Disk
from .models import Problem
from .pods import job_from_ledger
from .safefs import Unsafe
from .sides import JobState

log = logging.getLogger(__name__)
GROUP, VERSION = "kubeflash.io", "v1alpha1"
MERGE = "application/merge-patch+json"
TIMEOUT = 15
CONFIGMAP_LIMIT = 1000 << 10  # a ConfigMap holds at most 1 MiB in all
RESULTS_SHA = "kubeflash.io/results-sha256"


class KubeSide:
    def __init__(self, cfg: AgentConfig, disks: tuple[Disk, ...]):
        from kubernetes import client
        from kubernetes import config as kconfig

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
        self._fn: dict | None = None  # the FlashNode desired_models() read this pass, for job_pods()
        self._placed: dict[str, PlacedJob] | None = None  # the job ledger as the last job_pods() read it
        self._exported: dict[str, str] = {}  # ns/name -> sha256 of the results copied
        self._refused: dict[str, int] = {}  # ns/name -> HTTP status of the last refused ConfigMap write

    # -------------------------------------------------------------------------------------- FlashNode

    def start(self) -> None:
        self.ensure_flashnode()

    def ensure_flashnode(self) -> dict:
        try:
            return self._get_flashnode()
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
            return self.custom.create_cluster_custom_object(GROUP, VERSION, "flashnodes", body,
                                                            _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status != 409:  # created meanwhile (by the operator)
                raise
            return self._get_flashnode()

    def _get_flashnode(self) -> dict:
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
        fn = self._fn = self.ensure_flashnode()
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
        """Jobs placed on this node now: the live claims of the job ledger the operator keeps on this FlashNode.

        The agent reads no pod and no InferenceJob (its RBAC has no such read): the ledger carries all it needs
        (kubeflash_api/ledger.py). Read once per pass, with the FlashNode desired_models() just read when it did."""
        fn, self._fn = self._fn or self.ensure_flashnode(), None
        self._placed = placed_jobs((fn.get("metadata") or {}).get("annotations"))
        return [j for p in self._placed.values()
                if (j := job_from_ledger(p, self.disks, default_quota=self.cfg.default_job_quota,
                                         uid=self.cfg.job_uid, gid=self.cfg.job_gid))]

    def job_state(self, key: str) -> JobState:
        """A job exists here while the ledger lists it (placed now, or its attempt here ended and it is not
        deleted); None before the first job_pods() of this agent (nothing is removed on a guess)."""
        if self._placed is None:
            return JobState(None)
        job = self._placed.get(key)
        if job is None:
            return JobState(False)
        return JobState(True, job.kv or self.cfg.default_job_quota)

    def relay(self, key: str, patch: dict[str, Any]) -> None:
        ns, name = key.split("/", 1)
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "inferencejobs", name,
                                                              {"status": patch}, _content_type=MERGE,
                                                              _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status != 404:
                raise

    def export_results(self, key: str, job_dir: Path, read) -> None:
        """spec.output.configMap: once the job has ended, copy results.jsonl into that ConfigMap, which the operator
        created (owned by the job) before the pod (the pod has no API token to do it). Too large for a ConfigMap:
        an `error` key says so instead."""
        job = (self._placed or {}).get(key)
        target = job.output if job is not None and job.terminal else ""
        if not target:
            return
        try:
            data = read(CONFIGMAP_LIMIT)
        except FileNotFoundError:
            return
        except Unsafe as e:  # a link planted by the pod, a FIFO, or too large: its bytes are never read
            data = None
            why = (f"results.jsonl is {e.size} bytes, over what a ConfigMap holds ({CONFIGMAP_LIMIT}); use "
                   f"spec.output.pvc, or read it on the node at {job_dir}") if e.size is not None else \
                f"results.jsonl refused: {e.why}"
        digest = hashlib.sha256(data if data is not None else why.encode()).hexdigest()
        if self._exported.get(key) == digest:
            return
        ns = key.split("/", 1)[0]
        if data is not None:
            body_data = {"results.jsonl": data.decode(errors="replace"), "error": None}
        else:
            body_data = {"results.jsonl": None, "error": why}
        meta = {"annotations": {RESULTS_SHA: digest}}
        try:
            self.core.patch_namespaced_config_map(target, ns, {"metadata": meta, "data": body_data},
                                                  _request_timeout=TIMEOUT)
        except self.ApiException as e:
            if e.status not in (403, 404):
                raise
            # 404: the operator creates the ConfigMap (owned by the job) before the pod; 403: the chart's policy lets
            # this agent write only a ConfigMap the operator created for a job on this node
            if self._refused.get(key) != e.status:  # once per job and answer, not every pass
                log.warning("cannot write the output ConfigMap (only one the operator created for this job on this "
                            "node)", extra={"job": key, "configMap": target, "status": e.status})
            self._refused[key] = e.status
            return  # tried again next pass
        log.info("results copied into the output ConfigMap", extra={"configMap": f"{ns}/{target}"})
        self._exported[key] = digest
