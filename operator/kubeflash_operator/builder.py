"""The inference pod of one attempt of an InferenceJob, as a plain dict (docs/contract.md, "Inference pod").

Pure: everything it needs comes in as arguments, so the manifest is unit-tested without a cluster. The pod is
pinned to the placed node by required node affinity (the native scheduler still checks GPUs and memory),
mounts the node's model store read-only and the job's directory on the paired SSD, and runs unprivileged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubeflash_operator.spec import MAX_NAME, JobSpec

API_VERSION = "kubeflash.io/v1alpha1"
KIND = "InferenceJob"
JOB_LABEL = "kubeflash.io/job"
GPU_RESOURCE = "nvidia.com/gpu"
ENGINE_UID = 1000
DEFAULT_IMAGE = "ghcr.io/kubeflash/kubeflash:0.1.0"


@dataclass(frozen=True)
class JobRef:
    """The identity of the owning InferenceJob."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class PodTarget:
    """Where the attempt runs: the placed node, its GPUs, and the store roots on its disks."""

    node: str
    gpus: tuple[int, ...]
    disk: str  # the pair's disk (job directory, KV cache)
    disk_path: str
    model_id: str
    model_disk: str  # the disk holding the staged model (the pair's disk unless staged elsewhere)
    model_disk_path: str
    probe: tuple[tuple[str, float], ...] = ()  # the agent's measured bandwidths (NodeView.probe) for the engine


def pod_name(job: str, attempt: int) -> str:
    """Deterministic, so a restarted operator finds (adopts) the pod instead of making a second one."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return f"{job}-{attempt}"


def labels(job: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubeflash",
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/managed-by": "kubeflash-operator",
        "app.kubernetes.io/instance": job,
        JOB_LABEL: job,
    }


def build_pod(
    job: JobRef,
    spec: JobSpec,
    raw_spec: Mapping[str, Any],
    target: PodTarget,
    *,
    attempt: int,
    default_image: str = DEFAULT_IMAGE,
    device: str = "auto",
) -> dict[str, Any]:
    """The pod manifest for attempt `attempt` of `job` on `target`; `device` is the engine's KUBEFLASH_DEVICE."""
    if len(job.name) > MAX_NAME:
        raise ValueError(f"metadata.name must be at most {MAX_NAME} characters, got {len(job.name)}")
    volumes, mounts = _volumes(job, spec, target)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job.name, attempt),
            "namespace": job.namespace,
            "labels": labels(job.name),
            "annotations": {
                "kubeflash.io/attempt": str(attempt),
                "kubeflash.io/gpus": ",".join(str(g) for g in target.gpus),
                "kubeflash.io/disk": target.disk,
                "kubeflash.io/model-id": target.model_id,
            },
            "ownerReferences": [_owner(job)],
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "affinity": _pin(target.node),
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": ENGINE_UID,
                "runAsGroup": ENGINE_UID,
                "fsGroup": ENGINE_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "engine",
                    "image": spec.image or default_image,
                    "command": ["kubeflash", "engine"],
                    "env": _env(job, raw_spec, target, device),
                    "resources": _resources(spec),
                    "volumeMounts": mounts,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True,
                        "runAsUser": ENGINE_UID,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
            "volumes": volumes,
        },
    }


def _owner(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _pin(node: str) -> dict[str, Any]:
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _env(job: JobRef, raw_spec: Mapping[str, Any], target: PodTarget, device: str) -> list[dict[str, str]]:
    env = {
        "KUBEFLASH_JOB_SPEC": json.dumps(raw_spec, sort_keys=True, separators=(",", ":")),
        "KUBEFLASH_JOB_NAME": job.name,
        "KUBEFLASH_JOB_NAMESPACE": job.namespace,
        "KUBEFLASH_MODEL_DIR": f"/models/{target.model_id}",
        "KUBEFLASH_JOB_DIR": "/job",
        "KUBEFLASH_GPUS": ",".join(str(g) for g in target.gpus),
        "KUBEFLASH_DEVICE": device,
    }
    if target.probe:  # what spec.offload.policy auto plans with (docs/contract.md)
        env["KUBEFLASH_PROBE"] = json.dumps(dict(target.probe), sort_keys=True, separators=(",", ":"))
    if (raw_spec.get("input") or {}).get("configMap") or (raw_spec.get("input") or {}).get("file"):
        env["KUBEFLASH_INPUT_FILE"] = _input_file(raw_spec["input"])
    output = raw_spec.get("output") or {}
    if output.get("pvc"):
        sub = (output["pvc"].get("path") or "").strip("/")
        env["KUBEFLASH_OUTPUT_DIR"] = f"/output/{sub}" if sub else "/output"
    return [{"name": k, "value": v} for k, v in env.items()]


def _input_file(raw_input: Mapping[str, Any]) -> str:
    if raw_input.get("configMap"):
        return f"/input/{raw_input['configMap']['key']}"
    return f"/input/{raw_input['file'].lstrip('/')}"


def _resources(spec: JobSpec) -> dict[str, Any]:
    limits: dict[str, Any] = {GPU_RESOURCE: str(spec.resources.gpus)}
    requests: dict[str, Any] = dict(limits)
    if spec.resources.cpu_memory_quantity:
        requests["memory"] = spec.resources.cpu_memory_quantity
    return {"limits": limits, "requests": requests}


def _volumes(job: JobRef, spec: JobSpec, target: PodTarget) -> tuple[list[dict], list[dict]]:
    root, model_root = target.disk_path.rstrip("/"), target.model_disk_path.rstrip("/")
    volumes: list[dict[str, Any]] = [
        {"name": "models", "hostPath": {"path": f"{model_root}/models", "type": "Directory"}},
        {"name": "job", "hostPath": {"path": f"{root}/jobs/{job.namespace}/{job.name}", "type": "DirectoryOrCreate"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": "/models", "readOnly": True},
        {"name": "job", "mountPath": "/job"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.input.config_map:
        cm = spec.input.config_map
        volumes.append({"name": "input", "configMap": {"name": cm.name, "items": [{"key": cm.key, "path": cm.key}]}})
        mounts.append({"name": "input", "mountPath": "/input", "readOnly": True})
    elif spec.input.pvc:
        volumes.append({"name": "input", "persistentVolumeClaim": {"claimName": spec.input.pvc, "readOnly": True}})
        mounts.append({"name": "input", "mountPath": "/input", "readOnly": True})
    if spec.output and spec.output.pvc:
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": spec.output.pvc}})
        mounts.append({"name": "output", "mountPath": "/output"})
    return volumes, mounts
