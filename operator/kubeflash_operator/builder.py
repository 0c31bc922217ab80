"""The inference pod of one attempt of an InferenceJob, as a plain dict (docs/contract.md, "Inference pod").

Pure: everything it needs comes in as arguments, so the manifest is unit-tested without a cluster. The pod is
pinned to the placed node by required node affinity (the native scheduler still checks GPUs and memory),
mounts its model (read-only), its job directory and its sized KV space as CSI inline volumes of the
kubeflash.io driver on the paired SSD (no hostPath), with spec.cache.prefix also the node's prefix KV cache of
its model in its namespace (when the node's agent keeps one), and runs unprivileged. With
spec.offload.tensorParallel N > 1 it holds N GPUs, mounts shard k of the model read-only at /shards/k (from the disk
the agent cut it on) and one KV volume per rank on that rank's pair disk (rank 0 at /job/kv, rank k at /ranks/k),
and names them in KUBEFLASH_SHARD_DIRS / KUBEFLASH_RANK_DIRS; with spec.offload.reduce ring, KUBEFLASH_RING_DIRS
names a ring directory inside each rank's KV volume (docs/multi-gpu.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubeflash_api import JobSpec, to_canonical
from kubeflash_api import contract as c
from kubeflash_api.names import MAX_JOB_NAME
from kubeflash_api.quantity import parse_quantity

API_VERSION = c.API_VERSION
KIND = c.JOB_KIND
JOB_LABEL = c.JOB_LABEL
GPU_RESOURCE = "nvidia.com/gpu"
ENGINE_UID = 1000
DEFAULT_IMAGE = "ghcr.io/kubeflash/kubeflash:0.1.0"
MANAGED_BY = "kubeflash-operator"  # app.kubernetes.io/managed-by on every object the operator creates
NODE_LABEL = "kubeflash.io/node"  # on an output ConfigMap: the node whose agent may write the results into it


@dataclass(frozen=True)
class PodLimits:
    """Requests and limits of the engine container besides GPUs (operator config; docs/security.md "Cluster").

    Memory: spec.resources.cpuMemory (what the engine plans its host buffers within) plus `memory_overhead` (the
    process itself: Python, torch, tokenizer) when the job sets it, else `memory`; request = limit, so a job's
    pod is never OOM-killed for another's use and never takes more than it asked for. CPU: `cpu_request` guaranteed,
    `cpu_limit` the ceiling ("" = no CPU limit). Ephemeral storage (the pod's /tmp and logs): request = limit.
    """

    cpu_request: str = "1"
    cpu_limit: str = "8"
    memory: str = "16Gi"
    memory_overhead: str = "2Gi"
    ephemeral_storage: str = "2Gi"


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
    kv_cache_budget: int = 0  # bytes of the node's prefix KV cache (NodeView.kv_cache_budget); 0: the node has none
    shard_disks: tuple[str, ...] = ()  # spec.offload.tensorParallel N > 1: the disk holding shard k, k = 0..N-1
    kv_disks: tuple[str, ...] = ()  # N > 1: rank k's KV volume on the disk of its pair (default: all on `disk`)


def pod_name(job: str, attempt: int) -> str:
    """Deterministic, so a restarted operator finds (adopts) the pod instead of making a second one."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return f"{job}-{attempt}"


def labels(job: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubeflash",
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/instance": job,
        JOB_LABEL: job,
    }


def build_pod(
    job: JobRef,
    spec: JobSpec,
    target: PodTarget,
    *,
    attempt: int,
    default_image: str = DEFAULT_IMAGE,
    device: str = "auto",
    allowed_images: tuple[str, ...] = (),
    limits: PodLimits = PodLimits(),
) -> dict[str, Any]:
    """The pod manifest for attempt `attempt` of `job` on `target`; `device` is the engine's KUBEFLASH_DEVICE.

    Raises ValueError naming spec.image when the job names an image outside `allowed_images` (image_refusal)."""
    if len(job.name) > MAX_JOB_NAME:
        raise ValueError(f"metadata.name must be at most {MAX_JOB_NAME} characters, got {len(job.name)}")
    if (why := image_refusal(spec.image, default_image, allowed_images)) is not None:
        raise ValueError(why)
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
                    "env": _env(job, spec, target, device),
                    "resources": _resources(spec, limits),
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


def image_refusal(image: str | None, default_image: str, allowed_images: tuple[str, ...]) -> str | None:
    """Why a job may not run `image` (its spec.image), or None if it may.

    The operator's own engine image is always allowed; anything else only if the cluster admin listed it
    (chart value operator.allowedImages): an entry matches exactly, or, ending in `*`, as a prefix (e.g.
    `registry.example.com/team/*`). A tag is no pin: list `repo@sha256:<digest>` to allow one exact image.
    """
    if image is None or image == default_image:
        return None
    for entry in allowed_images:
        if image == entry or (entry.endswith("*") and image.startswith(entry[:-1])):
            return None
    allowed = ", ".join((default_image, *allowed_images))
    return (f"spec.image: {image!r} is not an allowed image; the cluster admin allows {allowed} "
            f"(chart value operator.allowedImages)")


def owner_reference(job: str, uid: str) -> dict[str, Any]:
    """The controller owner reference of an object the operator creates for InferenceJob `job` (uid `uid`)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _owner(job: JobRef) -> dict[str, Any]:
    return owner_reference(job.name, job.uid)


def _pin(node: str) -> dict[str, Any]:
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _env(job: JobRef, spec: JobSpec, target: PodTarget, device: str) -> list[dict[str, str]]:
    env = {
        c.ENV_JOB_SPEC: json.dumps(to_canonical(spec), sort_keys=True, separators=(",", ":")),
        c.ENV_JOB_NAME: job.name,
        c.ENV_JOB_NAMESPACE: job.namespace,
        c.ENV_MODEL_DIR: f"/models/{target.model_id}",
        c.ENV_JOB_DIR: "/job",
        c.ENV_GPUS: ",".join(str(g) for g in target.gpus),
        c.ENV_DEVICE: device,
    }
    if target.probe:  # what spec.offload.policy auto plans with (docs/contract.md)
        env[c.ENV_PROBE] = json.dumps(dict(target.probe), sort_keys=True, separators=(",", ":"))
    if spec.input.config_map:
        env[c.ENV_INPUT_FILE] = f"/input/{spec.input.config_map.key}"
    elif spec.input.file:
        env[c.ENV_INPUT_FILE] = f"/input/{spec.input.file}"
    if spec.output.pvc:
        env[c.ENV_OUTPUT_DIR] = "/output"
    world = _world(spec)
    if world > 1:  # os.pathsep-separated, one entry per rank (engine/cli_pod.py); rank 0's own dir is the job's
        env[c.ENV_SHARD_DIRS] = ":".join(f"{SHARD_MOUNT}/{k}" for k in range(world))
        env[c.ENV_RANK_DIRS] = ":".join(["/job", *(f"{RANK_MOUNT}/{k}" for k in range(1, world))])
        if spec.offload.reduce == "ring":  # each rank's ring directory inside its own pair's KV volume
            env[c.ENV_RING_DIRS] = ":".join(ring_dirs(world))
    if _node_cache(spec, target):
        env[c.ENV_KV_CACHE_DIR] = KV_CACHE_MOUNT
        env[c.ENV_KV_CACHE_BUDGET] = str(target.kv_cache_budget)
    return [{"name": k, "value": v} for k, v in env.items()]


def _resources(spec: JobSpec, pod: PodLimits) -> dict[str, Any]:
    """GPUs from spec.resources.gpus; memory from spec.resources.cpuMemory + overhead (else the operator's default), request
    = limit; CPU and ephemeral storage from the operator's defaults (PodLimits)."""
    memory = pod.memory
    if spec.resources.cpu_memory:
        memory = str(spec.resources.cpu_memory + parse_quantity(pod.memory_overhead, path="memory_overhead"))
    gpus = str(max(spec.resources.gpus, _world(spec)))
    requests = {GPU_RESOURCE: gpus, "cpu": pod.cpu_request, "memory": memory,
                "ephemeral-storage": pod.ephemeral_storage}
    limits = {GPU_RESOURCE: gpus, "memory": memory, "ephemeral-storage": pod.ephemeral_storage}
    if pod.cpu_limit:
        limits["cpu"] = pod.cpu_limit
    return {"limits": limits, "requests": requests}


def _csi(attributes: dict[str, str], *, read_only: bool = False) -> dict[str, Any]:
    """A CSI ephemeral inline volume of the kubeflash.io driver (docs/csi.md): created with the pod, on its node."""
    return {"driver": c.CSI_DRIVER, "readOnly": read_only, "volumeAttributes": attributes}


KV_CACHE_MOUNT = "/kvcache"
SHARD_MOUNT = "/shards"  # /shards/<rank>: a tensor-parallel rank's shard store, read-only
RANK_MOUNT = "/ranks"  # /ranks/<rank>, rank >= 1: that rank's KV volume (its progress and KV files)


def ring_dirs(world: int) -> list[str]:
    """spec.offload.reduce ring: rank k's SSD-ring directory, in rank order, inside that rank's KV volume (rank 0's
    at /job/kv, rank k's at /ranks/k), so each rank's incoming messages land on its own pair's disk; the launcher
    creates them."""
    return ["/job/kv/ring", *(f"{RANK_MOUNT}/{k}/ring" for k in range(1, world))]


def _world(spec: JobSpec) -> int:
    return spec.offload.tensor_parallel


def _node_cache(spec: JobSpec, target: PodTarget) -> bool:
    """The job asks for the node's prefix KV cache and the placed node's agent keeps one."""
    return spec.cache.prefix and target.kv_cache_budget > 0


def _volumes(job: JobRef, spec: JobSpec, target: PodTarget) -> tuple[list[dict], list[dict]]:
    kv_bytes = max(spec.resources.kv_disk, c.CSI_MIN_KV)  # the driver's smallest KV volume
    volumes: list[dict[str, Any]] = [
        {"name": "model", "csi": _csi({c.CSI_MODEL_ID: target.model_id, c.CSI_DISK: target.model_disk},
                                      read_only=True)},
        {"name": "job", "csi": _csi({c.CSI_JOB: job.name, c.CSI_DISK: target.disk})},
        {"name": "kv", "csi": _csi({c.CSI_KV_SIZE: str(kv_bytes), c.CSI_DISK: target.disk})},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "model", "mountPath": f"/models/{target.model_id}", "readOnly": True},
        {"name": "job", "mountPath": "/job"},
        {"name": "kv", "mountPath": "/job/kv"},  # the engine's disk KV tier (KUBEFLASH_JOB_DIR/kv)
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    world = _world(spec)
    if world > 1:
        if len(target.shard_disks) != world:
            raise ValueError(f"spec.offload.tensorParallel {world}: the target names {len(target.shard_disks)} shard "
                             "disks, one per rank is needed")
        kv_disks = target.kv_disks or (target.disk,) * world
        volumes[2]["csi"]["volumeAttributes"][c.CSI_DISK] = kv_disks[0]  # rank 0's KV on its own pair's disk
        for k in range(world):
            volumes.append({"name": f"shard-{k}", "csi": _csi({
                c.CSI_MODEL_ID: target.model_id, c.CSI_SHARD: str(k), c.CSI_TENSOR_PARALLEL: str(world),
                c.CSI_DISK: target.shard_disks[k]}, read_only=True)})
            mounts.append({"name": f"shard-{k}", "mountPath": f"{SHARD_MOUNT}/{k}", "readOnly": True})
        for k in range(1, world):
            volumes.append({"name": f"kv-{k}", "csi": _csi({c.CSI_KV_SIZE: str(kv_bytes), c.CSI_DISK: kv_disks[k]})})
            mounts.append({"name": f"kv-{k}", "mountPath": f"{RANK_MOUNT}/{k}"})
    if _node_cache(spec, target):  # this namespace's blocks of this model, on the pair's disk (docs/prefix-cache.md)
        volumes.append({"name": "kvcache", "csi": _csi({c.CSI_KV_CACHE: target.model_id, c.CSI_DISK: target.disk})})
        mounts.append({"name": "kvcache", "mountPath": KV_CACHE_MOUNT})
    if spec.input.config_map:
        cm = spec.input.config_map
        volumes.append({"name": "input", "configMap": {"name": cm.name, "items": [{"key": cm.key, "path": cm.key}]}})
        mounts.append({"name": "input", "mountPath": "/input", "readOnly": True})
    elif spec.input.pvc:
        volumes.append({"name": "input", "persistentVolumeClaim": {"claimName": spec.input.pvc, "readOnly": True}})
        mounts.append({"name": "input", "mountPath": "/input", "readOnly": True})
    if spec.output.pvc:
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": spec.output.pvc}})
        mounts.append({"name": "output", "mountPath": "/output"})
    return volumes, mounts
